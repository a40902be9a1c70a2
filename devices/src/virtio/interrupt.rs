//! The interrupt line of one virtio-mmio device.
//!
//! The transport and the device's worker thread share one [`Interrupt`]: the
//! worker sets a cause bit and pulses the irqfd, the guest reads the cause
//! from `InterruptStatus` and clears it through `InterruptACK`.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status, config generation and the irqfd of one device.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Wraps `irq`, an eventfd registered as a KVM irqfd: each write raises
    /// the device's (edge-triggered) interrupt line.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that buffers were placed in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver that the device's configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    fn raise(&self, cause: u32) -> io::Result<()> {
        // The cause must be visible before the guest can take the interrupt.
        self.status.fetch_or(cause, Ordering::AcqRel);
        self.irq.write(1)
    }

    /// The irqfd, for a vhost-user backend to signal used buffers on
    /// directly (`VHOST_USER_SET_VRING_CALL`).
    pub fn irqfd(&self) -> &EventFd {
        &self.irq
    }

    /// The pending causes, as the guest reads them from `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the causes the guest acknowledged through `InterruptACK`.
    pub fn ack(&self, causes: u32) {
        self.status.fetch_and(!causes, Ordering::AcqRel);
    }

    /// The configuration generation counter (`ConfigGeneration`).
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// The pending causes and the config generation, for a snapshot.
    pub fn snapshot(&self) -> super::state::InterruptSnapshot {
        super::state::InterruptSnapshot {
            status: self.status(),
            config_generation: self.config_generation(),
        }
    }

    /// Takes over saved causes and config generation. Unknown cause bits
    /// are dropped. With causes pending, pulses the irqfd once: the edge
    /// the guest would otherwise wait for may have been lost with the old
    /// VM (a spurious interrupt is harmless, a lost one hangs the driver).
    pub(crate) fn restore(&self, saved: &super::state::InterruptSnapshot) -> io::Result<()> {
        let status = saved.status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        self.config_generation
            .store(saved.config_generation, Ordering::Release);
        self.status.store(status, Ordering::Release);
        if status != 0 {
            self.irq.write(1)?;
        }
        Ok(())
    }

    /// Clears every pending cause (device reset).
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn used_queue_sets_cause_and_pulses_irqfd() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let int = Interrupt::new(irq.try_clone().unwrap());
        int.signal_used_queue().unwrap();
        assert_eq!(int.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        int.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(int.status(), 0);
    }

    #[test]
    fn config_change_bumps_generation() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let int = Interrupt::new(irq.try_clone().unwrap());
        let g = int.config_generation();
        int.signal_config_change().unwrap();
        assert_eq!(int.config_generation(), g.wrapping_add(1));
        assert_eq!(int.status(), VIRTIO_MMIO_INT_CONFIG);
        int.signal_used_queue().unwrap();
        int.ack(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(int.status(), VIRTIO_MMIO_INT_VRING);
        int.reset();
        assert_eq!(int.status(), 0);
        assert_eq!(irq.read().unwrap(), 2);
    }
}
