//! Unit tests of the virtio-mmio transport.

use super::*;
use std::sync::Mutex;
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use crate::virtio::device::ActivateError;

#[derive(Default)]
struct Record {
    activations: Vec<(u64, usize, bool)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    /// Hooks run by `spawn_worker`.
    hooks_run: usize,
}

struct DummyDevice {
    record: Arc<Mutex<Record>>,
    sizes: Vec<u16>,
    fail_activation: bool,
    /// Plays a vhost-user device, whose backend writes the irqfd itself.
    bypass: bool,
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = [0x10u8, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17];
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn used_queue_interrupts_bypass_transport(&self) -> bool {
        self.bypass
    }
    fn spawn_worker(&mut self, hook: WorkerHook) -> io::Result<()> {
        let mut r = self.record.lock().unwrap();
        if r.hooks_run > 0 {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        hook();
        r.hooks_run += 1;
        Ok(())
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::AlreadyActive);
        }
        let mut r = self.record.lock().unwrap();
        r.activations.push((
            ctx.acked_features,
            ctx.queues.len(),
            ctx.queues.iter().all(|q| q.event_idx_enabled()),
        ));
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
}

struct Harness {
    t: MmioTransport,
    record: Arc<Mutex<Record>>,
    irq: EventFd,
    mem: GuestMemoryMmap,
}

fn harness(sizes: Vec<u16>, fail_activation: bool) -> Harness {
    harness_with(sizes, fail_activation, false)
}

fn harness_with(sizes: Vec<u16>, fail_activation: bool, bypass: bool) -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let dev = DummyDevice {
        record: record.clone(),
        sizes,
        fail_activation,
        bypass,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem.clone(), Box::new(dev), irq.try_clone().unwrap()).unwrap();
    Harness {
        t,
        record,
        irq,
        mem,
    }
}

pub(super) fn r32(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

pub(super) fn w32(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

pub(super) fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
    w32(t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    w32(t, VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, low);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, VIRTIO_MMIO_DRIVER_FEATURES, high);
    w32(t, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, q: &MockSplitQueue<GuestMemoryMmap>) {
    w32(t, VIRTIO_MMIO_QUEUE_SEL, index);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
    let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    let (lo, hi) = split(q.desc_table_addr());
    w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, lo);
    w32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, hi);
    let (lo, hi) = split(q.avail_addr());
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, lo);
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, hi);
    let (lo, hi) = split(q.used_addr());
    w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, lo);
    w32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, hi);
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

fn bring_up(h: &mut Harness) {
    let mem = h.mem.clone();
    negotiate(&mut h.t, (1 << VIRTIO_RING_F_EVENT_IDX) | 1, 1);
    for i in 0..h.t.queues.len() as u32 {
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000 * u64::from(i + 1)), 16);
        setup_queue(&mut h.t, i, &q);
    }
    w32(
        &mut h.t,
        VIRTIO_MMIO_STATUS,
        STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

#[test]
fn identity_registers() {
    let mut h = harness(vec![16, 8], false);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    assert_eq!(h.t.device_type(), 42);
}

#[test]
fn rejects_bad_queue_max_size() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let dev = DummyDevice {
        record: Default::default(),
        sizes: vec![16, 3],
        fail_activation: false,
        bypass: false,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(matches!(
        MmioTransport::new(mem, Box::new(dev), irq),
        Err(Error::QueueMaxSize { index: 1, size: 3 })
    ));
}

#[test]
fn offers_version_1_on_the_second_feature_page() {
    let mut h = harness(vec![16], false);
    w32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        r32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES),
        (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101
    );
    w32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        r32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES),
        1 << (VIRTIO_F_VERSION_1 - 32)
    );
    w32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn masks_unoffered_features_and_refuses_legacy_drivers() {
    let mut h = harness(vec![16], false);
    // Acks bits 1 (not offered), 2 and ACCESS_PLATFORM (not offered), no VERSION_1.
    negotiate(&mut h.t, 0b111, 1 << (VIRTIO_F_ACCESS_PLATFORM - 32));
    assert_eq!(h.t.acked_features, 0b101);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_STATUS), STATUS_DRIVER);
    // Features can still change before FEATURES_OK.
    negotiate(&mut h.t, 0b1, 1);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_STATUS), STATUS_FEATURES_OK);
    assert_eq!(h.t.acked_features, 1 | (1 << VIRTIO_F_VERSION_1));
    // ...but not after.
    w32(&mut h.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(&mut h.t, VIRTIO_MMIO_DRIVER_FEATURES, 0b100);
    assert_eq!(h.t.acked_features, 1 | (1 << VIRTIO_F_VERSION_1));
}

