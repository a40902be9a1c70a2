//! Guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT                0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params        0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, PDPT, PD     0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB: not RAM; the MP floating pointer at
//!              0x0009_fc00, its table at 0x000a_0000; ACPI tables at 0x000e_0000,
//!              the VM generation id at 0x000e_f000,
//!              a reset stub at the reset vector 0x000f_fff0
//! 0x0010_0000  RAM: kernel, initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (1 GiB): virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// The "zero page" (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum size (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below 1 MiB ends here. The MP
/// table's floating pointer is its first 16 bytes (`mptable.rs`).
pub const EBDA_START: u64 = 0x9fc00;
/// The MP configuration table, in the reserved area below the ACPI tables.
pub const MPTABLE_CONFIG_START: u64 = 0xa0000;
pub const MPTABLE_CONFIG_END: u64 = ACPI_START;
/// ACPI tables live in the BIOS area, where the kernel scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0xf0000;
/// The VM generation id's 16 bytes, in the last page of the ACPI area
/// (reserved in the e820 map: the guest maps it, never allocates it); the
/// tables end before it.
pub const VMGENID_START: u64 = 0xef000;
/// The real-mode reset vector (F000:FFF0), where a "BIOS" reboot jumps.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Start of high RAM; the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x100000;

/// Hole below 4 GiB for device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio device windows are allocated upward from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_END: u64 = 0xfec0_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// ACPI sleep control, sleep status and reset registers (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The Generic Event Device's event register (the power button).
pub const GED_PORT: u16 = 0x608;
/// i8042 command port: writing 0xfe pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Virtio device interrupts: GSIs 5..=22 of the IOAPIC (4 is COM1).
pub const FIRST_DEVICE_IRQ: u32 = 5;
pub const LAST_DEVICE_IRQ: u32 = 22;
/// The Generic Event Device's interrupt.
pub const GED_IRQ: u32 = 23;
