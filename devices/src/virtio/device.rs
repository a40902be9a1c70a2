//! The contract between the virtio-mmio transport and a device model.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::Interrupt;

/// Code every device worker thread runs before anything else (the VMM uses
/// it to install the I/O-worker seccomp filter).
pub type WorkerHook = Arc<dyn Fn() + Send + Sync>;

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue, in index order: readable when the
    /// guest kicks the queue (through a KVM ioeventfd or a trapped write).
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The feature bits the driver accepted.
    pub acked_features: u64,
    /// Run first thing on the worker thread, if set.
    pub worker_hook: Option<WorkerHook>,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device is already active")]
    AlreadyActive,
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot set up the worker's epoll set: {0}")]
    Epoll(#[source] io::Error),
    #[error("cannot spawn the worker thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("cannot configure the backend: {0}")]
    Backend(#[source] io::Error),
}

/// A virtio device model behind the virtio-mmio transport.
///
/// The transport owns register state and queue configuration; the device owns
/// its configuration space and, once activated, a worker thread that serves
/// the queues. Nothing here may block on device I/O: it runs on vCPU threads.
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

    /// Starts serving the queues in `ctx` (spawning the worker thread).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops the worker, if any, and drops the queues, so that the device can
    /// be activated again. Blocks until the worker has exited.
    fn reset(&mut self);
}
