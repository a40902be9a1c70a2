//! The Intel MultiProcessor Specification (1.4) table: a floating pointer
//! at the start of the EBDA and a configuration table (processors, the ISA
//! bus, the IOAPIC and its interrupt routing) in the reserved area below
//! the ACPI tables.
//!
//! Guests read the machine from ACPI (`acpi.rs`'s MADT) and ignore this
//! table when ACPI describes the local APICs and the IOAPIC; it matters to
//! a guest booted with `acpi=off`, and it saves every Linux guest a scan.
//! Without a floating pointer, Linux (`default_find_smp_config`) looks for
//! one in the first KiB of RAM, the last KiB of base memory and the whole
//! 64 KiB BIOS area, remapping and unmapping its window every 16 bytes:
//! about 70,000 single-page TLB flushes. Where the guest's page tables are
//! shadowed (nested virtualisation without nested paging, as in the test
//! host with `--no-npt`) each one is a VM exit, and that scan was 11 s of
//! a 17 s boot. Found in the second place it looks, the scan is over.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    APIC_START, EBDA_START, IOAPIC_START, MPTABLE_CONFIG_END, MPTABLE_CONFIG_START,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MP table for {0} vCPUs does not fit below the ACPI tables")]
    TooLarge(u8),
    #[error("writing the MP table: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

// The floating pointer's 16 bytes end before the configuration table.
const _: () = assert!(EBDA_START + 16 <= MPTABLE_CONFIG_START);

/// Entry types of the base configuration table.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Versions reported for the (KVM in-kernel) local APICs and IOAPIC.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The IOAPIC's pins, as in the MADT (GSIs 0..=23).
const IOAPIC_PINS: u8 = 24;
/// Family 6 signature and the FPU and APIC feature bits (CPUID 1 EDX).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const SPEC_REVISION: u8 = 4;

/// Writes the floating pointer at `EBDA_START` and the configuration table
/// at `MPTABLE_CONFIG_START` for `vcpus` processors (APIC ids 0..vcpus,
/// the first one the bootstrap processor).
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), Error> {
    let table = config_table(vcpus);
    if MPTABLE_CONFIG_START + table.len() as u64 > MPTABLE_CONFIG_END {
        return Err(Error::TooLarge(vcpus));
    }
    mem.write_slice(&table, GuestAddress(MPTABLE_CONFIG_START))?;
    mem.write_slice(&floating_pointer(), GuestAddress(EBDA_START))?;
    Ok(())
}

/// The 16-byte floating pointer structure: where the configuration table
/// is, and that it is there (feature byte 1 is 0: no default configuration).
fn floating_pointer() -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(b"_MP_");
    p[4..8].copy_from_slice(&(MPTABLE_CONFIG_START as u32).to_le_bytes());
    p[8] = 1; // length, in 16-byte units
    p[9] = SPEC_REVISION;
    p[10] = checksum(&p);
    p
}

fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // unique among the APIC ids, as the spec asks
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA IRQ n on IOAPIC pin n, with the bus's own polarity and trigger
    // (flags 0), as the MADT says by having no source overrides.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 of the bootstrap processor (APIC id 0) takes the 8259's
    // interrupts (ExtINT), as the MP spec's PC/AT layout has it: only one
    // CPU may acknowledge them. LINT1 of every local APIC (0xff) is the NMI.
    for (kind, apic, lint) in [(INT_EXTINT, 0, 0), (INT_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, apic, lint]);
        count += 1;
    }

    let mut t = Vec::with_capacity(44 + entries.len());
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    t.push(SPEC_REVISION);
    t.push(0); // checksum, below
    t.extend_from_slice(b"KILN    "); // OEM id
    t.extend_from_slice(b"KILNVMM     "); // product id
    t.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    t.push(0);
    t.push(0);
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The byte that makes `bytes` sum to zero (its own place counted as 0).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// What Linux's `smp_scan_config` and `smp_read_mpc` check: the
    /// signatures, lengths and checksums, and the table at the pointer's
    /// address; then the entries add up to the count and the length.
    #[test]
    fn the_table_reads_back_as_linux_reads_it() {
        for vcpus in [1u8, 2, 7, 254] {
            let mem = memory();
            write(&mem, vcpus).unwrap();
            let mut p = [0u8; 16];
            mem.read_slice(&mut p, GuestAddress(EBDA_START)).unwrap();
            assert_eq!(&p[0..4], b"_MP_");
            assert_eq!(p[8], 1);
            assert_eq!(p[9], 4);
            assert_eq!(sum(&p), 0);
            assert_eq!(p[11], 0, "no default configuration");
            let at = u64::from(u32::from_le_bytes(p[4..8].try_into().unwrap()));
            let mut header = [0u8; 44];
            mem.read_slice(&mut header, GuestAddress(at)).unwrap();
            assert_eq!(&header[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(at)).unwrap();
            assert_eq!(sum(&t), 0, "{vcpus} vCPUs");
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().unwrap()),
                APIC_START as u32
            );
            let count = u16::from_le_bytes([t[34], t[35]]);
            let (mut off, mut seen, mut cpus, mut bsps, mut pins, mut lints) = (44, 0, 0, 0, 0, 0);
            while off < len {
                let size = if t[off] == ENTRY_PROCESSOR { 20 } else { 8 };
                match t[off] {
                    ENTRY_PROCESSOR => {
                        assert_eq!(t[off + 1], cpus as u8, "APIC ids in order");
                        cpus += 1;
                        bsps += usize::from(t[off + 3] & CPU_BOOTSTRAP != 0);
                    }
                    ENTRY_IOAPIC => {
                        assert_eq!(t[off + 1], vcpus, "IOAPIC id after the CPUs'");
                        let addr = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap());
                        assert_eq!(addr, IOAPIC_START as u32);
                    }
                    ENTRY_IO_INTERRUPT => {
                        assert_eq!(t[off + 5], t[off + 7], "ISA IRQ n on pin n");
                        pins += 1;
                    }
                    ENTRY_LOCAL_INTERRUPT => {
                        let (kind, apic, lint) = (t[off + 1], t[off + 6], t[off + 7]);
                        match kind {
                            INT_EXTINT => assert_eq!((apic, lint), (0, 0), "ExtINT: BSP's LINT0"),
                            INT_NMI => assert_eq!((apic, lint), (0xff, 1), "NMI: all LINT1"),
                            k => panic!("local interrupt type {k}"),
                        }
                        lints += 1;
                    }
                    ENTRY_BUS => {}
                    other => panic!("entry type {other}"),
                }
                off += size;
                seen += 1;
            }
            assert_eq!(off, len);
            assert_eq!(seen, count);
            assert_eq!((cpus, bsps, pins, lints), (usize::from(vcpus), 1, 24, 2));
        }
    }

    #[test]
    fn the_table_stays_below_the_acpi_tables() {
        assert!(MPTABLE_CONFIG_START + config_table(254).len() as u64 <= MPTABLE_CONFIG_END);
    }
}
