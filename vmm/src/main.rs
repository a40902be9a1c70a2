//! kiln-vmm: boot a Linux kernel in a KVM virtual machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use kiln_devices::VmExit;
use kiln_vmm::config::{self, OnReboot, SerialMode, VmConfig};
use kiln_vmm::loader::BzImageMode;
use kiln_vmm::persist::{self, SavedConfig};
use kiln_vmm::{builder, migration, runtime, snapshot};

/// Boot a Linux kernel in a KVM virtual machine.
///
/// The kernel may be an ELF vmlinux or a bzImage such as Debian's
/// /boot/vmlinuz-*. The guest's console is a 16550 UART on COM1 (ttyS0);
/// the machine is described to the guest through ACPI.
///
/// Exit status: 0 when the guest powers off or reboots, 1 when the VM
/// cannot be built or fails while running, 2 for bad arguments.
#[derive(Parser, Debug, Clone)]
#[command(name = "kiln-vmm", version, about, long_about)]
struct Cli {
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "incoming"])]
    kernel: Option<PathBuf>,

    /// Restore the VM saved in DIR by `PUT /vm/snapshot` instead of booting
    /// a kernel: the guest continues where it stopped. Its vCPUs, memory
    /// and kernel are the snapshot's; give the same --disk and --net
    /// devices, in the same order and with the same id= (their paths,
    /// TAPs and sockets may be new). The disks must hold what they held
    /// when the snapshot was taken: kiln-vmm does not copy them.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "bzimage", "incoming", "on_reboot"]
    )]
    restore: Option<PathBuf>,

    /// Wait for a VM migrated by another kiln-vmm (`PUT /vm/migrate`) on
    /// unix:PATH or tcp:HOST:PORT and run it. Give the same --cpus and
    /// --memory as the source, and its --disk and --net devices (same
    /// kinds, order and id=; local paths, TAPs and sockets); a volume or
    /// vhost-user disk is connected only once the source has paused. TCP
    /// needs --migration-secret unless both ends are on loopback.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "bzimage", "on_reboot"]
    )]
    incoming: Option<String>,

    /// For a migration over TCP: a file holding the secret (32 bytes or
    /// more) both kiln-vmm processes share; they prove it to each other
    /// before anything else is sent. The traffic itself is not encrypted
    /// (mutual TLS comes with the cluster's certificates).
    #[arg(long, value_name = "FILE", requires = "incoming")]
    migration_secret: Option<PathBuf>,

    /// Initial ramdisk (cpio archive, optionally compressed).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "ARGS", default_value = "console=ttyS0 panic=-1")]
    cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,

    /// Guest RAM, e.g. 512M or 2G (a bare number means MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,

    /// Where the serial console goes: stdio, file:PATH, socket:PATH (a Unix
    /// socket, mode 0600, that clients attach to and detach from at will;
    /// each first gets the last 64 KiB of output; what they write is the
    /// console's input) or none.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,

    /// What to do when the guest reboots.
    #[arg(long, value_enum, default_value_t = OnReboot::Exit)]
    on_reboot: OnReboot,

    /// How to boot a bzImage: extract decompresses its vmlinux on the host
    /// once (cached by content hash in $KILN_CACHE_DIR, /var/cache/kiln or
    /// ~/.cache/kiln) for a fast boot; native lets the guest decompress it.
    #[arg(long, value_enum, default_value_t = BzImageMode::Extract)]
    bzimage: BzImageMode,

    /// A virtio-blk disk: path=IMG[,ro=on][,direct=on][,id=NAME][,bw=RATE][,ops=N]
    /// for a raw image (bw= limits bytes per second, e.g. 50M, ops= requests
    /// per second), or vhost-user=SOCKET[,id=NAME] for a vhost-user-blk
    /// backend listening on that Unix socket (it serves the disk from guest
    /// memory shared with it; ro/direct/limits are its business), or
    /// volume=NAME[,store=SOCKET][,id=NAME] for a kiln-store volume, which
    /// the store daemon behind SOCKET (default: kiln-store's own,
    /// /run/kiln/store.sock) attaches and serves over vhost-user. Any of them
    /// takes queues=N: N request queues (1 to --cpus; default 1), which the
    /// guest spreads its CPUs over. The guest sees /dev/vda, /dev/vdb, ... in
    /// the order given. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,

    /// A virtio-net interface on an existing TAP device:
    /// tap=NAME[,mac=52:54:00:12:34:56][,id=NAME][,bw=RATE][,ops=N]. bw= and
    /// ops= limit bytes and frames per second, each direction. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<String>,

    /// Serve the control API (HTTP/1.1) on this Unix socket, mode 0600:
    /// GET /vm, PUT /vm/{shutdown,power-off,pause,resume,reboot}. A stale
    /// socket there is replaced.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// Build the VM (or restore it) but keep its vCPUs stopped until
    /// `PUT /vm/resume` on the --api-socket: a VM restored ahead of time
    /// that starts the moment it is wanted, or one whose devices are to be
    /// checked first. Its devices are ready meanwhile; `GET /vm` says
    /// "paused".
    #[arg(long, requires = "api_socket", conflicts_with = "incoming")]
    paused: bool,

    /// Do not confine kiln-vmm's threads with seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,

    /// Test aid: make each vCPU thread call a syscall its filter forbids,
    /// right after installing it. kiln-vmm must die with SIGSYS.
    #[arg(long, hide = true)]
    debug_seccomp_violation: bool,

    /// Internal: this process runs one boot for a --on-reboot restart
    /// supervisor, and exits with REBOOT_STATUS when the guest reboots.
    #[arg(long, hide = true)]
    supervised: bool,
}

