//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! One [`MmioTransport`] sits in the MMIO bus for each virtio device. It keeps
//! the register state the driver programs (features, queue addresses, device
//! status) and hands the configured queues to the device on `DRIVER_OK`.
//! Queue notifications normally bypass it entirely: the VMM registers each
//! eventfd from [`MmioTransport::queue_eventfds`] as a KVM ioeventfd.

use std::io;
use std::sync::Arc;

use tracing::{debug, error, info, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivateContext, VirtioDevice, WorkerHook};
use super::interrupt::Interrupt;
use super::worker::{drain_eventfd, GuestErrorLog};
use crate::bus::BusDevice;

/// Size of the MMIO window of one device: registers plus configuration space.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// Offset of `QueueNotify` in the window, where the VMM puts the ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "KILN" as the subsystem vendor ID.
pub const VENDOR_ID: u32 = 0x4b49_4c4e;

const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const STATUS_INIT: u32 = 0;
const STATUS_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = STATUS_ACK | VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = STATUS_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue {index} has invalid maximum size {size} (must be a power of two up to 32768)")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("cannot create the notification eventfd of queue {index}: {source}")]
    QueueEventFd {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the device's worker thread: {0}")]
    Worker(#[source] io::Error),
}

/// A virtio device as seen through its virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Shared with the device's worker, so that activating (on a vCPU
    /// thread) needs no `dup`.
    queue_events: Vec<Arc<EventFd>>,
    /// Why the worker thread could not be started in `with_worker_hook`;
    /// activations then fail instead of spawning it on a vCPU thread.
    worker_error: Option<String>,

    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    active: bool,
    bad_access: GuestErrorLog,
}

