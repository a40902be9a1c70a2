//! The saved state of virtio devices and their transport (snapshots,
//! live migration).
//!
//! Everything here is plain data (serde), written by the source kiln-vmm
//! and read back by another one, possibly from a file someone edited: the
//! restoring side validates it (see [`crate::virtio::MmioTransport::restore`])
//! and refuses what does not fit, with a [`RestoreError`], never a panic.
//!
//! A snapshot is taken of a paused transport
//! ([`crate::virtio::MmioTransport::pause`]): its device has completed every
//! request in flight and handed its queues back, so the queue indexes here
//! are exactly what the guest's rings say.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::device::ActivateError;
use crate::rate_limiter::RateLimiterSnapshot;

/// One virtqueue, as virtio-queue's `QueueState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// The interrupt state of a device (`InterruptStatus`, `ConfigGeneration`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptSnapshot {
    pub status: u32,
    pub config_generation: u32,
}

/// A virtio-mmio transport and its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// `VIRTIO_ID_*` of the device.
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    /// The device status register.
    pub status: u32,
    /// The device was activated (`DRIVER_OK`) and served its queues.
    pub active: bool,
    pub interrupt: InterruptSnapshot,
    /// Every queue of the device, in index order; for an active device the
    /// ones it served carry their ring positions.
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceSnapshot,
}

/// The device model's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    Block(BlockSnapshot),
    Net(NetSnapshot),
    VhostUserBlock(VhostUserBlockSnapshot),
}

impl DeviceSnapshot {
    /// "virtio-blk", "virtio-net", "vhost-user-blk", for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "virtio-blk",
            Self::Net(_) => "virtio-net",
            Self::VhostUserBlock(_) => "vhost-user-blk",
        }
    }
}

/// A virtio-blk disk as the guest knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// The feature bits the device offered.
    pub avail_features: u64,
    pub read_only: bool,
    /// The capacity in 512-byte sectors the guest saw.
    pub capacity_sectors: u64,
    /// Request queues the device has.
    pub queues: u16,
    /// The rate limiter's budgets, if the disk had one.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterSnapshot>,
}

/// A vhost-user-blk disk as the guest knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VhostUserBlockSnapshot {
    /// The feature bits the device offered the guest.
    pub avail_features: u64,
    /// The virtio features the backend offered.
    pub backend_features: u64,
    /// The vhost-user protocol features negotiated with the backend.
    pub protocol_features: u64,
    /// The configuration space as the guest saw it.
    pub config: Vec<u8>,
    /// Request queues the device has.
    pub queues: u16,
}

/// A virtio-net device as the guest knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSnapshot {
    /// The feature bits the device offered.
    pub avail_features: u64,
    pub mac: [u8; 6],
}

/// Why a device's state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("virtio device (type {device_type}) is running: pause it before taking its state")]
    NotPaused { device_type: u32 },
    #[error("virtio device (type {device_type}) cannot save its state")]
    Unsupported { device_type: u32 },
}

/// Why a saved state could not be given to a device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot holds a {saved} device, but this one is a {here}")]
    WrongKind {
        saved: &'static str,
        here: &'static str,
    },
    #[error("the snapshot's device has {saved} queues, this one has {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("disk {disk}: the guest saw {saved} sectors, the disk given now has {here}: restore needs a disk of the same size")]
    Capacity { disk: String, saved: u64, here: u64 },
    #[error("disk {disk}: the snapshot's disk was {}, this one is {}", rw(*.saved_read_only), rw(*.read_only))]
    ReadOnly {
        disk: String,
        saved_read_only: bool,
        read_only: bool,
    },
    #[error("the driver acked features {extra:#x} this device does not offer")]
    Features { extra: u64 },
    #[error("queue {index}: {why}")]
    InvalidQueue { index: usize, why: String },
    #[error("invalid device state: {0}")]
    Invalid(String),
    #[error("virtio device (type {device_type}) cannot restore a saved state")]
    Unsupported { device_type: u32 },
    #[error("the device is in use: restore needs a freshly built device")]
    InUse,
    #[error("cannot activate the restored device: {0}")]
    Activate(#[source] ActivateError),
}

fn rw(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}