/// Exit status of a supervised kiln-vmm whose guest rebooted.
const REBOOT_STATUS: u8 = 100;

impl Cli {
    /// The configuration to boot: everything from the command line.
    fn into_config(self) -> Result<VmConfig> {
        self.into_config_with(None)
    }

    /// With `saved` (a restore, a migration), vCPUs, memory, kernel and
    /// command line are the saved machine's; the devices, console and the
    /// rest come from the command line.
    fn into_config_with(self, saved: Option<&SavedConfig>) -> Result<VmConfig> {
        let (kernel, initrd, cmdline, vcpus, memory) = match saved {
            // An incoming VM brings its kernel (in its RAM); the
            // configuration's kernel and command line are set from its
            // state when it arrives.
            None if self.incoming.is_some() => (
                PathBuf::from("(incoming)"),
                None,
                String::new(),
                config::check_vcpus(self.cpus)?,
                config::check_memory(config::parse_memory(&self.memory)?, config::host_memory())?,
            ),
            None => {
                let kernel = self
                    .kernel
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--kernel is needed to boot a VM"))?;
                config::check_file("kernel", &kernel)?;
                if let Some(initrd) = &self.initrd {
                    config::check_file("initrd", initrd)?;
                }
                let memory = config::check_memory(
                    config::parse_memory(&self.memory)?,
                    config::host_memory(),
                )?;
                let vcpus = config::check_vcpus(self.cpus)?;
                (kernel, self.initrd, self.cmdline, vcpus, memory)
            }
            Some(s) => {
                let memory = config::check_memory(s.memory, config::host_memory())?;
                let vcpus = config::check_vcpus(u32::from(s.vcpus))?;
                (
                    s.kernel.clone(),
                    s.initrd.clone(),
                    s.cmdline.clone(),
                    vcpus,
                    memory,
                )
            }
        };
        let disks = self
            .disk
            .iter()
            .map(|d| d.parse())
            .collect::<Result<Vec<config::DiskConfig>, _>>()?;
        let nets = self
            .net
            .iter()
            .map(|n| n.parse())
            .collect::<Result<Vec<config::NetConfig>, _>>()?;
        config::check_unique_ids(&disks, &nets)?;
        config::check_disk_queues(&disks, vcpus)?;
        Ok(VmConfig {
            disks,
            nets,
            vcpus,
            memory,
            serial: self.serial.parse::<SerialMode>()?,
            kernel,
            initrd,
            cmdline,
            on_reboot: self.on_reboot,
            bzimage: self.bzimage,
            seccomp: !self.no_seccomp,
        })
    }
}

