//! The vhost-user-blk export end to end: two real daemons, a 2-replica
//! volume attached with `--vhost-user`, and a real vhost-user frontend (the
//! `vhost` crate's `Frontend`) driving one virtqueue laid out by hand in
//! memfd-backed guest memory, as a VMM would. No QEMU.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::vhost_guest::*;
use common::*;
use kiln_store::proto::{Request, Response};
use std::os::fd::AsRawFd;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const VOL_SIZE: u64 = 8 * MIB;
const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 16;

// Guest-physical layout of the test's queue and buffers.
const RING: Ring = Ring {
    size: QSIZE,
    desc: 0x0,
    avail: 0x1000,
    used: 0x2000,
};
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const SEGS: u64 = 0x3200;
const DATA: u64 = 0x10_0000;

const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_BLK_SIZE: u64 = 1 << 6;
const F_SEG_MAX: u64 = 1 << 2;

const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_UNSUPP: u8 = 2;
/// Written into the status byte before each request, to see whether the
/// device wrote it.
const UNTOUCHED: u8 = 0xAA;

const F_INDIRECT: u16 = 4;

/// A descriptor as the test lays it out: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct D(u64, u32, bool);

/// A VMM stand-in: guest RAM in a memfd shared with the backend, one split
/// virtqueue, kick and call eventfds.
struct Guest {
    mem: GuestMemoryMmap,
    frontend: Frontend,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_idx: u16,
    event_idx: bool,
    features: u64,
}

impl Guest {
    /// Connects and sets the device up as a VMM does at boot.
    fn connect(sock: &Path, event_idx: bool) -> Guest {
        Self::connect_with(sock, event_idx, 0, VhostUserProtocolFeatures::empty())
    }

    /// [`Guest::connect`], also requiring the virtio features `extra` and
    /// asking for the protocol features `protocol`.
    fn connect_with(
        sock: &Path,
        event_idx: bool,
        extra: u64,
        protocol: VhostUserProtocolFeatures,
    ) -> Guest {
        let mem = memfd_memory(MEM_SIZE);
        let mut required = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | F_FLUSH
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_BLK_SIZE
            | F_SEG_MAX
            | extra;
        if event_idx {
            required |= VIRTIO_RING_F_EVENT_IDX;
        }
        let mut n = connect_frontend(
            sock,
            1,
            required,
            0,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | protocol,
            &mem,
        );
        assert!(
            n.offered & VIRTIO_RING_F_EVENT_IDX != 0,
            "EVENT_IDX not offered: {:#x}",
            n.offered
        );
        assert!(
            n.protocol.contains(VhostUserProtocolFeatures::CONFIG),
            "{:?}",
            n.protocol
        );
        let Vring { kick, call, .. } = Vring::setup(&mut n.frontend, &mem, 0, RING);
        Guest {
            mem,
            frontend: n.frontend,
            kick,
            call,
            avail_idx: 0,
            used_idx: 0,
            event_idx,
            features: n.features,
        }
    }

    fn capacity(&mut self) -> u64 {
        let (_, cfg) = self
            .frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
        u64::from_le_bytes(cfg[0..8].try_into().unwrap())
    }

    /// Places a chain at descriptor 0.., makes it available, kicks, and
    /// waits for it on the used ring. Returns the used length.
    fn submit(&mut self, chain: &[D]) -> u32 {
        for (i, d) in chain.iter().enumerate() {
            let mut flags = if d.2 { F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= F_NEXT;
            }
            self.write_desc(i as u16, d.0, d.1, flags, (i + 1) as u16);
        }
        self.publish(0)
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        RING.write_desc(&self.mem, i, addr, len, flags, next);
    }

