//! Pause, snapshot, restore and resume of a transport around a real
//! virtio-blk disk (real files, the default engine: io_uring where the
//! host has it), the guest played by writing its rings in memory.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use crate::rate_limiter::RateLimit;
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::mmio::tests::{negotiate, r32, w32};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::state::{DeviceSnapshot, NetSnapshot, RestoreError, TransportSnapshot};

const MEM: usize = 0x40_0000;
const QSIZE: u16 = 64;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDRS: u64 = 0x1_0000;
const STATUSES: u64 = 0x2_0000;
const BUFS: u64 = 0x10_0000;
/// Bytes per write request.
const LEN: u32 = 0x4000;
const IMG_LEN: usize = 1 << 20;
const FULL_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

fn image(len: usize) -> TempFile {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(&vec![0u8; len]).unwrap();
    f
}

fn disk(path: &std::path::Path) -> Block {
    Block::new(BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        direct: false,
        id: None,
        rate_limit: RateLimit {
            bytes_per_sec: Some(1 << 30),
            ops_per_sec: None,
        },
        queues: 1,
    })
    .unwrap()
}

fn transport(mem: &GuestMemoryMmap, block: Block) -> (MmioTransport, EventFd) {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem.clone(), Box::new(block), irq.try_clone().unwrap())
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    (t, irq)
}

/// What a driver does: features, one queue of QSIZE at DESC/AVAIL/USED.
fn bring_up(t: &mut MmioTransport) {
    negotiate(t, 0, 1);
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
    w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w32(t, VIRTIO_MMIO_STATUS, FULL_DRIVER);
    assert!(t.is_active());
}

/// Request `n`: a write of LEN bytes of `n + 1` at sector `n * 32`, its
/// chain at descriptors 3(n % 21).., made available (not kicked).
fn post_write(m: &GuestMemoryMmap, n: u64) {
    let (hdr, buf, status) = (HDRS + 16 * n, BUFS + u64::from(LEN) * n, STATUSES + n);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..].copy_from_slice(&(n * 32).to_le_bytes());
    m.write_slice(&h, GuestAddress(hdr)).unwrap();
    m.write_slice(&vec![n as u8 + 1; LEN as usize], GuestAddress(buf))
        .unwrap();
    m.write_obj(0xaau8, GuestAddress(status)).unwrap();
    let descs = [
        (hdr, 16, VRING_DESC_F_NEXT as u16),
        (buf, LEN, VRING_DESC_F_NEXT as u16),
        (status, 1, VRING_DESC_F_WRITE as u16),
    ];
    post_chain(m, (DESC, AVAIL, QSIZE), (n % 21) as u16 * 3, &descs);
}

/// Lays out `descs` (addr, len, flags; NEXT is the caller's) from
/// descriptor `first` of the ring at (desc, avail, size) and makes the
/// chain available.
fn post_chain(m: &GuestMemoryMmap, ring: (u64, u64, u16), first: u16, descs: &[(u64, u32, u16)]) {
    let (desc, avail, size) = ring;
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let at = GuestAddress(desc + 16 * u64::from(first + i as u16));
        m.write_obj(addr, at).unwrap();
        m.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        m.write_obj(first + i as u16 + 1, GuestAddress(at.0 + 14))
            .unwrap();
    }
    let idx: u16 = m.read_obj(GuestAddress(avail + 2)).unwrap();
    m.write_obj(first, GuestAddress(avail + 4 + 2 * u64::from(idx % size)))
        .unwrap();
    m.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
        .unwrap();
}

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// The used ring's heads, in order.
fn used_heads(m: &GuestMemoryMmap) -> Vec<u16> {
    (0..used_idx(m))
        .map(|i| {
            let id: u32 = m
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i % QSIZE)))
                .unwrap();
            id as u16
        })
        .collect()
}

