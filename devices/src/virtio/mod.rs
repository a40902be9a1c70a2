//! Virtio devices on the virtio-mmio transport.
//!
//! [`mmio::MmioTransport`] is the register window the guest driver talks to;
//! it hands configured queues to a [`device::VirtioDevice`], which serves them
//! on its own worker thread. The device models live in [`block`] and [`net`];
//! [`vhost_user_blk`] is a virtio-blk disk whose queues another process serves.

pub mod block;
pub mod device;
pub mod interrupt;
pub mod metrics;
pub mod mmio;
pub mod net;
mod queue;
pub mod state;
pub mod vhost_user_blk;
mod worker;

pub use block::{Block, BlockBackend, BlockConfig};
pub use device::{ActivateContext, ActivateError, VirtioDevice, WorkerHook};
pub use interrupt::Interrupt;
pub use metrics::{BlockCounters, NetCounters};
pub use mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
pub use net::{parse_mac, Net, NetConfig};
pub use state::{
    BlockSnapshot, DeviceSnapshot, InterruptSnapshot, NetSnapshot, QueueSnapshot, RestoreError,
    SnapshotError, TransportSnapshot, VhostUserBlockSnapshot,
};
pub use vhost_user_blk::{FindBackend, VhostUserBlock, VhostUserBlockConfig};
