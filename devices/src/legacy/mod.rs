//! Legacy platform devices on the port-I/O bus: the 16550 serial port,
//! the ACPI sleep/reset registers, the Generic Event Device's register
//! (the power button) and the i8042 reset line; and the VM generation id,
//! which lives in guest memory and is announced through the GED.

pub mod ged;
pub mod power;
pub mod serial;
pub mod vmgenid;

pub use ged::{GedDevice, GedSnapshot};
pub use power::{AcpiPowerDevice, I8042ResetDevice};
pub use serial::{EventFdTrigger, SerialDevice, SerialRestoreError, SerialSnapshot};