    /// Puts `head` on the avail ring, kicks, waits for the used entry.
    fn publish(&mut self, head: u16) -> u32 {
        RING.put_avail(&self.mem, self.avail_idx, head);
        if self.event_idx {
            // used_event: interrupt me once this request is used.
            RING.set_used_event(&self.mem, self.used_idx);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        RING.publish(&self.mem, self.avail_idx);
        self.kick.write(1).unwrap();
        let t = Instant::now();
        loop {
            if self.call.read().is_ok() && RING.used_idx(&self.mem) != self.used_idx {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no used-ring interrupt for request {}",
                self.avail_idx
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let used = RING.used_idx(&self.mem);
        assert_eq!(
            used,
            self.used_idx.wrapping_add(1),
            "one request, one used entry"
        );
        let (id, len) = RING.used_elem(&self.mem, self.used_idx);
        assert_eq!(id, u32::from(head));
        self.used_idx = used;
        len
    }

    fn header(&self, kind: u32, sector: u64) {
        write_header(&self.mem, HDR, kind, sector);
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A request with the usual layout: header, data, status.
    fn request(&mut self, kind: u32, sector: u64, data: &[D]) -> (u8, u32) {
        self.header(kind, sector);
        let mut chain = vec![D(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push(D(STATUS, 1, true));
        let len = self.submit(&chain);
        (self.status(), len)
    }

    /// Writes `data` at `sector`, splitting the buffer into `pieces` descriptors.
    fn write(&mut self, sector: u64, data: &[u8], pieces: usize) -> u8 {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let (status, _) = self.request(T_OUT, sector, &split(data.len(), pieces, false));
        status
    }

    fn read(&mut self, sector: u64, len: usize, pieces: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0x55u8; len], GuestAddress(DATA))
            .unwrap();
        let (status, used) = self.request(T_IN, sector, &split(len, pieces, true));
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        if status == S_OK {
            assert_eq!(used as usize, len + 1, "used length of a read");
        }
        (status, buf)
    }

    /// A discard or write-zeroes request with one segment.
    fn ranged(&mut self, kind: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        self.mem.write_obj(sector, GuestAddress(SEGS)).unwrap();
        self.mem.write_obj(sectors, GuestAddress(SEGS + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(SEGS + 12)).unwrap();
        self.request(kind, 0, &[D(SEGS, 16, false)]).0
    }
}

/// `len` bytes at DATA as `pieces` descriptors.
fn split(len: usize, pieces: usize, write: bool) -> Vec<D> {
    let step = len.div_ceil(pieces);
    (0..len)
        .step_by(step)
        .map(|off| D(DATA + off as u64, step.min(len - off) as u32, write))
        .collect()
}

fn two_nodes(base: &Path) -> (Node, Node) {
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vmdisk", "8M", &[&n1, &n2]);
    (n1, n2)
}

fn export(n: &Node, vol: &str, dir: &Path) -> PathBuf {
    let sock = dir.join(format!("{vol}.vhost.sock"));
    let out = n.cli_ok(&["attach", vol, "--vhost-user", sock.to_str().unwrap()]);
    assert!(out.contains("vhost-user-blk"), "{out}");
    // The guest's disk and its library relay: the owner's only.
    for p in [
        sock.clone(),
        PathBuf::from(format!("{}.lib", sock.display())),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
    sock
}

#[test]
fn write_read_flush_and_replicas() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2) = two_nodes(t.path());
    let sock = export(&n1, "vmdisk", t.path());
    let mut g = Guest::connect(&sock, false);
    assert_eq!(g.capacity(), VOL_SIZE / 512);

    // Write 64 KiB at sector 8 (4 KiB) in 2 descriptors, read it back in 3.
    let data = pattern(7, 64 << 10);
    assert_eq!(g.write(8, &data, 2), S_OK);
    let (st, back) = g.read(8, data.len(), 3);
    assert_eq!(st, S_OK);
    assert!(back == data, "read back differs from what was written");
    assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
    // Both replicas hold it (each replica's local copy, no writer involved).
    for n in [&n1, &n2] {
        let r = n.replica_read("vmdisk", 4096, data.len() as u64);
        assert!(r.bad_blocks.is_empty());
        assert!(r.data == data, "replica on {} differs", n.id);
    }

    // GET_ID: the volume name, zero padded to 20 bytes.
    g.mem
        .write_slice(&[0xFFu8; 20], GuestAddress(DATA))
        .unwrap();
    let (st, used) = g.request(T_GET_ID, 0, &[D(DATA, 20, true)]);
    assert_eq!((st, used), (S_OK, 21));
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"vmdisk");
    assert!(id[6..].iter().all(|b| *b == 0));

    // Write zeroes and discard read back as zeros.
    assert_eq!(g.ranged(T_WRITE_ZEROES, 8, 8, 0), S_OK);
    assert_eq!(g.ranged(T_DISCARD, 16, 8, 0), S_OK);
    let (st, back) = g.read(8, 16 << 10, 1);
    assert_eq!(st, S_OK);
    assert!(
        back[..8192].iter().all(|b| *b == 0),
        "zeroed range not zero"
    );
    assert!(
        back[8192..] == data[8192..16 << 10],
        "data past the zeroed range changed"
    );
    // A request larger than the store's 4 MiB I/O unit, not 4 KiB aligned
    // (read-modify-write inside the store), in 7 descriptors.
    let big = pattern(8, (5 << 20) + 512);
    assert_eq!(g.write(2049, &big, 7), S_OK);
    let (st, back) = g.read(2049, big.len(), 5);
    assert_eq!(st, S_OK);
    assert!(back == big, "large request read back differs");
    assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
    for n in [&n1, &n2] {
        let all = n.replica_read_all("vmdisk", VOL_SIZE);
        let at = 2049 * 512;
        assert!(
            all[at..at + big.len()] == big[..],
            "replica on {} differs",
            n.id
        );
    }
    // The daemon's control socket still answers while the export runs.
    assert!(n1.status("vmdisk").attached);
}

/// A live migration's dirty log (`VHOST_F_LOG_ALL`, `SET_LOG_BASE` with a
/// memfd): every guest page the daemon writes is marked, and only those.
#[test]
fn a_migrations_dirty_log_gets_every_page_the_daemon_writes() {
    const LOG_ALL: u64 = 1 << 26;
    let t = tempfile::tempdir().unwrap();
    let (n1, _n2) = two_nodes(t.path());
    let sock = export(&n1, "vmdisk", t.path());
    let mut g = Guest::connect_with(&sock, false, LOG_ALL, VhostUserProtocolFeatures::LOG_SHMFD);
    // One bit per 4 KiB page of the 8 MiB of guest RAM: 256 bytes.
    let log = memfd_memory(4096);
    let region = log.find_region(GuestAddress(0)).unwrap();
    let fd = region.file_offset().unwrap().file().as_raw_fd();
    g.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 4096,
                mmap_offset: 0,
                mmap_handle: fd,
            }),
        )
        .unwrap();
    let take = || {
        let mut bits = [0u8; 256];
        log.read_slice(&mut bits, GuestAddress(0)).unwrap();
        log.write_slice(&[0u8; 256], GuestAddress(0)).unwrap();
        (0..2048u64)
            .filter(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect::<Vec<u64>>()
    };
    let page = |gpa: u64| gpa / 4096;
    // A write: the daemon only reads the data; it writes the status byte
    // and the used ring.
    let data = pattern(3, 16 << 10);
    assert_eq!(g.write(8, &data, 2), S_OK);
    assert_eq!(take(), vec![page(RING.used), page(STATUS)]);
    // A read: the data lands in the guest's 4 pages.
    let (st, back) = g.read(8, data.len(), 3);
    assert_eq!(st, S_OK);
    assert!(back == data);
    let mut want = vec![page(RING.used), page(STATUS)];
    want.extend(page(DATA)..page(DATA) + 4);
    assert_eq!(take(), want);
}

#[test]
fn hostile_requests_get_errors_and_the_daemon_keeps_serving() {
    let t = tempfile::tempdir().unwrap();
    let (n1, _n2) = two_nodes(t.path());
    let sock = export(&n1, "vmdisk", t.path());
    let mut g = Guest::connect(&sock, false);
    let sectors = VOL_SIZE / 512;
    let data = pattern(3, 8192);
    assert_eq!(g.write(0, &data, 1), S_OK);

    // Reads beyond capacity, straddling the end, and with overflowing sectors.
    assert_eq!(g.read(sectors, 4096, 1).0, S_IOERR);
    assert_eq!(g.read(sectors - 4, 4096, 1).0, S_IOERR);
    assert_eq!(g.read(u64::MAX / 256, 4096, 1).0, S_IOERR);
    assert_eq!(g.write(u64::MAX, &data, 1), S_IOERR);
    // Data not a multiple of 512 bytes.
    assert_eq!(g.read(0, 1000, 1).0, S_IOERR);
    // Unknown request type; discard with the (write-zeroes only) unmap flag.
    assert_eq!(g.request(99, 0, &[]).0, S_UNSUPP);
    assert_eq!(g.ranged(T_DISCARD, 0, 8, 1), S_UNSUPP);
    assert_eq!(g.ranged(T_WRITE_ZEROES, sectors, 8, 0), S_IOERR);
    // Discard with a truncated segment list.
    assert_eq!(g.request(T_DISCARD, 0, &[D(SEGS, 10, false)]).0, S_IOERR);
    // Data buffer outside guest memory.
    let far = D(1 << 40, 4096, true);
    g.header(T_IN, 0);
    g.submit(&[D(HDR, 16, false), far, D(STATUS, 1, true)]);
    assert_eq!(g.status(), S_IOERR);
    // Header too short.
    g.header(T_IN, 0);
    g.submit(&[D(HDR, 8, false), D(STATUS, 1, true)]);
    assert_eq!(g.status(), S_IOERR);
    // Device-readable descriptor after a device-writable one.
    g.header(T_IN, 0);
    g.submit(&[D(HDR, 16, false), D(STATUS, 1, true), D(DATA, 512, false)]);
    assert_eq!(g.status(), S_IOERR);
    // No status descriptor at all: returned with nothing written.
    g.header(T_FLUSH, 0);
    assert_eq!(g.submit(&[D(HDR, 16, false)]), 0);
    assert_eq!(g.status(), UNTOUCHED);
    // Status descriptor device-readable: nothing may be written to it.
    g.header(T_FLUSH, 0);
    assert_eq!(g.submit(&[D(HDR, 16, false), D(STATUS, 1, false)]), 0);
    assert_eq!(g.status(), UNTOUCHED);
    // Status byte outside guest memory.
    g.header(T_FLUSH, 0);
    assert_eq!(g.submit(&[D(HDR, 16, false), D(1 << 40, 1, true)]), 0);
    // A descriptor loop: the chain is cut at the queue size, no status.
    g.header(T_IN, 0);
    g.write_desc(0, HDR, 16, F_NEXT, 1);
    g.write_desc(1, DATA, 512, F_NEXT | F_WRITE, 1);
    assert_eq!(g.publish(0), 0);
    // Out-of-range next index.
    g.write_desc(0, HDR, 16, F_NEXT, 999);
    assert_eq!(g.publish(0), 0);

    // A valid indirect table: header, data, status.
    let table = 0x4000u64;
    for (i, (addr, len, flags)) in [
        (HDR, 16u32, F_NEXT),
        (DATA, 4096, F_NEXT | F_WRITE),
        (STATUS, 1, F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let at = GuestAddress(table + 16 * i as u64);
        g.mem.write_obj(addr, at).unwrap();
        g.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        g.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        g.mem.write_obj(i as u16 + 1, at.unchecked_add(14)).unwrap();
    }
    g.header(T_IN, 0);
    g.write_desc(0, table, 48, F_INDIRECT, 0);
    assert_eq!(g.publish(0), 4097);
    assert_eq!(g.status(), S_OK);
    let mut first = vec![0u8; 4096];
    g.mem.read_slice(&mut first, GuestAddress(DATA)).unwrap();
    assert!(first == data[..4096], "indirect read returned wrong data");
    // An indirect table that itself points to an indirect table.
    g.mem
        .write_obj(F_INDIRECT, GuestAddress(table + 12))
        .unwrap();
    g.header(T_IN, 0);
    g.write_desc(0, table, 48, F_INDIRECT, 0);
    assert_eq!(g.publish(0), 0);
    assert_eq!(g.status(), UNTOUCHED);

    // Still serving: the data is intact and new requests work.
    let (st, back) = g.read(0, data.len(), 2);
    assert_eq!(st, S_OK);
    assert!(back == data, "data changed by hostile requests");
    assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
    assert!(n1.status("vmdisk").attached);
    let log = n1.log();
    assert!(
        log.contains("vhost-user-blk: request failed"),
        "no log line:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn reconnect_fencing_and_detach() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2) = two_nodes(t.path());
    let sock = export(&n1, "vmdisk", t.path());
    let data = pattern(11, 16 << 10);
    {
        let mut g = Guest::connect(&sock, false);
        assert_eq!(g.write(64, &data, 4), S_OK);
        assert_eq!(g.features & VIRTIO_RING_F_EVENT_IDX, 0);
        // The VM "exits": the frontend drops its connection.
    }
    // A restarted VM connects to the same socket, this time with EVENT_IDX,
    // and sees the data; several requests in a row exercise the used_event
    // suppression.
    let mut g = Guest::connect(&sock, true);
    assert_eq!(g.capacity(), VOL_SIZE / 512);
    for _ in 0..(QSIZE as usize * 2 + 3) {
        let (st, back) = g.read(64, data.len(), 2);
        assert_eq!(st, S_OK);
        assert!(back == data, "data lost across reconnect");
    }
    drop(g);

    // Another node attaches the volume: n1's writer is fenced, and its
    // export answers I/O with IOERR (and logs it) instead of writing.
    let mut g = Guest::connect(&sock, true);
    n2.cli_ok(&["attach", "vmdisk"]);
    assert_eq!(g.write(64, &pattern(12, 4096), 1), S_IOERR);
    assert_eq!(g.read(64, 4096, 1).0, S_IOERR);
    let r = n2.replica_read("vmdisk", 64 * 512, data.len() as u64);
    assert!(r.data == data, "a fenced writer's export changed the data");
    let log = n1.log();
    assert!(
        log.lines()
            .any(|l| l.contains("vhost-user-blk: request failed") && l.contains("fenced")),
        "no log line for the fenced write:\n{log}"
    );

    // Detach stops the export: the frontend is cut off and the socket is gone.
    n1.cli_ok(&["detach", "vmdisk"]);
    assert!(!sock.exists(), "socket still there after detach");
    assert!(
        g.frontend.get_features().is_err(),
        "frontend still connected after detach"
    );
    assert!(Frontend::connect(&sock, 1).is_err());
    // The daemon itself is fine.
    match n1.call(Request::VolList).unwrap() {
        Response::Volumes(_) => {}
        r => panic!("unexpected {r:?}"),
    }
}

#[test]
fn export_needs_an_attached_volume_and_a_free_socket() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2) = two_nodes(t.path());
    // n2 holds a replica but is not the writer.
    let o = n2.cli(&[
        "attach",
        "nosuch",
        "--vhost-user",
        t.path().join("x.sock").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = n2.call(Request::VolExportVhost {
        name: "vmdisk".into(),
        socket: t.path().join("y.sock").display().to_string(),
    });
    assert!(e.is_err(), "export of a volume not attached here: {e:?}");
    // A path that is not a socket is never replaced.
    let file = t.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let e = n1.call(Request::VolExportVhost {
        name: "vmdisk".into(),
        socket: file.display().to_string(),
    });
    assert!(e.is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // The daemon's own control socket cannot be taken over.
    let e = n1.call(Request::VolExportVhost {
        name: "vmdisk".into(),
        socket: n1.socket.display().to_string(),
    });
    assert!(e.is_err());
    assert!(n1.status("vmdisk").attached, "control socket broken");
    // A refused re-export leaves the running export alone; exporting again
    // on the same socket, as it is, keeps it.
    let sock = export(&n1, "vmdisk", t.path());
    let e = n1.call(Request::VolExportVhost {
        name: "vmdisk".into(),
        socket: n1.socket.display().to_string(),
    });
    assert!(e.is_err());
    let mut g = Guest::connect(&sock, false);
    assert_eq!(g.capacity(), VOL_SIZE / 512);
    drop(g);
    let sock2 = export(&n1, "vmdisk", t.path());
    assert_eq!(sock, sock2);
    let mut g = Guest::connect(&sock, false);
    assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
    // With a frontend connected (a kiln-vmm whose VM another kiln-vmm on
    // this node is taking over), exporting again as it is leaves that
    // frontend's connection alone.
    let sock3 = export(&n1, "vmdisk", t.path());
    assert_eq!(sock, sock3);
    assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
}

#[test]
fn an_attach_whose_export_fails_is_undone() {
    let t = tempfile::tempdir().unwrap();
    let (n1, _n2) = two_nodes(t.path());
    n1.cli_ok(&["detach", "vmdisk"]);
    assert!(!n1.status("vmdisk").attached);
    // Refused before the attach: no directory for the socket, a socket
    // another server listens on, a file that is not a socket.
    let nodir = t.path().join("nosuch/disk.sock");
    let busy = t.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let file = t.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    for (sock, why) in [
        (&nodir, "no directory"),
        (&busy, "in use"),
        (&file, "not a socket"),
    ] {
        let o = n1.cli(&["attach", "vmdisk", "--vhost-user", sock.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: {err}", sock.display());
        assert!(err.contains(why), "{}: {err}", sock.display());
        assert!(
            !n1.status("vmdisk").attached,
            "left attached after {}: {err}",
            sock.display()
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // An export that fails only when it binds (a path too long for a unix
    // socket) undoes the attach too.
    let long = t.path().join("l".repeat(120));
    std::fs::create_dir(&long).unwrap();
    check_undone(&n1, &long.join("disk.sock"));
    // An attach that was there before stays when the export is refused.
    n1.cli_ok(&["attach", "vmdisk"]);
    let epoch = n1.status("vmdisk").epoch;
    let o = n1.cli(&["attach", "vmdisk", "--vhost-user", busy.to_str().unwrap()]);
    assert!(!o.status.success());
    let st = n1.status("vmdisk");
    assert!(st.attached && st.epoch == epoch, "{st:?}");
    // And the same request with a good socket serves the volume.
    n1.cli_ok(&["detach", "vmdisk"]);
    let sock = export(&n1, "vmdisk", t.path());
    let mut g = Guest::connect(&sock, false);
    assert_eq!(g.capacity(), VOL_SIZE / 512);
}

/// Attaching with an export on `sock` fails, and leaves the volume detached.
fn check_undone(n: &Node, sock: &Path) {
    let o = n.cli(&["attach", "vmdisk", "--vhost-user", sock.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}: exported", sock.display());
    assert!(!n.status("vmdisk").attached, "left attached: {err}");
    assert!(
        n.log()
            .contains("export failed: detaching the volume again"),
        "{err}"
    );
}

#[test]
fn an_encrypted_volume_served_to_a_guest() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    let n2 = Node::new(t.path(), "n2", 1);
    let key = kiln_store::crypt::VolumeKey::random().unwrap();
    let kf = t.path().join("key");
    std::fs::write(&kf, key.expose()).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (r1, r2) = (n1.replica_arg(), n2.replica_arg());
    let kfs = kf.to_str().unwrap();
    n1.cli_ok(&[
        "create",
        "vmdisk",
        "--size",
        "8M",
        "--replica",
        &r1,
        "--replica",
        &r2,
        "--key-file",
        kfs,
    ]);
    let sock = t.path().join("enc.vhost.sock");
    let socks = sock.to_str().unwrap();
    n1.cli_ok(&["attach", "vmdisk", "--key-file", kfs, "--vhost-user", socks]);
    let data = pattern(21, 64 << 10);
    let small = pattern(22, 1024);
    {
        let mut g = Guest::connect(&sock, false);
        assert_eq!(g.write(8, &data, 2), S_OK);
        // 1 KiB at sector 1: inside a 4 KiB block, read-modify-written.
        assert_eq!(g.write(1, &small, 1), S_OK);
        assert_eq!(g.request(T_FLUSH, 0, &[]).0, S_OK);
        let (st, back) = g.read(8, data.len(), 3);
        assert_eq!(st, S_OK);
        assert!(back == data, "read back differs");
        let (st, back) = g.read(0, 4096, 1);
        assert_eq!(st, S_OK);
        assert!(back[512..1536] == small[..] && back[..512].iter().all(|b| *b == 0));
        // Zeroed and discarded ranges read as zeros, encrypted or not.
        assert_eq!(g.ranged(T_WRITE_ZEROES, 8, 8, 0), S_OK);
        assert_eq!(g.ranged(T_DISCARD, 16, 8, 0), S_OK);
        let (st, back) = g.read(8, 16 << 10, 1);
        assert_eq!(st, S_OK);
        assert!(back[..8192].iter().all(|b| *b == 0));
        assert!(back[8192..] == data[8192..16 << 10]);
    }
    // The replicas hold ciphertext only.
    for n in [&n1, &n2] {
        let r = n.replica_read("vmdisk", 4096 * 4, 48 << 10);
        assert!(r.bad_blocks.is_empty());
        assert!(
            r.data[..] != data[12 << 10..60 << 10],
            "plaintext on {}",
            n.id
        );
    }
    // Detached and attached again with the key, the guest sees its data.
    n1.cli_ok(&["detach", "vmdisk"]);
    let o = n1.cli(&["attach", "vmdisk", "--vhost-user", socks]);
    assert!(!o.status.success(), "attached without its key");
    n1.cli_ok(&["attach", "vmdisk", "--key-file", kfs, "--vhost-user", socks]);
    let mut g = Guest::connect(&sock, false);
    let (st, back) = g.read(24, 32 << 10, 2);
    assert_eq!(st, S_OK);
    assert!(
        back[..] == data[8 << 10..40 << 10],
        "data lost across re-attach"
    );
}