impl MmioTransport {
    /// Wraps `device`. `irq` is an eventfd registered as a KVM irqfd for the
    /// device's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| Error::QueueMaxSize { index, size })?);
            queue_events.push(Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| Error::QueueEventFd { index, source })?,
            ));
        }
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_events,
            worker_error: None,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: STATUS_INIT,
            active: false,
            bad_access: GuestErrorLog::default(),
        })
    }

    /// Starts the device's worker thread now, before any seccomp filter is
    /// installed: it runs `hook` (the I/O-worker seccomp filter) once, then
    /// serves every activation of the device until the transport is dropped.
    /// Returns once the hook has run. Activation and reset, which run on vCPU
    /// threads, then create no thread. Call it once, right after
    /// [`MmioTransport::new`].
    ///
    /// If the thread cannot be started, the error is logged and the device
    /// fails its activations (NEEDS_RESET);
    /// [`MmioTransport::try_with_worker_hook`] returns the error instead.
    pub fn with_worker_hook(mut self, hook: WorkerHook) -> Self {
        if let Err(e) = self.device.spawn_worker(hook) {
            error!(
                device_type = self.device.device_type(),
                "cannot start the virtio device's worker thread: {e}"
            );
            self.worker_error = Some(e.to_string());
        }
        self
    }

    /// [`MmioTransport::with_worker_hook`], failing if the worker thread
    /// cannot be started.
    pub fn try_with_worker_hook(mut self, hook: WorkerHook) -> Result<Self, Error> {
        self.device.spawn_worker(hook).map_err(Error::Worker)?;
        Ok(self)
    }

    /// The queue notification eventfds, `(queue index, eventfd)`, for the VMM
    /// to register as KVM ioeventfds at window base + [`QUEUE_NOTIFY_OFFSET`]
    /// with `datamatch` = the index (4 bytes).
    pub fn queue_eventfds(&self) -> io::Result<Vec<(u32, EventFd)>> {
        (0u32..)
            .zip(&self.queue_events)
            .map(|(i, evt)| Ok((i, evt.try_clone()?)))
            .collect()
    }

    /// The virtio device ID of the wrapped device.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The shared interrupt state (for the VMM to raise config changes).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The device status register as last set.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is activated (its worker is serving the queues).
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn offered_features(&self) -> u64 {
        self.device.avail_features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    /// Queue registers may change between FEATURES_OK and DRIVER_OK only.
    fn queue_config_allowed(&self) -> bool {
        self.status_is(
            STATUS_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        )
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => {
                let bypassed = self.active && self.device.used_queue_interrupts_bypass_transport();
                self.interrupt.status() | if bypassed { VIRTIO_MMIO_INT_VRING } else { 0 }
            }
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.ack_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.guest_error(format_args!("write to read-only register {offset:#x}")),
        }
    }

    fn write_queue_register(&mut self, offset: u32, v: u32) {
        if !self.queue_config_allowed() {
            let status = self.status;
            self.guest_error(format_args!(
                "queue register {offset:#x} written in status {status:#x}"
            ));
            return;
        }
        let sel = self.queue_select;
        let Some(q) = self.selected_queue() else {
            self.guest_error(format_args!(
                "queue register written for absent queue {sel}"
            ));
            return;
        };
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => {
                let ok = u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok());
                if !ok {
                    self.guest_error(format_args!("invalid size {v} for queue {sel}"));
                }
            }
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn ack_features(&mut self, v: u32) {
        if !self.status_is(
            STATUS_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        ) {
            let status = self.status;
            self.guest_error(format_args!(
                "driver features written in status {status:#x}"
            ));
            return;
        }
        let (shift, mask) = match self.driver_features_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            page => {
                self.guest_error(format_args!("driver features written to page {page}"));
                return;
            }
        };
        let mut page = u64::from(v) << shift;
        let unoffered = page & !self.offered_features();
        if unoffered != 0 {
            self.guest_error(format_args!(
                "driver acked features {unoffered:#x} that were not offered"
            ));
            page &= !unoffered;
        }
        self.acked_features = (self.acked_features & !mask) | page;
    }

    fn notify(&mut self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("cannot signal queue {index}: {e}");
                }
            }
            None => self.guest_error(format_args!("notify for absent queue {index}")),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let cur = self.status;
        if v & cur != cur {
            self.guest_error(format_args!(
                "status {v:#x} clears bits of {cur:#x} without a reset"
            ));
            return;
        }
        let new = v & !cur;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            warn!(
                "driver marked the virtio device (type {}) FAILED",
                self.device.device_type()
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // The only legal steps: ACK, DRIVER, FEATURES_OK, DRIVER_OK, in order.
        match (cur, new) {
            (_, 0) => {}
            (STATUS_INIT, VIRTIO_CONFIG_S_ACKNOWLEDGE) | (STATUS_ACK, VIRTIO_CONFIG_S_DRIVER) => {
                self.status = v
            }
            (STATUS_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK) => {
                if self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0 {
                    self.status = v;
                } else {
                    // The driver reads FEATURES_OK back and gives up.
                    self.guest_error(format_args!("legacy driver (no VIRTIO_F_VERSION_1)"));
                }
            }
            (STATUS_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK) => {
                self.status = v;
                self.activate();
            }
            _ => self.guest_error(format_args!("invalid status transition {cur:#x} -> {v:#x}")),
        }
    }

    fn activate(&mut self) {
        if let Some(e) = &self.worker_error {
            let e = e.clone();
            self.fail(format_args!("no worker thread: {e}"));
            return;
        }
        match self.build_activate_context() {
            Ok(ctx) => match self.device.activate(ctx) {
                Ok(()) => {
                    self.active = true;
                    info!(
                        device_type = self.device.device_type(),
                        features = format_args!("{:#x}", self.acked_features),
                        "virtio device activated"
                    );
                }
                Err(e) => self.fail(format_args!("activation failed: {e}")),
            },
            Err(e) => self.fail(format_args!("{e}")),
        }
    }

    fn build_activate_context(&mut self) -> Result<ActivateContext, String> {
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // A driver may use fewer queues than the device has (a virtio-blk
        // driver with fewer CPUs than `num_queues`), always the first ones:
        // the device gets the ready ones, and decides whether they are enough.
        let ready = self.queues.iter().take_while(|q| q.ready()).count();
        if ready == 0 {
            return Err("queue 0 is not ready".into());
        }
        if let Some(i) = self.queues.iter().skip(ready).position(|q| q.ready()) {
            return Err(format!(
                "queue {} is ready but queue {ready} is not",
                ready + i
            ));
        }
        let mut queues = Vec::with_capacity(ready);
        for (i, q) in self.queues.iter_mut().take(ready).enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} lies outside guest memory"));
            }
            q.set_event_idx(event_idx);
            queues.push(Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e}"))?);
        }
        Ok(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events: self.queue_events[..ready].to_vec(),
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        })
    }

    /// Puts the device in NEEDS_RESET and tells the driver.
    fn fail(&mut self, why: std::fmt::Arguments) {
        error!(
            device_type = self.device.device_type(),
            "virtio device: {why}"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            error!("cannot raise the device interrupt: {e}");
        }
    }

    /// Device reset (status 0): stops the worker and forgets the driver's
    /// configuration, so that the driver can probe the device again.
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_events {
            drain_eventfd(evt);
        }
        self.interrupt.reset();
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.status = STATUS_INIT;
        debug!(
            device_type = self.device.device_type(),
            "virtio device reset"
        );
    }

    fn guest_error(&mut self, what: std::fmt::Arguments) {
        if let Some(n) = self.bad_access.hit() {
            warn!(
                device_type = self.device.device_type(),
                occurrences = n,
                "virtio-mmio: ignoring {what}"
            );
        }
    }
}

/// Register accesses must be aligned 32-bit accesses (virtio 1.2, 4.2.2.2).
fn register_access(offset: u64, len: usize) -> Option<u32> {
    (len == 4 && offset.is_multiple_of(4)).then_some(offset as u32)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_access(offset, data.len()) {
            Some(reg) => data.copy_from_slice(&self.read_register(reg).to_le_bytes()),
            None => {
                data.fill(0);
                self.guest_error(format_args!(
                    "{}-byte read at register offset {offset:#x}",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status_is(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                let status = self.status;
                self.guest_error(format_args!("config write in status {status:#x}"));
            }
            return;
        }
        match register_access(offset, data.len()) {
            Some(reg) => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.write_register(reg, u32::from_le_bytes(v));
            }
            None => self.guest_error(format_args!(
                "{}-byte write at register offset {offset:#x}",
                data.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn r32(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
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
}
