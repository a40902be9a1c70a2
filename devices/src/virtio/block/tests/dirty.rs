//! The guest memory the device writes is marked for live migration
//! ([`crate::dirty`]): a read's data buffers, its status byte and the used
//! ring, with every engine, and not what the device only reads.
//!
//! These tests start the process-wide tracker (holding its test lock) over
//! guest RAM far above the addresses other tests use, so that the devices
//! of tests running meanwhile mark nothing in it.

use crate::dirty::{self, PAGE_SIZE};
use crate::virtio::block::inflight::{QueueServer, ServerStats};

use super::*;

/// Guest RAM: 4 MiB at BASE.
const BASE: u64 = 0x7200_0000_0000;
const RAM: u64 = 4 << 20;
/// The ring (descriptors and avail ring) at BASE; the used ring on page 8,
/// the header on page 16, the status byte at the end of page 32.
const RING_USED: u64 = BASE + 8 * PAGE_SIZE;
const HDR_AT: u64 = BASE + 16 * PAGE_SIZE;
const STATUS_AT: u64 = BASE + 33 * PAGE_SIZE - 1;
/// Data: 4 KiB straddling pages 256 and 257, 512 bytes on page 512.
const DATA1: u64 = BASE + 256 * PAGE_SIZE + 0x800;
const DATA2: u64 = BASE + 512 * PAGE_SIZE;

/// The set pages of `words`, ascending.
fn pages(words: &[u64]) -> Vec<u64> {
    (0..words.len() as u64 * 64)
        .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// Serves one 9-sector read of sector 3 into DATA1 + DATA2 with `kind`
/// (`None`: synchronous, through the bounce buffer); returns the worker's
/// stats, the status and the used length, and leaves the marks in the
/// tracker.
fn serve_read(m: &GuestMemoryMmap, kind: Option<EngineKind>) -> (ServerStats, u8, u32) {
    let img = TempFile::new().unwrap();
    let content: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8 + 1).collect();
    img.as_file().write_all(&content).unwrap();
    let backend = RawFile::open(img.as_path(), false, false).unwrap();
    let mq = MockSplitQueue::create(m, GuestAddress(BASE), 16);
    let mut queue: Queue = mq.create_queue().unwrap();
    queue.set_used_ring_address(Some(RING_USED as u32), Some((RING_USED >> 32) as u32));
    let slot = slot_with(kind, std::os::fd::AsRawFd::as_raw_fd(img.as_file()), 16);
    let queue_evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctx = QueueContext {
        mem: m.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        disk: Disk {
            backend: Arc::new(backend),
            read_only: false,
            serial: [0; 20],
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
    let mut worker = BlockWorker::new(&ctx, queue, queue_evt, Some(&slot), Default::default());
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&3u64.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR_AT)).unwrap();
    m.write_obj(0xaau8, GuestAddress(STATUS_AT)).unwrap();
    mq.build_desc_chain(&[
        desc(HDR_AT, 16, 0),
        desc(DATA1, 0x1000, W),
        desc(DATA2, 0x200, W),
        desc(STATUS_AT, 1, W),
    ])
    .unwrap();
    worker.process_queue();
    settle(&mut worker);
    let status = m.read_obj::<u8>(GuestAddress(STATUS_AT)).unwrap();
    let len: u32 = m.read_obj(GuestAddress(RING_USED + 4 + 4)).unwrap();
    let stats = worker.server.stats();
    drop(worker);
    // The data really landed where the marks say.
    let mut got = vec![0u8; 0x1200];
    m.read_slice(&mut got[..0x1000], GuestAddress(DATA1))
        .unwrap();
    m.read_slice(&mut got[0x1000..], GuestAddress(DATA2))
        .unwrap();
    assert!(got == content[3 * 512..12 * 512], "{kind:?}: read data");
    (stats, status, len)
}

#[test]
fn a_read_marks_its_buffers_status_and_used_ring_with_every_engine() {
    let _g = dirty::test_lock();
    for kind in ENGINES {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), RAM as usize)]).unwrap();
        dirty::start(&[(GuestAddress(BASE), RAM)]);
        let (stats, status, len) = serve_read(&m, kind);
        let marked = pages(&dirty::take());
        dirty::stop();
        assert_eq!((status, len), (OK, 0x1200 + 1), "{kind:?}");
        // The engine really served it (not the bounce path), and the other
        // way round.
        let expected = match kind {
            Some(_) => ServerStats {
                started: 1,
                synchronous: 0,
                merged: 0,
            },
            None => ServerStats {
                started: 0,
                synchronous: 1,
                merged: 0,
            },
        };
        assert_eq!(stats, expected, "{kind:?}");
        // Used ring, status, data; not the descriptors, the avail ring or
        // the header, which the device only reads.
        assert_eq!(marked, vec![8, 32, 256, 257, 512], "{kind:?}");
    }
}

/// A device reset with a read in flight drops its result, but the kernel
/// wrote the buffers: they are marked, and nothing else is (no status, no
/// used entry).
#[test]
fn a_read_dropped_by_a_reset_still_marks_its_buffers() {
    let _g = dirty::test_lock();
    for kind in [EngineKind::Uring, EngineKind::Pool] {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), RAM as usize)]).unwrap();
        let img = TempFile::new().unwrap();
        img.as_file().write_all(&vec![7u8; 64 * 512]).unwrap();
        let backend = RawFile::open(img.as_path(), false, false).unwrap();
        let slot = slot_with(
            Some(kind),
            std::os::fd::AsRawFd::as_raw_fd(img.as_file()),
            16,
        );
        let mq = MockSplitQueue::create(&m, GuestAddress(BASE), 16);
        let mut queue: Queue = mq.create_queue().unwrap();
        queue.set_used_ring_address(Some(RING_USED as u32), Some((RING_USED >> 32) as u32));
        let disk = Disk {
            backend: Arc::new(backend),
            read_only: false,
            serial: [0; 20],
            counters: Arc::default(),
        };
        let limits = RequestLimits {
            capacity_sectors: 64,
            seg_max: 8,
            max_range_sectors: 64,
            max_ranges: 4,
        };
        let mut server = QueueServer::new(m.clone(), disk, limits, Some(&slot));
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR_AT)).unwrap();
        mq.build_desc_chain(&[
            desc(HDR_AT, 16, 0),
            desc(DATA2, 0x200, W),
            desc(STATUS_AT, 1, W),
        ])
        .unwrap();
        dirty::start(&[(GuestAddress(BASE), RAM)]);
        // Popping the chain writes the notification flags into the used
        // ring: taken before the reset.
        assert_eq!(server.process_queue(&mut queue, None), 0);
        assert_eq!(server.in_flight(), 1, "{kind:?}");
        assert_eq!(pages(&dirty::take()), vec![8], "{kind:?}");
        drop(server);
        let marked = pages(&dirty::take());
        dirty::stop();
        assert_eq!(marked, vec![512], "{kind:?}");
        assert_eq!(m.read_obj::<u8>(GuestAddress(DATA2)).unwrap(), 7);
    }
}
