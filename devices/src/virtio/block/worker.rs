//! The virtio-blk worker thread: epoll wiring and the request loop.

use std::sync::Arc;

use tracing::{error, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

use super::io::Disk;
use super::request::{self, Rejected, RequestLimits};
use crate::rate_limiter::{lock, RateLimiter, SharedRateLimiter};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::queue::{add_used, notify_if_needed};
use crate::virtio::worker::{drain_eventfd, EventSetPoller, GuestErrorLog, TOKEN_STOP};

const TOKEN_QUEUE: u64 = 1;
const TOKEN_RATE_LIMIT: u64 = 2;

/// Serves the request queue of one block device: the body an activation
/// hands to the device's worker thread.
pub(super) struct BlockWorker {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    /// The worker thread's stop eventfd, already in `poller`.
    stop: Arc<EventFd>,
    /// The worker thread's epoll set.
    poller: Arc<EventSetPoller>,
    handler: RequestHandler,
    /// The device's rate limiter, kept by the device across activations.
    limiter: Option<SharedRateLimiter>,
}

/// Turns descriptor chains into completed requests.
struct RequestHandler {
    disk: Disk,
    limits: RequestLimits,
    bounce: Vec<u8>,
    bad_requests: GuestErrorLog,
    io_errors: GuestErrorLog,
}

impl BlockWorker {
    /// Builds the body (on the activating vCPU thread: no syscalls).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        queue_evt: Arc<EventFd>,
        interrupt: Arc<Interrupt>,
        disk: Disk,
        limits: RequestLimits,
        poller: Arc<EventSetPoller>,
        stop: Arc<EventFd>,
        limiter: Option<SharedRateLimiter>,
    ) -> Self {
        Self {
            mem,
            queue,
            queue_evt,
            interrupt,
            stop,
            poller,
            limiter,
            handler: RequestHandler {
                disk,
                limits,
                bounce: Vec::new(),
                bad_requests: GuestErrorLog::default(),
                io_errors: GuestErrorLog::default(),
            },
        }
    }

    /// The thread body: registers the queue eventfd in the worker's epoll
    /// set, serves the queue until told to stop, and unregisters it (the
    /// epoll set outlives this activation).
    pub(super) fn run(mut self) {
        if let Err(e) = self.poller.add(&*self.queue_evt, TOKEN_QUEUE) {
            error!("virtio-blk worker: cannot poll the queue eventfd, stopping: {e}");
            return;
        }
        let limiter = self.limiter.clone();
        let timer_polled = match &limiter {
            Some(l) => match self.poller.add(&*lock(l), TOKEN_RATE_LIMIT) {
                Ok(()) => true,
                Err(e) => {
                    error!("virtio-blk worker: cannot poll the rate limiter, stopping: {e}");
                    false
                }
            },
            None => true,
        };
        if timer_polled {
            self.serve();
        }
        if let Err(e) = self.poller.remove(&*self.queue_evt) {
            error!("virtio-blk worker: cannot stop polling the queue eventfd: {e}");
        }
        if let (Some(l), true) = (&limiter, timer_polled) {
            if let Err(e) = self.poller.remove(&*lock(l)) {
                error!("virtio-blk worker: cannot stop polling the rate limiter: {e}");
            }
        }
    }

    fn serve(&mut self) {
        // Requests queued before activation completed.
        self.process_queue();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.poller.wait(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    error!("virtio-blk worker: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        drain_eventfd(&self.stop);
                        return;
                    }
                    TOKEN_QUEUE => {
                        drain_eventfd(&self.queue_evt);
                        self.process_queue();
                    }
                    TOKEN_RATE_LIMIT => {
                        if let Some(l) = &self.limiter {
                            lock(l).timer_expired();
                        }
                        self.process_queue();
                    }
                    _ => {}
                }
            }
        }
    }

    /// Handles every available request, then interrupts the guest if it
    /// wants to know.
    pub(super) fn process_queue(&mut self) {
        let Self {
            mem,
            queue,
            interrupt,
            handler,
            limiter,
            ..
        } = self;
        let mut limiter = limiter.as_ref().map(|l| lock(l));
        let mut total = 0usize;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn!("virtio-blk: cannot disable queue notifications: {e}");
            }
            let mut handled = 0usize;
            let mut throttled = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let Some(len) = handler.handle(mem, chain, limiter.as_deref_mut()) else {
                    // Over the rate limit: the request goes back on the
                    // ring until the limiter's timer fires.
                    queue.go_to_previous_position();
                    throttled = true;
                    break;
                };
                add_used(queue, mem, head, len);
                handled += 1;
            }
            total += handled;
            if throttled {
                break;
            }
            match queue.enable_notification(mem) {
                // More requests arrived while notifications were off. Unless
                // the ring is corrupt (nothing could be popped), go again.
                Ok(true) if handled > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!("virtio-blk: cannot enable queue notifications: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            notify_if_needed(queue, mem, interrupt);
        }
    }
}

