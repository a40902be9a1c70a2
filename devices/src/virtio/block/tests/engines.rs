//! Many requests in flight: out-of-order completion, flush ordering, reset
//! with I/O in flight, short transfers, the direct-I/O bounce fallback.
//!
//! The engines are the real ones on real files. To make completion order
//! and timing deterministic, some tests wrap an engine in [`Held`], which
//! passes every op to the real engine but hands the results to the server
//! only once all of them are in, in reverse order: the server then sees
//! every request in flight at once and completions in the worst order.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::super::engine::{IoDone, IoEngine, IoOp};
use super::*;

/// Queue size of these tests' rings.
const QSIZE: u16 = 256;
const RING_USED: u64 = 0x8000;
const HDRS: u64 = 0x1_0000;
const STATUSES: u64 = 0x2_0000;
const BUFS: u64 = 0x10_0000;
/// The image: 4 MiB, byte i holding (i / 512 * 7 + i) % 251.
const IMG_LEN: usize = 4 << 20;

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((i / 512 * 7 + i) % 251) as u8)
        .collect()
}

/// Holds every completion until all ops are done, then hands them over in
/// reverse order (module doc). Optionally cuts every op to its first iovec,
/// so that the kernel moves only part of it (a real short transfer).
struct Held {
    inner: Box<dyn IoEngine>,
    held: Vec<IoDone>,
    first_iovec_only: bool,
    pushed: usize,
    /// Runs at the submit of that number (from 1).
    hook: Option<(usize, Box<dyn FnOnce() + Send>)>,
    submits: usize,
}

impl Held {
    fn wrap(slot: &EngineSlot, first_iovec_only: bool) {
        Self::install(slot, first_iovec_only, None);
    }

    /// [`Held::wrap`] that also runs `hook` at the `nth` submit (from 1):
    /// something the guest does at an exact point of the server's work.
    fn wrap_with_hook(slot: &EngineSlot, nth: usize, hook: impl FnOnce() + Send + 'static) {
        Self::install(slot, false, Some((nth, Box::new(hook))));
    }

    fn install(
        slot: &EngineSlot,
        first_iovec_only: bool,
        hook: Option<(usize, Box<dyn FnOnce() + Send>)>,
    ) {
        let inner = engine::take(slot).unwrap();
        engine::put_back(
            slot,
            Box::new(Held {
                inner,
                held: Vec::new(),
                first_iovec_only,
                pushed: 0,
                hook,
                submits: 0,
            }),
        );
    }
}

impl IoEngine for Held {
    fn push(&mut self, mut op: IoOp) -> io::Result<()> {
        if self.first_iovec_only {
            op.iovcnt = op.iovcnt.min(1);
        }
        self.pushed += 1;
        self.inner.push(op)
    }
    fn submit(&mut self) -> io::Result<()> {
        self.submits += 1;
        if self
            .hook
            .as_ref()
            .is_some_and(|(nth, _)| *nth == self.submits)
        {
            if let Some((_, hook)) = self.hook.take() {
                hook();
            }
        }
        self.inner.submit()
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        self.inner.reap(&mut self.held);
        if self.held.len() == self.pushed {
            self.pushed = 0;
            // Tokens are slots, handed out in submission order.
            self.held.sort_by_key(|d| std::cmp::Reverse(d.token));
            out.append(&mut self.held);
        }
    }
    fn wait(&mut self) -> io::Result<()> {
        self.inner.wait()
    }
    fn notifier(&self) -> &EventFd {
        self.inner.notifier()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
    fn in_flight(&self) -> usize {
        self.pushed
    }
    fn name(&self) -> &'static str {
        "held"
    }
}

/// A queue of QSIZE entries whose chains the test lays out itself.
struct Ring<'a> {
    m: &'a GuestMemoryMmap,
    mq: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    avail: u16,
    /// Whether [`Ring::push`] moves the avail index (else the chain is laid
    /// out and waits for [`Ring::publisher`]).
    publish: bool,
}

impl<'a> Ring<'a> {
    fn new(m: &'a GuestMemoryMmap) -> (Self, Queue) {
        let mq = MockSplitQueue::new(m, QSIZE);
        let mut queue: Queue = mq.create_queue().unwrap();
        queue.set_used_ring_address(Some(RING_USED as u32), Some(0));
        let ring = Ring {
            m,
            mq,
            next_desc: 0,
            avail: 0,
            publish: true,
        };
        (ring, queue)
    }

