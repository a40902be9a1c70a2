//! Legacy platform devices on the port-I/O bus: the 16550 serial port,
//! the ACPI sleep/reset registers and the i8042 reset line.

pub mod power;
pub mod serial;

pub use power::{AcpiPowerDevice, I8042ResetDevice};
pub use serial::{EventFdTrigger, SerialDevice};