#[test]
fn activates_on_driver_ok_with_the_negotiated_features() {
    let mut h = harness(vec![16, 16], false);
    h.t = h.t.with_worker_hook(Arc::new(|| {}));
    bring_up(&mut h);
    assert!(h.t.is_active());
    assert_eq!(
        r32(&mut h.t, VIRTIO_MMIO_STATUS),
        STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
    );
    let r = h.record.lock().unwrap();
    let expect = (1 << VIRTIO_RING_F_EVENT_IDX) | 1 | (1 << VIRTIO_F_VERSION_1);
    assert_eq!(r.activations, vec![(expect, 2, true)]);
    assert_eq!(r.hooks_run, 1);
}

#[test]
fn a_worker_that_cannot_start_fails_activation() {
    let h = harness(vec![16], false);
    let t = h.t.try_with_worker_hook(Arc::new(|| {})).unwrap();
    assert!(matches!(
        t.try_with_worker_hook(Arc::new(|| {})),
        Err(Error::Worker(_))
    ));

    let mut h = harness(vec![16], false);
    h.t = h.t.with_worker_hook(Arc::new(|| {}));
    h.t = h.t.with_worker_hook(Arc::new(|| {}));
    bring_up(&mut h);
    assert!(!h.t.is_active());
    assert_ne!(h.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(h.record.lock().unwrap().activations.is_empty());
}

/// With a real device: the worker thread is created by
/// `with_worker_hook`, hooked once, and serves activation after
/// activation across resets until the transport is dropped.
#[test]
fn activations_reuse_the_worker_thread_created_with_the_hook() {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::virtio::block::{Block, BlockConfig};
    use crate::virtio::worker::tests::threads_named;

    let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
    img.as_file().write_all(&[0u8; 4096]).unwrap();
    let block = Block::new(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only: false,
        direct: false,
        id: None,
        rate_limit: Default::default(),
        queues: 1,
    })
    .unwrap();
    let name = block.name().to_string();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem.clone(), Box::new(block), irq).unwrap();
    assert!(threads_named(&name).is_empty());
    let hooks = Arc::new(AtomicUsize::new(0));
    let hook_tid = Arc::new(Mutex::new(None));
    let (n, tid) = (hooks.clone(), hook_tid.clone());
    let t = t.with_worker_hook(Arc::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
        // SAFETY: gettid has no arguments and cannot fail.
        *tid.lock().unwrap() = Some(unsafe { libc::gettid() });
    }));
    let threads = threads_named(&name);
    assert_eq!(threads.len(), 1);

    let mut h = Harness {
        t,
        record: Default::default(),
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
        mem,
    };
    for _ in 0..2 {
        bring_up(&mut h);
        assert!(h.t.is_active());
        assert_eq!(threads_named(&name), threads);
        w32(&mut h.t, VIRTIO_MMIO_STATUS, 0);
        assert!(!h.t.is_active());
        assert_eq!(threads_named(&name), threads);
    }
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
    assert_eq!(*hook_tid.lock().unwrap(), Some(threads[0]));
    drop(h);
    assert!(threads_named(&name).is_empty());
}

#[test]
fn refuses_queue_setup_outside_features_ok() {
    let mut h = harness(vec![16], false);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_QUEUE_READY), 0);
    bring_up(&mut h);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_QUEUE_READY), 1);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
    assert_eq!(h.t.queues[0].desc_table(), 0x1000);
}

#[test]
fn ignores_invalid_queue_sizes() {
    let mut h = harness(vec![16], false);
    negotiate(&mut h.t, 0, 1);
    for bad in [0, 3, 32, 0x1_0000] {
        w32(&mut h.t, VIRTIO_MMIO_QUEUE_NUM, bad);
        assert_eq!(h.t.queues[0].size(), 16);
    }
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_NUM, 4);
    assert_eq!(h.t.queues[0].size(), 4);
}

