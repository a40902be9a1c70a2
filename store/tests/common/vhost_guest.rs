//! A vhost-user-blk frontend harness for the vhost tests: the `vhost`
//! crate's real `Frontend` over memfd-backed guest memory, split
//! virtqueues laid out by hand, as a VMM would. No QEMU.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// `size` bytes of guest RAM at guest address 0 in a memfd, shareable with
/// the backend.
pub fn memfd_memory(size: usize) -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd
    // is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"kiln-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// What a frontend agreed with the backend.
pub struct Negotiated {
    pub frontend: Frontend,
    /// The virtio features offered by the backend.
    pub offered: u64,
    /// The virtio features set: all of `required`, what was offered of
    /// `optional`.
    pub features: u64,
    /// The protocol features the backend offered (before masking).
    pub protocol: VhostUserProtocolFeatures,
}

/// Connects to `sock` for `queues` queues, takes ownership and negotiates
/// features as a VMM does at boot: every `required` feature must be
/// offered; the protocol features set are the offered ones in `protocol`
/// (with MQ among them, the backend must have `queues` queues). Then hands the backend `mem` (one region) as the memory table.
pub fn connect_frontend(
    sock: &Path,
    queues: u64,
    required: u64,
    optional: u64,
    protocol: VhostUserProtocolFeatures,
    mem: &GuestMemoryMmap,
) -> Negotiated {
    let mut frontend = Frontend::connect(sock, queues).unwrap();
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert_eq!(
        offered & required,
        required,
        "features {:#x} not offered: {offered:#x}",
        required & !offered
    );
    let features = required | (optional & offered);
    frontend.set_features(features).unwrap();
    let proto = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(proto & protocol).unwrap();
    if (proto & protocol).contains(VhostUserProtocolFeatures::MQ) {
        assert!(frontend.get_queue_num().unwrap() >= queues);
    }
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    frontend.set_mem_table(&[info]).unwrap();
    Negotiated {
        frontend,
        offered,
        features,
        protocol: proto,
    }
}

/// Where one split virtqueue lives in guest memory (guest-physical).
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// Writes descriptor `i` of the table.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Puts `head` in the avail ring at position `idx` (not published).
    pub fn put_avail(&self, mem: &GuestMemoryMmap, idx: u16, head: u16) {
        let slot = u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
    }

    /// Sets used_event (VIRTIO_RING_F_EVENT_IDX): interrupt once the used
    /// index passes `used`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, used: u16) {
        mem.write_obj(
            used,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
        )
        .unwrap();
    }

    /// Makes the entries before `idx` available (after a fence).
    pub fn publish(&self, mem: &GuestMemoryMmap, idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entry at position `idx`: (head, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, idx: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(idx % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// One vring of the frontend: its place, its kick and call eventfds.
pub struct Vring {
    pub index: usize,
    pub config: VringConfigData,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Vring {
    /// Sets vring `index` up at `ring` (guest memory mapped at `mem`) and
    /// enables it.
    pub fn setup(
        frontend: &mut Frontend,
        mem: &GuestMemoryMmap,
        index: usize,
        ring: Ring,
    ) -> Vring {
        let host = mem.find_region(GuestAddress(0)).unwrap().as_ptr() as u64;
        let v = Vring {
            index,
            config: VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host + ring.desc,
                avail_ring_addr: host + ring.avail,
                used_ring_addr: host + ring.used,
                log_addr: None,
            },
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        frontend.set_vring_num(index, ring.size).unwrap();
        v.start(frontend, 0);
        frontend.set_vring_enable(index, true).unwrap();
        v
    }

    /// (Re)starts the ring at avail index `base`, as a restoring VMM does.
    pub fn start(&self, frontend: &Frontend, base: u16) {
        frontend.set_vring_base(self.index, base).unwrap();
        frontend.set_vring_addr(self.index, &self.config).unwrap();
        frontend.set_vring_call(self.index, &self.call).unwrap();
        frontend.set_vring_kick(self.index, &self.kick).unwrap();
    }
}

/// A virtio-blk request header at `hdr`: type, reserved, sector.
pub fn write_header(mem: &GuestMemoryMmap, hdr: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
}
