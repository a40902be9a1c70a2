//! The VM-wide state KVM holds: the in-kernel interrupt controllers, the
//! PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the VM's {what}: {source}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the VM's {what}: {source}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the saved {what} is for irqchip {found}, not {expected}")]
    WrongChip {
        what: &'static str,
        found: u32,
        expected: u32,
    },
}

/// The in-kernel devices' state (the KVM structures serialize as their
/// bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// The kvmclock: the guest's nanoseconds since boot as it last saw them.
    pub clock: kvm_clock_data,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC (master)"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC (slave)"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

impl Vm {
    /// Reads the VM's state. Call with every vCPU paused (and after their
    /// states are saved), so that the clock is the moment the guest stopped.
    pub fn save_state(&self) -> Result<VmState, StateError> {
        let get = |what| move |source| StateError::Get { what, source };
        let chip = |(chip_id, what): (u32, &'static str)| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(get(what)).map(|()| c)
        };
        Ok(VmState {
            pic_master: chip(CHIPS[0])?,
            pic_slave: chip(CHIPS[1])?,
            ioapic: chip(CHIPS[2])?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock: self.fd.get_clock().map_err(get("kvmclock"))?,
        })
    }

    /// Puts a saved state into this new VM (made by [`Vm::new`], so with
    /// its irqchip and PIT). Call before any vCPU runs.
    ///
    /// The kvmclock is set to the saved value, not advanced by the time
    /// the snapshot sat on disk: the guest's monotonic clock continues
    /// from where it stopped, never backwards (the wall clock is the
    /// guest's NTP's business, as after a suspend).
    pub fn restore_state(&self, s: &VmState) -> Result<(), StateError> {
        let set = |what| move |source| StateError::Set { what, source };
        for ((expected, what), chip) in CHIPS.iter().zip([&s.pic_master, &s.pic_slave, &s.ioapic]) {
            if chip.chip_id != *expected {
                return Err(StateError::WrongChip {
                    what,
                    found: chip.chip_id,
                    expected: *expected,
                });
            }
            self.fd.set_irqchip(chip).map_err(set(what))?;
        }
        self.fd.set_pit2(&s.pit).map_err(set("PIT"))?;
        // Only the value: KVM_CLOCK_REALTIME would move it by the time
        // since the save, and the other flags are KVM's to report.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("kvmclock"))
    }
}
