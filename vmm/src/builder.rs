//! The one place that turns a validated [`VmConfig`] into a VM ready to run.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_devices::legacy::vmgenid::VmGenId;
use kiln_devices::legacy::{AcpiPowerDevice, GedDevice, I8042ResetDevice, SerialDevice};
use kiln_devices::virtio::net::announce::Announcer;
use kiln_devices::virtio::{
    self, Block, BlockConfig, BlockCounters, MmioTransport, Net, VhostUserBlock,
    VhostUserBlockConfig, VirtioDevice, WorkerHook, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use kiln_devices::{Bus, BusError, ExitSignal};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, MmioDeviceInfo, S5_SLEEP_TYPE};
use crate::arch::layout::*;
use crate::config::{DiskBackend, DiskConfig, SerialMode, VmConfig};
use crate::console::{ConsoleHub, HubWriter};
use crate::loader::{self, BootInfo};
use crate::vstate::kvm::{self, Kvm};
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::{memory, vm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
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
    MpTable(#[from] crate::arch::mptable::Error),
    #[error(transparent)]
    Regs(#[from] crate::arch::regs::Error),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("disk {}: {source}", path.display())]
    Disk {
        path: std::path::PathBuf,
        source: virtio::block::Error,
    },
    #[error(transparent)]
    Volume(#[from] crate::store::Error),
    #[error("cannot set up the disk on {what}: {source}")]
    DeferredDisk {
        what: String,
        source: std::io::Error,
    },
    #[error("vhost-user disk {}: {source}", socket.display())]
    VhostUserDisk {
        socket: std::path::PathBuf,
        source: virtio::vhost_user_blk::Error,
    },
    #[error("network interface on TAP {tap}: {source}")]
    Net {
        tap: String,
        source: virtio::net::Error,
    },
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] virtio::mmio::Error),
    #[error("too many devices: the guest has room for {0}")]
    TooManyDevices(usize),
    #[error(transparent)]
    Socket(#[from] crate::socket::Error),
    #[error("--serial socket: cannot make the socket non-blocking: {0}")]
    SerialSocket(std::io::Error),
    #[error("the VM generation id: {0}")]
    VmGenId(kiln_devices::legacy::vmgenid::Error),
    #[error(transparent)]
    Restore(#[from] crate::persist::Error),
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
    /// `--serial socket:`: the listening socket and where output goes.
    pub console: Option<(UnixListener, Arc<Mutex<ConsoleHub>>)>,
    /// The Generic Event Device: presses the guest's power button.
    pub ged: Arc<Mutex<GedDevice>>,
    /// Each device's counters for the control API, in `--disk`, `--net`
    /// order.
    pub devices: Vec<crate::control::DeviceStats>,
    /// How the kernel was booted (ELF, extracted bzImage, ...).
    pub kernel_description: String,
    /// The virtio transports, disks then interfaces, in `--disk`, `--net`
    /// order (snapshots pause and save them).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Each interface's announcer (after a restore or a migration).
    pub announcers: Vec<Arc<Announcer>>,
    /// What a snapshot records of the configuration.
    pub saved_config: crate::persist::SavedConfig,
    /// Restored from a saved machine (its devices are paused until it
    /// starts, see `persist::start_restored`).
    pub restored: bool,
    // Kept alive for as long as the vCPUs run: KVM maps this memory and
    // the VM fd owns the irqchip.
    pub mem: GuestMemoryMmap,
    pub vm: Arc<vm::Vm>,
    _kvm: Kvm,
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)
}

/// Where the console's output goes; for `socket:`, also the listening
/// socket and the hub its clients attach to.
type SerialOutput = (
    Box<dyn Write + Send>,
    Option<(UnixListener, Arc<Mutex<ConsoleHub>>)>,
);

fn serial_output(mode: &SerialMode) -> Result<SerialOutput, Error> {
    let out: Box<dyn Write + Send> = match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::None => Box::new(std::io::sink()),
        SerialMode::File(path) => {
            Box::new(File::create(path).map_err(|source| Error::SerialFile {
                path: path.display().to_string(),
                source,
            })?)
        }
        SerialMode::Socket(path) => {
            let listener = crate::socket::bind("--serial socket:", path)?;
            listener
                .set_nonblocking(true)
                .map_err(Error::SerialSocket)?;
            let hub = ConsoleHub::new();
            return Ok((Box::new(HubWriter(hub.clone())), Some((listener, hub))));
        }
    };
    Ok((out, None))
}

/// Checks what can be checked without KVM, so a bad kernel or an initrd
/// that cannot fit fails before any KVM object exists.
pub fn precheck(cfg: &VmConfig) -> Result<(), Error> {
    crate::config::check_disk_queues(&cfg.disks, cfg.vcpus)?;
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

/// Hands out virtio-mmio windows and interrupt lines, and remembers them
/// for the DSDT and the kernel command line.
struct MmioAllocator {
    devices: Vec<MmioDeviceInfo>,
}

impl MmioAllocator {
    fn next(&mut self) -> Result<MmioDeviceInfo, Error> {
        let n = self.devices.len() as u64;
        // One page per device keeps every window page-aligned.
        let base = VIRTIO_MMIO_START + n * 0x1000;
        let irq = FIRST_DEVICE_IRQ + n as u32;
        let capacity = (LAST_DEVICE_IRQ - FIRST_DEVICE_IRQ + 1) as usize;
        if irq > LAST_DEVICE_IRQ || base + 0x1000 > VIRTIO_MMIO_END {
            return Err(Error::TooManyDevices(capacity));
        }
        let info = MmioDeviceInfo {
            base,
            len: MMIO_WINDOW_SIZE,
            irq,
        };
        self.devices.push(info);
        Ok(info)
    }

    /// `virtio_mmio.device=` entries, for kernels built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's find them in the DSDT).
    fn cmdline(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| format!("virtio_mmio.device={}@{:#x}:{}", d.len, d.base, d.irq))
            .collect()
    }
}

/// Where the first `--` outside double quotes starts (the kernel's rule),
/// or the end.
fn init_words_start(cmdline: &str) -> usize {
    let b = cmdline.as_bytes();
    let space = |i: usize| b.get(i).is_none_or(u8::is_ascii_whitespace);
    let mut quoted = false;
    for i in 0..b.len() {
        match b[i] {
            b'"' => quoted = !quoted,
            b'-' if !quoted
                && (i == 0 || space(i - 1))
                && b.get(i + 1) == Some(&b'-')
                && space(i + 2) =>
            {
                return i
            }
            _ => {}
        }
    }
    b.len()
}

/// The guest's command line: the user's, with what kiln-vmm says about its
/// machine added before any `--` (after which words go to init):
/// - `pci=off`, unless the user set `pci=` themselves: the machine has no
///   PCI bus, and a kernel not told so probes for one through port I/O,
///   about 400 exits to kiln-vmm at boot (a tenth of a second or more
///   where exits are expensive, as under nesting);
/// - the virtio-mmio devices, for kernels that read them from here.
fn guest_cmdline(user: &str, devices: Vec<String>) -> String {
    let (kernel, init) = user.split_at(init_words_start(user));
    let mut words = vec![kernel.trim()];
    if !kernel
        .split_ascii_whitespace()
        .any(|w| w.starts_with("pci="))
    {
        words.push("pci=off");
    }
    words.extend(devices.iter().map(String::as_str));
    words.push(init.trim());
    words.retain(|w| !w.is_empty());
    words.join(" ")
}

/// The hooks a device's worker thread runs first: the seccomp filter of
/// its kind.
#[derive(Clone)]
pub struct WorkerHooks {
    /// Workers that serve queues in kiln-vmm (block I/O, TAP).
    pub io: WorkerHook,
    /// Workers that talk to a vhost-user backend over its socket.
    pub vhost_user: WorkerHook,
}

/// Wires one virtio device: window, interrupt, queue notifications.
fn add_virtio(
    vm: &vm::Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    alloc: &mut MmioAllocator,
    device: Box<dyn VirtioDevice>,
    hook: &WorkerHook,
) -> Result<Arc<Mutex<MmioTransport>>, Error> {
    let slot = alloc.next()?;
    let irq = eventfd()?;
    vm.register_irqfd(&irq, slot.irq)?;
    let transport = MmioTransport::new(mem.clone(), device, irq)?.with_worker_hook(hook.clone());
    for (index, evt) in transport.queue_eventfds().map_err(Error::EventFd)? {
        vm.register_mmio_ioeventfd(&evt, slot.base + QUEUE_NOTIFY_OFFSET, index)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), slot.base, slot.len)?;
    Ok(transport)
}

