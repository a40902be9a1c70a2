//! A disk with two queues: one worker thread serves both, with one
//! interrupt for what both completed.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::*;
use crate::rate_limiter::RateLimit;
use crate::virtio::block::device::{Block, BlockConfig, Error as BlockError};
use crate::virtio::block::raw::RawFile;
use crate::virtio::block::worker::{QueueHandback, QueueSet};
use crate::virtio::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::virtio::worker::tests::threads_named;
use virtio_queue::QueueT;

fn two_queue_disk(img: &TempFile) -> Block {
    Block::new(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only: false,
        direct: false,
        id: None,
        rate_limit: RateLimit::default(),
        queues: 2,
    })
    .unwrap()
}

/// A queue context on the image `img` (2048 sectors at most), interrupting
/// through `irq`, with the queues' eventfds `events`.
fn context(
    m: &GuestMemoryMmap,
    img: &TempFile,
    irq: &EventFd,
    limiter: Option<crate::rate_limiter::SharedRateLimiter>,
    events: &[Arc<EventFd>],
) -> QueueContext {
    QueueContext {
        mem: m.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        disk: Disk {
            backend: Arc::new(RawFile::open(img.as_path(), false, false).unwrap()),
            read_only: false,
            serial: [0; 20],
            counters: Arc::default(),
        },
        limits: RequestLimits {
            capacity_sectors: 2048,
            seg_max: 8,
            max_range_sectors: 64,
            max_ranges: 4,
        },
        limiter,
        all_queue_events: events.to_vec(),
        quiescing: Default::default(),
    }
}

/// Puts a one-sector write of `byte` at `sector` in queue `mq` (its
/// header, data and status at `base`).
fn put_write(
    m: &GuestMemoryMmap,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    base: u64,
    sector: u64,
    byte: u8,
) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(base)).unwrap();
    m.write_slice(&[byte; 512], GuestAddress(base + 0x1000))
        .unwrap();
    m.write_obj(0xaau8, GuestAddress(base + 0x2000)).unwrap();
    mq.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(base, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(
                base + 0x1000,
                512,
                VRING_DESC_F_NEXT as u16,
                2,
            )),
            RawDescriptor::from(Descriptor::new(base + 0x2000, 1, W, 0)),
        ],
        0,
    )
    .unwrap();
}

/// Puts a one-sector write of `byte` at `sector` in queue `mq` (its
/// header, data and status at `base`), kicks it, and waits for the used
/// entry.
fn write_through(
    m: &GuestMemoryMmap,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    kick: &EventFd,
    base: u64,
    sector: u64,
    byte: u8,
) {
    put_write(m, mq, base, sector, byte);
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while mq.used().idx().load() != mq.avail().idx().load() {
        assert!(Instant::now() < deadline, "no used entry");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(base + 0x2000)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn two_queues_are_served_by_one_worker() {
    let img = TempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let mut b = two_queue_disk(&img);
    assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_MQ), 0);
    let mut nq = [0u8; 2];
    b.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    let hooks = Arc::new(AtomicUsize::new(0));
    let h = hooks.clone();
    b.spawn_worker(Arc::new(move || {
        h.fetch_add(1, Ordering::SeqCst);
    }))
    .unwrap();
    let name = b.name().to_string();
    let q1 = format!("{name}q1");
    assert_eq!(threads_named(&name).len(), 1);
    assert!(threads_named(&q1).is_empty(), "no thread for queue 1");
    let pool = b
        .engine_names()
        .iter()
        .filter(|&&n| n == "thread pool")
        .count()
        * super::super::engine::pool::THREADS;
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        1 + pool,
        "every thread hooked"
    );

    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let kicks = [
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    ];
    let mqs = [
        MockSplitQueue::create(&m, GuestAddress(0), 16),
        MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16),
    ];
    b.activate(ActivateContext {
        mem: m.clone(),
        queues: mqs.iter().map(|q| q.create_queue().unwrap()).collect(),
        queue_events: kicks.to_vec(),
        interrupt: interrupt.clone(),
        acked_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_MQ),
    })
    .unwrap();
    write_through(&m, &mqs[0], &kicks[0], 0x10_0000, 0, 0x11);
    write_through(&m, &mqs[1], &kicks[1], 0x20_0000, 8, 0x22);
    let mut on_disk = [0u8; 512];
    img.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk.iter().all(|&x| x == 0x11));
    img.as_file().read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert!(on_disk.iter().all(|&x| x == 0x22));
    b.reset();

    // A driver with one CPU uses one queue: the other stays idle.
    let mq = MockSplitQueue::create(&m, GuestAddress(0x2_0000), 16);
    b.activate(ActivateContext {
        mem: m.clone(),
        queues: vec![mq.create_queue().unwrap()],
        queue_events: vec![kicks[0].clone()],
        interrupt: interrupt.clone(),
        acked_features: 1 << VIRTIO_F_VERSION_1,
    })
    .unwrap();
    write_through(&m, &mq, &kicks[0], 0x10_0000, 16, 0x33);
    b.reset();

    // More queues than the device has.
    let r = b.activate(ActivateContext {
        mem: m.clone(),
        queues: (0..3).map(|_| mq.create_queue().unwrap()).collect(),
        queue_events: vec![kicks[0].clone(), kicks[1].clone(), kicks[0].clone()],
        interrupt,
        acked_features: 1 << VIRTIO_F_VERSION_1,
    });
    assert!(matches!(
        r,
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 3
        })
    ));
    drop(b);
    assert!(threads_named(&name).is_empty());
    assert!(threads_named(&q1).is_empty());
}