fn wait_used(m: &GuestMemoryMmap, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while used_idx(m) != n {
        assert!(
            Instant::now() < deadline,
            "used index {} != {n}",
            used_idx(m)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn on_disk(img: &std::fs::File, n: u64) -> Vec<u8> {
    let mut got = vec![0u8; LEN as usize];
    img.read_exact_at(&mut got, n * 32 * 512).unwrap();
    got
}

/// A copy of guest memory, as a restore maps it from the memory file.
fn copy_memory(m: &GuestMemoryMmap) -> GuestMemoryMmap {
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut buf = vec![0u8; MEM];
    m.read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

/// 16 writes are kicked and the transport paused at once: every request
/// the device took is completed (none is half done), the rest wait on the
/// ring; the queue's indexes agree with the used ring. Requests made while
/// paused wait. The snapshot goes through JSON into a new transport and
/// disk, on copies of the memory and the image: the device serves what
/// waited and the guest's next requests, the used index going on. The
/// paused source resumes and serves too.
#[test]
fn a_paused_disk_restores_into_a_new_transport_and_resumes() {
    let img = image(IMG_LEN);
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let (mut t, _irq) = transport(&m, disk(img.as_path()));
    bring_up(&mut t);
    assert!(t.snapshot().is_err(), "a running device cannot be saved");
    for n in 0..16 {
        post_write(&m, n);
    }
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    t.pause().unwrap();
    assert!(t.is_paused() && t.is_active());
    let done = used_idx(&m);
    let heads = used_heads(&m);
    let mut sorted = heads.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), heads.len(), "no request completed twice");
    for n in 0..16u64 {
        let head = (n % 21) as u16 * 3;
        let status: u8 = m.read_obj(GuestAddress(STATUSES + n)).unwrap();
        if heads.contains(&head) {
            assert_eq!(status, VIRTIO_BLK_S_OK as u8, "request {n}");
            assert!(on_disk(img.as_file(), n).iter().all(|&b| b == n as u8 + 1));
        } else {
            assert_eq!(status, 0xaa, "request {n} was not taken");
        }
    }
    // Nothing moves while paused, even with more requests and a kick
    // (the guest's last, just before its vCPUs were paused).
    for n in 16..20 {
        post_write(&m, n);
    }
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(used_idx(&m), done);

    let snap = t.snapshot().unwrap();
    assert!(snap.active);
    assert_eq!(snap.status, FULL_DRIVER);
    assert_eq!(snap.queues[0].next_avail, done, "taken == completed");
    assert_eq!(snap.queues[0].next_used, done);
    assert_eq!(snap.queues[0].size, QSIZE);
    let DeviceSnapshot::Block(b) = &snap.device else {
        panic!("{:?}", snap.device)
    };
    assert_eq!(b.capacity_sectors, (IMG_LEN / 512) as u64);
    assert!(b.rate_limiter.is_some());
    let json = serde_json::to_string(&snap).unwrap();
    let back: TransportSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    // The restored VM: copies of memory and image, a new disk and transport.
    let img2 = image(0);
    std::fs::copy(img.as_path(), img2.as_path()).unwrap();
    let m2 = copy_memory(&m);
    let (mut t2, _irq2) = transport(&m2, disk(img2.as_path()));
    t2.restore(&back).unwrap();
    // Restored paused: nothing is served until the machine starts.
    assert!(t2.is_active() && t2.is_paused());
    t2.resume().unwrap();
    assert!(t2.is_active() && !t2.is_paused());
    assert_eq!(r32(&mut t2, VIRTIO_MMIO_STATUS), FULL_DRIVER);
    // What was left on the ring is served without a kick (activation runs
    // the queue), then new requests after a kick.
    wait_used(&m2, 20);
    for n in 20..24 {
        post_write(&m2, n);
    }
    w32(&mut t2, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    wait_used(&m2, 24);
    for n in 0..24u64 {
        let status: u8 = m2.read_obj(GuestAddress(STATUSES + n)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8, "request {n}");
        assert!(on_disk(img2.as_file(), n).iter().all(|&b| b == n as u8 + 1));
    }
    assert!(
        on_disk(img.as_file(), 21).iter().all(|&b| b == 0),
        "the copy took them"
    );
    assert_eq!(used_heads(&m2)[..usize::from(done)], heads[..], "kept");

    // The source goes on where it paused.
    t.resume().unwrap();
    assert!(!t.is_paused());
    wait_used(&m, 20);
    post_write(&m, 20);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    wait_used(&m, 21);
    for n in 16..21u64 {
        assert!(on_disk(img.as_file(), n).iter().all(|&b| b == n as u8 + 1));
    }
    // A reset after all this stops it as usual.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
}

/// A saved state for a transport like `transport(&m, disk(..))`'s.
fn saved_state(m: &GuestMemoryMmap) -> TransportSnapshot {
    let img = image(IMG_LEN);
    let (mut t, _irq) = transport(m, disk(img.as_path()));
    bring_up(&mut t);
    t.pause().unwrap();
    let s = t.snapshot().unwrap();
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    s
}

/// States that do not fit are refused with clear errors and leave the new
/// transport untouched; the genuine state is then accepted.
#[test]
fn tampered_or_mismatched_states_are_refused() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let good = saved_state(&m);
    let img = image(IMG_LEN);
    let (mut t, _irq) = transport(&m, disk(img.as_path()));

    let mut s = good.clone();
    s.queues[0].desc_table = MEM as u64 - 0x10;
    let e = t.restore(&s).unwrap_err();
    assert!(
        matches!(e, RestoreError::InvalidQueue { index: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("outside guest memory"), "{e}");

    let mut s = good.clone();
    s.queues[0].size = 3;
    assert!(matches!(
        t.restore(&s),
        Err(RestoreError::InvalidQueue { index: 0, .. })
    ));
    let mut s = good.clone();
    s.queues[0].max_size = 1024;
    assert!(matches!(
        t.restore(&s),
        Err(RestoreError::InvalidQueue { index: 0, .. })
    ));

    let mut s = good.clone();
    s.device = DeviceSnapshot::Net(NetSnapshot {
        avail_features: 0,
        mac: [2, 0, 0, 0, 0, 1],
    });
    let e = t.restore(&s).unwrap_err();
    assert!(matches!(e, RestoreError::WrongKind { .. }), "{e}");
    assert!(e.to_string().contains("virtio-net"), "{e}");

    let mut s = good.clone();
    s.device_type = 1;
    assert!(matches!(t.restore(&s), Err(RestoreError::WrongKind { .. })));

    let mut s = good.clone();
    s.queues.push(s.queues[0]);
    assert!(matches!(
        t.restore(&s),
        Err(RestoreError::QueueCount { saved: 2, here: 1 })
    ));

    let mut s = good.clone();
    s.acked_features |= 1 << 40;
    assert!(matches!(t.restore(&s), Err(RestoreError::Features { .. })));

    let mut s = good.clone();
    s.status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    assert!(matches!(t.restore(&s), Err(RestoreError::Invalid(_))));

    // Another disk size: refused, naming the disk.
    let small = image(IMG_LEN / 2);
    let (mut t_small, _irq) = transport(&m, disk(small.as_path()));
    let e = t_small.restore(&good).unwrap_err();
    assert!(
        matches!(
            e,
            RestoreError::Capacity {
                saved: 2048,
                here: 1024,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&small.as_path().display().to_string()),
        "{e}"
    );
    assert!(!t_small.is_active());

    // None of it touched `t`.
    assert!(!t.is_active());
    assert_eq!(t.status(), 0);
    t.restore(&good).unwrap();
    assert!(t.is_active());
    // A transport in use is not restored over.
    assert!(matches!(t.restore(&good), Err(RestoreError::InUse)));
}

/// A device that was never activated (the guest had not probed it yet)
/// restores as it was: registers only, no activation; the driver then
/// brings it up as usual.
#[test]
fn an_inactive_device_restores_without_activation() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let img = image(IMG_LEN);
    let (mut t, _irq) = transport(&m, disk(img.as_path()));
    w32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    let snap = t.snapshot().unwrap();
    assert!(!snap.active);
    let (mut t2, _irq2) = transport(&m, disk(img.as_path()));
    t2.restore(&snap).unwrap();
    assert!(!t2.is_active());
    assert_eq!(t2.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w32(&mut t2, VIRTIO_MMIO_STATUS, 0);
    bring_up(&mut t2);
}

/// Pending interrupt causes and the config generation survive, and the
/// restored transport pulses its irqfd for the pending ones.
#[test]
fn interrupt_state_is_restored_and_raised_again() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let img = image(IMG_LEN);
    let (mut t, _irq) = transport(&m, disk(img.as_path()));
    bring_up(&mut t);
    t.interrupt().signal_config_change().unwrap();
    t.interrupt().signal_used_queue().unwrap();
    t.pause().unwrap();
    let snap = t.snapshot().unwrap();
    assert_eq!(snap.interrupt.status, 3);
    assert_eq!(snap.interrupt.config_generation, 1);
    let (mut t2, irq2) = transport(&m, disk(img.as_path()));
    t2.restore(&snap).unwrap();
    assert_eq!(r32(&mut t2, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    assert_eq!(r32(&mut t2, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(irq2.read().unwrap(), 1);
}

/// The network device's ring `i`: (desc, avail, used) at 0x4_0000 + 16 KiB i.
fn net_ring(i: u64) -> (u64, u64, u64) {
    let base = 0x4_0000 + 0x4000 * i;
    (base, base + 0x1000, base + 0x2000)
}

/// An ANNOUNCE_ACK command on the control queue, the `n`th (its header at
/// 0x8_0000 + 16n, its ack byte at 0x9_0000 + n), made available.
fn post_announce_ack(m: &GuestMemoryMmap, n: u64) {
    let (desc, avail, _) = net_ring(2);
    m.write_slice(&[3, 0], GuestAddress(0x8_0000 + 16 * n))
        .unwrap();
    m.write_obj(0xffu8, GuestAddress(0x9_0000 + n)).unwrap();
    let chain = [
        (0x8_0000 + 16 * n, 2, VRING_DESC_F_NEXT as u16),
        (0x9_0000 + n, 1, VRING_DESC_F_WRITE as u16),
    ];
    post_chain(m, (desc, avail, 16), (n % 8) as u16 * 2, &chain);
}

fn net_used_idx(m: &GuestMemoryMmap, i: u64) -> u16 {
    m.read_obj(GuestAddress(net_ring(i).2 + 2)).unwrap()
}

fn wait_net_used(m: &GuestMemoryMmap, i: u64, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while net_used_idx(m, i) != n {
        assert!(
            Instant::now() < deadline,
            "used index {} != {n}",
            net_used_idx(m, i)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn net_device(tap: &str, mac: Option<[u8; 6]>) -> crate::virtio::net::Net {
    crate::virtio::net::Net::new(crate::virtio::net::NetConfig {
        tap: tap.into(),
        mac,
        rate_limit: RateLimit::default(),
    })
    .unwrap()
}

/// A virtio-net device with its control queue, on a real TAP: a command is
/// served, the device paused (its worker stops, the queues come back with
/// their indexes), resumed (another command served), paused and saved;
/// a new device on the same TAP, with another MAC, restores it: the guest
/// keeps its MAC and the control queue goes on from there.
#[test]
fn a_network_device_pauses_resumes_and_restores() {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE};
    let Some(tap) = crate::virtio::net::tap::tests::TestTap::create("kt-snap") else {
        return;
    };
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut t = MmioTransport::new(m.clone(), Box::new(net_device(&tap.0, Some(mac))), irq)
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    let features = (1u32 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
    negotiate(&mut t, features, 1);
    for i in 0..3u64 {
        let (desc, avail, used) = net_ring(i);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w32(&mut t, VIRTIO_MMIO_STATUS, FULL_DRIVER);
    assert!(t.is_active());
    post_announce_ack(&m, 0);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    wait_net_used(&m, 2, 1);

    t.pause().unwrap();
    let first = t.snapshot().unwrap();
    assert_eq!(first.queues[2].next_avail, 1);
    assert_eq!(first.queues[2].next_used, 1);
    t.resume().unwrap();
    post_announce_ack(&m, 1);
    w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    wait_net_used(&m, 2, 2);

    t.pause().unwrap();
    let snap: TransportSnapshot =
        serde_json::from_str(&serde_json::to_string(&t.snapshot().unwrap()).unwrap()).unwrap();
    assert_eq!(snap.queues[2].next_avail, 2);
    let DeviceSnapshot::Net(saved) = &snap.device else {
        panic!("{:?}", snap.device)
    };
    assert_eq!(saved.mac, mac);
    let m2 = copy_memory(&m);
    drop(t);

    let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t2 = MmioTransport::new(m2.clone(), Box::new(net_device(&tap.0, None)), irq2)
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    t2.restore(&snap).unwrap();
    assert!(t2.is_active() && t2.is_paused());
    t2.resume().unwrap();
    let mut got = [0u8; 6];
    crate::bus::BusDevice::read(&mut t2, 0x100, &mut got);
    assert_eq!(got, mac, "the guest keeps its MAC");
    post_announce_ack(&m2, 2);
    w32(&mut t2, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    wait_net_used(&m2, 2, 3);
    let ack: u8 = m2.read_obj(GuestAddress(0x9_0000 + 2)).unwrap();
    assert_eq!(ack, 0, "VIRTIO_NET_OK");
    // A block device's state does not fit.
    drop(t2);
    let irq3 = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t3 = MmioTransport::new(m2.clone(), Box::new(net_device(&tap.0, None)), irq3).unwrap();
    let mut wrong = snap.clone();
    wrong.device = DeviceSnapshot::Block(crate::virtio::state::BlockSnapshot {
        avail_features: 0,
        read_only: false,
        capacity_sectors: 8,
        queues: 1,
        rate_limiter: None,
    });
    assert!(matches!(
        t3.restore(&wrong),
        Err(RestoreError::WrongKind { .. })
    ));
}
