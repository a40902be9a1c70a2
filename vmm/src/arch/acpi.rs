//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and DSDT.
//!
//! Hardware-reduced ACPI keeps the platform small: no PM timer, no GPE
//! blocks, no SCI. Power-off goes through the FADT sleep control register,
//! reboot through the FADT reset register. The DSDT carries `_S5_`, COM1
//! and one `LNRO0005` device per virtio-mmio window — the only way a
//! Debian kernel (no `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`) finds them.
//!
//! The power button, which a hardware-reduced machine cannot wire as a
//! fixed event, is a control-method button (`PNP0C0C`, `\_SB_.PWRB`)
//! notified by a Generic Event Device (`ACPI0013`): its interrupt makes the
//! guest run `_EVT`, which reads the event register kiln-vmm latched and
//! sends `Notify (PWRB, 0x80)` for a press. Linux's `button` driver turns
//! that into a KEY_POWER input event.
//!
//! The VM generation id (`\_SB_.VGEN`, `_CID "VM_Gen_Counter"`) is a device
//! whose `ADDR` method returns where its 16 bytes live
//! ([`VMGENID_START`], written by `kiln_devices::legacy::vmgenid`); the same
//! GED notifies it (`Notify (VGEN, 0x80)`) when a restore changed the id.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const OEM_ID: [u8; 6] = *b"KILN  ";
const OEM_TABLE_ID: [u8; 8] = *b"KILNVMM ";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: no VGA and no CMOS RTC. Leaving out the "8042" bit tells
/// the kernel there is no keyboard controller to probe.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// The GED register's power-button bit (kiln_devices' `EVENT_POWER_BUTTON`).
pub const GED_EVENT_POWER_BUTTON: u8 = kiln_devices::legacy::ged::EVENT_POWER_BUTTON;
/// The GED register's VM-generation-id bit (kiln_devices' `EVENT_VMGENID`).
pub const GED_EVENT_VMGENID: u8 = kiln_devices::legacy::vmgenid::EVENT_VMGENID;

/// SLP_TYP value for S5 that the DSDT's `_S5_` announces.
pub const S5_SLEEP_TYPE: u8 = 5;

/// A virtio-mmio device as the guest must see it in the DSDT.
#[derive(Clone, Copy, Debug)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area below the VM generation id")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Places tables one after another, 16-byte aligned, from ACPI_START to
/// VMGENID_START.
struct Writer<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<u64, Error> {
        let addr = self.next;
        let end = addr + bytes.len() as u64;
        if end > VMGENID_START {
            return Err(Error::TooLarge((end - ACPI_START) as usize));
        }
        self.mem.write_slice(bytes, GuestAddress(addr))?;
        self.next = (end + 15) & !15;
        Ok(addr)
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Builds the DSDT's AML body.
fn dsdt_body(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();

    // \_S5_: Package { SLP_TYPa, SLP_TYPb }.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    device(
        &mut body,
        "_SB_.COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        &[],
        vec![&com1_io, &com1_irq],
    );

    vm_generation_id(&mut body);
    power_button(&mut body);

    for (i, dev) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        device(
            &mut body,
            &format!("_SB_.V{i:03X}"),
            &"LNRO0005",
            i as u32,
            // Coherent DMA: the device reads guest memory directly.
            &[("_CCA", &aml::ONE)],
            vec![&mem, &irq],
        );
    }
    body
}

/// The VM generation id (Microsoft's "Virtual Machine Generation ID"
/// interface, as QEMU and Firecracker describe it). Linux's vmgenid driver
/// matches the `_CID` (ACPICA upper-cases it to `VM_GEN_COUNTER`) and
/// evaluates `ADDR`: a package of the address's low and high 32 bits.
/// `QEMUVGID` is QEMU's `_HID` for the device, which guests have long seen
/// (iasl would refuse it as ASL source, its suffix not being hex digits;
/// no guest checks that, and drivers match the `_CID`).
fn vm_generation_id(body: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &"QEMUVGID");
    let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let low = VMGENID_START as u32;
    let high = (VMGENID_START >> 32) as u32;
    let addr = aml::Package::new(vec![&low, &high]);
    let ret = aml::Return::new(&addr);
    let method = aml::Method::new("ADDR".into(), 0, false, vec![&ret]);
    aml::Device::new("_SB_.VGEN".into(), vec![&hid, &cid, &ddn, &method]).to_aml_bytes(body);
}