#[test]
fn queue_outside_memory_needs_reset_instead_of_activation() {
    let mut h = harness(vec![16], false);
    negotiate(&mut h.t, 0, 1);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xfff0_0000);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_READY, 1);
    w32(
        &mut h.t,
        VIRTIO_MMIO_STATUS,
        STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(!h.t.is_active());
    assert!(h.record.lock().unwrap().activations.is_empty());
    assert_ne!(
        r32(&mut h.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(
        r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(h.irq.read().unwrap(), 1);
}

#[test]
fn unready_queue_or_failed_activation_needs_reset() {
    let mut h = harness(vec![16, 16], false);
    negotiate(&mut h.t, 0, 1);
    w32(
        &mut h.t,
        VIRTIO_MMIO_STATUS,
        STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(!h.t.is_active());
    assert_ne!(h.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    let mut h = harness(vec![16], true);
    bring_up(&mut h);
    assert!(!h.t.is_active());
    assert_ne!(h.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn status_follows_the_state_machine() {
    let mut h = harness(vec![16], false);
    // Skipping ACKNOWLEDGE.
    w32(&mut h.t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(h.t.status(), 0);
    // DRIVER_OK straight after DRIVER.
    w32(&mut h.t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    w32(&mut h.t, VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    w32(
        &mut h.t,
        VIRTIO_MMIO_STATUS,
        STATUS_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(h.t.status(), STATUS_DRIVER);
    // Clearing bits without a reset.
    w32(&mut h.t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    assert_eq!(h.t.status(), STATUS_DRIVER);
    // FAILED is always accepted.
    w32(
        &mut h.t,
        VIRTIO_MMIO_STATUS,
        STATUS_DRIVER | VIRTIO_CONFIG_S_FAILED,
    );
    assert_eq!(h.t.status(), STATUS_DRIVER | VIRTIO_CONFIG_S_FAILED);
    assert!(!h.t.is_active());
}

#[test]
fn reset_stops_the_device_and_allows_a_new_probe() {
    let mut h = harness(vec![16], false);
    bring_up(&mut h);
    h.t.interrupt().signal_used_queue().unwrap();
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    w32(&mut h.t, VIRTIO_MMIO_STATUS, 0);
    assert!(!h.t.is_active());
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_eq!(h.t.status(), 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(h.t.acked_features, 0);
    // The stale notify was drained.
    let evts = h.t.queue_eventfds().unwrap();
    assert!(evts[0].1.read().is_err());
    // A rebooted guest probes again.
    bring_up(&mut h);
    assert!(h.t.is_active());
    assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    // A reset before activation does not reach the device.
    w32(&mut h.t, VIRTIO_MMIO_STATUS, 0);
    w32(&mut h.t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.record.lock().unwrap().resets, 2);
}

#[test]
fn trapped_notify_signals_the_queue_eventfd() {
    let mut h = harness(vec![16, 16], false);
    let evts = h.t.queue_eventfds().unwrap();
    assert_eq!(evts.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1]);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w32(&mut h.t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    assert_eq!(evts[1].1.read().unwrap(), 2);
    assert!(evts[0].1.read().is_err());
}

#[test]
fn interrupt_status_and_ack() {
    let mut h = harness(vec![16], false);
    let int = h.t.interrupt();
    int.signal_used_queue().unwrap();
    int.signal_config_change().unwrap();
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    w32(&mut h.t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    assert_eq!(h.irq.read().unwrap(), 2);
}

/// A vhost-user backend pulses the irqfd without the transport knowing:
/// while such a device is active, every interrupt reads as a used-ring
/// one, even after the driver acknowledged it.
#[test]
fn interrupts_that_bypass_the_transport_read_as_used_ring_while_active() {
    let mut h = harness_with(vec![16], false, true);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    bring_up(&mut h);
    assert!(h.t.is_active());
    for _ in 0..2 {
        assert_eq!(
            r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        w32(&mut h.t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    }
    h.t.interrupt().signal_config_change().unwrap();
    assert_eq!(
        r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    w32(&mut h.t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Other devices report only what they raised.
    let mut h = harness(vec![16], false);
    bring_up(&mut h);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_is_delegated() {
    let mut h = harness(vec![16], false);
    let mut b = [0u8; 2];
    h.t.read(0x103, &mut b);
    assert_eq!(b, [0x13, 0x14]);
    let mut b = [0xffu8; 4];
    h.t.read(0x1fe, &mut b[..2]);
    assert_eq!(b, [0, 0, 0xff, 0xff]);
    // Writes need the DRIVER status bit.
    h.t.write(0x104, &[1]);
    assert!(h.record.lock().unwrap().config_writes.is_empty());
    negotiate(&mut h.t, 0, 1);
    h.t.write(0x104, &[1, 2]);
    assert_eq!(
        h.record.lock().unwrap().config_writes,
        vec![(4, vec![1, 2])]
    );
}

#[test]
fn misaligned_or_narrow_register_accesses_are_ignored() {
    let mut h = harness(vec![16], false);
    let mut b = [0xaau8; 2];
    h.t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xaau8; 4];
    h.t.read(2, &mut b);
    assert_eq!(b, [0; 4]);
    h.t.write(VIRTIO_MMIO_STATUS as u64, &[1]);
    h.t.write(VIRTIO_MMIO_STATUS as u64 + 1, &[1, 0, 0, 0]);
    assert_eq!(h.t.status(), 0);
    // Writes to read-only registers change nothing.
    w32(&mut h.t, VIRTIO_MMIO_MAGIC_VALUE, 0);
    assert_eq!(r32(&mut h.t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
}

/// A device that cannot be quiesced fails the pause: it is stopped and the
/// driver told to reset it (NEEDS_RESET); its state cannot be saved.
#[test]
fn a_device_that_cannot_quiesce_fails_the_pause_and_needs_reset() {
    let mut h = harness(vec![16], false);
    assert!(h.t.pause().is_ok(), "nothing to pause before activation");
    bring_up(&mut h);
    assert!(matches!(
        h.t.pause(),
        Err(ActivateError::QuiesceUnsupported)
    ));
    assert!(!h.t.is_active() && !h.t.is_paused());
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_ne!(h.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(h.t.resume().is_ok(), "nothing to resume");
    assert!(matches!(
        h.t.snapshot(),
        Err(crate::virtio::state::SnapshotError::Unsupported { device_type: 42 })
    ));
}
