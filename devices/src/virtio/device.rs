//! The contract between the virtio-mmio transport and a device model.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::Interrupt;
use super::state::{DeviceSnapshot, RestoreError, SnapshotError};

/// Code a device's worker thread runs once, before anything else (the VMM
/// uses it to install the I/O-worker seccomp filter).
pub type WorkerHook = Arc<dyn Fn() + Send + Sync>;

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue, in index order: readable when the
    /// guest kicks the queue (through a KVM ioeventfd or a trapped write).
    /// Shared with the transport rather than duplicated: activation runs on
    /// a vCPU thread, which may not `dup`.
    pub queue_events: Vec<Arc<EventFd>>,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The feature bits the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device is already active")]
    AlreadyActive,
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot spawn the worker thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("cannot hand the queues to the worker thread: {0}")]
    Worker(#[source] io::Error),
    #[error("cannot configure the backend: {0}")]
    Backend(#[source] io::Error),
    #[error("vhost-user backend: {0}")]
    VhostUser(String),
    #[error("the device cannot be quiesced")]
    QuiesceUnsupported,
    #[error("the worker of queue {0} did not hand its queue back")]
    QueueLost(usize),
}

/// A virtio device model behind the virtio-mmio transport.
///
/// The transport owns register state and queue configuration; the device owns
/// its configuration space and a worker thread that serves the queues while
/// the device is active. Except [`VirtioDevice::spawn_worker`], everything
/// here runs on vCPU threads: it may not block on device I/O, and under
/// kiln-vmm's seccomp filters it may not create threads or file descriptors.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The feature bits offered to the driver. The transport adds
    /// `VIRTIO_F_VERSION_1` itself.
    fn avail_features(&self) -> u64;

    /// The maximum size of each queue; the slice length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads the device-specific configuration space at `offset`. Bytes past
    /// its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; devices ignore writes
    /// to read-only fields.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Whether something outside the transport signals used buffers on the
    /// device's irqfd (a vhost-user backend writes it directly), so that the
    /// transport never learns the cause: `InterruptStatus` then always
    /// reports a used-ring interrupt while the device is active (a guest
    /// finding no used buffers treats it as spurious).
    fn used_queue_interrupts_bypass_transport(&self) -> bool {
        false
    }

    /// Creates the device's worker thread, which runs `hook` once and then
    /// serves every activation until the device is dropped. The transport
    /// calls it when the VMM builds the device, before any seccomp filter is
    /// installed. Fails if the worker already exists.
    ///
    /// A device activated without it (unit tests) spawns its worker, without
    /// a hook, on first activation.
    fn spawn_worker(&mut self, hook: WorkerHook) -> io::Result<()>;

    /// Starts serving the queues in `ctx` by handing a body to the worker
    /// thread. Creates neither threads nor file descriptors once the worker
    /// exists.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops serving the queues and drops them, so that the device can be
    /// activated again. Blocks until the worker's body has returned; the
    /// worker thread stays for the next activation.
    fn reset(&mut self);

    /// Stops serving the queues of an active device after completing every
    /// request in flight (used ring written, interrupt raised as usual),
    /// and hands the queues back in their current state, in index order,
    /// for [`VirtioDevice::activate`] to serve again (resume) or for a
    /// snapshot. The worker thread stays. Runs on the VMM's main thread
    /// while the vCPUs are paused; creates no thread and no fd.
    ///
    /// On an error the device is stopped and its queues are lost: the
    /// transport fails the device (NEEDS_RESET).
    fn quiesce(&mut self) -> Result<Vec<Queue>, ActivateError> {
        self.reset();
        Err(ActivateError::QuiesceUnsupported)
    }

    /// The device model's own state (features offered, config space as the
    /// guest sees it, budgets), for a snapshot.
    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        Err(SnapshotError::Unsupported {
            device_type: self.device_type(),
        })
    }

    /// Takes over `state`, saved by [`VirtioDevice::snapshot`] of a device
    /// of the same kind, on a device freshly built (not active) on the new
    /// backend; refuses a state this device cannot honour (another kind of
    /// device, another disk size, another queue count).
    fn restore(&mut self, state: &DeviceSnapshot) -> Result<(), RestoreError> {
        let _ = state;
        Err(RestoreError::Unsupported {
            device_type: self.device_type(),
        })
    }

    /// Connects a device restored without its backend (see
    /// `VhostUserBlock::deferred`); called when a restored machine starts,
    /// before the device is resumed. Nothing to do for most devices.
    fn connect_backend(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Has the process serving this device (a vhost-user backend) record
    /// every guest page it writes in `log` from the next activation on
    /// (`None`: no more), for a live migration: KVM's dirty log does not
    /// see those writes. Called only on a device that is not active (the
    /// transport pauses an active one around it). Fails if the backend
    /// cannot log. Nothing to do for a device served in this process (it
    /// reports its writes to [`crate::dirty`] itself).
    fn log_backend_writes(
        &mut self,
        log: Option<std::sync::Arc<crate::dirty::BackendLog>>,
    ) -> Result<(), String> {
        let _ = log;
        Ok(())
    }

    /// The connection to another process that serves this device (a
    /// vhost-user backend), with the socket it was made on: what a
    /// migration to a kiln-vmm on the same host hands over, since such a
    /// backend serves one frontend at a time. None for a device served in
    /// this process.
    fn backend_connection(&self) -> Option<(&std::path::Path, std::os::fd::BorrowedFd<'_>)> {
        None
    }
}

/// Copies `data.len()` bytes of a device's config space from `offset`;
/// bytes past its end (a guest may ask anything) read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}