/// `GET /vm`'s entry for a device: its id, kind and counters (none for a
/// vhost-user disk: its backend does the I/O).
fn device_stats(
    id: String,
    kind: &'static str,
    values: impl Fn() -> Vec<(&'static str, u64)> + Send + 'static,
) -> crate::control::DeviceStats {
    Box::new(move || {
        let mut v = serde_json::json!({ "id": id, "kind": kind });
        for (name, n) in values() {
            v[name] = n.into();
        }
        v
    })
}

/// A disk's device, the kind of worker it needs, and its counters when
/// kiln-vmm serves it.
type BuiltDisk = (
    Box<dyn VirtioDevice>,
    WorkerHook,
    Option<Arc<BlockCounters>>,
);

/// A disk's device and the kind of worker it needs. A vhost-user backend
/// is connected and negotiated with here, so that a missing or unsuitable
/// backend fails the build before any KVM object exists.
///
/// A volume of a restored machine (a snapshot, a migration) is attached
/// only when the machine starts (`persist::start_restored`): attaching
/// fences its previous writer, which a migration's source stays until it
/// commits. Unless the source handed its connection over: then the store
/// is asked here for the volume's socket, on this node, where nothing is
/// fenced.
fn build_disk(
    disk: &DiskConfig,
    index: usize,
    hooks: &WorkerHooks,
    restoring: bool,
    handed: &mut HandedDisks,
) -> Result<BuiltDisk, Error> {
    let id = crate::control::device_id(disk.id.as_deref(), "disk", index);
    let vhost_user = |socket: PathBuf, handed: &mut HandedDisks| -> Result<BuiltDisk, Error> {
        let cfg = VhostUserBlockConfig {
            socket: socket.clone(),
            queues: disk.queues,
        };
        let block = match handed.remove(&id) {
            Some((from, connection)) if from == socket => {
                tracing::info!(
                    "disk {id}: taking over the source's connection to {}",
                    socket.display()
                );
                VhostUserBlock::adopt(cfg, connection)
            }
            other => {
                if let Some((from, _)) = other {
                    tracing::info!(
                        "disk {id}: the source's backend was {}, this VM's is {}: connecting to it",
                        from.display(),
                        socket.display()
                    );
                }
                VhostUserBlock::connect(cfg)
                    .map_err(|source| Error::VhostUserDisk { socket, source })?
            }
        };
        Ok((Box::new(block), hooks.vhost_user.clone(), None))
    };
    Ok(match &disk.backend {
        DiskBackend::File {
            path,
            read_only,
            direct,
        } => {
            let block = Block::new(BlockConfig {
                path: path.clone(),
                read_only: *read_only,
                direct: *direct,
                id: disk.id.clone(),
                rate_limit: disk.rate_limit,
                queues: disk.queues,
            })
            .map_err(|source| Error::Disk {
                path: path.clone(),
                source,
            })?;
            let counters = block.counters();
            (Box::new(block), hooks.io.clone(), Some(counters))
        }
        DiskBackend::Volume { name, store } if restoring && !handed.contains_key(&id) => {
            let (volume, store, queues) = (name.clone(), store.clone(), disk.queues);
            let find: kiln_devices::virtio::FindBackend = Box::new(move || {
                crate::store::export_volume(&volume, store.as_deref(), queues)
                    .map_err(|e| e.to_string())
            });
            let what = format!("volume {name}");
            let block = VhostUserBlock::deferred(&what, disk.queues, find)
                .map_err(|source| Error::DeferredDisk { what, source })?;
            (Box::new(block), hooks.vhost_user.clone(), None)
        }
        DiskBackend::Volume { name, store } => {
            let socket = crate::store::export_volume(name, store.as_deref(), disk.queues)?;
            vhost_user(socket, handed)?
        }
        DiskBackend::VhostUser { socket } => vhost_user(socket.clone(), handed)?,
    })
}

/// What was put in guest RAM before the devices were built.
enum Loaded<'a> {
    Kernel {
        kernel: loader::LoadedKernel,
        initrd: Option<(GuestAddress, u64)>,
    },
    Saved(&'a crate::snapshot::VmSnapshot),
}

/// How the VM starts: a kernel booted from scratch, or a saved machine
/// (a snapshot, a migration) whose guest RAM is already in place.
pub enum Start<'a> {
    Boot,
    Restore {
        snapshot: &'a crate::snapshot::VmSnapshot,
        mem: GuestMemoryMmap,
        /// vhost-user connections handed over by a migration's source.
        handed: HandedDisks,
    },
}