/// Quiescing a two-queue disk hands both queues back with their positions
/// (in index order), and activating it with them serves on from there;
/// the device's state refuses a disk of another queue count.
#[test]
fn both_queues_come_back_from_quiesce_and_serve_on() {
    use crate::virtio::state::{DeviceSnapshot, RestoreError};
    let img = TempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let mut b = two_queue_disk(&img);
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let kicks = [
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    ];
    let mqs = [
        MockSplitQueue::create(&m, GuestAddress(0), 16),
        MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16),
    ];
    let ctx = |queues| ActivateContext {
        mem: m.clone(),
        queues,
        queue_events: kicks.to_vec(),
        interrupt: interrupt.clone(),
        acked_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_MQ),
    };
    b.activate(ctx(mqs.iter().map(|q| q.create_queue().unwrap()).collect()))
        .unwrap();
    write_through(&m, &mqs[0], &kicks[0], 0x10_0000, 0, 0x11);
    write_through(&m, &mqs[1], &kicks[1], 0x20_0000, 8, 0x22);
    write_through(&m, &mqs[1], &kicks[1], 0x20_0000, 9, 0x23);
    let queues = b.quiesce().unwrap();
    assert_eq!(
        queues.iter().map(|q| q.next_avail()).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        queues.iter().map(|q| q.next_used()).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(queues[1].desc_table(), 0x1_0000);
    b.activate(ctx(queues)).unwrap();
    write_through(&m, &mqs[0], &kicks[0], 0x10_0000, 16, 0x33);
    write_through(&m, &mqs[1], &kicks[1], 0x20_0000, 17, 0x44);
    assert_eq!(mqs[0].used().idx().load(), 2);
    assert_eq!(mqs[1].used().idx().load(), 3);
    let state = b.snapshot().unwrap();
    b.reset();
    assert!(b.quiesce().unwrap().is_empty(), "nothing to hand back");

    let DeviceSnapshot::Block(mut s) = state else {
        panic!("{state:?}")
    };
    assert_eq!(s.queues, 2);
    s.queues = 1;
    assert!(matches!(
        b.restore(&DeviceSnapshot::Block(s)),
        Err(RestoreError::QueueCount { saved: 1, here: 2 })
    ));
}

