//! The one place that turns a validated [`VmConfig`] into a VM ready to run.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kiln_devices::legacy::{AcpiPowerDevice, I8042ResetDevice, SerialDevice};
use kiln_devices::{Bus, BusError, ExitSignal};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, MmioDeviceInfo, S5_SLEEP_TYPE};
use crate::arch::layout::*;
use crate::config::{SerialMode, VmConfig};
use crate::loader::{self, BootInfo};
use crate::vstate::kvm::{self, Kvm};
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::{memory, vm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error("--cpus {requested} is more than this host's KVM allows ({max})")]
    TooManyCpus { requested: u8, max: usize },
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Regs(#[from] crate::arch::regs::Error),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: String,
        source: std::io::Error,
    },
}

/// A VM with its memory loaded and devices wired, not yet running.
pub struct Machine {
    pub vcpus: Vec<Vcpu>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// How the kernel was booted (ELF, extracted bzImage, ...).
    pub kernel_description: String,
    // Kept alive for as long as the vCPUs run: KVM maps this memory and
    // the VM fd owns the irqchip.
    pub mem: GuestMemoryMmap,
    pub vm: vm::Vm,
    _kvm: Kvm,
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)
}

fn serial_output(mode: &SerialMode) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::None => Box::new(std::io::sink()),
        SerialMode::File(path) => {
            Box::new(File::create(path).map_err(|source| Error::SerialFile {
                path: path.display().to_string(),
                source,
            })?)
        }
    })
}

/// Checks what can be checked without KVM, so a bad kernel or an initrd
/// that cannot fit fails before any KVM object exists.
pub fn precheck(cfg: &VmConfig) -> Result<(), Error> {
    loader::detect_format(&cfg.kernel)?;
    if let Some(path) = &cfg.initrd {
        let size = std::fs::metadata(path)
            .map_err(|source| loader::Error::Open {
                path: path.clone(),
                source,
            })?
            .len();
        let low_ram = cfg.memory.min(MMIO_GAP_START);
        if size.saturating_add(HIMEM_START) >= low_ram {
            return Err(loader::Error::InitrdTooLarge {
                path: path.clone(),
                size,
                limit: low_ram,
            }
            .into());
        }
    }
    Ok(())
}

pub fn build(cfg: &VmConfig) -> Result<Machine, Error> {
    precheck(cfg)?;
    let kvm = Kvm::open()?;
    if usize::from(cfg.vcpus) > kvm.max_vcpus {
        return Err(Error::TooManyCpus {
            requested: cfg.vcpus,
            max: kvm.max_vcpus,
        });
    }
    let mem = memory::create(cfg.memory)?;
    let vm = vm::Vm::new(&kvm, &mem)?;

    let kernel = loader::load_kernel(&mem, &cfg.kernel, cfg.bzimage)?;
    tracing::info!("kernel: {}", kernel.description);
    let initrd = match &cfg.initrd {
        Some(path) => Some(loader::load_initrd(&mem, path, kernel.end, &kernel.header)?),
        None => None,
    };
    let cmdline_len = loader::load_command_line(&mem, &cfg.cmdline)?;

    let exit = Arc::new(ExitSignal::new().map_err(Error::EventFd)?);
    let mut pio = Bus::new();
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, serial_output(&cfg.serial)?).map_err(Error::EventFd)?,
    ));
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPowerDevice::new(
            S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
            exit.clone(),
        ))),
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        kiln_devices::legacy::power::WINDOW_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042ResetDevice::new(exit.clone()))),
        u64::from(I8042_COMMAND_PORT),
        1,
    )?;
    let mmio = Bus::new();
    let mmio_devices: Vec<MmioDeviceInfo> = Vec::new();

    crate::arch::regs::write_reset_stub(&mem)?;
    let rsdp = acpi::create_tables(&mem, cfg.vcpus, &mmio_devices)?;
    let e820 = loader::e820_map(&mem);
    loader::write_zero_page(
        &mem,
        &BootInfo {
            header: kernel.header,
            cmdline_len,
            initrd,
            rsdp,
            e820: &e820,
        },
    )?;

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(&kvm.supported_cpuid, cfg.vcpus)?;
        if index == 0 {
            vcpu.configure_boot(&mem, kernel.entry)?;
        }
        vcpus.push(vcpu);
    }

    Ok(Machine {
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit,
        serial,
        kernel_description: kernel.description,
        mem,
        vm,
        _kvm: kvm,
    })
}
