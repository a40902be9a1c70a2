//! A whole machine saved and given back: what snapshots and live migration
//! share. The pieces live elsewhere (vCPU and VM state in `vstate`, the
//! files in `snapshot`, each device's state in kiln-devices); this module
//! puts them together in the one order that works:
//!
//! - saving, with the vCPUs paused: quiesce every virtio device (requests
//!   in flight complete), save each vCPU (on its own thread), the VM
//!   (irqchip, PIT, clock) and every device; the devices are resumed
//!   afterwards whatever happened;
//! - restoring, on a freshly built machine before any vCPU runs: the VM
//!   state first (the irqchip would otherwise swallow what the devices
//!   raise), then the vCPUs, the virtio transports (active devices are
//!   left paused on their saved queues), the serial port and the GED;
//!   nothing is written to guest RAM or sent to a backend yet;
//! - starting the restored machine ([`start_restored`], when it is to
//!   run: at once for a snapshot, after the source's commit for a
//!   migration): the devices serve their queues, and the guest is told it
//!   was restored: a new VM generation id (its RNG reseeds) and, on each
//!   interface, a request to announce itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_devices::legacy::vmgenid::{self, VmGenId};
use kiln_devices::legacy::{GedDevice, GedSnapshot, SerialDevice, SerialSnapshot};
use kiln_devices::virtio::net::announce::Announcer;
use kiln_devices::virtio::{MmioTransport, TransportSnapshot};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::VMGENID_START;
use crate::config::{DiskBackend, VmConfig};
use crate::snapshot::{self, VmSnapshot};
use crate::vstate::vcpu::{self, PauseGate, Vcpu};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the snapshot has {saved} --{what} device(s) but {given} were given: give the VM's \
         --{what} devices, in the same order"
    )]
    DeviceCount {
        what: &'static str,
        saved: usize,
        given: usize,
    },
    #[error("{what} {index}: the snapshot's is {saved}, the one given is {given}")]
    DeviceMismatch {
        what: &'static str,
        index: usize,
        saved: String,
        given: String,
    },
    #[error("the snapshot's {what} cannot be read: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("the snapshot has {saved} vCPU states for {vcpus} vCPUs")]
    VcpuCount { saved: usize, vcpus: usize },
    #[error("cannot restore the VM's interrupt controllers and clock: {0}")]
    VmState(String),
    #[error("cannot restore vCPU {index}: {reason}")]
    VcpuState { index: usize, reason: String },
    #[error(
        "the guest was shown CPU features this host's KVM does not offer (vCPU {index}: {}); \
         it would fail on its first use of one: restore or migrate it to a host with the same \
         CPU or a newer one",
        missing.join(", ")
    )]
    CpuFeatures { index: usize, missing: Vec<String> },
    #[error("cannot restore {id}: {reason}")]
    Device { id: String, reason: String },
    #[error("cannot save vCPU state: {0}")]
    SaveVcpus(String),
    #[error("cannot save the VM's interrupt controllers and clock: {0}")]
    SaveVm(String),
    #[error("cannot pause {id} (it completes its requests in flight first): {reason}")]
    PauseDevice { id: String, reason: String },
    #[error("cannot save {id}: {reason}")]
    SaveDevice { id: String, reason: String },
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("cannot give the guest a new VM generation id: {0}")]
    VmGenId(String),
}

/// One virtio device as the configuration named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// Its `id=` (or `disk0`, `net1`, ...).
    pub id: String,
    /// "file", "vhost-user" or "volume" for disks; "tap" for interfaces.
    pub kind: String,
    /// Request queues (disks).
    pub queues: u16,
}

/// What a snapshot records of the configuration: what a restore takes from
/// it (vCPUs, memory, kernel for reference) and what it checks the new
/// command line against (the devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// The kiln-vmm that saved it.
    pub vmm_version: String,
    pub vcpus: u8,
    pub memory: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<SavedDevice>,
    pub nets: Vec<SavedDevice>,
}