/// Connections to vhost-user backends handed over by a migration's source
/// on this host, by disk id: the backend's socket and the connection. A
/// disk whose backend is at the same socket here takes the connection
/// over instead of connecting (the backend serves one frontend at a time).
pub type HandedDisks = std::collections::HashMap<String, (PathBuf, UnixStream)>;

/// Guest RAM's backing for `cfg`: a vhost-user backend maps guest RAM
/// itself, which needs a memfd; other guests keep private memory
/// (transparent huge pages and KSM work on it, and nothing else can map
/// it).
pub fn memory_backing(cfg: &VmConfig) -> memory::Backing {
    if cfg.disks.iter().any(DiskConfig::is_vhost_user) {
        memory::Backing::SharedMemfd
    } else {
        memory::Backing::Anonymous
    }
}

pub fn build(cfg: &VmConfig, hooks: &WorkerHooks) -> Result<Machine, Error> {
    build_with(cfg, hooks, Start::Boot)
}

/// Builds the VM of `cfg`, booting its kernel or restoring a saved machine.
pub fn build_with(cfg: &VmConfig, hooks: &WorkerHooks, mut start: Start) -> Result<Machine, Error> {
    let mut handed = HandedDisks::new();
    match &mut start {
        Start::Boot => precheck(cfg)?,
        Start::Restore {
            snapshot,
            handed: h,
            ..
        } => {
            crate::config::check_disk_queues(&cfg.disks, cfg.vcpus)?;
            crate::persist::check_devices(snapshot, cfg)?;
            handed = std::mem::take(h);
        }
    }
    let restoring = matches!(start, Start::Restore { .. });
    let disks = cfg
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| build_disk(d, i, hooks, restoring, &mut handed))
        .collect::<Result<Vec<_>, _>>()?;
    for (id, (socket, _)) in handed {
        tracing::warn!(
            "a vhost-user connection to {} was handed over for disk {id}, which this VM does not have: closed",
            socket.display()
        );
    }
    let kvm = Kvm::open()?;
    if usize::from(cfg.vcpus) > kvm.max_vcpus {
        return Err(Error::TooManyCpus {
            requested: cfg.vcpus,
            max: kvm.max_vcpus,
        });
    }
    let (mem, saved) = match start {
        Start::Boot => (memory::create(cfg.memory, memory_backing(cfg))?, None),
        Start::Restore { snapshot, mem, .. } => (mem, Some(snapshot)),
    };
    let vm = vm::Vm::new(&kvm, &mem)?;

    // What goes into guest RAM before the devices: a kernel and its
    // initrd, or nothing (a saved machine's RAM already holds everything).
    let loaded = match saved {
        None => {
            let kernel = loader::load_kernel(&mem, &cfg.kernel, cfg.bzimage)?;
            tracing::info!("kernel: {}", kernel.description);
            let initrd = match &cfg.initrd {
                Some(path) => Some(loader::load_initrd(&mem, path, kernel.end, &kernel.header)?),
                None => None,
            };
            Loaded::Kernel { kernel, initrd }
        }
        Some(snapshot) => Loaded::Saved(snapshot),
    };

    let exit = Arc::new(ExitSignal::new().map_err(Error::EventFd)?);
    let mut pio = Bus::new();
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let (output, console) = serial_output(&cfg.serial)?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, output).map_err(Error::EventFd)?,
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
    let ged_irq = eventfd()?;
    vm.register_irqfd(&ged_irq, GED_IRQ)?;
    let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq)));
    pio.insert(
        ged.clone(),
        u64::from(GED_PORT),
        kiln_devices::legacy::ged::WINDOW_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042ResetDevice::new(exit.clone()))),
        u64::from(I8042_COMMAND_PORT),
        1,
    )?;
    let mut mmio = Bus::new();
    let mut alloc = MmioAllocator {
        devices: Vec::new(),
    };
    let mut devices = Vec::new();
    let mut transports = Vec::new();
    for (i, ((device, hook, counters), disk)) in disks.into_iter().zip(&cfg.disks).enumerate() {
        transports.push(add_virtio(&vm, &mem, &mut mmio, &mut alloc, device, &hook)?);
        let id = crate::control::device_id(disk.id.as_deref(), "disk", i);
        devices.push(device_stats(id, "block", move || {
            counters
                .as_ref()
                .map(|c| c.values().to_vec())
                .unwrap_or_default()
        }));
    }
    let mut announcers = Vec::new();
    for (i, nic) in cfg.nets.iter().enumerate() {
        let net = Net::new(virtio::NetConfig {
            tap: nic.tap.clone(),
            mac: nic.mac,
            rate_limit: nic.rate_limit,
        })
        .map_err(|source| Error::Net {
            tap: nic.tap.clone(),
            source,
        })?;
        let counters = net.counters();
        announcers.push(net.announcer());
        transports.push(add_virtio(
            &vm,
            &mem,
            &mut mmio,
            &mut alloc,
            Box::new(net),
            &hooks.io,
        )?);
        let id = crate::control::device_id(nic.id.as_deref(), "net", i);
        devices.push(device_stats(id, "net", move || counters.values().to_vec()));
    }

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(&kvm.supported_cpuid, cfg.vcpus)?;
        vcpus.push(vcpu);
    }
    let restored = matches!(loaded, Loaded::Saved(_));
    let kernel_description = match loaded {
        Loaded::Kernel { kernel, initrd } => {
            let cmdline = guest_cmdline(&cfg.cmdline, alloc.cmdline());
            let cmdline_len = loader::load_command_line(&mem, &cmdline)?;
            crate::arch::regs::write_reset_stub(&mem)?;
            let rsdp = acpi::create_tables(&mem, cfg.vcpus, &alloc.devices)?;
            crate::arch::mptable::write(&mem, cfg.vcpus)?;
            VmGenId::new(&mem, GuestAddress(VMGENID_START)).map_err(Error::VmGenId)?;
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
            vcpus[0].configure_boot(&mem, kernel.entry)?;
            kernel.description
        }
        Loaded::Saved(snapshot) => {
            crate::persist::restore_machine(
                snapshot,
                &crate::persist::RestoreParts {
                    vm: &vm,
                    vcpus: &vcpus,
                    transports: &transports,
                    serial: &serial,
                    ged: &ged,
                },
            )?;
            "restored from a snapshot".to_string()
        }
    };

    Ok(Machine {
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit,
        serial,
        console,
        ged,
        devices,
        kernel_description,
        transports,
        announcers,
        saved_config: crate::persist::SavedConfig::of(cfg),
        restored,
        mem,
        vm: Arc::new(vm),
        _kvm: kvm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_told_there_is_no_pci_bus_unless_the_user_says_otherwise() {
        assert_eq!(
            guest_cmdline("console=ttyS0  quiet", vec![]),
            "console=ttyS0  quiet pci=off"
        );
        assert_eq!(
            guest_cmdline("console=ttyS0 pci=nomsi", vec![]),
            "console=ttyS0 pci=nomsi"
        );
        assert_eq!(guest_cmdline("", vec![]), "pci=off");
    }

    #[test]
    fn machine_words_go_before_the_words_for_init() {
        let dev = vec!["virtio_mmio.device=512@0xd0000000:5".to_string()];
        assert_eq!(
            guest_cmdline("quiet --x=1 -- single pci=x", dev.clone()),
            "quiet --x=1 pci=off virtio_mmio.device=512@0xd0000000:5 -- single pci=x"
        );
        assert_eq!(
            guest_cmdline("a=\"x -- y\" --", dev),
            "a=\"x -- y\" pci=off virtio_mmio.device=512@0xd0000000:5 --"
        );
    }
}
