//! The queue worker and its [`QueueServer`] against real files, with each
//! engine: none (synchronous), io_uring, the thread pool.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::engine::{self, EngineKind, EngineSlot};
use super::io::Disk;
use super::raw::RawFile;
use super::request::RequestLimits;
use super::worker::{BlockWorker, QueueContext};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::worker::EventSetPoller;
use kiln_block::request::test_utils::{desc, mem, write_header, DATA, HDR, STATUS, W};

mod dirty;
mod engines;
mod multiqueue;

/// Where the tests put the used ring.
const USED: u64 = 0x8000;

/// The engines every rig test runs with: `None` is synchronous.
const ENGINES: [Option<EngineKind>; 3] = [None, Some(EngineKind::Uring), Some(EngineKind::Pool)];

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

struct Rig<'a> {
    mq: MockSplitQueue<'a, GuestMemoryMmap>,
    worker: BlockWorker,
    irq: EventFd,
    _slot: EngineSlot,
    _img: TempFile,
}

/// An engine of `kind` in a slot, for `fd`.
pub(super) fn slot_with(
    kind: Option<EngineKind>,
    fd: std::os::fd::RawFd,
    depth: usize,
) -> EngineSlot {
    let slot = EngineSlot::default();
    if let Some(kind) = kind {
        engine::put_back(
            &slot,
            engine::build(kind, fd, depth, "kiln-test-blk", None).unwrap(),
        );
    }
    slot
}

fn rig(m: &GuestMemoryMmap, read_only: bool, event_idx: bool, kind: Option<EngineKind>) -> Rig<'_> {
    let img = TempFile::new().unwrap();
    let content: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
    img.as_file().write_all(&content).unwrap();
    let backend = RawFile::open(img.as_path(), read_only, false).unwrap();
    let mut serial = [0u8; 20];
    serial[..5].copy_from_slice(b"disk7");
    let mq = MockSplitQueue::new(m, 16);
    let mut queue: Queue = mq.create_queue().unwrap();
    queue.set_event_idx(event_idx);
    // The mock's used ring overlaps the avail ring's used_event field.
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let slot = slot_with(kind, std::os::fd::AsRawFd::as_raw_fd(img.as_file()), 16);
    let queue_evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let ctx = QueueContext {
        mem: m.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        disk: Disk {
            backend: Arc::new(backend),
            read_only,
            serial,
            counters: Arc::default(),
        },
        limits: RequestLimits {
            capacity_sectors: 64,
            seg_max: 8,
            max_range_sectors: 64,
            max_ranges: 4,
        },
        limiter: None,
        all_queue_events: vec![queue_evt.clone()],
        quiescing: Default::default(),
    };
    let worker = BlockWorker::new(&ctx, queue, queue_evt, Some(&slot), Default::default());
    Rig {
        mq,
        worker,
        irq,
        _slot: slot,
        _img: img,
    }
}

/// Runs the worker's completion path until nothing is in flight (waiting
/// for the kernel, with a generous deadline that only a hang reaches).
pub(super) fn settle(worker: &mut BlockWorker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        worker.reap();
        if worker.server.in_flight() == 0 && !worker.server.is_stalled() {
            return;
        }
        assert!(Instant::now() < deadline, "I/O in flight never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Rig<'_> {
    /// Submits one chain, runs the queue, returns (status, used len).
    fn submit(&mut self, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
        m.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        self.mq.build_desc_chain(descs).unwrap();
        self.run(m)
    }

    fn run(&mut self, m: &GuestMemoryMmap) -> (u8, u32) {
        self.worker.process_queue();
        settle(&mut self.worker);
        let status = m.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        let len = match used_idx(m).checked_sub(1) {
            Some(i) => m
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i % 16) + 4))
                .unwrap(),
            None => u32::MAX,
        };
        (status, len)
    }
}