#[test]
fn queue_counts_are_checked() {
    let img = TempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    for n in [0u16, 65] {
        let r = Block::new(BlockConfig {
            path: img.as_path().to_path_buf(),
            read_only: false,
            direct: false,
            id: None,
            rate_limit: RateLimit::default(),
            queues: n,
        });
        assert!(matches!(r, Err(BlockError::QueueCount(q)) if q == n));
    }
    let one = Block::new(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only: false,
        direct: false,
        id: None,
        rate_limit: RateLimit::default(),
        queues: 1,
    })
    .unwrap();
    assert_eq!(one.avail_features() & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(one.queues(), 1);
}

/// Queues share their disk's rate limiter and its one timer: the worker
/// that consumes the timer kicks the other queues, which may be holding
/// requests back too (they would otherwise wait for a guest kick that a
/// held-back queue never gets).
#[test]
fn the_rate_limiter_timer_wakes_every_queue() {
    let m = mem();
    let img = TempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let limiter = crate::rate_limiter::shared(RateLimit {
        bytes_per_sec: None,
        ops_per_sec: Some(10),
    })
    .unwrap();
    let events: Vec<Arc<EventFd>> = (0..3)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctx = context(&m, &img, &irq, limiter, &events);
    // Over the limit: the timer is armed (its read waits for it to fire).
    {
        let l = ctx.limiter.as_ref().unwrap();
        assert!(crate::rate_limiter::lock(l).admit(0).unwrap());
        assert!(!crate::rate_limiter::lock(l).admit(0).unwrap());
    }
    let mq = MockSplitQueue::new(&m, 16);
    let mut w = BlockWorker::new(
        &ctx,
        mq.create_queue().unwrap(),
        events[1].clone(),
        None,
        Default::default(),
    );
    w.rate_limit_timer_fired();
    assert_eq!(events[0].read().unwrap(), 1);
    assert_eq!(events[2].read().unwrap(), 1);
    assert!(
        events[1].read().is_err(),
        "its own queue is served directly"
    );
}

/// A worker thread that finds requests completed on both of its queues in
/// one wakeup interrupts the guest once for both (they share the device's
/// interrupt), and each request is on the disk.
#[test]
fn one_wakeup_with_both_queues_done_interrupts_once() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let img = TempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let events: Vec<Arc<EventFd>> = (0..2)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctx = context(&m, &img, &irq, None, &events);
    let mqs = [
        MockSplitQueue::create(&m, GuestAddress(0), 16),
        MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16),
    ];
    // Both requests wait before the worker starts: its first pass serves
    // both queues (without an engine: each completes as it starts).
    put_write(&m, &mqs[0], 0x10_0000, 0, 0x11);
    put_write(&m, &mqs[1], 0x20_0000, 8, 0x22);
    let handbacks = [QueueHandback::default(), QueueHandback::default()];
    let queues = (0..2)
        .map(|i| {
            BlockWorker::new(
                &ctx,
                mqs[i].create_queue().unwrap(),
                events[i].clone(),
                None,
                handbacks[i].clone(),
            )
        })
        .collect();
    let poller = Arc::new(EventSetPoller::new().unwrap());
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    poller
        .add(&*stop, crate::virtio::worker::TOKEN_STOP)
        .unwrap();
    let set = QueueSet::new(&ctx, queues, poller, stop.clone());
    let thread = std::thread::spawn(move || set.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while mqs.iter().any(|q| q.used().idx().load() != 1) {
        assert!(Instant::now() < deadline, "not both served");
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.write(1).unwrap();
    thread.join().unwrap();
    assert_eq!(irq.read().unwrap(), 1, "one interrupt for both queues");
    for (i, h) in handbacks.iter().enumerate() {
        let q = h.lock().unwrap().take();
        assert_eq!(q.map(|q| q.next_avail()), Some(1), "queue {i} handed back");
    }
    let mut on_disk = [0u8; 512];
    img.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk.iter().all(|&x| x == 0x11));
    img.as_file().read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert!(on_disk.iter().all(|&x| x == 0x22));
}