impl SavedConfig {
    pub fn of(cfg: &VmConfig) -> Self {
        Self {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            vcpus: cfg.vcpus,
            memory: cfg.memory,
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            disks: cfg
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| SavedDevice {
                    id: crate::control::device_id(d.id.as_deref(), "disk", i),
                    kind: disk_kind(&d.backend).to_string(),
                    queues: d.queues,
                })
                .collect(),
            nets: cfg
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| SavedDevice {
                    id: crate::control::device_id(n.id.as_deref(), "net", i),
                    kind: "tap".to_string(),
                    queues: 1,
                })
                .collect(),
        }
    }
}

fn disk_kind(b: &DiskBackend) -> &'static str {
    match b {
        DiskBackend::File { .. } => "file",
        DiskBackend::VhostUser { .. } => "vhost-user",
        DiskBackend::Volume { .. } => "volume",
    }
}

/// The devices' state, in `VmSnapshot::devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedDevices {
    /// Disks then interfaces, in configuration order.
    pub transports: Vec<TransportSnapshot>,
    pub serial: SerialSnapshot,
    pub ged: GedSnapshot,
}

/// The snapshot's configuration.
pub fn saved_config(snap: &VmSnapshot) -> Result<SavedConfig, Error> {
    serde_json::from_value(snap.config.clone()).map_err(|e| Error::Corrupt {
        what: "configuration",
        reason: e.to_string(),
    })
}

/// The snapshot's device state.
pub fn saved_devices(snap: &VmSnapshot) -> Result<SavedDevices, Error> {
    serde_json::from_value(snap.devices.clone()).map_err(|e| Error::Corrupt {
        what: "device state",
        reason: e.to_string(),
    })
}

/// Whether `cfg`'s devices are the snapshot's: as many disks and
/// interfaces, each of the same kind, id and queue count (their paths may
/// differ).
pub fn check_devices(snap: &VmSnapshot, cfg: &VmConfig) -> Result<(), Error> {
    let saved = saved_config(snap)?;
    let given = SavedConfig::of(cfg);
    for (what, s, g) in [
        ("disk", &saved.disks, &given.disks),
        ("net", &saved.nets, &given.nets),
    ] {
        if s.len() != g.len() {
            return Err(Error::DeviceCount {
                what,
                saved: s.len(),
                given: g.len(),
            });
        }
        for (index, (s, g)) in s.iter().zip(g).enumerate() {
            if s != g {
                let show = |d: &SavedDevice| format!("{} id={} queues={}", d.kind, d.id, d.queues);
                return Err(Error::DeviceMismatch {
                    what,
                    index,
                    saved: show(s),
                    given: show(g),
                });
            }
        }
    }
    Ok(())
}

/// A freshly built machine's parts that a restore gives state to.
pub struct RestoreParts<'a> {
    pub vm: &'a Vm,
    /// Configured as for a new VM (`Vcpu::configure`): their CPUID is what
    /// this host offers, and a guest shown features outside it is refused.
    pub vcpus: &'a [Vcpu],
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    pub serial: &'a Arc<Mutex<SerialDevice>>,
    pub ged: &'a Arc<Mutex<GedDevice>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The id of the `index`th virtio device (disks first), for messages.
pub fn device_name(config: &SavedConfig, index: usize) -> String {
    config
        .disks
        .iter()
        .chain(&config.nets)
        .nth(index)
        .map_or_else(|| format!("device {index}"), |d| format!("device {}", d.id))
}

/// Gives `snap` to a machine built for it (see the module's doc for the
/// order). Nothing runs yet: the vCPU threads start afterwards.
/// What starting a restored machine touches.
pub struct RestartParts<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    pub ged: &'a Mutex<GedDevice>,
    pub announcers: &'a [Arc<Announcer>],
    pub config: &'a SavedConfig,
}

