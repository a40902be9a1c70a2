//! Pausing, saving and restoring a virtio-mmio transport and its device
//! (snapshots and live migration; `docs/snapshots.md`).
//!
//! All of it runs on the VMM's main thread while the vCPUs are paused, so
//! that no register access races it:
//! - [`MmioTransport::pause`] quiesces an active device: it completes its
//!   requests in flight and hands its queues back, which the transport keeps;
//! - [`MmioTransport::snapshot`] then reads the registers, the interrupt
//!   state, the queues (with their ring positions) and the device's state;
//! - [`MmioTransport::resume`] has the device serve the kept queues again
//!   (the source VM goes on after a snapshot or a failed migration);
//! - [`MmioTransport::restore`] gives a saved state to a freshly built
//!   transport and device (the restored or migrated VM) and, if the device
//!   was active, activates it with the saved queues: the guest's driver
//!   does not negotiate again.
//!
//! Like activation, none of it creates threads or file descriptors.

use tracing::info;
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_queue::{Queue, QueueT};

use super::MmioTransport;
use crate::virtio::device::{ActivateContext, ActivateError};
use crate::virtio::state::{QueueSnapshot, RestoreError, SnapshotError, TransportSnapshot};

impl MmioTransport {
    /// Quiesces an active device: it completes every request in flight
    /// (used ring written, interrupt raised), stops serving and hands its
    /// queues back; the transport keeps them for [`MmioTransport::snapshot`]
    /// and [`MmioTransport::resume`]. Does nothing if the device is not
    /// active or already paused.
    ///
    /// On an error the device has stopped and lost its queues: it is put in
    /// NEEDS_RESET (the guest's driver resets it), and the error returned.
    pub fn pause(&mut self) -> Result<(), ActivateError> {
        if !self.active || self.paused.is_some() {
            return Ok(());
        }
        match self.device.quiesce() {
            Ok(queues) => {
                self.paused = Some(queues);
                Ok(())
            }
            Err(e) => {
                self.active = false;
                self.fail(format_args!("cannot quiesce the device: {e}"));
                Err(e)
            }
        }
    }

    /// The device's connection to the process that serves it, if another
    /// process does ([`crate::virtio::VirtioDevice::backend_connection`]).
    pub fn backend_connection(&self) -> Option<(&std::path::Path, std::os::fd::BorrowedFd<'_>)> {
        self.device.backend_connection()
    }

    /// Has the device's backend process, if it has one, log the guest
    /// pages it writes in `log` (`None`: no more); see
    /// [`crate::virtio::VirtioDevice::log_backend_writes`]. A device that
    /// runs is paused around it (its backend stops and restarts its rings,
    /// which the guest sees as a short wait), under this transport's lock,
    /// so the guest's driver cannot come in between.
    pub fn log_backend_writes(
        &mut self,
        log: Option<std::sync::Arc<crate::dirty::BackendLog>>,
    ) -> Result<(), String> {
        if self.device.backend_connection().is_none() {
            return Ok(());
        }
        let running = self.active && self.paused.is_none();
        if running {
            self.pause().map_err(|e| e.to_string())?;
        }
        let set = self.device.log_backend_writes(log);
        if running {
            self.resume().map_err(|e| e.to_string())?;
        }
        set
    }

    /// Connects a device restored without its backend
    /// ([`crate::virtio::VirtioDevice::connect_backend`]).
    pub fn connect_backend(&mut self) -> Result<(), String> {
        self.device.connect_backend()
    }

    /// Whether the device is paused ([`MmioTransport::pause`]).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Has a paused device serve its queues again, where it left them, with
    /// the features the driver acked. Does nothing if it is not paused.
    /// On an error the device is put in NEEDS_RESET and the error returned.
    pub fn resume(&mut self) -> Result<(), ActivateError> {
        let Some(queues) = self.paused.take() else {
            return Ok(());
        };
        let n = queues.len();
        let Some(queue_events) = self.queue_events.get(..n) else {
            self.active = false;
            self.fail(format_args!("the device handed back {n} queues"));
            return Err(ActivateError::QueueCount {
                expected: self.queue_events.len(),
                got: n,
            });
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events: queue_events.to_vec(),
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        self.device.activate(ctx).inspect_err(|e| {
            self.active = false;
            self.fail(format_args!("cannot resume the device: {e}"));
        })
    }

    /// The transport's and its device's state. The device must be paused
    /// ([`MmioTransport::pause`]) or not active: a running device's rings
    /// move under the snapshot.
    pub fn snapshot(&self) -> Result<TransportSnapshot, SnapshotError> {
        if self.active && self.paused.is_none() {
            return Err(SnapshotError::NotPaused {
                device_type: self.device.device_type(),
            });
        }
        let paused = self.paused.as_deref().unwrap_or(&[]);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot::from(paused.get(i).unwrap_or(q).state()))
            .collect();
        Ok(TransportSnapshot {
            device_type: self.device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            active: self.active,
            interrupt: self.interrupt.snapshot(),
            queues,
            device: self.device.snapshot()?,
        })
    }

