//! x86_64 platform: guest physical layout, long-mode entry, CPUID, MSRs and
//! the ACPI tables that describe the machine to the guest.

pub mod acpi;
pub mod cpu_compat;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