    /// Makes the chain `descs` (addr, len, flags) available; returns its head.
    fn push(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | VRING_DESC_F_NEXT as u16, (idx + 1) % QSIZE)
            };
            self.mq
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        self.mq
            .avail()
            .ring()
            .ref_at(usize::from(self.avail % QSIZE))
            .unwrap()
            .store(head);
        self.avail = self.avail.wrapping_add(1);
        if self.publish {
            self.mq.avail().idx().store(self.avail);
        }
        head
    }

    /// What makes every chain pushed so far available, as the guest does:
    /// a store of the avail index, to run from anywhere.
    fn publisher(&self) -> impl FnOnce() + Send + 'static {
        let (m, idx) = (self.m.clone(), self.avail);
        let at = GuestAddress(self.mq.avail_addr().0 + 2);
        move || m.write_obj(idx, at).unwrap()
    }

    /// Request `n`: header `t`/`sector` at its own header slot, `data` as
    /// its data descriptors, its own status byte (set to 0xaa).
    fn request(&mut self, n: u64, t: u32, sector: u64, data: &[(u64, u32, u16)]) -> u16 {
        let hdr = HDRS + 16 * n;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.m.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.m
            .write_obj(0xaau8, GuestAddress(STATUSES + n))
            .unwrap();
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend_from_slice(data);
        descs.push((STATUSES + n, 1, W));
        self.push(&descs)
    }

    fn status(&self, n: u64) -> u8 {
        self.m.read_obj(GuestAddress(STATUSES + n)).unwrap()
    }

    /// The used ring: (head, len) in the order the device put them there.
    fn used(&self) -> Vec<(u16, u32)> {
        let idx: u16 = self.m.read_obj(GuestAddress(RING_USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = RING_USED + 4 + 8 * u64::from(i % QSIZE);
                let id: u32 = self.m.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.m.read_obj(GuestAddress(at + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }
}

struct Setup {
    m: GuestMemoryMmap,
    img: TempFile,
    slot: EngineSlot,
    irq: EventFd,
}

fn setup_in(dir: Option<&std::path::Path>, kind: EngineKind, direct: bool) -> (Setup, Disk) {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
    let img = match dir {
        Some(d) => TempFile::new_in(d).unwrap(),
        None => TempFile::new().unwrap(),
    };
    img.as_file().write_all(&pattern(0, IMG_LEN)).unwrap();
    let backend = RawFile::open(img.as_path(), false, direct).unwrap();
    let slot = slot_with(Some(kind), img.as_file().as_raw_fd(), usize::from(QSIZE));
    let disk = Disk {
        backend: Arc::new(backend),
        read_only: false,
        serial: [0; 20],
        counters: Arc::default(),
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    (Setup { m, img, slot, irq }, disk)
}

fn worker(s: &Setup, disk: Disk, queue: Queue) -> BlockWorker {
    let queue_evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let ctx = QueueContext {
        mem: s.m.clone(),
        interrupt: Arc::new(Interrupt::new(s.irq.try_clone().unwrap())),
        limits: RequestLimits {
            capacity_sectors: (IMG_LEN / 512) as u64,
            seg_max: 16,
            max_range_sectors: 1024,
            max_ranges: 4,
        },
        disk,
        limiter: None,
        all_queue_events: vec![queue_evt.clone()],
        quiescing: Default::default(),
    };
    BlockWorker::new(&ctx, queue, queue_evt, Some(&s.slot), Default::default())
}

const REAL_ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Pool];

/// 48 reads and writes of 4-12 KiB (two or three segments each) in one
/// batch: all are in flight at once, they complete in reverse order, each
/// head is used once with the right length, the data is right, and the
/// guest gets one interrupt for the batch.
#[test]
fn many_requests_in_flight_complete_out_of_order() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        Held::wrap(&s.slot, false);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        let mut heads = Vec::new();
        for n in 0..48u64 {
            let buf = BUFS + n * 0x4000;
            let sector = n * 37 % 8000;
            let (t, flags) = if n % 3 == 0 {
                s.m.write_slice(&[n as u8 + 1; 0x3000], GuestAddress(buf))
                    .unwrap();
                (VIRTIO_BLK_T_OUT, 0)
            } else {
                (VIRTIO_BLK_T_IN, W)
            };
            let segs: Vec<(u64, u32, u16)> = if n % 2 == 0 {
                vec![(buf, 0x1000, flags), (buf + 0x1000, 0x2000, flags)]
            } else {
                vec![
                    (buf, 0x200, flags),
                    (buf + 0x200, 0xe00, flags),
                    (buf + 0x1000, 0x1000, flags),
                ]
            };
            heads.push((ring.request(n, t, sector, &segs), t, sector, segs));
        }
        w.process_queue();
        assert_eq!(w.server.in_flight(), 48, "{kind:?}: all in flight at once");
        assert_eq!(w.server.stats().started, 48);
        assert!(ring.used().is_empty());
        settle(&mut w);
        let used = ring.used();
        let expected: Vec<u16> = heads.iter().rev().map(|h| h.0).collect();
        assert_eq!(
            used.iter().map(|u| u.0).collect::<Vec<_>>(),
            expected,
            "{kind:?}"
        );
        assert_eq!(s.irq.read().unwrap(), 1, "one interrupt for the batch");
        for (n, (head, t, sector, segs)) in heads.iter().enumerate() {
            let n = n as u64;
            assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8, "request {n}");
            let len: u32 = segs.iter().map(|s| s.1).sum();
            let used_len = used.iter().find(|u| u.0 == *head).unwrap().1;
            let at = (*sector * 512) as usize;
            if *t == VIRTIO_BLK_T_IN {
                assert_eq!(used_len, len + 1);
                let mut got = vec![0u8; len as usize];
                s.m.read_slice(&mut got, GuestAddress(segs[0].0)).unwrap();
                // Writes of this batch may overlap the read: only check
                // reads of sectors no write touched.
                let written = heads.iter().any(|h| {
                    h.1 == VIRTIO_BLK_T_OUT
                        && h.2 * 512 < (at + len as usize) as u64
                        && at as u64 <= h.2 * 512 + 0x3000
                });
                if !written {
                    assert!(got == pattern(at, len as usize), "read {n}");
                }
            } else {
                assert_eq!(used_len, 1);
                let mut got = vec![0u8; len as usize];
                s.img.as_file().read_exact_at(&mut got, at as u64).unwrap();
                assert!(got.iter().all(|&b| b == n as u8 + 1), "write {n}");
            }
        }
    }
}