fn io(m: &GuestMemoryMmap, t: u32, sector: u64, data: RawDescriptor) -> Vec<RawDescriptor> {
    write_header(m, t, sector);
    vec![desc(HDR, 16, 0), data, desc(STATUS, 1, W)]
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn requests_over_the_rate_limit_wait_on_the_ring_for_the_timer() {
    for kind in ENGINES {
        requests_over_the_rate_limit_wait_on_the_ring_for_the_timer_with(kind);
    }
}

fn requests_over_the_rate_limit_wait_on_the_ring_for_the_timer_with(kind: Option<EngineKind>) {
    use crate::rate_limiter::{lock, shared, RateLimit};
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    // 10 requests a second: a one-request bucket, refilled every 100 ms.
    let limiter = shared(RateLimit {
        bytes_per_sec: None,
        ops_per_sec: Some(10),
    })
    .unwrap()
    .unwrap();
    r.worker.limiter = Some(limiter.clone());
    let chain = io(&m, VIRTIO_BLK_T_IN, 1, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (OK, 513));
    assert_eq!(used_idx(&m), 1);
    let start = std::time::Instant::now();
    let chain = io(&m, VIRTIO_BLK_T_IN, 2, desc(DATA, 512, W));
    r.mq.build_desc_chain(&chain).unwrap();
    r.worker.process_queue();
    // Throttled: still on the ring, not completed.
    assert_eq!(used_idx(&m), 1);
    assert!(lock(&limiter).is_blocked());
    // A guest kick while blocked changes nothing.
    r.worker.process_queue();
    assert_eq!(used_idx(&m), 1);
    lock(&limiter).timer_expired();
    assert!(start.elapsed() >= std::time::Duration::from_millis(90));
    r.worker.process_queue();
    settle(&mut r.worker);
    assert_eq!(used_idx(&m), 2);
    let mut b = [0u8; 512];
    m.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b.iter().all(|&x| x == 2));
}

#[test]
fn reads_and_interrupts() {
    for kind in ENGINES {
        reads_and_interrupts_with(kind);
    }
}

fn reads_and_interrupts_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    let chain = io(&m, VIRTIO_BLK_T_IN, 5, desc(DATA, 1024, W));
    assert_eq!(r.submit(&m, &chain), (OK, 1025));
    let mut b = [0u8; 1024];
    m.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b[..512].iter().all(|&x| x == 5) && b[512..].iter().all(|&x| x == 6));
    assert_eq!(r.irq.read().unwrap(), 1);
}

#[test]
fn writes_flushes_and_get_id() {
    for kind in ENGINES {
        writes_flushes_and_get_id_with(kind);
    }
}

fn writes_flushes_and_get_id_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let chain = io(&m, VIRTIO_BLK_T_OUT, 63, desc(DATA, 512, 0));
    assert_eq!(r.submit(&m, &chain), (OK, 1));
    let chain = io(&m, VIRTIO_BLK_T_IN, 63, desc(DATA + 0x1000, 512, W));
    assert_eq!(r.submit(&m, &chain), (OK, 513));
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 0x1000)).unwrap(), 0x5a);
    write_header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.submit(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]),
        (OK, 1)
    );
    let chain = io(&m, VIRTIO_BLK_T_GET_ID, 0, desc(DATA, 20, W));
    assert_eq!(r.submit(&m, &chain), (OK, 21));
    let mut id = [0u8; 5];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk7");
}

#[test]
fn discard_and_write_zeroes() {
    for kind in ENGINES {
        discard_and_write_zeroes_with(kind);
    }
}

fn discard_and_write_zeroes_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    let mut range = [0u8; 16];
    range[..8].copy_from_slice(&8u64.to_le_bytes());
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    m.write_slice(&range, GuestAddress(DATA)).unwrap();
    for t in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        let chain = io(&m, t, 0, desc(DATA, 16, 0));
        assert_eq!(r.submit(&m, &chain), (OK, 1));
    }
    let chain = io(&m, VIRTIO_BLK_T_IN, 8, desc(DATA + 0x1000, 4096, W));
    assert_eq!(r.submit(&m, &chain), (OK, 4097));
    let mut b = vec![0xffu8; 4096];
    m.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn read_only_disks_refuse_writes() {
    for kind in ENGINES {
        read_only_disks_refuse_writes_with(kind);
    }
}

fn read_only_disks_refuse_writes_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, true, false, kind);
    let chain = io(&m, VIRTIO_BLK_T_OUT, 0, desc(DATA, 512, 0));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    let chain = io(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0, desc(DATA, 16, 0));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (OK, 513));
}

#[test]
fn hostile_requests_get_error_statuses() {
    for kind in ENGINES {
        hostile_requests_get_error_statuses_with(kind);
    }
}

