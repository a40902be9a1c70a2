//! Asking the guest to announce itself (`VIRTIO_NET_F_GUEST_ANNOUNCE`).
//!
//! After a restore or a live migration the guest's MAC sits behind another
//! host port: switches and peers must learn it again. The device sets
//! `VIRTIO_NET_S_ANNOUNCE` in its config `status` and raises a
//! configuration-change interrupt; Linux's driver (`virtnet_config_changed_work`)
//! then calls `netdev_notify_peers` (gratuitous ARP, unsolicited neighbour
//! advertisements) and answers `VIRTIO_NET_CTRL_ANNOUNCE_ACK` on the control
//! queue, which clears the bit.
//!
//! The bit is only ever set for a driver that negotiated
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` (the spec's rule; Linux 6.1 also reaches a
//! `BUG_ON` if it must ack an announcement without a control queue).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::info;
use virtio_bindings::virtio_net::{VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP};

use crate::virtio::interrupt::Interrupt;

const LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
const ANNOUNCE: u16 = VIRTIO_NET_S_ANNOUNCE as u16;

/// The config `status` field of one network device and the trigger that
/// asks its driver to announce itself. Shared (an `Arc`) by the device, its
/// worker (which clears the request when the driver acks it) and whoever
/// restores the VM (which triggers it): get it from [`super::Net::announcer`]
/// before the device is boxed into its transport.
#[derive(Debug)]
pub struct Announcer {
    status: AtomicU16,
    /// The device's interrupt while a driver that negotiated
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE` drives it.
    line: Mutex<Option<Arc<Interrupt>>>,
}

impl Default for Announcer {
    fn default() -> Self {
        Self {
            status: AtomicU16::new(LINK_UP),
            line: Mutex::new(None),
        }
    }
}

impl Announcer {
    /// Asks the guest to announce itself: sets `VIRTIO_NET_S_ANNOUNCE` and
    /// raises a configuration-change interrupt. Returns `Ok(false)` (and
    /// does nothing) when no driver that negotiated
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE` is driving the device: the device is not
    /// active, or its driver does not do announcements. Never blocks beyond
    /// a short lock; callable from any thread.
    pub fn announce(&self) -> io::Result<bool> {
        let line = self.line();
        let Some(interrupt) = line.as_ref() else {
            return Ok(false);
        };
        // The bit must be visible before the guest takes the interrupt.
        self.status.fetch_or(ANNOUNCE, Ordering::AcqRel);
        interrupt.signal_config_change()?;
        info!("virtio-net: asked the guest to announce itself");
        Ok(true)
    }

    /// Whether an announcement was asked for and not yet acknowledged.
    pub fn pending(&self) -> bool {
        self.config_status() & ANNOUNCE != 0
    }

    /// The config `status` field as the driver reads it.
    pub fn config_status(&self) -> u16 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver acknowledged the announcement
    /// (`VIRTIO_NET_CTRL_ANNOUNCE_ACK`).
    pub(super) fn ack(&self) {
        self.status.fetch_and(!ANNOUNCE, Ordering::AcqRel);
    }

    /// The device was activated: `interrupt` is its line when the driver
    /// negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE`, `None` otherwise.
    pub(super) fn activated(&self, interrupt: Option<Arc<Interrupt>>) {
        *self.line() = interrupt;
    }

    /// Device reset: no driver, no pending announcement.
    pub(super) fn reset(&self) {
        *self.line() = None;
        self.ack();
    }

    fn line(&self) -> MutexGuard<'_, Option<Arc<Interrupt>>> {
        // The guarded value is a plain Option: a panic elsewhere cannot
        // leave it half-updated.
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn line() -> (Arc<Interrupt>, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (Arc::new(Interrupt::new(irq.try_clone().unwrap())), irq)
    }

    #[test]
    fn announce_sets_the_bit_and_signals_a_config_change() {
        let a = Announcer::default();
        assert_eq!(a.config_status(), LINK_UP);
        let (int, irq) = line();
        a.activated(Some(int.clone()));
        let generation = int.config_generation();
        assert!(a.announce().unwrap());
        assert_eq!(a.config_status(), LINK_UP | ANNOUNCE);
        assert!(a.pending());
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(int.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(int.config_generation(), generation.wrapping_add(1));
        a.ack();
        assert_eq!(a.config_status(), LINK_UP);
        assert!(!a.pending());
    }

    #[test]
    fn no_announcement_without_a_driver_that_negotiated_it() {
        let a = Announcer::default();
        // Never activated.
        assert!(!a.announce().unwrap());
        // Activated by a driver without VIRTIO_NET_F_GUEST_ANNOUNCE.
        a.activated(None);
        assert!(!a.announce().unwrap());
        assert_eq!(a.config_status(), LINK_UP);
        // Reset clears a pending request and forgets the line.
        let (int, irq) = line();
        a.activated(Some(int));
        assert!(a.announce().unwrap());
        a.reset();
        assert_eq!(a.config_status(), LINK_UP);
        assert_eq!(irq.read().unwrap(), 1);
        assert!(!a.announce().unwrap());
        assert!(irq.read().is_err(), "no interrupt after reset");
    }
}