/// A flush behind eight writes waits until they have all finished (none is
/// completed after it); the writes behind it wait with it, and may then run
/// alongside the sync (virtio orders a flush only after what came before).
#[test]
fn flush_completes_after_every_write_before_it() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        Held::wrap(&s.slot, false);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        let mut before = Vec::new();
        for n in 0..8u64 {
            let buf = BUFS + n * 0x1000;
            s.m.write_slice(&[0x40 + n as u8; 0x1000], GuestAddress(buf))
                .unwrap();
            before.push(ring.request(n, VIRTIO_BLK_T_OUT, n * 8, &[(buf, 0x1000, 0)]));
        }
        let flush = ring.request(8, VIRTIO_BLK_T_FLUSH, 0, &[]);
        let mut after = Vec::new();
        for n in 9..13u64 {
            let buf = BUFS + n * 0x1000;
            s.m.write_slice(&[0x40 + n as u8; 0x1000], GuestAddress(buf))
                .unwrap();
            after.push(ring.request(n, VIRTIO_BLK_T_OUT, n * 8, &[(buf, 0x1000, 0)]));
        }
        w.process_queue();
        // The flush waits on the ring, and so do the writes behind it.
        assert_eq!(w.server.in_flight(), 8, "{kind:?}");
        assert!(w.server.is_stalled());
        settle(&mut w);
        let used: Vec<u16> = ring.used().iter().map(|u| u.0).collect();
        assert_eq!(used.len(), 13);
        let pos = used.iter().position(|&h| h == flush).unwrap();
        assert!(pos >= 8, "{kind:?}: {used:?}");
        assert!(before.iter().all(|h| used[..8].contains(h)));
        assert!(after.iter().all(|h| used[8..].contains(h)));
        for n in 0..13u64 {
            assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8);
        }
        for n in (0..8u64).chain(9..13) {
            let mut got = [0u8; 0x1000];
            s.img.as_file().read_exact_at(&mut got, n * 4096).unwrap();
            assert!(got.iter().all(|&b| b == 0x40 + n as u8));
        }
    }
}