impl RequestHandler {
    /// Parses and runs one request; returns the used length (bytes written
    /// into the chain, status byte included), or `None` when `limiter` says
    /// the request must wait.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        limiter: Option<&mut RateLimiter>,
    ) -> Option<u32> {
        let head = chain.head_index();
        let req = match request::parse(mem, chain, &self.limits) {
            Ok(req) => req,
            Err(Rejected { error, status }) => {
                if let Some(n) = self.bad_requests.hit() {
                    warn!(head, occurrences = n, "virtio-blk: bad request: {error}");
                }
                return Some(match status {
                    Some(addr) => complete(mem, addr, error.status(), 0),
                    // Nowhere to put a status: hand the chain back empty.
                    None => 0,
                });
            }
        };
        if let Some(limiter) = limiter {
            match limiter.admit(req.data_len) {
                Ok(true) => {}
                Ok(false) => return None,
                // Without a working timer, throttling could stall the disk
                // forever: let the request through.
                Err(e) => warn!("virtio-blk: rate limiter timer failed: {e}"),
            }
        }
        Some(match self.disk.execute(mem, &req, &mut self.bounce) {
            Ok(written) => complete(mem, req.status, VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                if let Some(n) = self.io_errors.hit() {
                    warn!(
                        head,
                        occurrences = n,
                        "virtio-blk: {:?} request failed: {e}",
                        req.request_type
                    );
                }
                complete(mem, req.status, VIRTIO_BLK_S_IOERR as u8, 0)
            }
        })
    }
}

/// Writes the status byte; returns the used length.
fn complete(mem: &GuestMemoryMmap, status_addr: GuestAddress, status: u8, written: u32) -> u32 {
    match mem.write_obj(status, status_addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            warn!("virtio-blk: cannot write the status byte: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vmm_sys_util::tempfile::TempFile;

    use crate::virtio::block::raw::RawFile;
    use crate::virtio::block::request::tests::{desc, mem, write_header, DATA, HDR, STATUS, W};

    /// Where the tests put the used ring.
    const USED: u64 = 0x8000;

    fn used_idx(m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    struct Rig<'a> {
        mq: MockSplitQueue<'a, GuestMemoryMmap>,
        worker: BlockWorker,
        irq: EventFd,
        _img: TempFile,
    }

    fn rig(m: &GuestMemoryMmap, read_only: bool, event_idx: bool) -> Rig<'_> {
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
        let worker = BlockWorker::new(
            m.clone(),
            queue,
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            Disk {
                backend: Arc::new(backend),
                read_only,
                serial,
                counters: Arc::default(),
            },
            RequestLimits {
                capacity_sectors: 64,
                seg_max: 8,
                max_range_sectors: 64,
                max_ranges: 4,
            },
            Arc::new(EventSetPoller::new().unwrap()),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            None,
        );
        Rig {
            mq,
            worker,
            irq,
            _img: img,
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
        use crate::rate_limiter::{lock, shared, RateLimit};
        let m = mem();
        let mut r = rig(&m, false, false);
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
        assert_eq!(used_idx(&m), 2);
        let mut b = [0u8; 512];
        m.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(b.iter().all(|&x| x == 2));
    }

    #[test]
    fn reads_and_interrupts() {
        let m = mem();
        let mut r = rig(&m, false, false);
        let chain = io(&m, VIRTIO_BLK_T_IN, 5, desc(DATA, 1024, W));
        assert_eq!(r.submit(&m, &chain), (OK, 1025));
        let mut b = [0u8; 1024];
        m.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(b[..512].iter().all(|&x| x == 5) && b[512..].iter().all(|&x| x == 6));
        assert_eq!(r.irq.read().unwrap(), 1);
    }

    #[test]
    fn writes_flushes_and_get_id() {
        let m = mem();
        let mut r = rig(&m, false, false);
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
        let m = mem();
        let mut r = rig(&m, false, false);
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
        let m = mem();
        let mut r = rig(&m, true, false);
        let chain = io(&m, VIRTIO_BLK_T_OUT, 0, desc(DATA, 512, 0));
        assert_eq!(r.submit(&m, &chain), (IOERR, 1));
        let chain = io(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0, desc(DATA, 16, 0));
        assert_eq!(r.submit(&m, &chain), (IOERR, 1));
        let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 512, W));
        assert_eq!(r.submit(&m, &chain), (OK, 513));
    }

    #[test]
    fn hostile_requests_get_error_statuses() {
        let m = mem();
        let mut r = rig(&m, false, false);
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
        // Zero-length data.
        let chain = io(&m, VIRTIO_BLK_T_IN, 0, desc(DATA, 0, W));
        assert_eq!(r.submit(&m, &chain), (IOERR, 1));
        // The device keeps working.
        let chain = io(&m, VIRTIO_BLK_T_IN, 1, desc(DATA, 512, W));
        assert_eq!(r.submit(&m, &chain), (OK, 513));
    }

    #[test]
    fn chains_without_a_status_are_returned_empty() {
        let m = mem();
        let mut r = rig(&m, false, false);
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
        let m = mem();
        let mut r = rig(&m, false, false);
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
        let m = mem();
        let mut r = rig(&m, false, false);
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
        let m = mem();
        let mut r = rig(&m, false, true);
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
        assert_eq!(r.irq.read().unwrap(), 1);
        // The worker asked to be kicked at the next request.
        let avail_event = USED + 4 + 8 * 16;
        assert_eq!(m.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 2);
    }
}
