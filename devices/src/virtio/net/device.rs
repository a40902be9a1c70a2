//! The virtio-net device model: features, configuration space, activation.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;

use super::announce::Announcer;
use super::ctrl::CtrlQueue;
use super::mac::{MacAddr, MacError};
use super::tap::{Tap, TapError};
use super::worker::{NetLimiters, NetWorker};
use crate::rate_limiter::{self, RateLimit};
use crate::virtio::device::{ActivateContext, ActivateError, VirtioDevice, WorkerHook};
use crate::virtio::state::{DeviceSnapshot, NetSnapshot, RestoreError, SnapshotError};
use crate::virtio::worker::Worker;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Control queue index (`VIRTIO_NET_F_CTRL_VQ`).
pub const CTRL_QUEUE: usize = 2;
/// Size of the control queue: Linux keeps one command in flight.
pub const CTRL_QUEUE_SIZE: u16 = 64;

/// `mac[6]` then `status: u16`.
const CONFIG_LEN: usize = 8;

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

/// What a `--net` option describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// An existing TAP interface.
    pub tap: String,
    /// The guest's MAC; a random 52:54:00:xx:xx:xx one when absent.
    pub mac: Option<[u8; 6]>,
    /// Bytes and frames per second, each direction (default: no limit).
    pub rate_limit: RateLimit,
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Mac(#[from] MacError),
    #[error("cannot create the rate limiter's timer: {0}")]
    RateLimiter(#[source] std::io::Error),
}

/// A virtio-net device on a TAP interface.
pub struct Net {
    name: String,
    tap: Arc<Tap>,
    mac: MacAddr,
    avail_features: u64,
    /// The config space's `status` field, and the announcement trigger.
    announcer: Arc<Announcer>,
    queue_sizes: [u16; 3],
    /// Spawned by [`VirtioDevice::spawn_worker`] (or the first activation)
    /// and kept until the device is dropped.
    worker: Option<Worker>,
    limiters: NetLimiters,
    /// Where the worker leaves the queues when its body returns.
    handback: Arc<Mutex<Option<Vec<Queue>>>>,
}

impl Net {
    /// Attaches to the TAP interface `cfg.tap`.
    pub fn new(cfg: NetConfig) -> Result<Self, Error> {
        let mac = match cfg.mac {
            Some(m) if m[0] & 1 != 0 => {
                return Err(MacError::Multicast(MacAddr(m).to_string()).into())
            }
            Some(m) if m == [0; 6] => return Err(MacError::Zero.into()),
            Some(m) => MacAddr(m),
            None => MacAddr::random(),
        };
        let tap = Tap::open(&cfg.tap)?;
        let limiters = NetLimiters {
            rx: rate_limiter::shared(cfg.rate_limit).map_err(Error::RateLimiter)?,
            tx: rate_limiter::shared(cfg.rate_limit).map_err(Error::RateLimiter)?,
        };
        let features = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .fold(0u64, |f, &bit| f | (1u64 << bit));
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        info!(tap = %cfg.tap, %mac, "virtio-net device created");
        Ok(Self {
            name: format!("kiln-net{index}"),
            tap: Arc::new(tap),
            mac,
            avail_features: features,
            announcer: Arc::new(Announcer::default()),
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            worker: None,
            limiters,
            handback: Arc::default(),
        })
    }

    /// Frames through the interface, for the control API.
    pub fn counters(&self) -> Arc<crate::virtio::metrics::NetCounters> {
        self.tap.counters()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac.0
    }

    /// The worker thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The announcement trigger, to keep before the device is boxed into
    /// its transport: after a restore or a migration,
    /// [`Announcer::announce`] asks the guest to announce itself.
    pub fn announcer(&self) -> Arc<Announcer> {
        self.announcer.clone()
    }

    /// Asks the guest to announce itself (see [`Announcer::announce`]).
    pub fn announce(&self) -> io::Result<bool> {
        self.announcer.announce()
    }

    /// The config space: `mac[6]` then `status: u16`.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&self.announcer.config_status().to_le_bytes());
        config
    }
}

