//! One kiln-vmm process per VM, supervised without being tied to the agent.
//!
//! kiln-vmm is started in its own process group with its output in its
//! runtime directory, so killing or replacing the agent leaves it running.
//! The agent watches it (as its parent while it can, by its pid after a
//! restart), records every state change as an event, applies the restart
//! policy with backoff, and at its own start re-adopts the VMs it finds and
//! removes what dead ones left behind (TAPs, runtime directories, cgroups).
//!
//! Operations on one VM are serialized by a per-VM lock.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::attest::KilnEvent;
use crate::db::{Change, Db, Note};
use crate::error::ApiError;
use crate::image_policy;
use crate::images;
use crate::model::{
    now, DesiredVmState, FileRole, Image, ImageState, Network, NicStatus, PolicyMode,
    RestartPolicy, Vm, VmState, Volume,
};
use crate::paths::{Paths, VmRunDir};
use crate::store::Store;
use crate::trust::Trust;
use crate::{cgroup, netdev, vmm_client};

/// How long kiln-vmm has to answer on its API socket after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a graceful shutdown presses the power button again.
const PRESS_AGAIN: Duration = Duration::from_secs(5);
/// Restart backoff: 1 s, doubling, at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Supervisor {
    db: Arc<Db>,
    store: Arc<Store>,
    trust: Arc<Trust>,
    paths: Paths,
    vmm: PathBuf,
    cgroup_root: Option<PathBuf>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// How a kiln-vmm process ended.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(i32),
    /// It was not our child (adopted after a restart): no status.
    Unknown,
}

struct Launched {
    pid: u32,
    child: Child,
    nics: Vec<NicStatus>,
    disks: Vec<String>,
    cgroup: Option<PathBuf>,
}

/// Whether `pid` is the kiln-vmm serving `api` (not a reused pid).
fn alive(pid: u32, api: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let needle = api.as_os_str().as_encoded_bytes();
            c.windows(needle.len()).any(|w| w == needle)
        })
        .unwrap_or(false)
}

fn kill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number has no
    // memory effects; the pid was checked to be our VM's kiln-vmm.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Queues of each virtio disk of a VM with `vcpus` vCPUs: one per vCPU,
/// within what kiln-store exports (1 to 64).
fn disk_queue_count(vcpus: u32) -> u16 {
    u16::try_from(vcpus.clamp(1, 64)).unwrap_or(64)
}

/// The last non-empty lines of kiln-vmm's log, for a failure's reason.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(2)..];
    tail.join(" / ")
}

