//! Legacy platform devices on the port-I/O bus: the 16550 serial port,
//! the ACPI sleep/reset registers, the Generic Event Device's register
//! (the power button) and the i8042 reset line.

pub mod ged;
pub mod power;
pub mod serial;

pub use ged::GedDevice;
pub use power::{AcpiPowerDevice, I8042ResetDevice};
pub use serial::{EventFdTrigger, SerialDevice};