/// Starts a restored machine, before its vCPUs run: devices restored
/// without their backend connect to it (a kiln-store volume is attached
/// only now), the devices serve their queues again (a backend hears from
/// this process only now, and
/// guest RAM is written only now: a migration's destination does this
/// once the source has committed), then the guest is told it was
/// restored: a new VM generation id, and each interface asked to announce
/// itself.
pub fn start_restored(parts: &RestartParts) -> Result<(), Error> {
    for (index, t) in parts.transports.iter().enumerate() {
        let mut t = lock(t);
        t.connect_backend().map_err(|e| Error::Device {
            id: device_name(parts.config, index),
            reason: format!("cannot reach its backend: {e}"),
        })?;
        t.resume().map_err(|e| Error::Device {
            id: device_name(parts.config, index),
            reason: format!("cannot start it again: {e}"),
        })?;
    }
    // A restored guest is a fork of the one saved: a new generation id
    // makes it reseed its RNG (Linux's vmgenid driver).
    VmGenId::new(parts.mem, GuestAddress(VMGENID_START))
        .map_err(|e| Error::VmGenId(e.to_string()))?;
    lock(parts.ged)
        .notify(vmgenid::EVENT_VMGENID)
        .map_err(|e| Error::VmGenId(e.to_string()))?;
    // Switches learn where the guest now is from its announcements.
    for (i, a) in parts.announcers.iter().enumerate() {
        match a.announce() {
            Ok(true) => tracing::debug!("net{i}: the guest was asked to announce itself"),
            Ok(false) => tracing::info!(
                "net{i}: the guest's driver does not announce itself (no GUEST_ANNOUNCE)"
            ),
            Err(e) => tracing::warn!("net{i}: cannot ask the guest to announce itself: {e}"),
        }
    }
    Ok(())
}

pub fn restore_machine(snap: &VmSnapshot, parts: &RestoreParts) -> Result<(), Error> {
    let config = saved_config(snap)?;
    let devices = saved_devices(snap)?;
    if snap.vcpus.len() != parts.vcpus.len() {
        return Err(Error::VcpuCount {
            saved: snap.vcpus.len(),
            vcpus: parts.vcpus.len(),
        });
    }
    if devices.transports.len() != parts.transports.len() {
        return Err(Error::Corrupt {
            what: "device state",
            reason: format!(
                "{} virtio devices saved for {} configured",
                devices.transports.len(),
                parts.transports.len()
            ),
        });
    }
    for (index, (vcpu, state)) in parts.vcpus.iter().zip(&snap.vcpus).enumerate() {
        let offered = vcpu.cpuid().map_err(|e| Error::VcpuState {
            index,
            reason: e.to_string(),
        })?;
        let missing = crate::arch::cpu_compat::missing_features(&state.cpuid, &offered);
        if !missing.is_empty() {
            return Err(Error::CpuFeatures { index, missing });
        }
    }
    parts
        .vm
        .restore_state(&snap.vm)
        .map_err(|e| Error::VmState(e.to_string()))?;
    for (index, (vcpu, state)) in parts.vcpus.iter().zip(&snap.vcpus).enumerate() {
        vcpu.restore_state(state).map_err(|e| Error::VcpuState {
            index,
            reason: e.to_string(),
        })?;
    }
    for (index, (t, saved)) in parts.transports.iter().zip(&devices.transports).enumerate() {
        lock(t).restore(saved).map_err(|e| Error::Device {
            id: device_name(&config, index),
            reason: e.to_string(),
        })?;
    }
    lock(parts.serial)
        .restore(&devices.serial)
        .map_err(|e| Error::Device {
            id: "the serial port".into(),
            reason: e.to_string(),
        })?;
    lock(parts.ged)
        .restore(&devices.ged)
        .map_err(|e| Error::Device {
            id: "the GED".into(),
            reason: e.to_string(),
        })?;
    tracing::info!(
        "restored {} vCPU(s), {} MiB, {} virtio device(s), saved by kiln-vmm {}",
        snap.vcpus.len(),
        snap.memory_size >> 20,
        devices.transports.len(),
        config.vmm_version
    );
    Ok(())
}

