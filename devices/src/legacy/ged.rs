//! The Generic Event Device's register: how the VMM tells the guest about
//! a platform event on a hardware-reduced ACPI machine (which has no GPE
//! blocks). The VMM latches the event here and raises the GED's interrupt;
//! the DSDT's `_EVT` method reads the register (which clears it) and
//! notifies the device the event belongs to, e.g. `Notify (PWRB, 0x80)`:
//! the power button was pressed.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;
/// The register is one byte.
pub const WINDOW_LEN: u64 = 1;

pub struct GedDevice {
    pending: u8,
    irq: EventFd,
}

/// The GED's latched events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedSnapshot {
    /// Events latched and not yet read by the guest (`EVENT_*` bits).
    pub pending: u8,
}

impl GedDevice {
    /// `irq` is the eventfd registered as the GED's (edge-triggered) irqfd.
    pub fn new(irq: EventFd) -> Self {
        Self { pending: 0, irq }
    }

    /// The events latched and not yet read, for a snapshot.
    pub fn snapshot(&self) -> GedSnapshot {
        GedSnapshot {
            pending: self.pending,
        }
    }

    /// Takes over saved events; with some pending, raises the interrupt
    /// again (the edge may have been lost with the old VM).
    pub fn restore(&mut self, saved: &GedSnapshot) -> std::io::Result<()> {
        self.pending = saved.pending;
        if self.pending != 0 {
            self.irq.write(1)?;
        }
        Ok(())
    }

    /// Latches `event` and interrupts the guest.
    pub fn notify(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn an_event_is_latched_until_read_and_raises_the_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut d = GedDevice::new(irq.try_clone().unwrap());
        let mut b = [0xffu8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0]);
        d.notify(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut wide = [0xffu8; 4];
        d.read(1, &mut wide);
        assert_eq!(
            wide, [0; 4],
            "other offsets read as zero and keep the event"
        );
        d.read(0, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON]);
        d.read(0, &mut b);
        assert_eq!(b, [0], "reading clears it");
    }

    #[test]
    fn a_pending_event_survives_a_snapshot() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut d = GedDevice::new(irq.try_clone().unwrap());
        assert_eq!(d.snapshot(), GedSnapshot::default());
        d.notify(EVENT_POWER_BUTTON).unwrap();
        let saved: GedSnapshot =
            serde_json::from_str(&serde_json::to_string(&d.snapshot()).unwrap()).unwrap();
        assert_eq!(saved.pending, EVENT_POWER_BUTTON);

        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut restored = GedDevice::new(irq2.try_clone().unwrap());
        restored.restore(&saved).unwrap();
        assert_eq!(irq2.read().unwrap(), 1, "the interrupt is raised again");
        let mut b = [0u8; 1];
        restored.read(0, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON]);
        // Nothing pending: no interrupt.
        let mut quiet = GedDevice::new(irq2.try_clone().unwrap());
        quiet.restore(&GedSnapshot::default()).unwrap();
        assert!(irq2.read().is_err());
    }
}