/// The per-thread confinement: seccomp filters unless disabled.
fn confinement(seccomp: bool, violate: bool) -> Result<runtime::Confinement> {
    if !seccomp {
        tracing::warn!("seccomp is disabled: kiln-vmm's threads are not confined");
        return Ok(runtime::Confinement::none());
    }
    let mut confine = kiln_vmm::seccomp::Filters::load()?.confinement()?;
    if violate {
        let install = confine.vcpu.clone();
        confine.vcpu = std::sync::Arc::new(move || {
            install()?;
            // SAFETY: getppid takes no arguments; the vCPU filter forbids it,
            // so the kernel kills the process here.
            unsafe { libc::syscall(libc::SYS_getppid) };
            Err("the seccomp filter allowed a forbidden syscall".into())
        });
    }
    Ok(confine)
}

/// --on-reboot restart: each boot runs in a child kiln-vmm (confined by its
/// own seccomp filters, which would survive an exec), and this unconfined
/// parent starts a new one whenever the guest reboots.
fn supervise() -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    loop {
        let status = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .arg("--supervised")
            .status()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", exe.display()))?;
        match status.code() {
            Some(c) if c == i32::from(REBOOT_STATUS) => {
                eprintln!("kiln-vmm: the guest rebooted; restarting it");
            }
            Some(c) => return Ok(ExitCode::from(c as u8)),
            None => {
                use std::os::unix::process::ExitStatusExt;
                anyhow::bail!(
                    "the VM process died with signal {}",
                    status.signal().unwrap_or(0)
                );
            }
        }
    }
}

/// A device worker's hook: installs its filter, or ends kiln-vmm (an
/// unconfined device worker is not an option).
fn exit_unless_confined(install: runtime::ThreadHook) -> kiln_devices::virtio::WorkerHook {
    std::sync::Arc::new(move || {
        if let Err(e) = install() {
            eprintln!("kiln-vmm: error: {e}");
            std::process::exit(1);
        }
    })
}