/// What saving needs of the running machine: shared by the control API's
/// snapshot and the migration thread.
#[derive(Clone)]
pub struct LiveMachine {
    pub mem: GuestMemoryMmap,
    pub vm: Arc<Vm>,
    pub pause: Arc<PauseGate>,
    /// The vCPU threads, kicked out of the guest to pause them.
    pub vcpus: Vec<libc::pthread_t>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ged: Arc<Mutex<GedDevice>>,
    pub config: SavedConfig,
}

/// How long the vCPU threads get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

impl LiveMachine {
    /// Stops the vCPUs (they wait in the pause gate).
    pub fn pause_vcpus(&self) -> Result<(), String> {
        let vcpus = &self.vcpus;
        self.pause.pause(vcpus.len(), vcpu::PAUSE_TIMEOUT, || {
            for t in vcpus {
                // SAFETY: the thread ids come from the vCPU threads'
                // JoinHandles; those threads never exit while the VMM runs
                // (they park instead).
                unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
            }
        })
    }

    /// Quiesces every virtio device; on a failure the ones already paused
    /// are resumed and the error returned.
    pub fn pause_devices(&self) -> Result<(), Error> {
        for (index, t) in self.transports.iter().enumerate() {
            if let Err(e) = lock(t).pause() {
                self.resume_devices();
                return Err(Error::PauseDevice {
                    id: device_name(&self.config, index),
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Has every paused device serve its queues again; a device that
    /// cannot is left needing a reset (the guest's driver resets it) and
    /// logged.
    pub fn resume_devices(&self) {
        for (index, t) in self.transports.iter().enumerate() {
            if let Err(e) = lock(t).resume() {
                tracing::error!(
                    "cannot resume {}: {e}; the guest's driver must reset it",
                    device_name(&self.config, index)
                );
            }
        }
    }

    /// The whole machine's state. The vCPUs must be paused and the devices
    /// quiesced ([`LiveMachine::pause_devices`]).
    pub fn capture(&self) -> Result<VmSnapshot, Error> {
        let vcpus = self
            .pause
            .save_states(SAVE_TIMEOUT)
            .map_err(|e| Error::SaveVcpus(e.to_string()))?;
        let vm = self
            .vm
            .save_state()
            .map_err(|e| Error::SaveVm(e.to_string()))?;
        let mut transports = Vec::with_capacity(self.transports.len());
        for (index, t) in self.transports.iter().enumerate() {
            transports.push(lock(t).snapshot().map_err(|e| Error::SaveDevice {
                id: device_name(&self.config, index),
                reason: e.to_string(),
            })?);
        }
        let devices = SavedDevices {
            transports,
            serial: lock(&self.serial).snapshot(),
            ged: lock(&self.ged).snapshot(),
        };
        let to_value = |what: &'static str, v: serde_json::Result<serde_json::Value>| {
            v.map_err(|e| Error::SaveDevice {
                id: what.into(),
                reason: e.to_string(),
            })
        };
        Ok(VmSnapshot {
            id: snapshot::new_id()?,
            memory_size: self.config.memory,
            vcpus,
            vm,
            devices: to_value("the device state", serde_json::to_value(&devices))?,
            config: to_value("the configuration", serde_json::to_value(&self.config))?,
        })
    }

    /// Writes the paused VM to `dir` (see `snapshot::save`); the devices
    /// are quiesced for it and resumed after, the vCPUs stay paused.
    pub fn snapshot_to(&self, dir: &Path) -> Result<SnapshotReport, Error> {
        let started = Instant::now();
        self.pause_devices()?;
        let result = self
            .capture()
            .and_then(|snap| Ok(snapshot::save(dir, &snap, &self.mem)?));
        self.resume_devices();
        let stats = result?;
        Ok(SnapshotReport {
            elapsed: started.elapsed(),
            memory_bytes_written: stats.memory.written_bytes,
        })
    }
}

/// What taking a snapshot did.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotReport {
    pub elapsed: Duration,
    /// Guest RAM actually written (zero pages are left as holes).
    pub memory_bytes_written: u64,
}
