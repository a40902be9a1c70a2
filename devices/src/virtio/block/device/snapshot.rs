//! The state of a virtio-blk disk that a snapshot keeps: what the guest
//! was told (features, read-only, capacity, queue count) and the rate
//! limiter's budgets. The data is the backing file's, not the snapshot's.

use super::Block;
use crate::rate_limiter::lock;
use crate::virtio::state::{BlockSnapshot, DeviceSnapshot, RestoreError};
use crate::virtio::worker::Worker;

impl Block {
    /// The disk as the guest knows it, for a snapshot.
    pub(super) fn state(&self) -> BlockSnapshot {
        BlockSnapshot {
            avail_features: self.avail_features,
            read_only: self.disk.read_only,
            capacity_sectors: self.capacity_sectors,
            queues: u16::try_from(self.queue_sizes.len()).unwrap_or(u16::MAX),
            rate_limiter: self.limiter.as_ref().map(|l| lock(l).snapshot()),
        }
    }

    /// Takes over a saved disk's state, refusing a disk that differs from
    /// what the guest saw (size, read-only, queue count). Features offered
    /// then and not now are the transport's check (against those acked).
    pub(super) fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), RestoreError> {
        let DeviceSnapshot::Block(saved) = state else {
            return Err(RestoreError::WrongKind {
                saved: state.kind(),
                here: "virtio-blk",
            });
        };
        if self.workers.iter().flatten().any(Worker::is_busy) {
            return Err(RestoreError::InUse);
        }
        if saved.capacity_sectors != self.capacity_sectors {
            return Err(RestoreError::Capacity {
                disk: self.label.clone(),
                saved: saved.capacity_sectors,
                here: self.capacity_sectors,
            });
        }
        if saved.read_only != self.disk.read_only {
            return Err(RestoreError::ReadOnly {
                disk: self.label.clone(),
                saved_read_only: saved.read_only,
                read_only: self.disk.read_only,
            });
        }
        if usize::from(saved.queues) != self.queue_sizes.len() {
            return Err(RestoreError::QueueCount {
                saved: usize::from(saved.queues),
                here: self.queue_sizes.len(),
            });
        }
        if let (Some(l), Some(budgets)) = (&self.limiter, &saved.rate_limiter) {
            lock(l).restore(budgets);
        }
        Ok(())
    }

    /// Empties the first `n` handback slots, returning what they held.
    pub(super) fn take_handbacks(&self, n: usize) -> Vec<Option<virtio_queue::Queue>> {
        self.handbacks
            .iter()
            .take(n)
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).take())
            .collect()
    }
}
