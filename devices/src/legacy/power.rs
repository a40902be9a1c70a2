//! Power-off and reset as the guest requests them.
//!
//! With hardware-reduced ACPI the kernel powers off by writing
//! `SLP_TYP << 2 | SLP_EN` to the FADT's sleep control register and reboots
//! by writing the reset value to the FADT's reset register. Kernels that
//! fall back to the keyboard controller pulse the reset line by writing
//! 0xfe to the i8042 command port.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Register offsets within the device's 3-port window.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
pub const WINDOW_LEN: u64 = 3;

pub struct AcpiPowerDevice {
    s5_sleep_type: u8,
    reset_value: u8,
    exit: Arc<ExitSignal>,
}

impl AcpiPowerDevice {
    pub fn new(s5_sleep_type: u8, reset_value: u8, exit: Arc<ExitSignal>) -> Self {
        Self {
            s5_sleep_type,
            reset_value,
            exit,
        }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; the other registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == self.s5_sleep_type {
                    self.exit.signal(VmExit::PowerOff);
                } else if value & SLP_EN != 0 {
                    tracing::warn!("guest asked for unsupported sleep type {sleep_type}");
                }
            }
            RESET_OFFSET if value == self.reset_value => {
                tracing::info!("guest reset through the ACPI reset register");
                self.exit.signal(VmExit::Reset)
            }
            _ => {}
        }
    }
}

/// The i8042's command port, reduced to the CPU reset line.
pub struct I8042ResetDevice {
    exit: Arc<ExitSignal>,
}

const I8042_CMD_RESET: u8 = 0xfe;

impl I8042ResetDevice {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042ResetDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_CMD_RESET) {
            tracing::info!("guest reset through the i8042 reset line");
            self.exit.signal(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPowerDevice, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (AcpiPowerDevice::new(5, 1, exit.clone()), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut d, exit) = device();
        d.write(SLEEP_CONTROL_OFFSET, &[5 << 2]);
        assert_eq!(exit.reason(), None, "SLP_EN not set");
        d.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), None, "S3 is not supported");
        d.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    #[test]
    fn reset_register_resets_only_with_the_reset_value() {
        let (mut d, exit) = device();
        d.write(RESET_OFFSET, &[2]);
        d.write(RESET_OFFSET, &[]);
        assert_eq!(exit.reason(), None);
        d.write(RESET_OFFSET, &[1]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn i8042_reset_pulse() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut d = I8042ResetDevice::new(exit.clone());
        d.write(0, &[0xd1]);
        assert_eq!(exit.reason(), None);
        d.write(0, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
