//! Kiln device models.
//!
//! Everything a guest can touch lives here: the port-I/O and MMIO buses the
//! vCPUs dispatch to, the legacy devices (16550 serial, ACPI power/reset
//! register, i8042 reset line) and the virtio-mmio transport with its devices.
//! Guest input is hostile: every address, length and descriptor is checked,
//! and a bad request gets an error status, never a panic.

pub mod bus;
pub mod dirty;
pub mod exit;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitSignal, VmExit};

/// Stack size of the threads Kiln starts (vCPUs, device workers). Below
/// 2 MiB, so that no stack can hold an aligned 2 MiB range: a host whose
/// transparent huge pages are `always` backs any such range of a stack with
/// a huge page, 2 MiB of resident memory for a stack that uses a few KiB.
/// Rust's default (2 MiB) leaves that to where the stack happens to land.
pub const THREAD_STACK_SIZE: usize = 1 << 20;
