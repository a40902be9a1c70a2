//! kiln-vmm: one process per VM, booting distro Linux kernels on KVM.
//!
//! [`config`] validates what the user asked for; [`builder`] turns it into
//! a machine (memory, kernel, devices, ACPI, vCPUs); [`runtime`] runs it;
//! [`api`] serves the control API, whose actions [`control`] carries out.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod control;
pub mod loader;
pub mod migrate;
pub mod migration;
pub mod options;
pub mod persist;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod socket;
pub mod store;
pub mod terminal;
pub mod vstate;