fn hostile_requests_get_error_statuses_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    // Past the end of the disk, by one sector and by overflow.
    let chain = io(&m, VIRTIO_BLK_T_IN, 64, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    let chain = io(&m, VIRTIO_BLK_T_OUT, u64::MAX, desc(DATA, 512, 0));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    // Unknown type.
    let chain = io(&m, 99, 0, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (UNSUPP, 1));
    // Wrong direction.
    let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 512, 0));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    // Data outside guest memory.
    let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(0x3f_fe00, 0x1000, W));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    // A huge data descriptor (4 GiB - 512) outside memory.
    let chain = io(&m, VIRTIO_BLK_T_OUT, 0, desc(DATA, u32::MAX - 511, 0));
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    // A zero-length data descriptor carries nothing: a read of nothing.
    let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 0, W));
    assert_eq!(r.submit(&m, &chain), (OK, 1));
    // A readable buffer after the status's writable one.
    write_header(&m, VIRTIO_BLK_T_IN, 0);
    let chain = [desc(HDR, 16, 0), desc(STATUS, 1, W), desc(DATA, 512, 0)];
    assert_eq!(r.submit(&m, &chain), (IOERR, 1));
    // The device keeps working.
    let chain = io(&m, VIRTIO_BLK_T_IN, 1, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (OK, 513));
}

#[test]
fn chains_without_a_status_are_returned_empty() {
    for kind in ENGINES {
        chains_without_a_status_are_returned_empty_with(kind);
    }
}

fn chains_without_a_status_are_returned_empty_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    write_header(&m, VIRTIO_BLK_T_IN, 0);
    // Status descriptor readable.
    let (status, len) = r.submit(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, 0)]);
    assert_eq!((status, len), (0xaa, 0));
    // Lone header.
    let (status, len) = r.submit(&m, &[desc(HDR, 16, 0)]);
    assert_eq!((status, len), (0xaa, 0));
}

#[test]
fn descriptor_loops_do_not_hang() {
    for kind in ENGINES {
        descriptor_loops_do_not_hang_with(kind);
    }
}

fn descriptor_loops_do_not_hang_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    write_header(&m, VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, n | W, 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, n | W, 1)),
    ];
    r.mq.add_desc_chains(&descs, 0).unwrap();
    m.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    assert_eq!(r.run(&m), (0xaa, 0));
}

#[test]
fn bad_head_indexes_and_avail_indexes_do_not_hang() {
    for kind in ENGINES {
        bad_head_indexes_and_avail_indexes_do_not_hang_with(kind);
    }
}

fn bad_head_indexes_and_avail_indexes_do_not_hang_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, false, kind);
    // A head index past the queue size.
    r.mq.avail().ring().ref_at(0).unwrap().store(1000);
    r.mq.avail().idx().store(1);
    r.worker.process_queue();
    assert_eq!(used_idx(&m), 0);
    // An avail index more than a queue size ahead.
    r.mq.avail().idx().store(500);
    r.worker.process_queue();
    assert_eq!(used_idx(&m), 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    for kind in ENGINES {
        event_idx_suppresses_interrupts_with(kind);
    }
}

fn event_idx_suppresses_interrupts_with(kind: Option<EngineKind>) {
    let m = mem();
    let mut r = rig(&m, false, true, kind);
    // used_event (after the avail ring) = 5: no interrupt before the 6th.
    let used_event = r.mq.avail_addr().0 + 4 + 2 * 16;
    m.write_obj(5u16, GuestAddress(used_event)).unwrap();
    let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 512, W));
    assert_eq!(r.submit(&m, &chain), (OK, 513));
    assert!(r.irq.read().is_err());
    m.write_obj(1u16, GuestAddress(used_event)).unwrap();
    let n = VRING_DESC_F_NEXT as u16;
    let chain = [
        RawDescriptor::from(Descriptor::new(HDR, 16, n, 4)),
        RawDescriptor::from(Descriptor::new(DATA, 512, n | W, 5)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
    ];
    r.mq.add_desc_chains(&chain, 3).unwrap();
    r.worker.process_queue();
    settle(&mut r.worker);
    assert_eq!(r.irq.read().unwrap(), 1);
    // The worker asked to be kicked at the next request.
    let avail_event = USED + 4 + 8 * 16;
    assert_eq!(m.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 2);
}