impl Supervisor {
    pub fn new(
        db: Arc<Db>,
        store: Arc<Store>,
        trust: Arc<Trust>,
        paths: Paths,
        vmm: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Supervisor {
            db,
            store,
            trust,
            paths,
            vmm,
            cgroup_root: cgroup::root(),
            locks: Default::default(),
        })
    }

    pub fn cgroup_v2(&self) -> bool {
        self.cgroup_root.is_some()
    }

    /// The lock that serializes operations on one VM.
    pub fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.paths.vm_dir(id)
    }

    pub fn console_socket(&self, id: &str) -> PathBuf {
        VmRunDir(&self.run_dir(id)).console_socket()
    }

    pub fn api_socket(&self, id: &str) -> PathBuf {
        VmRunDir(&self.run_dir(id)).api_socket()
    }

    /// Starts the VM (already `starting`) in the background.
    pub fn spawn_start(self: &Arc<Self>, id: String, delay: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.start_now(&id).await;
        });
    }

    async fn start_now(self: &Arc<Self>, id: &str) {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let Ok(vm) = self.db.get::<Vm>(id) else {
            return;
        };
        if vm.desired == DesiredVmState::Stopped || vm.status.state != VmState::Starting {
            return; // asked to stop meanwhile
        }
        match self.launch(&vm).await {
            Ok(l) => {
                let pid = l.pid;
                let cg = l.cgroup.as_ref().map(|p| p.display().to_string());
                let r = self.db.update(id, Change::Observed, |v: &mut Vm| {
                    v.status.state = if v.desired == DesiredVmState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    v.status.pid = Some(pid);
                    v.status.started_at = Some(now());
                    v.status.nics = l.nics.clone();
                    v.status.disks = l.disks.clone();
                    v.status.disks = l.disks.clone();
                    v.status.cgroup = cg.clone();
                    v.status.reason = None;
                    Ok(Some(Note::with(
                        "state",
                        format!("kiln-vmm running as pid {pid}"),
                    )))
                });
                if r.is_err() {
                    kill(pid);
                }
                self.watch(id.to_string(), pid, Some(l.child));
            }
            Err(reason) => {
                tracing::warn!("VM {} failed to start: {reason}", vm.meta.name);
                let _ = self.db.update(id, Change::Observed, |v: &mut Vm| {
                    v.status.state = VmState::Failed;
                    v.status.pid = None;
                    v.status.nics.clear();
                    v.status.disks.clear();
                    v.status.reason = Some(reason.clone());
                    Ok(Some(Note::with("state", reason.clone())))
                });
            }
        }
    }

    /// Everything a VM needs, then kiln-vmm; undone on any failure.
    async fn launch(&self, vm: &Vm) -> Result<Launched, String> {
        let id = &vm.meta.id;
        let image: Image = self
            .db
            .get(&vm.spec.boot.image)
            .map_err(|_| format!("boot image {:?} does not exist", vm.spec.boot.image))?;
        if image.status.state != ImageState::Ready {
            return Err(format!(
                "boot image {} is not ready ({:?})",
                image.meta.name, image.status.state
            ));
        }
        if !image.spec.source.is_kernel() {
            return Err(format!(
                "boot image {} is not a kernel image",
                image.meta.name
            ));
        }
        let image_cmdline = image.spec.source.cmdline();
        let kernel = images::blob(&self.paths, &image, FileRole::Kernel)
            .ok_or_else(|| format!("boot image {} has no kernel", image.meta.name))?;
        let initrd = images::blob(&self.paths, &image, FileRole::Initrd);
        let volumes = crate::api::volumes::ready_volumes(&self.db, &vm.spec)?;
        let vols: Vec<Volume> = volumes
            .iter()
            .map(|n| self.db.get::<Volume>(n).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        self.check_image_policy(vm, &image, &vols)?;
        // Keys first: a locked node refuses before anything is set up.
        let attach: Vec<kiln_store::proto::Request> = vols
            .iter()
            .map(|v| {
                crate::volume_keys::attach_request(&self.db, &self.trust, v).map_err(|e| e.message)
            })
            .collect::<Result<_, _>>()?;
        let dir = self.run_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let rd = VmRunDir(&dir);

        let mut nics: Vec<NicStatus> = Vec::new();
        let mut disks: Vec<String> = Vec::new();
        // One virtio queue per vCPU, so that every vCPU submits on its own
        // queue and kiln-store serves each on its own thread (kiln-vmm
        // allows 1..=vCPUs; kiln-store 1..=64).
        let disk_queues = disk_queue_count(vm.spec.vcpus);
        let result = async {
            for (i, (name, attach)) in volumes.iter().zip(attach).enumerate() {
                let sock = dir.join(format!("disk{i}.sock"));
                let store = self.store.clone();
                let s2 = sock.display().to_string();
                // One request: kiln-store undoes its attach if the export
                // fails.
                let attach = attach.with_export(s2, disk_queues, false);
                tokio::task::spawn_blocking(move || store.call(&attach))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("volume {name}: {}", e.message))?;
                disks.push(name.clone());
            }
            for (i, nic) in vm.spec.nics.iter().enumerate() {
                let net: Network = self
                    .db
                    .get(&nic.network)
                    .map_err(|_| format!("network {:?} does not exist", nic.network))?;
                let tap = netdev::tap_name(id, i);
                netdev::create_tap(&tap, &net.status.bridge)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                nics.push(NicStatus {
                    network: net.meta.name.clone(),
                    tap,
                    mac: nic.mac.clone().unwrap_or_else(|| netdev::stable_mac(id, i)),
                });
            }
            let log =
                std::fs::File::create(rd.log()).map_err(|e| format!("cannot create log: {e}"))?;
            let log2 = log.try_clone().map_err(|e| e.to_string())?;
            let cmdline = vm
                .spec
                .boot
                .cmdline
                .clone()
                .or_else(|| image_cmdline.map(str::to_string))
                .unwrap_or_else(|| "console=ttyS0".to_string());
            self.measure_launch(vm, &image, &vols, &cmdline).await?;
            let mut cmd = Command::new(&self.vmm);
            cmd.arg("--kernel").arg(&kernel);
            if let Some(i) = &initrd {
                cmd.arg("--initrd").arg(i);
            }
            cmd.arg("--cmdline")
                .arg(&cmdline)
                .arg("--cpus")
                .arg(vm.spec.vcpus.to_string())
                .arg("--memory")
                .arg(format!("{}M", vm.spec.memory_mib))
                .arg("--api-socket")
                .arg(rd.api_socket())
                .arg("--serial")
                .arg(format!("socket:{}", rd.console_socket().display()))
                .arg("--on-reboot")
                .arg("restart");
            for (i, d) in disks.iter().enumerate() {
                cmd.arg("--disk").arg(format!(
                    "vhost-user={},id={d},queues={disk_queues}",
                    dir.join(format!("disk{i}.sock")).display()
                ));
            }
            for n in &nics {
                cmd.arg("--net").arg(format!("tap={},mac={}", n.tap, n.mac));
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log2))
                .env("KILN_LOG", "info")
                .process_group(0)
                .kill_on_drop(false);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", self.vmm.display()))?;
            let pid = child.id().ok_or("kiln-vmm ended at once")?;
            let _ = std::fs::write(rd.pid_file(), pid.to_string());
            let cgroup = match &self.cgroup_root {
                Some(root) => match cgroup::place(root, id, pid, vm.spec.vcpus, vm.spec.memory_mib)
                {
                    Ok(p) => Some(p),
                    Err(e) => {
                        kill(pid);
                        let _ = child.wait().await;
                        return Err(format!("{e:#}"));
                    }
                },
                None => None,
            };
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    if let Some(cg) = &cgroup {
                        cgroup::remove(cg);
                    }
                    let tail = log_tail(&rd.log());
                    return Err(format!(
                        "kiln-vmm exited ({status}) before it was ready: {tail}"
                    ));
                }
                if rd.api_socket().exists() && vmm_client::info(&rd.api_socket()).await.is_ok() {
                    break;
                }
                if started.elapsed() > READY_TIMEOUT {
                    kill(pid);
                    let _ = child.wait().await;
                    if let Some(cg) = &cgroup {
                        cgroup::remove(cg);
                    }
                    return Err(format!(
                        "kiln-vmm did not answer on its API socket within {} s: {}",
                        READY_TIMEOUT.as_secs(),
                        log_tail(&rd.log())
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok((pid, child, cgroup))
        }
        .await;
        match result {
            Ok((pid, child, cgroup)) => Ok(Launched {
                pid,
                child,
                nics,
                disks,
                cgroup,
            }),
            Err(e) => {
                self.cleanup(id, &nics, &disks, None).await;
                Err(e)
            }
        }
    }

    /// The image policy: in `enforce` mode an unapproved kernel, initrd
    /// or base disk image stops the launch; in `audit` mode it is an event.
    fn check_image_policy(&self, vm: &Vm, image: &Image, vols: &[Volume]) -> Result<(), String> {
        let policy = image_policy::current(&self.db).map_err(|e| e.to_string())?;
        let mut sources = image_policy::boot_sources(image);
        sources.extend(
            vols.iter()
                .filter_map(|v| image_policy::base_image(&self.db, v)),
        );
        let bad = image_policy::unapproved(&policy.spec, &sources);
        if bad.is_empty() {
            return Ok(());
        }
        let what = bad.join("; ");
        match policy.spec.mode {
            PolicyMode::Enforce => Err(format!("refused by the image policy (enforce): {what}")),
            PolicyMode::Audit => {
                tracing::warn!("VM {}: image policy (audit): {what}", vm.meta.name);
                let _ = self.db.update(&vm.meta.id, Change::Observed, |_: &mut Vm| {
                    Ok(Some(Note::with(
                        "policy-violation",
                        format!("started although (audit mode): {what}"),
                    )))
                });
                Ok(())
            }
        }
    }

    /// Extends what this launch is made of into the VM-launch PCR.
    async fn measure_launch(
        &self,
        vm: &Vm,
        image: &Image,
        vols: &[Volume],
        cmdline: &str,
    ) -> Result<(), String> {
        let sha = |role| image.file(role).map(|f| f.sha256.clone());
        let disks = vols
            .iter()
            .map(|v| match image_policy::base_image(&self.db, v) {
                Some(s) => format!("volume:{}@live;image:sha256:{}", v.meta.id, s.sha256),
                None => format!("volume:{}@live", v.meta.id),
            })
            .collect();
        let event = KilnEvent::VmLaunch {
            vm: vm.meta.id.clone(),
            name: vm.meta.name.clone(),
            kernel: sha(FileRole::Kernel).unwrap_or_default(),
            initrd: sha(FileRole::Initrd),
            cmdline: cmdline.to_string(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disks,
        };
        let trust = self.trust.clone();
        tokio::task::spawn_blocking(move || trust.measure_launch(event))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot measure the launch: {e}"))
    }

    /// Removes a VM's TAPs, runtime directory and cgroup.
    async fn cleanup(
        &self,
        id: &str,
        nics: &[NicStatus],
        disks: &[String],
        cgroup_dir: Option<&str>,
    ) {
        for d in disks {
            let (store, name) = (self.store.clone(), d.clone());
            let r = tokio::task::spawn_blocking(move || {
                store.call(&kiln_store::proto::Request::VolDetach { name })
            })
            .await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!("cannot detach volume {d} from this node's store");
            }
        }
        for n in nics {
            if let Err(e) = netdev::delete_tap(&n.tap).await {
                tracing::warn!("cannot remove TAP {}: {e:#}", n.tap);
            }
        }
        if let Some(cg) = cgroup_dir {
            cgroup::remove(Path::new(cg));
        }
        let dir = self.run_dir(id);
        // Keep the last log for a post-mortem: it goes when the VM is deleted
        // or started again.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name() != "vmm.log" {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Waits for kiln-vmm `pid` to end, then acts on it.
    fn watch(self: &Arc<Self>, id: String, pid: u32, child: Option<Child>) {
        let me = self.clone();
        tokio::spawn(async move {
            let exit = match child {
                Some(mut c) => match c.wait().await {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        match (s.code(), s.signal()) {
                            (Some(c), _) => Exit::Code(c),
                            (None, Some(sig)) => Exit::Signal(sig),
                            _ => Exit::Unknown,
                        }
                    }
                    Err(_) => Exit::Unknown,
                },
                None => {
                    let api = me.api_socket(&id);
                    while alive(pid, &api) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Exit::Unknown
                }
            };
            me.on_exit(&id, pid, exit).await;
        });
    }

    async fn on_exit(self: &Arc<Self>, id: &str, pid: u32, exit: Exit) {
        let lock = self.lock(id);
        let guard = lock.lock().await;
        let Ok(vm) = self.db.get::<Vm>(id) else {
            return;
        };
        if vm.status.pid != Some(pid) {
            return;
        }
        self.cleanup(
            id,
            &vm.status.nics,
            &vm.status.disks,
            vm.status.cgroup.as_deref(),
        )
        .await;
        let tail = log_tail(&VmRunDir(&self.run_dir(id)).log());
        let restart = self.decide(&vm, exit, &tail);
        drop(guard);
        if let Some(delay) = restart {
            self.spawn_start(id.to_string(), delay);
        }
    }

    /// Records how a VM's kiln-vmm ended; returns the restart delay if the
    /// policy restarts it.
    fn decide(&self, vm: &Vm, exit: Exit, tail: &str) -> Option<Duration> {
        let asked = vm.desired == DesiredVmState::Stopped;
        let clean = matches!(exit, Exit::Code(0));
        let policy = vm.spec.restart_policy;
        let restart = !asked
            && match policy {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => !clean,
                RestartPolicy::Always => true,
            };
        let why = match exit {
            Exit::Code(0) => "the guest powered off".to_string(),
            Exit::Code(c) => format!("kiln-vmm exited with status {c}: {tail}"),
            Exit::Signal(s) => format!("kiln-vmm was killed by signal {s}"),
            Exit::Unknown => "kiln-vmm ended (its exit status is unknown: it ended while the agent was away or was not its child)".to_string(),
        };
        let delay = MAX_BACKOFF.min(Duration::from_secs(1u64 << vm.status.restarts.min(5)));
        let r = self.db.update(&vm.meta.id, Change::Observed, |v: &mut Vm| {
            v.status.pid = None;
            v.status.nics.clear();
            v.status.disks.clear();
            v.status.cgroup = None;
            if asked {
                v.status.state = VmState::Stopped;
                v.status.reason = None;
                return Ok(Some(Note::with("state", "stopped on request")));
            }
            if restart {
                v.status.state = VmState::Starting;
                v.status.restarts += 1;
                v.status.reason = Some(why.clone());
                return Ok(Some(Note::with(
                    "state",
                    format!(
                        "{why}; restart policy {policy:?}: starting again in {} s",
                        delay.as_secs()
                    ),
                )));
            }
            if clean {
                v.status.state = VmState::Stopped;
            } else {
                v.status.state = VmState::Failed;
            }
            v.status.reason = Some(why.clone());
            Ok(Some(Note::with("state", why.clone())))
        });
        if clean && !restart && !asked {
            let _ = self.db.update(
                &vm.meta.id,
                Change::Desired { expected: None },
                |v: &mut Vm| {
                    v.desired = DesiredVmState::Stopped;
                    Ok(None)
                },
            );
        }
        match r {
            Ok(_) if restart => Some(delay),
            _ => None,
        }
    }

    /// Graceful shutdown (the VM is already `stopping`): the power button,
    /// then power-off after `timeout`.
    pub fn spawn_shutdown(self: &Arc<Self>, id: String, pid: u32, timeout: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let api = me.api_socket(&id);
            // A paused guest cannot see its button: let it run first (a
            // running one answers 409, which changes nothing).
            let _ = vmm_client::action(&api, "resume").await;
            if let Err(e) = vmm_client::action(&api, "shutdown").await {
                tracing::warn!("graceful shutdown of {id} failed ({e:#}); powering off");
                me.force_off(pid, &api).await;
                return;
            }
            // A press can come before the guest listens for its button (early
            // in its boot): press again every few seconds until the deadline.
            let deadline = Instant::now() + timeout;
            let mut next_press = Instant::now() + PRESS_AGAIN;
            while alive(pid, &api) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if Instant::now() >= next_press {
                    next_press = Instant::now() + PRESS_AGAIN;
                    let _ = vmm_client::action(&api, "shutdown").await;
                }
            }
            if alive(pid, &api) {
                let _ = me.db.update(&id, Change::Observed, |_: &mut Vm| {
                    Ok(Some(Note::with(
                        "state",
                        format!(
                            "the guest did not power off within {} s: powering off",
                            timeout.as_secs()
                        ),
                    )))
                });
                me.force_off(pid, &api).await;
            }
        });
    }

    /// Power-off through the API, else SIGKILL.
    pub async fn force_off(&self, pid: u32, api: &Path) {
        if vmm_client::action(api, "power-off").await.is_err() && alive(pid, api) {
            kill(pid);
        }
    }

    /// At the agent's start: re-adopt live VMs, settle dead ones, remove
    /// leftovers.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ApiError> {
        let vms = self.db.list::<Vm>()?;
        // TAPs are named after VM ids: only this agent's VMs' TAPs are its
        // to remove (another agent on the host, such as a test's, owns its own).
        let own_taps: Vec<String> = vms
            .iter()
            .map(|vm| netdev::tap_name(&vm.meta.id, 0))
            .map(|t| t[..t.len() - 1].to_string())
            .collect();
        let mut live_taps: Vec<String> = Vec::new();
        let mut live_ids: Vec<String> = Vec::new();
        for vm in vms {
            let id = vm.meta.id.clone();
            let lock = self.lock(&id);
            let guard = lock.lock().await;
            let active = matches!(
                vm.status.state,
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
            );
            if !active {
                continue;
            }
            let api = self.api_socket(&id);
            match vm.status.pid.filter(|p| alive(*p, &api)) {
                Some(pid) => {
                    live_ids.push(id.clone());
                    live_taps.extend(vm.status.nics.iter().map(|n| n.tap.clone()));
                    let observed = match vmm_client::info(&api).await {
                        Ok(i) if i.state == "paused" => VmState::Paused,
                        Ok(_) => VmState::Running,
                        Err(e) => {
                            tracing::warn!(
                                "VM {} (pid {pid}) does not answer: {e:#}",
                                vm.meta.name
                            );
                            vm.status.state
                        }
                    };
                    let stopping = vm.status.state == VmState::Stopping;
                    self.db.update(&id, Change::Observed, |v: &mut Vm| {
                        if !stopping {
                            v.status.state = observed;
                        }
                        Ok(Some(Note::with(
                            "adopted",
                            format!("kiln-vmm pid {pid} re-adopted"),
                        )))
                    })?;
                    drop(guard);
                    self.watch(id.clone(), pid, None);
                    if stopping {
                        self.force_off(pid, &api).await;
                    }
                }
                None if vm.status.state == VmState::Starting && vm.status.pid.is_none() => {
                    // A start (or restart) that had not launched yet.
                    drop(guard);
                    live_ids.push(id.clone());
                    self.spawn_start(id, Duration::ZERO);
                }
                None => {
                    self.cleanup(
                        &id,
                        &vm.status.nics,
                        &vm.status.disks,
                        vm.status.cgroup.as_deref(),
                    )
                    .await;
                    let restart = self.decide(&vm, Exit::Unknown, "");
                    drop(guard);
                    if let Some(d) = restart {
                        live_ids.push(id.clone());
                        self.spawn_start(id, d);
                    }
                }
            }
        }
        for tap in netdev::list_taps() {
            if !live_taps.contains(&tap) && own_taps.iter().any(|p| tap.starts_with(p.as_str())) {
                tracing::info!("removing leftover TAP {tap}");
                let _ = netdev::delete_tap(&tap).await;
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.paths.vms_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !live_ids.contains(&name) && self.db.get::<Vm>(&name).is_err() {
                    tracing::info!("removing leftover runtime directory {}", e.path().display());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Removes what a deleted VM left.
    pub fn forget(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.run_dir(id));
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::disk_queue_count;

    #[test]
    fn a_disk_gets_a_queue_per_vcpu_within_the_stores_limit() {
        assert_eq!(disk_queue_count(0), 1);
        assert_eq!(disk_queue_count(1), 1);
        assert_eq!(disk_queue_count(4), 4);
        assert_eq!(disk_queue_count(64), 64);
        assert_eq!(disk_queue_count(200), 64);
    }
}
