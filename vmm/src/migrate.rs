//! kiln-vmm's side of live migration: the running machine behind
//! `migration`'s two traits, and the thread that runs an outgoing
//! migration.
//!
//! - [`VmSource`]: guest RAM, the dirty pages (KVM's log for the guest's
//!   writes, `kiln_devices::dirty` for the devices'), and pause/save and
//!   resume of the running VM.
//! - [`VmTarget`]: an `--incoming` kiln-vmm: pages written into fresh
//!   guest RAM, then the machine built on its own devices and restored
//!   from the state (a volume is attached only then, when the source is
//!   paused and has flushed), then started once the source commits.
//! - [`MigrationWorker`]: a thread made when the VMM starts (the main
//!   thread's seccomp filter forbids making one later), under its own
//!   filter, that runs `PUT /vm/migrate` while the event loop goes on
//!   serving the API (`GET /vm` shows the progress).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_devices::dirty::BackendLog;
use kiln_devices::{ExitSignal, VmExit};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::{ApiError, MigrateParams};
use crate::builder::{self, Machine, Start, WorkerHooks};
use crate::config::VmConfig;
use crate::migration::{
    self, protocol, Address, Handed, Handover, MigrationSource, MigrationTarget, Progress, Secret,
    SendConfig, TransportConfig,
};
use crate::persist::{self, LiveMachine, SavedConfig};
use crate::runtime::{self, ApiSetup, Confinement, Running, ThreadHook};
use crate::snapshot::{self, VmSnapshot};
use crate::vstate::dirty::{self, DirtyLog};