/// The power button and the Generic Event Device that presses it.
fn power_button(body: &mut Vec<u8>) {
    device(
        body,
        "_SB_.PWRB",
        &aml::EISAName::new("PNP0C0C"),
        0,
        &[],
        vec![],
    );

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &(GED_PORT as usize),
        &1usize,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    // _EVT (Arg0 = the GSI): Local0 = GDAT (reading clears the latch,
    // every event at once); if its power-button bit is set,
    // Notify (\_SB_.PWRB, 0x80); if its generation-id bit is set,
    // Notify (\_SB_.VGEN, 0x80).
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let button = GED_EVENT_POWER_BUTTON;
    let bit = aml::And::new(&aml::Local(1), &aml::Local(0), &button);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let pressed = aml::Equal::new(&aml::Local(1), &button);
    let when = aml::If::new(&pressed, vec![&notify]);
    let genid = GED_EVENT_VMGENID;
    let genid_bit = aml::And::new(&aml::Local(2), &aml::Local(0), &genid);
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify_vgen = aml::Notify::new(&vgen, &0x80u8);
    let changed = aml::Equal::new(&aml::Local(2), &genid);
    let when_changed = aml::If::new(&changed, vec![&notify_vgen]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read, &bit, &when, &genid_bit, &when_changed],
    );
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(body);
}

/// Appends `Device(path) { _HID, _UID, extra names..., _CRS }` to `body`.
fn device(
    body: &mut Vec<u8>,
    path: &str,
    hid: &dyn Aml,
    uid: u32,
    extra: &[(&str, &dyn Aml)],
    resources: Vec<&dyn Aml>,
) {
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let extra: Vec<aml::Name> = extra
        .iter()
        .map(|(name, value)| aml::Name::new((*name).into(), *value))
        .collect();
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    children.extend(extra.iter().map(|n| n as &dyn Aml));
    children.push(&crs);
    aml::Device::new(path.into(), children).to_aml_bytes(body);
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Writes all tables into guest memory and returns the RSDP's address.
pub fn create_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, Error> {
    // The RSDP goes first, at a 16-byte boundary the kernel scans.
    let mut w = Writer {
        mem,
        next: ACPI_START + Rsdp::len() as u64,
    };
    w.next = (w.next + 15) & !15;

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices));
    let dsdt_addr = w.put(dsdt.as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"KILNVMM\0").into();
    let fadt_addr = w.put(&to_bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt_addr = w.put(&to_bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = w.put(&to_bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&to_bytes(&rsdp), GuestAddress(ACPI_START))?;
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let devs = [MmioDeviceInfo {
            base: VIRTIO_MMIO_START,
            len: 0x200,
            irq: 5,
        }];
        let rsdp_addr = create_tables(&mem, 2, &devs).unwrap();

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]));
        assert!(checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());

        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "bad checksum in {:?}", &t[..4]);
            t
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        let dsdt = read_table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_"));
        assert!(has(b"LNRO0005"));
        assert!(has(b"ACPI0013"));
        assert!(has(b"_EVT"));
        assert!(has(b"PWRB"));
        // The VM generation id: its names, and ADDR returning
        // Package (2) { DWordConst (VMGENID_START), Zero }: ReturnOp,
        // PackageOp, PkgLength (itself included), NumElements, the elements.
        assert!(has(b"VGEN"));
        assert!(has(b"QEMUVGID\0"));
        assert!(has(b"_CID\x0dVM_Gen_Counter\0"));
        assert!(has(b"_DDN\x0dVM_Gen_Counter\0"));
        let addr = VMGENID_START as u32;
        let mut ret = vec![0xa4, 0x12, 0x08, 0x02, 0x0c];
        ret.extend_from_slice(&addr.to_le_bytes());
        ret.push(0x00);
        let method = dsdt
            .windows(4)
            .position(|w| w == b"ADDR")
            .expect("no ADDR method");
        assert_eq!(dsdt[method - 2], 0x14, "ADDR is not a method");
        assert_eq!(&dsdt[method + 5..method + 5 + ret.len()], &ret[..]);
        // _EVT notifies it: NotifyOp \_SB_.VGEN 0x80.
        assert!(has(b"\x86\\\x2e_SB_VGEN\x0a\x80"));
        assert!(has(b"\x86\\\x2e_SB_PWRB\x0a\x80"));
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // Header (44 bytes) + two local APICs (8 each) + one IOAPIC (12).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
    }

    #[test]
    fn the_tables_leave_the_generation_id_alone() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let genid =
            kiln_devices::legacy::vmgenid::VmGenId::new(&mem, GuestAddress(VMGENID_START)).unwrap();
        create_tables(&mem, 1, &[]).unwrap();
        let mut id = [0u8; 16];
        mem.read_slice(&mut id, GuestAddress(VMGENID_START))
            .unwrap();
        assert_eq!(id, genid.id());
        assert!((ACPI_START..ACPI_END).contains(&VMGENID_START));
        assert_eq!(VMGENID_START % 4096, 0);
    }

    #[test]
    fn the_ged_events_are_distinct() {
        assert_ne!(GED_EVENT_VMGENID, 0);
        assert_eq!(GED_EVENT_VMGENID & GED_EVENT_POWER_BUTTON, 0);
    }
}
