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
    /// The queues an active device handed back when paused
    /// ([`MmioTransport::pause`]), until [`MmioTransport::resume`].
    paused: Option<Vec<Queue>>,
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
            paused: None,
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
        self.paused = None;
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

mod snapshot;

#[cfg(test)]
mod tests;