/// `--incoming`: waits for the VM, then runs it.
fn run_incoming(cli: Cli, address: &str, started: std::time::Instant) -> Result<VmExit> {
    let address: migration::Address = address
        .parse()
        .map_err(|e| anyhow::anyhow!("--incoming {address}: {e}"))?;
    let secret = match &cli.migration_secret {
        Some(p) => Some(migration::Secret::from_file(p).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let violate = cli.debug_seccomp_violation;
    let api_socket = cli.api_socket.clone();
    let cfg = cli.into_config_with(None)?;
    let confine = confinement(cfg.seccomp, violate)?;
    let hooks = builder::WorkerHooks {
        io: exit_unless_confined(confine.io.clone()),
        vhost_user: exit_unless_confined(confine.vhost_user.clone()),
    };
    let transport = migration::TransportConfig {
        secret,
        ..migration::TransportConfig::default()
    };
    let listener = migration::Listener::bind(&address, &transport)
        .map_err(|e| anyhow::anyhow!("--incoming {address}: {e}"))?;
    let api = match api_socket {
        Some(path) => Some(runtime::ApiSetup {
            listener: kiln_vmm::api::http::bind(&path)?,
            started,
            config: kiln_vmm::control::config_json(&cfg),
            devices: Vec::new(),
            start_paused: false,
        }),
        None => None,
    };
    tracing::info!(
        "waiting for a migrated VM on {} ({} vCPU(s), {} MiB)",
        listener.local_address(),
        cfg.vcpus,
        cfg.memory >> 20
    );
    let console = cfg.serial == SerialMode::Stdio;
    let mut target = kiln_vmm::migrate::VmTarget::new(cfg, &hooks, console, confine, api)?;
    let report = migration::receive(&listener, &mut target, &migration::ReceiveConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(
        "migrated VM from {} (kiln-vmm {}) runs here: {} data pages, {} zero pages, {} KiB of state, {:?}",
        report.peer,
        report.source_version,
        report.data_pages,
        report.zero_pages,
        report.state_bytes >> 10,
        report.total_time
    );
    drop(listener);
    let running = target
        .into_running()
        .ok_or_else(|| anyhow::anyhow!("the migration ended without a VM to run"))?;
    Ok(running.wait()?)
}

fn run(cli: Cli, started: std::time::Instant) -> Result<VmExit> {
    if let Some(address) = cli.incoming.clone() {
        return run_incoming(cli, &address, started);
    }
    let violate = cli.debug_seccomp_violation;
    let api_socket = cli.api_socket.clone();
    let paused = cli.paused;
    let restore = cli.restore.clone();
    // A snapshot is read and checked before anything else is set up.
    let (cfg, saved) = match &restore {
        Some(dir) => {
            let snap = snapshot::load(dir)
                .map_err(|e| anyhow::anyhow!("cannot restore {}: {e}", dir.display()))?;
            let saved = persist::saved_config(&snap)?;
            (cli.into_config_with(Some(&saved))?, Some((dir, snap)))
        }
        None => (cli.into_config()?, None),
    };
    let confine = confinement(cfg.seccomp, violate)?;
    let hooks = builder::WorkerHooks {
        io: exit_unless_confined(confine.io.clone()),
        vhost_user: exit_unless_confined(confine.vhost_user.clone()),
    };
    let building = std::time::Instant::now();
    let mut machine = match &saved {
        None => builder::build(&cfg, &hooks)?,
        Some((dir, snap)) => {
            // Devices are checked before guest RAM is mapped.
            persist::check_devices(snap, &cfg)?;
            let mem = snapshot::restore_memory(dir, snap, builder::memory_backing(&cfg))
                .map_err(|e| anyhow::anyhow!("cannot restore {}: {e}", dir.display()))?;
            builder::build_with(
                &cfg,
                &hooks,
                builder::Start::Restore {
                    snapshot: snap,
                    mem,
                    handed: builder::HandedDisks::new(),
                },
            )?
        }
    };
    tracing::debug!("VM built in {:?}", building.elapsed());
    tracing::info!(
        "{} {} ({}), {} vCPU(s), {} MiB",
        if saved.is_some() {
            "running"
        } else {
            "booting"
        },
        cfg.kernel.display(),
        machine.kernel_description,
        cfg.vcpus,
        cfg.memory >> 20
    );
    let api = match api_socket {
        Some(path) => Some(runtime::ApiSetup {
            listener: kiln_vmm::api::http::bind(&path)?,
            started,
            config: kiln_vmm::control::config_json(&cfg),
            devices: std::mem::take(&mut machine.devices),
            start_paused: paused,
        }),
        None => None,
    };
    Ok(runtime::run(
        machine,
        cfg.serial == SerialMode::Stdio,
        confine,
        api,
    )?)
}

fn main() -> ExitCode {
    kiln_crash::abort_on_panic();
    let started = std::time::Instant::now();
    // One malloc arena for all threads: no per-thread heaps that glibc
    // would grow with mprotect (outside the seccomp filters), and less
    // memory overhead. kiln-vmm's threads allocate little.
    // SAFETY: mallopt only changes allocator tunables; called before any
    // other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        // SAFETY: isatty only inspects the descriptor.
        .with_ansi(unsafe { libc::isatty(libc::STDERR_FILENO) } == 1)
        .init();

    let cli = Cli::parse();
    let supervised = cli.supervised;
    if cli.on_reboot == OnReboot::Restart && !supervised {
        // Check the configuration once here, so errors are not repeated.
        if let Err(e) = cli.into_config() {
            eprintln!("kiln-vmm: error: {e}");
            return ExitCode::FAILURE;
        }
        return supervise().unwrap_or_else(|e| {
            eprintln!("kiln-vmm: error: {e}");
            ExitCode::FAILURE
        });
    }
    match run(cli, started) {
        Ok(VmExit::PowerOff) => ExitCode::SUCCESS,
        Ok(VmExit::Reset) if supervised => ExitCode::from(REBOOT_STATUS),
        Ok(VmExit::Reset) => {
            eprintln!(
                "kiln-vmm: the guest rebooted; exiting (--on-reboot restart starts it again)"
            );
            ExitCode::SUCCESS
        }
        Ok(VmExit::Migrated) => {
            eprintln!("kiln-vmm: the VM was migrated and runs at its destination now");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Error(e)) => {
            eprintln!("kiln-vmm: error: the VM failed: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            // Kiln's errors carry their cause in their message; printing the
            // source chain too would repeat it.
            eprintln!("kiln-vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