/// Dropping the worker's body (a device reset) with reads in flight waits
/// for them: afterwards the engine is back in its slot with nothing in
/// flight, the data the kernel read is in guest memory, and the used ring
/// was not touched (after a reset the rings are not the device's).
#[test]
fn reset_waits_for_io_in_flight() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        Held::wrap(&s.slot, false);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        for n in 0..32u64 {
            let buf = BUFS + n * 0x2_0000;
            ring.request(n, VIRTIO_BLK_T_IN, n * 256, &[(buf, 0x2_0000, W)]);
        }
        w.process_queue();
        assert_eq!(w.server.in_flight(), 32);
        drop(w);
        let engine = engine::take(&s.slot).expect("the engine is back in its slot");
        assert_eq!(engine.in_flight(), 0, "{kind:?}");
        assert!(ring.used().is_empty());
        for n in 0..32u64 {
            assert_eq!(ring.status(n), 0xaa, "no status after the reset");
            let mut got = vec![0u8; 0x2_0000];
            s.m.read_slice(&mut got, GuestAddress(BUFS + n * 0x2_0000))
                .unwrap();
            assert!(got == pattern(n as usize * 256 * 512, 0x2_0000), "read {n}");
        }
    }
}

/// Quiescing (a snapshot) with 32 reads in flight: unlike a reset, each
/// is completed in the used ring, once, with its status and data, and the
/// guest is interrupted once; the queue's indexes then agree with the ring.
#[test]
fn quiesce_completes_io_in_flight() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        Held::wrap(&s.slot, false);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        let mut heads = Vec::new();
        for n in 0..32u64 {
            let buf = BUFS + n * 0x2_0000;
            heads.push(ring.request(n, VIRTIO_BLK_T_IN, n * 256, &[(buf, 0x2_0000, W)]));
        }
        w.process_queue();
        assert_eq!(w.server.in_flight(), 32);
        assert!(ring.used().is_empty());
        w.complete_in_flight();
        assert_eq!(w.server.in_flight(), 0, "{kind:?}");
        let mut used: Vec<u16> = ring.used().iter().map(|u| u.0).collect();
        assert!(ring.used().iter().all(|u| u.1 == 0x2_0000 + 1));
        used.sort_unstable();
        heads.sort_unstable();
        assert_eq!(used, heads, "{kind:?}: every request once");
        assert_eq!(s.irq.read().unwrap(), 1, "one interrupt");
        for n in 0..32u64 {
            assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8, "request {n}");
            let mut got = vec![0u8; 0x2_0000];
            s.m.read_slice(&mut got, GuestAddress(BUFS + n * 0x2_0000))
                .unwrap();
            assert!(got == pattern(n as usize * 256 * 512, 0x2_0000), "read {n}");
        }
        drop(w);
        let engine = engine::take(&s.slot).expect("the engine is back in its slot");
        assert_eq!(engine.in_flight(), 0);
    }
}

/// The kernel moves only part of each request (the engine is given the
/// first iovec only): the server continues each from where it stopped,
/// and every byte lands where it belongs.
#[test]
fn short_transfers_are_continued() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        Held::wrap(&s.slot, true);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        let segs = |buf: u64, f: u16| {
            vec![
                (buf, 0x200, f),
                (buf + 0x1000, 0x400, f),
                (buf + 0x3000, 0xa00, f),
            ]
        };
        s.m.write_slice(&[0x77; 0x4000], GuestAddress(BUFS))
            .unwrap();
        ring.request(0, VIRTIO_BLK_T_OUT, 100, &segs(BUFS, 0));
        ring.request(1, VIRTIO_BLK_T_IN, 3000, &segs(BUFS + 0x1_0000, W));
        w.process_queue();
        settle(&mut w);
        assert_eq!(ring.status(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(ring.status(1), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 0x1000];
        s.img.as_file().read_exact_at(&mut got, 100 * 512).unwrap();
        assert!(got.iter().all(|&b| b == 0x77), "{kind:?}");
        let mut at = 3000 * 512;
        for (addr, len, _) in segs(BUFS + 0x1_0000, W) {
            let mut got = vec![0u8; len as usize];
            s.m.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert!(
                got == pattern(at, len as usize),
                "{kind:?} segment at {addr:#x}"
            );
            at += len as usize;
        }
    }
}

