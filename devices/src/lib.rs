//! Kiln device models.
//!
//! Everything a guest can touch lives here: the port-I/O and MMIO buses the
//! vCPUs dispatch to, the legacy devices (16550 serial, ACPI power/reset
//! register, i8042 reset line) and the virtio-mmio transport with its devices.
//! Guest input is hostile: every address, length and descriptor is checked,
//! and a bad request gets an error status, never a panic.

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitSignal, VmExit};
