//! The virtio-net worker thread: moves frames between the TAP and the guest.
//!
//! Receive is flow-controlled by the guest: when it has no free receive
//! buffers the worker keeps the frame it already read, stops polling the TAP
//! (the kernel queues further frames, or applies its own backpressure) and
//! resumes when the guest kicks the receive queue. Frames are never dropped
//! because the guest is slow.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::CtrlQueue;
use super::rx::write_rx_frame;
use super::tap::VNET_HDR_LEN;
use super::tx::read_tx_frame;
use super::{FrameIo, MAX_BUFFER_LEN};
use crate::rate_limiter::{lock, SharedRateLimiter};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::queue::{add_used, disable_notification, enable_notification, notify_if_needed};
use crate::virtio::worker::{drain_eventfd, EventSetPoller, GuestErrorLog, TOKEN_STOP};

const TOKEN_RX_QUEUE: u64 = 1;
const TOKEN_TX_QUEUE: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_RX_LIMIT: u64 = 4;
const TOKEN_TX_LIMIT: u64 = 5;
const TOKEN_CTRL_QUEUE: u64 = 6;

/// The device's rate limiters, one per direction, kept by the device across
/// activations.
#[derive(Clone, Default)]
pub(super) struct NetLimiters {
    pub rx: Option<SharedRateLimiter>,
    pub tx: Option<SharedRateLimiter>,
}

/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Serves the receive and transmit queues of one network device: the body
/// an activation hands to the device's worker thread.
pub(super) struct NetWorker<T: FrameIo> {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_evt: Arc<EventFd>,
    tx_evt: Arc<EventFd>,
    /// The control queue, when the driver negotiated one.
    ctrl: Option<CtrlQueue>,
    interrupt: Arc<Interrupt>,
    tap: Arc<T>,
    /// The worker thread's stop eventfd, already in `poller`.
    stop: Arc<EventFd>,
    /// The worker thread's epoll set.
    poller: Arc<EventSetPoller>,

    limiters: NetLimiters,

    /// The frame read from the TAP and not yet delivered.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// The pending frame passed the receive rate limiter already.
    rx_admitted: bool,
    /// Whether the TAP is polled for readability.
    tap_polled: bool,
    /// The TAP reported an error or hang-up and was dropped from the set.
    tap_dead: bool,
    tx_frame: Vec<u8>,

    bad_tx: GuestErrorLog,
    bad_rx: GuestErrorLog,
    tap_errors: GuestErrorLog,
}