    /// Gives `saved` to this transport, freshly built (never activated) on
    /// a device of the same kind: registers, interrupt state, queues and the
    /// device's own state. A device that was active is left paused with
    /// its saved queues and features: [`MmioTransport::resume`] starts it,
    /// as if the driver had just set DRIVER_OK.
    ///
    /// `saved` may come from an edited file: queues are checked against
    /// guest memory as a driver's setup is, and anything that does not fit
    /// this device (another kind, another queue count, features it does not
    /// offer, a disk of another size) is refused, leaving the transport's
    /// registers as they were.
    pub fn restore(&mut self, saved: &TransportSnapshot) -> Result<(), RestoreError> {
        if self.active || self.status != 0 {
            return Err(RestoreError::InUse);
        }
        if saved.device_type != self.device.device_type() {
            return Err(RestoreError::WrongKind {
                saved: saved.device.kind(),
                here: kind_name(self.device.device_type()),
            });
        }
        if saved.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: saved.queues.len(),
                here: self.queues.len(),
            });
        }
        // First: a device may learn what it offers from its saved state
        // (a vhost-user connection handed over by a migration).
        self.device.restore(&saved.device)?;
        let extra = saved.acked_features & !self.offered_features();
        if extra != 0 {
            return Err(RestoreError::Features { extra });
        }
        let queues = saved
            .queues
            .iter()
            .enumerate()
            .map(|(index, s)| self.restored_queue(index, s))
            .collect::<Result<Vec<_>, _>>()?;
        if saved.active {
            if saved.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
                return Err(RestoreError::Invalid(format!(
                    "an active device with status {:#x} (no DRIVER_OK)",
                    saved.status
                )));
            }
            if saved.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
                return Err(RestoreError::Invalid(
                    "an active device that needs a reset".into(),
                ));
            }
            if let Some(e) = &self.worker_error {
                return Err(RestoreError::Activate(ActivateError::Spawn(
                    std::io::Error::other(e.clone()),
                )));
            }
        }
        self.queues = queues;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.acked_features = saved.acked_features;
        self.queue_select = saved.queue_select;
        self.status = saved.status;
        if let Err(e) = self.interrupt.restore(&saved.interrupt) {
            tracing::warn!("cannot raise the restored device's pending interrupt: {e}");
        }
        if !saved.active {
            return Ok(());
        }
        let ctx = self
            .build_activate_context()
            .map_err(RestoreError::Invalid)?;
        // Restored paused: the device starts serving its queues at
        // [`MmioTransport::resume`], when the machine starts. A migration's
        // destination must not touch a backend (or guest RAM it may share
        // with the source) before the source has committed.
        self.paused = Some(ctx.queues);
        self.active = true;
        info!(
            device_type = self.device.device_type(),
            features = format_args!("{:#x}", self.acked_features),
            "virtio device restored (paused until the machine starts)"
        );
        Ok(())
    }

    /// Queue `index` from `saved`, checked as a driver's setup would be.
    fn restored_queue(&self, index: usize, saved: &QueueSnapshot) -> Result<Queue, RestoreError> {
        let invalid = |why: String| RestoreError::InvalidQueue { index, why };
        let max = self.queues[index].max_size();
        if saved.max_size != max {
            return Err(invalid(format!(
                "maximum size {} saved, the device's is {max}",
                saved.max_size
            )));
        }
        let q = Queue::try_from(virtio_queue::QueueState::from(*saved))
            .map_err(|e| invalid(e.to_string()))?;
        if q.ready() && !q.is_valid(&self.mem) {
            return Err(invalid("its rings lie outside guest memory".into()));
        }
        Ok(q)
    }
}

/// The kind of device a `VIRTIO_ID_*` names, for messages.
fn kind_name(device_type: u32) -> &'static str {
    match device_type {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => "virtio-blk",
        virtio_bindings::virtio_ids::VIRTIO_ID_NET => "virtio-net",
        _ => "virtio",
    }
}

#[cfg(test)]
mod tests;