/// With O_DIRECT, aligned guest buffers go to the engine as they are;
/// buffers at an unaligned address or of an unaligned length take the
/// bounce path, and both read and write the right bytes.
/// Requests popped together that continue each other on the disk in the
/// same direction go to the engine as one op: 12 adjacent reads of 16
/// segments each make one; a read between writes breaks their run (the
/// limits of an op are `inflight`'s unit tests). Every request still completes
/// once, with its own status, length and data, also when the kernel moves
/// each op one iovec at a time (short transfers).
#[test]
fn adjacent_requests_go_as_one_op() {
    for kind in REAL_ENGINES {
        for short in [false, true] {
            let (s, disk) = setup_in(None, kind, false);
            Held::wrap(&s.slot, short);
            let (mut ring, queue) = Ring::new(&s.m);
            let counters = disk.counters.clone();
            let mut w = worker(&s, disk, queue);
            let mut reqs = Vec::new();
            for n in 0..12u64 {
                let buf = BUFS + n * 0x2000;
                let segs: Vec<(u64, u32, u16)> = (0..16).map(|i| (buf + i * 512, 512, W)).collect();
                let head = ring.request(n, VIRTIO_BLK_T_IN, n * 16, &segs);
                reqs.push((head, VIRTIO_BLK_T_IN, n * 16, buf));
            }
            // Write, write, read, write, write: adjacent all along.
            let types = [
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_OUT,
            ];
            for (i, t) in types.into_iter().enumerate() {
                let n = 12 + i as u64;
                let buf = BUFS + 0x20_0000 + i as u64 * 0x2000;
                let flags = if t == VIRTIO_BLK_T_IN { W } else { 0 };
                if t == VIRTIO_BLK_T_OUT {
                    s.m.write_slice(&[0x60 + n as u8; 0x2000], GuestAddress(buf))
                        .unwrap();
                }
                let sector = 3000 + i as u64 * 16;
                let head = ring.request(n, t, sector, &[(buf, 0x2000, flags)]);
                reqs.push((head, t, sector, buf));
            }
            w.process_queue();
            assert_eq!(w.server.in_flight(), 17, "{kind:?}");
            let stats = w.server.stats();
            assert_eq!(stats.started, 17);
            assert_eq!(stats.merged, 11 + 1 + 1, "{kind:?} short={short}");
            settle(&mut w);
            // What the control API reports: 13 requests went in the
            // transfer of the one before them; 13 reads, 4 writes.
            let values = counters.values();
            assert_eq!(values[4], ("merged", 13), "{kind:?} short={short}");
            assert_eq!((values[2].1, values[3].1), (13, 4));
            let used = ring.used();
            assert_eq!(used.len(), 17);
            for (n, (head, t, sector, buf)) in reqs.iter().enumerate() {
                let n = n as u64;
                assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8, "request {n}");
                let found: Vec<_> = used.iter().filter(|u| u.0 == *head).collect();
                assert_eq!(found.len(), 1, "request {n} used once");
                let at = *sector * 512;
                if *t == VIRTIO_BLK_T_IN {
                    assert_eq!(found[0].1, 0x2000 + 1);
                    let mut got = vec![0u8; 0x2000];
                    s.m.read_slice(&mut got, GuestAddress(*buf)).unwrap();
                    assert!(got == pattern(at as usize, 0x2000), "read {n}");
                } else {
                    assert_eq!(found[0].1, 1);
                    let mut got = vec![0u8; 0x2000];
                    s.img.as_file().read_exact_at(&mut got, at).unwrap();
                    assert!(got.iter().all(|&b| b == 0x60 + n as u8), "write {n}");
                }
            }
        }
    }
}

/// The used ring's flags word: whether the device asked the guest not to
/// notify it (`VRING_USED_F_NO_NOTIFY`; these rings have no EVENT_IDX).
fn notifications_off(m: &GuestMemoryMmap) -> bool {
    let flags: u16 = m.read_obj(GuestAddress(RING_USED)).unwrap();
    flags & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 != 0
}

