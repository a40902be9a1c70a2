//! What the control API's actions do to the running VM. Runs on the main
//! thread's event loop (see `api` for how requests get there).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_devices::legacy::{ged, GedDevice};
use kiln_devices::{ExitSignal, VmExit};
use serde_json::{json, Value};

use crate::api::{ApiError, ApiReply, ApiResult, VmAction};
use crate::config::{DiskBackend, VmConfig};
use crate::vstate::vcpu::PauseGate;

/// A device's counters, as `GET /vm` reports them.
pub type DeviceStats = Box<dyn Fn() -> Value + Send>;

/// Everything the actions act on.
pub struct VmControl {
    pub started: Instant,
    /// `GET /vm`'s `config`, made once.
    pub config: Value,
    pub exit: Arc<ExitSignal>,
    pub ged: Arc<Mutex<GedDevice>>,
    pub pause: Arc<PauseGate>,
    /// The vCPU threads: kicked out of the guest to pause, and asked for
    /// their CPU time.
    pub vcpus: Vec<libc::pthread_t>,
    pub devices: Vec<DeviceStats>,
    /// What snapshots and migrations save.
    pub live: crate::persist::LiveMachine,
    /// Runs `PUT /vm/migrate`.
    pub migration: crate::migrate::MigrationWorker,
}

impl VmControl {
    pub fn handle(&mut self, action: VmAction) -> ApiResult {
        let paused = self.pause.is_paused();
        match action {
            VmAction::Info => return Ok(ApiReply::Info(self.info())),
            VmAction::Pause if paused => {
                return Err(ApiError::conflict("the VM is already paused"))
            }
            VmAction::Resume if !paused => return Err(ApiError::conflict("the VM is not paused")),
            VmAction::Shutdown if paused => {
                return Err(ApiError::conflict(
                    "the VM is paused: resume it so the guest can see the power button",
                ))
            }
            VmAction::Pause => {
                self.live
                    .pause_vcpus()
                    .map_err(|e| ApiError::internal(format!("cannot pause: {e}")))?;
                tracing::info!("API: VM paused");
            }
            VmAction::Resume => {
                self.pause.resume();
                tracing::info!("API: VM resumed");
            }
            VmAction::Shutdown => {
                self.ged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .notify(ged::EVENT_POWER_BUTTON)
                    .map_err(|e| {
                        ApiError::internal(format!("cannot press the power button: {e}"))
                    })?;
                tracing::info!("API: pressed the guest's power button");
            }
            VmAction::PowerOff => {
                tracing::info!("API: powering the VM off");
                self.exit.signal(VmExit::PowerOff);
            }
            VmAction::Reboot => {
                tracing::info!("API: resetting the VM");
                self.exit.signal(VmExit::Reset);
            }
            VmAction::Snapshot(_) if !paused => {
                return Err(ApiError::conflict(
                    "the VM is running: pause it (PUT /vm/pause) before taking a snapshot",
                ))
            }
            VmAction::Snapshot(p) => {
                let report = self
                    .live
                    .snapshot_to(&p.destination_dir)
                    .map_err(|e| ApiError::internal(format!("snapshot failed: {e}")))?;
                tracing::info!(
                    "API: snapshot written to {} in {:?} ({} MiB of guest RAM written)",
                    p.destination_dir.display(),
                    report.elapsed,
                    report.memory_bytes_written >> 20
                );
            }
            VmAction::Migrate(p) => {
                let destination = p.destination.clone();
                let doc = self
                    .migration
                    .submit(p, crate::migrate::VmSource::new(self.live.clone()))?;
                tracing::info!("API: migrating the VM to {destination}");
                return Ok(ApiReply::Accepted(doc));
            }
        }
        Ok(ApiReply::Done)
    }

    fn info(&self) -> Value {
        let state = if self.pause.is_paused() {
            "paused"
        } else {
            "running"
        };
        json!({
            "state": state,
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "pid": std::process::id(),
            "config": self.config,
            "vcpu_time_ns": self.vcpus.iter().map(|t| thread_cpu_ns(*t)).sum::<u64>(),
            "devices": self.devices.iter().map(|d| d()).collect::<Vec<_>>(),
            "migration": self.migration.status_json(),
        })
    }
}

/// CPU time a thread has used, in nanoseconds; 0 if unknown.
fn thread_cpu_ns(thread: libc::pthread_t) -> u64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread (see `VmAction::Pause`); `clock`
    // is a valid out pointer.
    if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
        return 0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The id a device is known by: its `id=`, else `disk0`, `net1`, ...
pub fn device_id(id: Option<&str>, kind: &str, index: usize) -> String {
    id.map_or_else(|| format!("{kind}{index}"), String::from)
}

/// `GET /vm`'s `config`: what the VM was started with.
pub fn config_json(cfg: &VmConfig) -> Value {
    let disks: Vec<Value> = cfg
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut v = match &d.backend {
                DiskBackend::File {
                    path,
                    read_only,
                    direct,
                } => json!({
                    "path": path.display().to_string(),
                    "read_only": read_only,
                    "direct": direct,
                }),
                DiskBackend::VhostUser { socket } => {
                    json!({ "vhost_user": socket.display().to_string() })
                }
                DiskBackend::Volume { name, store } => {
                    json!({
                        "volume": name,
                        "store": store.as_ref().map(|s| s.display().to_string()),
                    })
                }
            };
            v["id"] = json!(device_id(d.id.as_deref(), "disk", i));
            v
        })
        .collect();
    let nets: Vec<Value> = cfg
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut v = json!({
                "id": device_id(n.id.as_deref(), "net", i),
                "tap": n.tap,
            });
            if let Some(m) = n.mac {
                v["mac"] = json!(m
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"));
            }
            v
        })
        .collect();
    json!({
        "vcpus": cfg.vcpus,
        "memory_mib": cfg.memory >> 20,
        "kernel": cfg.kernel.display().to_string(),
        "initrd": cfg.initrd.as_ref().map(|p| p.display().to_string()),
        "cmdline": cfg.cmdline,
        "disks": disks,
        "nets": nets,
    })
}