impl<T: FrameIo + 'static> NetWorker<T> {
    /// Builds the body (on the activating vCPU thread: no syscalls beyond
    /// allocating its frame buffers).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        rx_evt: Arc<EventFd>,
        tx_evt: Arc<EventFd>,
        ctrl: Option<CtrlQueue>,
        interrupt: Arc<Interrupt>,
        tap: Arc<T>,
        poller: Arc<EventSetPoller>,
        stop: Arc<EventFd>,
        limiters: NetLimiters,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            ctrl,
            interrupt,
            tap,
            stop,
            poller,
            limiters,
            rx_frame: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            rx_admitted: false,
            tap_polled: true,
            tap_dead: false,
            tx_frame: Vec::with_capacity(MAX_BUFFER_LEN),
            bad_tx: GuestErrorLog::default(),
            bad_rx: GuestErrorLog::default(),
            tap_errors: GuestErrorLog::default(),
        }
    }

    /// The thread body: registers the queue eventfds and the TAP in the
    /// worker's epoll set, serves the queues until told to stop, and
    /// unregisters them (the epoll set outlives this activation). Returns
    /// the queues (RX, TX, control if any) as it left them: nothing is in
    /// flight between two events.
    pub(super) fn run(mut self) -> Vec<Queue> {
        match self.register() {
            Ok(()) => self.serve(),
            Err(e) => {
                error!("virtio-net worker: cannot poll the queues and the TAP, stopping: {e}")
            }
        }
        self.unregister();
        self.into_queues()
    }

    /// The queues: RX, TX, then the control queue if there is one.
    pub(super) fn into_queues(self) -> Vec<Queue> {
        let mut queues = vec![self.rx, self.tx];
        queues.extend(self.ctrl.map(CtrlQueue::into_queue));
        queues
    }

    /// Adds this activation's fds to the worker's epoll set.
    pub(super) fn register(&self) -> io::Result<()> {
        self.poller.add(&*self.rx_evt, TOKEN_RX_QUEUE)?;
        self.poller.add(&*self.tx_evt, TOKEN_TX_QUEUE)?;
        self.poller.add(&*self.tap, TOKEN_TAP)?;
        if let Some(c) = &self.ctrl {
            self.poller.add(&**c.evt(), TOKEN_CTRL_QUEUE)?;
        }
        if let Some(l) = &self.limiters.rx {
            self.poller.add(&*lock(l), TOKEN_RX_LIMIT)?;
        }
        if let Some(l) = &self.limiters.tx {
            self.poller.add(&*lock(l), TOKEN_TX_LIMIT)?;
        }
        Ok(())
    }

    /// Removes whatever [`NetWorker::register`] added and is still there.
    fn unregister(&self) {
        let limiter_fd = |l: &Option<SharedRateLimiter>| l.as_ref().map(|l| lock(l).as_raw_fd());
        let fds = [
            ("RX queue eventfd", Some(self.rx_evt.as_raw_fd())),
            ("TX queue eventfd", Some(self.tx_evt.as_raw_fd())),
            ("TAP", Some(self.tap.as_raw_fd())),
            (
                "control queue eventfd",
                self.ctrl.as_ref().map(|c| c.evt().as_raw_fd()),
            ),
            ("RX rate limiter", limiter_fd(&self.limiters.rx)),
            ("TX rate limiter", limiter_fd(&self.limiters.tx)),
        ];
        for (what, fd) in fds {
            let Some(fd) = fd else { continue };
            match self.poller.remove(&fd) {
                Ok(()) => {}
                // Never added, or dropped after a TAP error.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => error!("virtio-net worker: cannot stop polling the {what}: {e}"),
            }
        }
    }

    fn serve(&mut self) {
        self.process_tx();
        self.process_ctrl();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.poller.wait(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    error!("virtio-net worker: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if !self.handle_event(ev.data(), ev.event_set()) {
                    return;
                }
            }
        }
    }

    /// Handles one epoll event; returns false when the worker must stop.
    pub(super) fn handle_event(&mut self, token: u64, events: EventSet) -> bool {
        match token {
            TOKEN_STOP => {
                drain_eventfd(&self.stop);
                return false;
            }
            TOKEN_RX_QUEUE => {
                drain_eventfd(&self.rx_evt);
                self.resume_rx();
            }
            TOKEN_TX_QUEUE => {
                drain_eventfd(&self.tx_evt);
                self.process_tx();
            }
            TOKEN_CTRL_QUEUE => {
                if let Some(c) = &self.ctrl {
                    drain_eventfd(c.evt());
                }
                self.process_ctrl();
            }
            TOKEN_RX_LIMIT => {
                if let Some(l) = &self.limiters.rx {
                    lock(l).timer_expired();
                }
                self.resume_rx();
            }
            TOKEN_TX_LIMIT => {
                if let Some(l) = &self.limiters.tx {
                    lock(l).timer_expired();
                }
                self.process_tx();
            }
            TOKEN_TAP => {
                if events.intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !events.contains(EventSet::IN)
                {
                    self.drop_tap();
                } else {
                    self.process_rx();
                }
            }
            _ => {}
        }
        true
    }

    /// Answers the control commands the driver queued.
    fn process_ctrl(&mut self) {
        if let Some(c) = &mut self.ctrl {
            c.process(&self.mem, &self.interrupt);
        }
    }

    fn drop_tap(&mut self) {
        error!("virtio-net: the TAP reported an error; receive stops");
        if let Err(e) = self.poller.remove(&*self.tap) {
            error!("virtio-net: cannot stop polling the TAP: {e}");
        }
        self.tap_dead = true;
    }

    /// The guest added receive buffers: deliver what is waiting and poll the
    /// TAP again.
    fn resume_rx(&mut self) {
        if self.tap_dead {
            return;
        }
        if !self.tap_polled {
            match self
                .poller
                .set_readable_interest(&*self.tap, TOKEN_TAP, true)
            {
                Ok(()) => self.tap_polled = true,
                Err(e) => error!("virtio-net: cannot resume polling the TAP: {e}"),
            }
        }
        self.process_rx();
    }

    fn pause_rx(&mut self) {
        if self.tap_polled {
            match self
                .poller
                .set_readable_interest(&*self.tap, TOKEN_TAP, false)
            {
                Ok(()) => self.tap_polled = false,
                Err(e) => error!("virtio-net: cannot pause polling the TAP: {e}"),
            }
        }
    }

    /// Moves frames from the TAP into guest receive buffers until either
    /// runs out.
    pub(super) fn process_rx(&mut self) {
        let mut delivered = 0usize;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= VNET_HDR_LEN => {
                        // The TAP leaves num_buffers alone; without
                        // VIRTIO_NET_F_MRG_RXBUF it must read 1.
                        self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
                            .copy_from_slice(&1u16.to_le_bytes());
                        len
                    }
                    Ok(len) => {
                        if let Some(n) = self.tap_errors.hit() {
                            warn!(
                                occurrences = n,
                                "virtio-net: dropping a {len}-byte TAP read"
                            );
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if let Some(n) = self.tap_errors.hit() {
                            warn!(occurrences = n, "virtio-net: TAP read failed: {e}");
                        }
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            if !self.rx_admitted {
                if !admit(&self.limiters.rx, len - VNET_HDR_LEN) {
                    // Over the receive rate: stop reading the TAP until the
                    // limiter's timer fires.
                    self.pause_rx();
                    break;
                }
                self.rx_admitted = true;
            }
            let Some(chain) = next_rx_chain(&mut self.rx, &self.mem) else {
                self.pause_rx();
                break;
            };
            let head = chain.head_index();
            let max = self.rx.size();
            let used = match write_rx_frame(&self.mem, chain, max, &self.rx_frame[..len]) {
                Ok(used) => used,
                Err(e) => {
                    if let Some(n) = self.bad_rx.hit() {
                        warn!(
                            occurrences = n,
                            "virtio-net: dropping a received frame: {e}"
                        );
                    }
                    0
                }
            };
            add_used(&mut self.rx, &self.mem, head, used);
            self.rx_pending = None;
            self.rx_admitted = false;
            delivered += 1;
        }
        if delivered > 0 {
            notify_if_needed(&mut self.rx, &self.mem, &self.interrupt);
        }
    }

    /// Sends every frame the guest queued for transmission.
    pub(super) fn process_tx(&mut self) {
        let mut total = 0usize;
        loop {
            if let Err(e) = disable_notification(&mut self.tx, &self.mem) {
                warn!("virtio-net: cannot disable TX notifications: {e}");
            }
            let mut handled = 0usize;
            let mut throttled = false;
            let max = self.tx.size();
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                match read_tx_frame(&self.mem, chain, max, &mut self.tx_frame) {
                    Ok(len) if !admit(&self.limiters.tx, len - VNET_HDR_LEN) => {
                        // Over the transmit rate: the frame goes back on the
                        // ring until the limiter's timer fires.
                        self.tx.go_to_previous_position();
                        throttled = true;
                        break;
                    }
                    Ok(len) => self.send(len),
                    Err(e) => {
                        if let Some(n) = self.bad_tx.hit() {
                            warn!(occurrences = n, "virtio-net: dropping a TX chain: {e}");
                        }
                    }
                }
                add_used(&mut self.tx, &self.mem, head, 0);
                handled += 1;
            }
            total += handled;
            if throttled {
                break;
            }
            match enable_notification(&mut self.tx, &self.mem) {
                Ok(true) if handled > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!("virtio-net: cannot enable TX notifications: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            notify_if_needed(&mut self.tx, &self.mem, &self.interrupt);
        }
    }

    fn send(&mut self, len: usize) {
        loop {
            match self.tap.write_frame(&self.tx_frame[..len]) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The kernel rejects malformed frames (e.g. a bad GSO
                    // header) and drops when its queue is full.
                    if let Some(n) = self.tap_errors.hit() {
                        warn!(occurrences = n, "virtio-net: TAP write failed: {e}");
                    }
                    return;
                }
            }
        }
    }
}