/// The machine as the migration protocol compares it.
fn protocol_machine(c: &SavedConfig) -> protocol::Machine {
    protocol::Machine {
        ram_size: c.memory,
        vcpus: u32::from(c.vcpus),
        devices: c
            .disks
            .iter()
            .chain(&c.nets)
            .map(|d| protocol::DeviceId {
                kind: d.kind.clone(),
                id: d.id.clone(),
            })
            .collect(),
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Copies between a byte buffer and guest RAM pages `first_page..`,
/// crossing RAM ranges (pages are numbered across them, in order).
fn for_each_page_run(
    mem: &GuestMemoryMmap,
    first_page: u64,
    len: usize,
    mut f: impl FnMut(vm_memory::GuestAddress, std::ops::Range<usize>) -> io::Result<()>,
) -> io::Result<()> {
    let page = dirty::PAGE_SIZE as usize;
    let mut done = 0;
    while done < len {
        let p = first_page
            .checked_add((done / page) as u64)
            .and_then(|p| usize::try_from(p).ok())
            .ok_or_else(|| other("page number overflows"))?;
        let addr = dirty::page_address(mem, p)
            .ok_or_else(|| other(format!("page {p} is past the end of guest RAM")))?;
        // Up to the end of this RAM range.
        let in_range = mem
            .iter()
            .find(|r| r.start_addr() <= addr && addr.0 < r.start_addr().0 + r.len())
            .map(|r| (r.start_addr().0 + r.len() - addr.0) as usize)
            .unwrap_or(page);
        let n = (len - done).min(in_range);
        f(addr, done..done + n)?;
        done += n;
    }
    Ok(())
}

/// The running VM as a migration source.
pub struct VmSource {
    live: LiveMachine,
    log: Option<DirtyLog>,
    /// Whether `pause_and_save` paused the vCPUs (a VM paused before the
    /// migration stays paused if it fails).
    paused_vcpus: bool,
    paused_devices: bool,
    /// The dirty log the vhost-user backends write, when every one of them
    /// can (see [`VmSource::start_backend_log`]).
    backend_log: Option<Arc<BackendLog>>,
}

impl VmSource {
    pub fn new(live: LiveMachine) -> Self {
        Self {
            live,
            log: None,
            paused_vcpus: false,
            paused_devices: false,
            backend_log: None,
        }
    }

    /// Has every vhost-user backend log the guest pages it writes (they
    /// write guest RAM from their own process, out of KVM's sight). If one
    /// cannot, none does, and the pages go again while the VM is paused
    /// (see `fetch_dirty`).
    fn start_backend_log(&mut self) {
        let Some(end) = self
            .live
            .mem
            .iter()
            .map(|r| r.start_addr().0.saturating_add(r.len()))
            .max()
        else {
            return;
        };
        let log = match BackendLog::new(end) {
            Ok(log) => Arc::new(log),
            Err(e) => {
                tracing::warn!("migration: no dirty log for the vhost-user backends ({e}): all guest RAM goes again while paused");
                return;
            }
        };
        let refused = self
            .live
            .transports
            .iter()
            .enumerate()
            .find_map(|(index, t)| {
                let set = lock(t).log_backend_writes(Some(log.clone()));
                set.err().map(|e| (index, e))
            });
        if let Some((index, e)) = refused {
            tracing::warn!(
                "migration: {}: {e}: all guest RAM goes again while paused",
                persist::device_name(&self.live.config, index)
            );
            self.stop_backend_log();
            return;
        }
        tracing::info!(
            "migration: the vhost-user backends log their writes to guest RAM ({} KiB log)",
            log.mmap_size() / 1024
        );
        self.backend_log = Some(log);
    }

    /// Has the backends stop logging (at their next activation if paused).
    fn stop_backend_log(&mut self) {
        self.backend_log = None;
        for (index, t) in self.live.transports.iter().enumerate() {
            if let Err(e) = lock(t).log_backend_writes(None) {
                tracing::warn!(
                    "migration: {}: cannot stop the backend's dirty log: {e}",
                    persist::device_name(&self.live.config, index)
                );
            }
        }
    }

    fn has_vhost_user_disk(&self) -> bool {
        self.live
            .config
            .disks
            .iter()
            .any(|d| d.kind == "vhost-user" || d.kind == "volume")
    }

    fn ram_ranges(&self) -> Vec<(vm_memory::GuestAddress, u64)> {
        self.live
            .mem
            .iter()
            .map(|r| (r.start_addr(), r.len()))
            .collect()
    }
}

impl MigrationSource for VmSource {
    fn machine(&self) -> protocol::Machine {
        protocol_machine(&self.live.config)
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        for_each_page_run(&self.live.mem, first_page, len, |addr, r| {
            self.live.mem.read_slice(&mut buf[r], addr).map_err(other)
        })
    }

    fn start_dirty_log(&mut self) -> io::Result<()> {
        kiln_devices::dirty::start(&self.ram_ranges());
        match DirtyLog::start(&self.live.vm) {
            Ok(log) => {
                self.log = Some(log);
                if self.has_vhost_user_disk() {
                    self.start_backend_log();
                }
                Ok(())
            }
            Err(e) => {
                kiln_devices::dirty::stop();
                Err(other(e))
            }
        }
    }

    fn fetch_dirty(&mut self) -> io::Result<Vec<u64>> {
        let log = self
            .log
            .as_mut()
            .ok_or_else(|| other("dirty logging is off"))?;
        let guest = log.fetch(&self.live.vm).map_err(other)?;
        let pages = guest.pages();
        if let Some(backends) = &self.backend_log {
            // What the vhost-user backends wrote; once the devices are
            // quiesced, everything they ever will.
            backends.drain(|addr, len| kiln_devices::dirty::mark(GuestAddress(addr), len));
        } else if self.paused_devices && self.has_vhost_user_disk() {
            // A vhost-user backend (another process) that cannot log
            // writes guest RAM without telling us: with the VM paused,
            // every page goes again (zero pages cost a few bytes each).
            // Correct, at the price of a longer pause.
            tracing::info!("migration: a vhost-user disk: resending all guest RAM while paused");
            let _ = kiln_devices::dirty::take();
            return Ok(vec![u64::MAX; pages.div_ceil(64)]);
        }
        let mut words = kiln_devices::dirty::take();
        words.resize(pages.div_ceil(64).max(words.len()), 0);
        for p in guest.iter() {
            words[p / 64] |= 1 << (p % 64);
        }
        Ok(words)
    }

    fn stop_dirty_log(&mut self) {
        if self.backend_log.is_some() {
            self.stop_backend_log();
        }
        if let Some(log) = self.log.take() {
            if let Err(e) = log.stop(&self.live.vm) {
                tracing::warn!("cannot switch KVM's dirty log off: {e}");
            }
        }
        kiln_devices::dirty::stop();
    }

    fn pause_and_save(&mut self) -> io::Result<Vec<u8>> {
        if !self.live.pause.is_paused() {
            self.live.pause_vcpus().map_err(other)?;
            self.paused_vcpus = true;
        }
        self.live.pause_devices().map_err(other)?;
        self.paused_devices = true;
        // The rings the devices wrote last: their used entries.
        let snap = self.live.capture().map_err(other)?;
        snapshot::format::encode(&snap).map_err(other)
    }

    /// Guest RAM's memfd, if RAM is one shared memfd (a VM with a
    /// vhost-user disk), and every vhost-user disk's backend connection.
    fn handover(&self) -> io::Result<Handover> {
        let shared_memfd = self
            .live
            .mem
            .iter()
            .all(|r| r.flags() & libc::MAP_SHARED != 0 && r.file_offset().is_some());
        let memory = match self.live.mem.iter().next().and_then(|r| r.file_offset()) {
            Some(f) if shared_memfd && f.start() == 0 => Some((
                OwnedFd::from(f.file().try_clone()?),
                self.live.mem.iter().map(|r| r.as_ptr() as u64).collect(),
            )),
            _ => None,
        };
        let mut vhost_user = Vec::new();
        for (disk, t) in self.live.config.disks.iter().zip(&self.live.transports) {
            let t = lock(t);
            if let Some((socket, fd)) = t.backend_connection() {
                vhost_user.push((
                    disk.id.clone(),
                    socket.display().to_string(),
                    fd.try_clone_to_owned()?,
                ));
            }
        }
        Ok(Handover { memory, vhost_user })
    }

    fn resume(&mut self) {
        if self.paused_devices {
            self.live.resume_devices();
            self.paused_devices = false;
        }
        if self.paused_vcpus {
            self.live.pause.resume();
            self.paused_vcpus = false;
        }
        tracing::info!("migration: the VM runs on here");
    }
}

/// What `GET /vm` says of migrations.
#[derive(Debug, Clone)]
enum Status {
    None,
    Running {
        destination: String,
        progress: Arc<Progress>,
    },
    Failed {
        destination: String,
        error: String,
        in_doubt: bool,
    },
    Done {
        destination: String,
        report: Value,
    },
}

type Job = (MigrateParams, Option<Secret>, VmSource);

/// The outgoing-migration thread and what it is doing.
pub struct MigrationWorker {
    jobs: mpsc::Sender<Job>,
    status: Arc<Mutex<Status>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationWorker {
    /// Starts the thread: it runs `hook` (its seccomp filter), then one
    /// migration at a time. A migration that succeeds ends the VM here
    /// (`exit`: [`VmExit::Migrated`]).
    pub fn spawn(hook: ThreadHook, exit: Arc<ExitSignal>) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let status = Arc::new(Mutex::new(Status::None));
        let st = status.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                if let Err(e) = hook() {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok((params, secret, mut source)) = rx.recv() {
                    run_job(&params, secret, &mut source, &st, &exit);
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { jobs, status }),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other("the migration thread died at start")),
        }
    }

    /// Starts migrating to `params.destination`; refuses a second one.
    pub fn submit(&self, params: MigrateParams, source: VmSource) -> Result<Value, ApiError> {
        let address: Address = params
            .destination
            .parse()
            .map_err(|e| ApiError::bad_request(format!("destination: {e}")))?;
        let secret = match &params.secret_file {
            Some(p) => Some(
                Secret::from_file(p)
                    .map_err(|e| ApiError::bad_request(format!("secret_file: {e}")))?,
            ),
            None => None,
        };
        let mut status = lock(&self.status);
        if matches!(*status, Status::Running { .. }) {
            return Err(ApiError::conflict("a migration is already running"));
        }
        if let Status::Failed { in_doubt: true, .. } = &*status {
            return Err(ApiError::conflict(
                "the last migration is in doubt: the VM may run at its destination; \
                 check there before anything else",
            ));
        }
        let progress = Arc::new(Progress::default());
        *status = Status::Running {
            destination: address.to_string(),
            progress,
        };
        drop(status);
        self.jobs
            .send((params, secret, source))
            .map_err(|_| ApiError::internal("the migration thread has stopped"))?;
        Ok(json!({ "migration": self.status_json() }))
    }

    /// `GET /vm`'s `migration`.
    pub fn status_json(&self) -> Value {
        match &*lock(&self.status) {
            Status::None => Value::Null,
            Status::Running {
                destination,
                progress,
            } => {
                let p = progress.snapshot();
                json!({
                    "state": "running",
                    "destination": destination,
                    "phase": format!("{:?}", p.phase).to_lowercase(),
                    "round": p.round,
                    "bytes_sent": p.bytes_sent,
                    "ram_bytes": p.ram_bytes,
                    "dirty_pages": p.dirty_pages,
                })
            }
            Status::Failed {
                destination,
                error,
                in_doubt,
            } => json!({
                "state": if *in_doubt { "in-doubt" } else { "failed" },
                "destination": destination,
                "error": error,
            }),
            Status::Done {
                destination,
                report,
            } => json!({
                "state": "done",
                "destination": destination,
                "report": report,
            }),
        }
    }
}

fn run_job(
    params: &MigrateParams,
    secret: Option<Secret>,
    source: &mut VmSource,
    status: &Mutex<Status>,
    exit: &ExitSignal,
) {
    let progress = match &*lock(status) {
        Status::Running { progress, .. } => progress.clone(),
        _ => Arc::new(Progress::default()),
    };
    let destination = params.destination.clone();
    let result = params
        .destination
        .parse::<Address>()
        .map_err(|e| (e.to_string(), false))
        .and_then(|address| {
            let cfg = SendConfig {
                transport: TransportConfig {
                    secret,
                    ..TransportConfig::default()
                },
                downtime: Duration::from_millis(params.downtime_ms),
                precopy_timeout: Duration::from_secs(params.timeout_s),
                ..SendConfig::default()
            };
            tracing::info!("migration to {address} started");
            migration::migrate(source, &address, &cfg, &progress)
                .map_err(|e| (e.to_string(), e.in_doubt))
        });
    match result {
        Ok(report) => {
            let rounds: Vec<Value> = report
                .rounds
                .iter()
                .map(|r| {
                    json!({
                        "round": r.round,
                        "pages": r.pages,
                        "bytes": r.bytes,
                        "ms": r.time.as_millis() as u64,
                        "paused": r.paused,
                    })
                })
                .collect();
            let summary = json!({
                "downtime_ms": report.downtime.as_millis() as u64,
                "total_ms": report.total_time.as_millis() as u64,
                "bytes_sent": report.bytes_sent,
                "state_bytes": report.state_bytes,
                "switch_reason": format!("{:?}", report.switch_reason),
                "rounds": rounds,
            });
            tracing::info!(
                "migration to {destination} done: downtime {:?}, total {:?}, {} rounds, {} MiB sent (switched over: {:?})",
                report.downtime,
                report.total_time,
                report.rounds.len(),
                report.bytes_sent >> 20,
                report.switch_reason
            );
            *lock(status) = Status::Done {
                destination,
                report: summary,
            };
            exit.signal(VmExit::Migrated);
        }
        Err((error, in_doubt)) => {
            tracing::error!("{error}");
            *lock(status) = Status::Failed {
                destination,
                error,
                in_doubt,
            };
        }
    }
}

/// An `--incoming` kiln-vmm: receives the VM, builds it on its own
/// devices, runs it when the source commits.
pub struct VmTarget<'a> {
    cfg: VmConfig,
    hooks: &'a WorkerHooks,
    mem: GuestMemoryMmap,
    machine: Option<Machine>,
    /// vhost-user connections the source handed over, for `restore`.
    handed: builder::HandedDisks,
    /// What starting the VM needs, taken by `run`.
    start: Option<(bool, Confinement, Option<ApiSetup>)>,
    running: Option<Running>,
}