/// A guest without EVENT_IDX adds a request while the worker's pass, which
/// found the ring empty, has notifications off: it sees NO_NOTIFY and does
/// not kick. The worker must take the request when it turns notifications
/// back on and finds the ring not empty, not take the empty pass for a
/// corrupt ring and leave the request there (nothing would bring the
/// worker back for it). The engine wrapper adds the request at the exact
/// point: the pass's submit, between its empty pop and the enable.
#[test]
fn a_request_added_during_an_empty_pass_is_taken() {
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(None, kind, false);
        let (mut ring, queue) = Ring::new(&s.m);
        ring.publish = false;
        ring.request(0, VIRTIO_BLK_T_IN, 64, &[(BUFS, 0x1000, W)]);
        let publish = ring.publisher();
        let flags = s.m.clone();
        Held::wrap_with_hook(&s.slot, 1, move || {
            assert!(notifications_off(&flags), "the guest would have kicked");
            publish();
        });
        let mut w = worker(&s, disk, queue);
        w.process_queue();
        assert_eq!(
            w.server.stats().started,
            1,
            "{kind:?}: the request was left on the ring"
        );
        settle(&mut w);
        assert_eq!(ring.used().len(), 1);
        assert_eq!(ring.status(0), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 0x1000];
        s.m.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        assert!(got == pattern(64 * 512, 0x1000), "{kind:?}");
        assert!(!notifications_off(&s.m), "notifications are back on");
    }
}

#[test]
fn unaligned_buffers_with_direct_io_take_the_bounce_path() {
    let Some(dir) = super::super::raw::tests::direct_dir() else {
        return;
    };
    for kind in REAL_ENGINES {
        let (s, disk) = setup_in(Some(&dir), kind, true);
        let (mut ring, queue) = Ring::new(&s.m);
        let mut w = worker(&s, disk, queue);
        ring.request(0, VIRTIO_BLK_T_IN, 8, &[(BUFS, 0x2000, W)]);
        ring.request(1, VIRTIO_BLK_T_IN, 8, &[(BUFS + 0x1_0200, 0x2000, W)]);
        ring.request(2, VIRTIO_BLK_T_IN, 9, &[(BUFS + 0x2_0000, 0x1000, W)]);
        s.m.write_slice(&[0x31; 0x600], GuestAddress(BUFS + 0x3_0200))
            .unwrap();
        ring.request(3, VIRTIO_BLK_T_OUT, 40, &[(BUFS + 0x3_0200, 0x600, 0)]);
        w.process_queue();
        settle(&mut w);
        assert_eq!(
            w.server.stats(),
            crate::virtio::block::inflight::ServerStats {
                started: 1,
                synchronous: 3,
                merged: 0,
            },
            "{kind:?}"
        );
        for n in 0..4 {
            assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8, "request {n}");
        }
        for (addr, at, len) in [
            (BUFS, 8 * 512, 0x2000),
            (BUFS + 0x1_0200, 8 * 512, 0x2000),
            (BUFS + 0x2_0000, 9 * 512, 0x1000),
        ] {
            let mut got = vec![0u8; len];
            s.m.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert!(got == pattern(at, len), "{kind:?} read into {addr:#x}");
        }
        let mut got = vec![0u8; 0x800];
        s.img.as_file().read_exact_at(&mut got, 40 * 512).unwrap();
        assert!(got[..0x600].iter().all(|&b| b == 0x31));
        assert_eq!(got[0x600..], pattern(40 * 512 + 0x600, 0x200)[..]);
    }
}

/// Hostile chains mixed into a batch of good requests in flight: each bad
/// one gets its error status at once, the good ones complete, nothing hangs.
#[test]
fn hostile_chains_among_requests_in_flight() {
    let (s, disk) = setup_in(None, EngineKind::Uring, false);
    Held::wrap(&s.slot, false);
    let (mut ring, queue) = Ring::new(&s.m);
    let mut w = worker(&s, disk, queue);
    let ok = VIRTIO_BLK_S_OK as u8;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let mut expect: VecDeque<(u64, u8)> = VecDeque::new();
    ring.request(0, VIRTIO_BLK_T_IN, 0, &[(BUFS, 0x1000, W)]);
    expect.push_back((0, ok));
    // Past the end of the disk.
    ring.request(
        1,
        VIRTIO_BLK_T_IN,
        (IMG_LEN / 512) as u64,
        &[(BUFS, 0x200, W)],
    );
    expect.push_back((1, ioerr));
    // Data outside guest memory.
    ring.request(2, VIRTIO_BLK_T_OUT, 0, &[(0x7f_ff00, 0x1000, 0)]);
    expect.push_back((2, ioerr));
    // Wrong direction.
    ring.request(3, VIRTIO_BLK_T_IN, 0, &[(BUFS, 0x200, 0)]);
    expect.push_back((3, ioerr));
    // Unknown type.
    ring.request(4, 77, 0, &[(BUFS, 0x200, W)]);
    expect.push_back((4, VIRTIO_BLK_S_UNSUPP as u8));
    ring.request(5, VIRTIO_BLK_T_OUT, 16, &[(BUFS + 0x1000, 0x1000, 0)]);
    expect.push_back((5, ok));
    w.process_queue();
    // The bad ones are answered before the good ones finish.
    assert_eq!(ring.used().len(), 4);
    assert_eq!(w.server.in_flight(), 2);
    settle(&mut w);
    assert_eq!(ring.used().len(), 6);
    for (n, status) in expect {
        assert_eq!(ring.status(n), status, "request {n}");
    }
}