/// The TAP offloads matching what the guest can receive: the kernel then
/// passes it partially checksummed and unsegmented (GSO) frames.
pub fn tap_offload_flags(acked_features: u64) -> libc::c_uint {
    let has = |bit: u32| acked_features & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // With VIRTIO_F_VERSION_1 the MAC and status are read-only.
        debug!(
            device = %self.name,
            "ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn spawn_worker(&mut self, hook: WorkerHook) -> io::Result<()> {
        Worker::spawn_into(&mut self.worker, &self.name, hook)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.as_ref().is_some_and(Worker::is_busy) {
            return Err(ActivateError::AlreadyActive);
        }
        let acked = |bit: u32| ctx.acked_features & (1u64 << bit) != 0;
        let has_ctrl = acked(VIRTIO_NET_F_CTRL_VQ);
        let expected = if has_ctrl { 3 } else { 2 };
        let got = ctx.queues.len();
        if got != expected || ctx.queue_events.len() != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let (Some(rx), Some(tx), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), events.next(), events.next())
        else {
            return Err(ActivateError::QueueCount { expected, got });
        };
        let ctrl = match (queues.next(), events.next()) {
            (Some(q), Some(evt)) => Some(CtrlQueue::new(q, evt, self.announcer.clone())),
            _ => None,
        };
        // GUEST_ANNOUNCE without a control queue to ack it on is invalid
        // (the driver refuses it); never announce to such a driver.
        let announces = has_ctrl && acked(VIRTIO_NET_F_GUEST_ANNOUNCE);
        let worker =
            Worker::get_or_spawn(&mut self.worker, &self.name).map_err(ActivateError::Spawn)?;
        let offload = tap_offload_flags(ctx.acked_features);
        let tap = self.tap.clone();
        let interrupt = ctx.interrupt.clone();
        let handback = self.handback.clone();
        *lock_handback(&handback) = None;
        let body = NetWorker::new(
            ctx.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            ctrl,
            ctx.interrupt.clone(),
            self.tap.clone(),
            worker.poller(),
            worker.stop_eventfd(),
            self.limiters.clone(),
        );
        worker
            .submit(move || {
                // TUNSETOFFLOAD runs here, on the worker: the activating
                // vCPU thread's seccomp filter allows only KVM_RUN.
                let queues = match tap.set_offload(offload) {
                    Ok(()) => body.run(),
                    Err(e) => {
                        tracing::error!("virtio-net: cannot set the TAP's offloads, stopping: {e}");
                        body.into_queues()
                    }
                };
                *lock_handback(&handback) = Some(queues);
            })
            .map_err(ActivateError::Worker)?;
        self.announcer.activated(announces.then_some(interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        self.announcer.reset();
        if let Some(w) = &mut self.worker {
            w.stop();
        }
        *lock_handback(&self.handback) = None;
    }

    /// Stops the worker (no frame is half moved between two of its events)
    /// and takes the queues back. A pending announcement stays.
    fn quiesce(&mut self) -> Result<Vec<Queue>, ActivateError> {
        if let Some(w) = &mut self.worker {
            w.stop();
        }
        lock_handback(&self.handback)
            .take()
            .ok_or(ActivateError::QueueLost(0))
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        Ok(DeviceSnapshot::Net(NetSnapshot {
            avail_features: self.avail_features,
            mac: self.mac.0,
        }))
    }

    /// Takes the MAC the guest knew (a device built without `mac=` got a
    /// random one); features: the transport checks those acked are offered.
    fn restore(&mut self, state: &DeviceSnapshot) -> Result<(), RestoreError> {
        let DeviceSnapshot::Net(saved) = state else {
            return Err(RestoreError::WrongKind {
                saved: state.kind(),
                here: "virtio-net",
            });
        };
        if self.worker.as_ref().is_some_and(Worker::is_busy) {
            return Err(RestoreError::InUse);
        }
        if saved.mac[0] & 1 != 0 || saved.mac == [0; 6] {
            return Err(RestoreError::Invalid(format!(
                "MAC {} is not a unicast address",
                MacAddr(saved.mac)
            )));
        }
        if saved.mac != self.mac.0 {
            warn!(
                device = %self.name,
                "the restored guest keeps its MAC {} (this device was given {})",
                MacAddr(saved.mac),
                self.mac
            );
            self.mac = MacAddr(saved.mac);
        }
        Ok(())
    }
}

fn lock_handback(h: &Mutex<Option<Vec<Queue>>>) -> std::sync::MutexGuard<'_, Option<Vec<Queue>>> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::virtio::interrupt::Interrupt;
    use crate::virtio::net::tap::tests::TestTap;

    #[test]
    fn offload_flags_follow_guest_features() {
        assert_eq!(tap_offload_flags(0), 0);
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, &b| a | (1 << b));
        // TSO without checksum offload is meaningless.
        assert_eq!(tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tap_offload_flags(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_UFO
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn constructor_errors_are_clear() {
        let cfg = |tap: &str, mac| NetConfig {
            tap: tap.into(),
            mac,
            rate_limit: RateLimit::default(),
        };
        assert!(matches!(
            Net::new(cfg("kiln-nonexist1", None)),
            Err(Error::Tap(TapError::NoSuchDevice(_)))
        ));
        assert!(matches!(
            Net::new(cfg("lo", Some([1, 0, 0, 0, 0, 1]))),
            Err(Error::Mac(MacError::Multicast(_)))
        ));
        assert!(matches!(
            Net::new(cfg("lo", Some([0; 6]))),
            Err(Error::Mac(MacError::Zero))
        ));
    }

    #[test]
    fn config_space_and_features() {
        let Some(t) = TestTap::create("kt1") else {
            return;
        };
        let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
        let n = Net::new(NetConfig {
            tap: t.0.clone(),
            mac: Some(mac),
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        assert_eq!(n.mac(), mac);
        assert_eq!(n.device_type(), VIRTIO_ID_NET);
        assert_eq!(
            n.queue_max_sizes(),
            &[QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
        );
        assert!(n.name().starts_with("kiln-net"));
        let mut c = [0u8; 10];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        assert_eq!(&c[8..], &[0, 0]);
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
        ] {
            assert_ne!(n.avail_features() & (1 << bit), 0);
        }
        // Nothing that makes Linux send control commands the device does
        // not serve.
        for bit in [
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_VLAN,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        ] {
            assert_eq!(n.avail_features() & (1 << bit), 0, "feature {bit}");
        }
        // Random MACs when none is given.
        drop(n);
        let n = Net::new(NetConfig {
            tap: t.0.clone(),
            mac: None,
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        assert_eq!(&n.mac()[..3], &[0x52, 0x54, 0x00]);
    }

    /// A driver with a control queue and GUEST_ANNOUNCE: `announce()` sets
    /// the status bit and raises a config interrupt, the driver's
    /// ANNOUNCE_ACK on the control queue (served by the worker) clears it.
    #[test]
    fn announces_through_the_config_space_and_the_control_queue() {
        let Some(t) = TestTap::create("kt3") else {
            return;
        };
        let mut n = Net::new(NetConfig {
            tap: t.0.clone(),
            mac: None,
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        let announcer = n.announcer();
        // Not active yet: nothing to ask.
        assert!(!n.announce().unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mocks: Vec<_> = (0..3u64)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(i * 0x4000), 16))
            .collect();
        let queues = |n: usize| -> Vec<Queue> {
            (0..n)
                .map(|i| {
                    let mut q: Queue = mocks[i].create_queue().unwrap();
                    q.set_used_ring_address(Some(0x2_0000 + 0x1000 * i as u32), Some(0));
                    q
                })
                .collect()
        };
        let kicks: Vec<_> = (0..3)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let acked = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | (1u64 << VIRTIO_NET_F_CTRL_VQ)
            | (1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE);
        let ctx = |queues: Vec<Queue>| ActivateContext {
            mem: mem.clone(),
            queue_events: kicks[..queues.len()].to_vec(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: acked,
        };
        // CTRL_VQ negotiated: the control queue must be there.
        assert!(matches!(
            n.activate(ctx(queues(2))),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        n.activate(ctx(queues(3))).unwrap();

        let status = |n: &Net| {
            let mut c = [0u8; 2];
            n.read_config(6, &mut c);
            u16::from_le_bytes(c)
        };
        let link_up = VIRTIO_NET_S_LINK_UP as u16;
        let announce = VIRTIO_NET_S_ANNOUNCE as u16;
        assert_eq!(status(&n), link_up);
        let generation = interrupt.config_generation();
        assert!(n.announce().unwrap());
        assert_eq!(status(&n), link_up | announce);
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_eq!(interrupt.config_generation(), generation.wrapping_add(1));

        // The driver acks on the control queue.
        mem.write_slice(&[3, 0], GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x10_1000)).unwrap();
        mocks[CTRL_QUEUE]
            .add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(0x10_0000, 2, VRING_DESC_F_NEXT as u16, 1)),
                    RawDescriptor::from(Descriptor::new(
                        0x10_1000,
                        1,
                        VRING_DESC_F_WRITE as u16,
                        0,
                    )),
                ],
                0,
            )
            .unwrap();
        kicks[CTRL_QUEUE].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while announcer.pending() {
            assert!(Instant::now() < deadline, "the worker never served the ack");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status(&n), link_up);
        let ack: u8 = mem.read_obj(GuestAddress(0x10_1000)).unwrap();
        assert_eq!(ack, VIRTIO_NET_OK as u8);

        // After a reset nothing is announced until a driver comes back.
        n.reset();
        assert!(!announcer.announce().unwrap());
        assert_eq!(status(&n), link_up);
    }

    /// Frames arriving on a real TAP mark the receive buffers they land in
    /// and the used ring for live migration ([`crate::dirty`]), and nothing
    /// else: every marked page is a used ring's or one a used buffer's
    /// bytes are on, and each of those is marked. The host side ARPs for
    /// the guest from a namespace of its own. The tracker's RAM is far above
    /// what other tests use (they run meanwhile).
    #[test]
    fn received_frames_on_a_real_tap_mark_their_buffers() {
        use crate::dirty::{self, PAGE_SIZE};
        const BASE: u64 = 0x7500_0000_0000;
        const RAM: u64 = 0x100_0000;
        let Some(t) = TestTap::create("kt5") else {
            return;
        };
        let _g = dirty::test_lock();
        let mut n = Net::new(NetConfig {
            tap: t.0.clone(),
            mac: None,
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), RAM as usize)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(BASE + 0x4000), 16);
        let (rx_used, tx_used) = (BASE + 0x8000, BASE + 0x9000);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        rx.set_used_ring_address(Some(rx_used as u32), Some((rx_used >> 32) as u32));
        tx.set_used_ring_address(Some(tx_used as u32), Some((tx_used >> 32) as u32));
        // Buffers of 6 KiB, 0x1_0000 apart, each starting 0x800 into a
        // page: a frame of more than 2 KiB lands on two pages.
        let buf = |head: u64| BASE + 0x10_0000 + head * 0x1_0000 + 0x800;
        let w = VRING_DESC_F_WRITE as u16;
        let bufs: Vec<_> = (0..8u64)
            .map(|i| RawDescriptor::from(Descriptor::new(buf(i), 0x1800, w, 0)))
            .collect();
        rxq.add_desc_chains(&bufs, 0).unwrap();
        dirty::start(&[(GuestAddress(BASE), RAM)]);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        n.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx, tx],
            queue_events: vec![
                Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features: 1u64 << VIRTIO_F_VERSION_1,
        })
        .unwrap();
        let ns = TestNetns::create("kiln-kt5");
        run(&["ip", "link", "set", "kt5", "netns", ns.0]);
        ns.exec(&["ip", "addr", "add", "10.213.9.1/24", "dev", "kt5"]);
        ns.exec(&["ip", "link", "set", "kt5", "up"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(rx_used + 2)).unwrap() == 0 {
            assert!(Instant::now() < deadline, "no frame reached the guest");
            ns.exec(&["bash", "-c", "echo hi > /dev/udp/10.213.9.2/9 || true"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        // The worker stops: every mark it made is in.
        n.reset();
        let words = dirty::take();
        dirty::stop();
        let marked: Vec<u64> = (0..words.len() as u64 * 64)
            .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        let page = |addr: u64| (addr - BASE) / PAGE_SIZE;
        // The TX used ring too: the worker sets its notification flags
        // when it starts.
        let mut expected = vec![page(rx_used), page(tx_used)];
        let used_idx: u16 = mem.read_obj(GuestAddress(rx_used + 2)).unwrap();
        for i in 0..u64::from(used_idx.min(8)) {
            let head: u32 = mem.read_obj(GuestAddress(rx_used + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(rx_used + 8 + 8 * i)).unwrap();
            assert!(len > 12, "frame {i}: {len} bytes");
            let at = buf(u64::from(head));
            expected.extend(page(at)..=page(at + u64::from(len) - 1));
        }
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(marked, expected);
    }

    /// A network namespace for one test, deleted (with what is in it)
    /// afterwards.
    struct TestNetns(&'static str);

    impl TestNetns {
        fn create(name: &'static str) -> Self {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            run(&["ip", "netns", "add", name]);
            Self(name)
        }

        /// Runs `cmd` inside the namespace.
        fn exec(&self, cmd: &[&str]) -> String {
            let mut args = vec!["ip", "netns", "exec", self.0];
            args.extend_from_slice(cmd);
            run(&args)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).output();
        }
    }

    fn run(args: &[&str]) -> String {
        let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Boots the device on a real TAP, lets the host side ARP for a guest
    /// address and sends a frame from the guest. The host side of the TAP
    /// lives in a network namespace of its own, so no traffic reaches the
    /// machine's real networks.
    #[test]
    fn moves_frames_through_a_real_tap() {
        let Some(t) = TestTap::create("kt2") else {
            return;
        };
        let mut n = Net::new(NetConfig {
            tap: t.0.clone(),
            mac: None,
            rate_limit: RateLimit::default(),
        })
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        rx.set_used_ring_address(Some(0x8000), Some(0));
        tx.set_used_ring_address(Some(0x9000), Some(0));
        let w = VRING_DESC_F_WRITE as u16;
        let bufs: Vec<_> = (0..8u64)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 0x1_0000, 0x1_0000, w, 0)))
            .collect();
        rxq.add_desc_chains(&bufs, 0).unwrap();

        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let rx_kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let tx_kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let acked = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        n.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx, tx],
            queue_events: vec![rx_kick.clone(), tx_kick.clone()],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features: acked,
        })
        .unwrap();

        let ns = TestNetns::create("kiln-kt2");
        run(&["ip", "link", "set", "kt2", "netns", ns.0]);
        ns.exec(&["ip", "addr", "add", "10.213.7.1/24", "dev", "kt2"]);
        ns.exec(&["ip", "link", "set", "kt2", "up"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut saw_arp = false;
        while !saw_arp {
            assert!(
                Instant::now() < deadline,
                "no ARP request reached the guest"
            );
            // Makes the namespace's kernel ARP for the guest.
            ns.exec(&["bash", "-c", "echo hi > /dev/udp/10.213.7.2/9 || true"]);
            std::thread::sleep(Duration::from_millis(50));
            let used_idx: u16 = mem.read_obj(GuestAddress(0x8002)).unwrap();
            for i in 0..u64::from(used_idx.min(8)) {
                let head: u32 = mem.read_obj(GuestAddress(0x8004 + 8 * i)).unwrap();
                let buf = 0x10_0000 + u64::from(head) * 0x1_0000;
                // Ethertype after the 12-byte virtio-net header and two MACs.
                let ethertype: [u8; 2] = mem.read_obj(GuestAddress(buf + 12 + 12)).unwrap();
                saw_arp |= ethertype == [0x08, 0x06];
            }
        }
        assert!(irq.read().is_ok());

        // Transmit a broadcast frame; the namespace counts it as received.
        let rx_packets = || -> u64 {
            ns.exec(&["cat", "/sys/class/net/kt2/statistics/rx_packets"])
                .trim()
                .parse()
                .unwrap()
        };
        let before = rx_packets();
        let mut frame = vec![0u8; 12 + 60];
        frame[12..18].fill(0xff);
        frame[18..24].copy_from_slice(&n.mac());
        frame[24..26].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        mem.write_slice(&frame, GuestAddress(0x20_0000)).unwrap();
        txq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                0x20_0000,
                frame.len() as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        tx_kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx_packets() == before {
            assert!(
                Instant::now() < deadline,
                "the frame never reached the host"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let tx_used: u16 = mem.read_obj(GuestAddress(0x9002)).unwrap();
        assert_eq!(tx_used, 1);
        n.reset();
        assert!(!n.worker.as_ref().unwrap().is_busy());
    }
}