/// Asks a direction's rate limiter whether a frame of `bytes` may go now
/// (if not, its timer is armed). A limiter whose timer fails lets traffic
/// through rather than stall the interface.
fn admit(limiter: &Option<SharedRateLimiter>, bytes: usize) -> bool {
    let Some(l) = limiter else { return true };
    lock(l).admit(bytes as u64).unwrap_or_else(|e| {
        warn!("virtio-net: rate limiter timer failed: {e}");
        true
    })
}

/// Pops a receive chain; when there is none, asks the guest to kick the
/// queue once it adds one (and catches buffers added meanwhile).
fn next_rx_chain<'m>(
    rx: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(chain) = rx.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match enable_notification(rx, mem) {
        Ok(true) => rx.pop_descriptor_chain(mem),
        Ok(false) => None,
        Err(e) => {
            warn!("virtio-net: cannot enable RX notifications: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const RX_USED: u64 = 0x8000;
    const TX_USED: u64 = 0x9000;
    const BUF: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    struct Rig<'a> {
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        worker: NetWorker<UnixDatagram>,
        peer: UnixDatagram,
        irq: EventFd,
    }

    fn rig(m: &GuestMemoryMmap) -> Rig<'_> {
        rig_at(m, 0)
    }

    /// The rig with its rings at `base` + the usual addresses.
    fn rig_at(m: &GuestMemoryMmap, base: u64) -> Rig<'_> {
        let rxq = MockSplitQueue::create(m, GuestAddress(base), 16);
        let txq = MockSplitQueue::create(m, GuestAddress(base + 0x4000), 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        // The mock's used rings overlap the avail rings' used_event fields.
        let (rx_used, tx_used) = (base + RX_USED, base + TX_USED);
        rx.set_used_ring_address(Some(rx_used as u32), Some((rx_used >> 32) as u32));
        tx.set_used_ring_address(Some(tx_used as u32), Some((tx_used >> 32) as u32));
        let (tap, peer) = UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker = NetWorker::new(
            m.clone(),
            rx,
            tx,
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            None,
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            Arc::new(tap),
            Arc::new(EventSetPoller::new().unwrap()),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            NetLimiters::default(),
        );
        worker.register().unwrap();
        Rig {
            rxq,
            txq,
            worker,
            peer,
            irq,
        }
    }

    fn used(m: &GuestMemoryMmap, ring: u64) -> Vec<(u32, u32)> {
        let idx: u16 = m.read_obj(GuestAddress(ring + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = ring + 4 + 8 * u64::from(i % 16);
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Offers `n` single-buffer receive chains of `len` bytes starting at
    /// descriptor `first`.
    fn offer_rx(r: &Rig, first: u16, n: u16, len: u32) {
        let descs: Vec<_> = (0..n)
            .map(|i| d(BUF + u64::from(first + i) * 0x1_0000, len, W))
            .collect();
        r.rxq.add_desc_chains(&descs, first).unwrap();
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    #[test]
    fn transmits_frames_to_the_tap() {
        let m = mem();
        let mut r = rig(&m);
        m.write_slice(&frame(0x11, 80), GuestAddress(BUF)).unwrap();
        r.txq
            .build_desc_chain(&[d(BUF, 12, 0), d(BUF + 12, 68, 0)])
            .unwrap();
        r.worker.process_tx();
        let mut got = [0u8; 200];
        let n = r.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame(0x11, 80)[..]);
        assert_eq!(used(&m, TX_USED), vec![(0, 0)]);
        assert_eq!(r.irq.read().unwrap(), 1);
    }

    /// A limiter letting one frame through per 100 ms.
    fn one_frame_per_100ms() -> SharedRateLimiter {
        crate::rate_limiter::shared(crate::rate_limiter::RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(10),
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn frames_over_the_transmit_rate_wait_on_the_ring() {
        let m = mem();
        let mut r = rig(&m);
        let limiter = one_frame_per_100ms();
        r.worker.limiters.tx = Some(limiter.clone());
        m.write_slice(&frame(0x11, 80), GuestAddress(BUF)).unwrap();
        m.write_slice(&frame(0x22, 80), GuestAddress(BUF + 0x1000))
            .unwrap();
        r.txq
            .add_desc_chains(&[d(BUF, 80, 0), d(BUF + 0x1000, 80, 0)], 0)
            .unwrap();
        r.worker.process_tx();
        // The first frame went, the second waits on the ring.
        assert_eq!(used(&m, TX_USED), vec![(0, 0)]);
        let mut got = [0u8; 200];
        assert_eq!(r.peer.recv(&mut got).unwrap(), 80);
        assert_eq!(got[79], 0x11);
        assert!(
            r.peer.recv(&mut got).is_err(),
            "the second frame went early"
        );
        // The timer fires (blocks until then): the frame goes.
        assert!(r.worker.handle_event(TOKEN_TX_LIMIT, EventSet::IN));
        assert_eq!(used(&m, TX_USED), vec![(0, 0), (1, 0)]);
        assert_eq!(r.peer.recv(&mut got).unwrap(), 80);
        assert_eq!(got[79], 0x22);
    }

    #[test]
    fn frames_over_the_receive_rate_stay_in_the_tap() {
        let m = mem();
        let mut r = rig(&m);
        let limiter = one_frame_per_100ms();
        r.worker.limiters.rx = Some(limiter.clone());
        offer_rx(&r, 0, 2, 2048);
        r.peer.send(&frame(0x33, 100)).unwrap();
        r.peer.send(&frame(0x44, 100)).unwrap();
        r.worker.process_rx();
        assert_eq!(used(&m, RX_USED), vec![(0, 100)]);
        assert!(lock(&limiter).is_blocked());
        // A guest kick while throttled delivers nothing more.
        r.worker.handle_event(TOKEN_RX_QUEUE, EventSet::IN);
        assert_eq!(used(&m, RX_USED), vec![(0, 100)]);
        // The timer fires (blocks until then): the frame goes.
        r.worker.handle_event(TOKEN_RX_LIMIT, EventSet::IN);
        assert_eq!(used(&m, RX_USED), vec![(0, 100), (1, 100)]);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF + 0x1_0000 + 99)).unwrap(),
            0x44
        );
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_returned() {
        let m = mem();
        let mut r = rig(&m);
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            // 0: write-only buffer.
            d(BUF, 100, W),
            // 1: outside guest memory.
            d(0x3f_fff0, 100, 0),
            // 2: too long.
            d(BUF, 70_000, 0),
            // 3: too short.
            d(BUF, 4, 0),
            // 4 -> 5 -> 4: a loop.
            RawDescriptor::from(Descriptor::new(BUF, 12, n, 5)),
            RawDescriptor::from(Descriptor::new(BUF, 12, n, 4)),
        ];
        r.txq.add_desc_chains(&descs, 0).unwrap();
        r.worker.process_tx();
        assert!(r.peer.recv(&mut [0u8; 16]).is_err());
        let heads: Vec<u32> = used(&m, TX_USED).iter().map(|u| u.0).collect();
        assert_eq!(heads, vec![0, 1, 2, 3, 4]);
        // A good frame still goes through afterwards.
        m.write_slice(&frame(0x22, 64), GuestAddress(BUF)).unwrap();
        r.txq.add_desc_chains(&[d(BUF, 64, 0)], 6).unwrap();
        r.worker.process_tx();
        let mut got = [0u8; 100];
        assert_eq!(r.peer.recv(&mut got).unwrap(), 64);
    }

    #[test]
    fn receives_frames_into_guest_buffers() {
        let m = mem();
        let mut r = rig(&m);
        offer_rx(&r, 0, 2, 2048);
        r.peer.send(&frame(0x33, 100)).unwrap();
        r.peer.send(&frame(0x44, 1500)).unwrap();
        r.worker.process_rx();
        assert_eq!(used(&m, RX_USED), vec![(0, 100), (1, 1500)]);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(BUF)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        assert_eq!(m.read_obj::<u8>(GuestAddress(BUF + 99)).unwrap(), 0x33);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF + 0x1_0000 + 12)).unwrap(),
            0x44
        );
        assert_eq!(r.irq.read().unwrap(), 1);
    }

    #[test]
    fn a_slow_guest_pauses_the_tap_without_dropping_frames() {
        let m = mem();
        let mut r = rig(&m);
        for tag in 1..=3u8 {
            r.peer.send(&frame(tag, 60 + usize::from(tag))).unwrap();
        }
        // No buffers: the first frame is held, the TAP is no longer polled.
        assert!(r.worker.handle_event(TOKEN_TAP, EventSet::IN));
        assert!(!r.worker.tap_polled);
        assert_eq!(r.worker.rx_pending, Some(61));
        assert!(used(&m, RX_USED).is_empty());
        assert!(r.irq.read().is_err());
        // One buffer: one frame delivered, then paused again.
        offer_rx(&r, 0, 1, 2048);
        assert!(r.worker.handle_event(TOKEN_RX_QUEUE, EventSet::IN));
        assert_eq!(used(&m, RX_USED), vec![(0, 61)]);
        assert!(!r.worker.tap_polled);
        assert_eq!(r.worker.rx_pending, Some(62));
        // More buffers: the rest arrive, in order.
        offer_rx(&r, 1, 4, 2048);
        assert!(r.worker.handle_event(TOKEN_RX_QUEUE, EventSet::IN));
        assert_eq!(used(&m, RX_USED), vec![(0, 61), (1, 62), (2, 63)]);
        assert!(r.worker.tap_polled);
        assert_eq!(r.worker.rx_pending, None);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF + 0x2_0000 + 62)).unwrap(),
            3
        );
    }

    #[test]
    fn hostile_rx_chains_drop_one_frame_and_go_on() {
        let m = mem();
        let mut r = rig(&m);
        // Too small, device-readable, outside memory, then a good one.
        r.rxq
            .add_desc_chains(
                &[
                    d(BUF, 50, W),
                    d(BUF, 2048, 0),
                    d(0x3f_ff00, 2048, W),
                    d(BUF + 0x1_0000, 2048, W),
                ],
                0,
            )
            .unwrap();
        for tag in 1..=4u8 {
            r.peer.send(&frame(tag, 100)).unwrap();
        }
        r.worker.process_rx();
        assert_eq!(used(&m, RX_USED), vec![(0, 0), (1, 0), (2, 0), (3, 100)]);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BUF + 0x1_0000 + 50)).unwrap(),
            4
        );
    }

    /// A received frame marks the buffers it was written to and the used
    /// ring for live migration ([`crate::dirty`]), not the buffer it did not
    /// need nor the rings the device only reads. The tracker's RAM is far
    /// above what other tests use (they run meanwhile).
    #[test]
    fn received_frames_mark_their_buffers_and_the_used_ring() {
        use crate::dirty::{self, PAGE_SIZE};
        const BASE: u64 = 0x7300_0000_0000;
        let _g = dirty::test_lock();
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 0x40_0000)]).unwrap();
        let mut r = rig_at(&m, BASE);
        // 512 bytes at the end of page 256, 4 KiB across pages 512-513,
        // 4 KiB on page 768 (the frame does not reach it).
        let b1 = BASE + 257 * PAGE_SIZE - 0x200;
        let b2 = BASE + 513 * PAGE_SIZE - 0x10;
        let b3 = BASE + 768 * PAGE_SIZE;
        r.rxq
            .build_desc_chain(&[d(b1, 0x200, W), d(b2, 0x1000, W), d(b3, 0x1000, W)])
            .unwrap();
        dirty::start(&[(GuestAddress(BASE), 0x40_0000)]);
        r.peer.send(&frame(0x5a, 0x300)).unwrap();
        r.worker.process_rx();
        let words = dirty::take();
        dirty::stop();
        assert_eq!(used(&m, BASE + RX_USED), vec![(0, 0x300)]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(b2 + 0xff)).unwrap(), 0x5a);
        let marked: Vec<u64> = (0..words.len() as u64 * 64)
            .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(marked, vec![8, 256, 512, 513]);
    }

    #[test]
    fn tap_errors_stop_polling_it() {
        let m = mem();
        let mut r = rig(&m);
        assert!(r.worker.handle_event(TOKEN_TAP, EventSet::HANG_UP));
        assert!(r.worker.tap_dead);
        // Kicks no longer touch the TAP.
        assert!(r.worker.handle_event(TOKEN_RX_QUEUE, EventSet::IN));
        assert!(!r.worker.handle_event(TOKEN_STOP, EventSet::IN));
    }
}