/// 4 KiB random O_DIRECT reads, 32 at a time, from a file on a disk file
/// system, synchronously and through each engine: every read completes OK
/// with the block it asked for (each block of the file carries its own
/// number), in whatever order the engine finishes them. (Their speed is
/// `scripts/bench-io`'s business.)
#[test]
fn random_reads_at_depth_32_return_their_blocks_through_every_engine() {
    let Some(dir) = super::super::raw::tests::direct_dir() else {
        return;
    };
    const FILE: u64 = 16 << 20;
    const BATCHES: u64 = 8;
    let img = TempFile::new_in(&dir).unwrap();
    img.as_file().set_len(FILE).unwrap();
    let mut chunk = vec![0x5au8; 1 << 20];
    for i in 0..(FILE >> 20) {
        for (k, blk) in chunk.chunks_mut(4096).enumerate() {
            let b = (i << 20) / 4096 + k as u64;
            blk[..8].copy_from_slice(&b.to_le_bytes());
        }
        img.as_file().write_all_at(&chunk, i << 20).unwrap();
    }
    img.as_file().sync_all().unwrap();
    for kind in [None, Some(EngineKind::Uring), Some(EngineKind::Pool)] {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let disk = Disk {
            backend: Arc::new(RawFile::open(img.as_path(), false, true).unwrap()),
            read_only: false,
            serial: [0; 20],
            counters: Arc::default(),
        };
        let slot = slot_with(kind, img.as_file().as_raw_fd(), usize::from(QSIZE));
        let s = Setup {
            m,
            img: TempFile::new().unwrap(),
            slot,
            irq: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let (mut ring, queue) = Ring::new(&s.m);
        let queue_evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ctx = QueueContext {
            mem: s.m.clone(),
            interrupt: Arc::new(Interrupt::new(s.irq.try_clone().unwrap())),
            limits: RequestLimits {
                capacity_sectors: FILE / 512,
                seg_max: 16,
                max_range_sectors: 1024,
                max_ranges: 4,
            },
            disk,
            limiter: None,
            all_queue_events: vec![queue_evt.clone()],
            quiescing: Default::default(),
        };
        let mut w = BlockWorker::new(&ctx, queue, queue_evt, Some(&s.slot), Default::default());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for batch in 0..BATCHES {
            let mut want = Vec::new();
            for n in 0..32u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % (FILE / 4096);
                want.push(block);
                let sector = block * 8;
                s.m.write_slice(&[0u8; 4096], GuestAddress(BUFS + n * 0x1000))
                    .unwrap();
                ring.request(
                    n,
                    VIRTIO_BLK_T_IN,
                    sector,
                    &[(BUFS + n * 0x1000, 0x1000, W)],
                );
            }
            w.process_queue();
            while w.server.in_flight() > 0 || w.server.is_stalled() {
                w.reap();
            }
            assert_eq!(ring.used().len() as u64, (batch + 1) * 32, "{kind:?}");
            for (n, block) in want.into_iter().enumerate() {
                let n = n as u64;
                let what = format!("{kind:?}, batch {batch}, request {n}, block {block}");
                assert_eq!(ring.status(n), VIRTIO_BLK_S_OK as u8, "{what}");
                let mut got = [0u8; 4096];
                s.m.read_slice(&mut got, GuestAddress(BUFS + n * 0x1000))
                    .unwrap();
                assert_eq!(got[..8], block.to_le_bytes(), "{what}");
                assert!(got[8..].iter().all(|b| *b == 0x5a), "{what}");
            }
        }
    }
}