impl<'a> VmTarget<'a> {
    /// Fresh guest RAM for `cfg` (zero, as the protocol needs).
    pub fn new(
        cfg: VmConfig,
        hooks: &'a WorkerHooks,
        console_input: bool,
        confine: Confinement,
        api: Option<ApiSetup>,
    ) -> Result<Self, builder::Error> {
        let mem = crate::vstate::memory::create(cfg.memory, builder::memory_backing(&cfg))?;
        Ok(Self {
            cfg,
            hooks,
            mem,
            machine: None,
            handed: builder::HandedDisks::new(),
            start: Some((console_input, confine, api)),
            running: None,
        })
    }

    /// The running VM, once the migration has completed.
    pub fn into_running(self) -> Option<Running> {
        self.running
    }
}

impl MigrationTarget for VmTarget<'_> {
    fn machine(&self) -> protocol::Machine {
        protocol_machine(&SavedConfig::of(&self.cfg))
    }

    fn write_pages(&mut self, first_page: u64, data: &[u8]) -> io::Result<()> {
        let mem = &self.mem;
        for_each_page_run(mem, first_page, data.len(), |addr, r| {
            mem.write_slice(&data[r], addr).map_err(other)
        })
    }

    fn zero_pages(&mut self, first_page: u64, count: u64) -> io::Result<()> {
        let zeros = vec![0u8; dirty::PAGE_SIZE as usize];
        for p in 0..count {
            self.write_pages(first_page.saturating_add(p), &zeros)?;
        }
        Ok(())
    }

    fn restore(&mut self, state: &[u8]) -> io::Result<()> {
        let (_, snap): (u32, VmSnapshot) =
            snapshot::format::decode(Path::new("the migrated state"), state).map_err(other)?;
        let saved = persist::saved_config(&snap).map_err(other)?;
        // What the source ran, for GET /vm and a later snapshot.
        self.cfg.kernel = saved.kernel.clone();
        self.cfg.initrd = saved.initrd.clone();
        self.cfg.cmdline = saved.cmdline.clone();
        let machine = builder::build_with(
            &self.cfg,
            self.hooks,
            Start::Restore {
                snapshot: &snap,
                mem: self.mem.clone(),
                handed: std::mem::take(&mut self.handed),
            },
        )
        .map_err(other)?;
        self.machine = Some(machine);
        Ok(())
    }

    /// Guest RAM: the source's memfd, mapped shared in place of ours
    /// (which was never touched). vhost-user connections: kept for
    /// `restore`, where disks with the same backend take them over.
    fn adopt(&mut self, handed: Vec<(Handed, OwnedFd)>) -> io::Result<()> {
        for (item, fd) in handed {
            match item {
                Handed::Memory { host_addrs } => {
                    let file = std::fs::File::from(fd);
                    let len = file.metadata()?.len();
                    if len < self.cfg.memory {
                        return Err(other(format!(
                            "the handed-over guest RAM holds {len} bytes, not {}",
                            self.cfg.memory
                        )));
                    }
                    self.mem = crate::vstate::memory::map_memfd_shared_at(
                        file,
                        self.cfg.memory,
                        &host_addrs,
                    )
                    .map_err(other)?;
                    tracing::info!("incoming migration: guest RAM handed over (not copied)");
                }
                Handed::VhostUser { id, socket } => {
                    self.handed
                        .insert(id, (PathBuf::from(socket), UnixStream::from(fd)));
                }
            }
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        let machine = self
            .machine
            .take()
            .ok_or_else(|| other("no restored machine to run"))?;
        let (console_input, confine, api) = self
            .start
            .take()
            .ok_or_else(|| other("the VM was started already"))?;
        let running = runtime::start(machine, console_input, confine, api).map_err(other)?;
        self.running = Some(running);
        Ok(())
    }
}
