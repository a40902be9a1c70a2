//! The vhost-user-blk device model the transport sees: features and config
//! space from the backend, activation handed to the worker thread.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use tracing::{debug, error};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;

use super::handshake::{self, hang_up, BackendRequests, Negotiated, VCPU_DEADLINE};
use super::session::{QueueHandback, Session};
use crate::dirty::BackendLog;
use crate::virtio::block::device::QUEUE_SIZE;
use crate::virtio::device::{ActivateContext, ActivateError, VirtioDevice, WorkerHook};
use crate::virtio::state::{DeviceSnapshot, RestoreError, SnapshotError, VhostUserBlockSnapshot};
use crate::virtio::worker::Worker;

pub use super::handshake::Error;

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

/// What a `--disk vhost-user=...` option describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlockConfig {
    /// The backend's listening Unix socket.
    pub socket: PathBuf,
    /// Request queues to set up (the backend must serve at least as many).
    pub queues: u16,
}

/// A virtio-blk device served by a vhost-user backend.
pub struct VhostUserBlock {
    name: String,
    socket: PathBuf,
    backend: Negotiated,
    queue_sizes: Vec<u16>,
    /// The backend's request channel, lent to each activation's session.
    requests: Arc<Mutex<Option<BackendRequests>>>,
    /// Spawned by [`VirtioDevice::spawn_worker`] (or the first activation);
    /// it talks to the backend during activations and watches its socket.
    worker: Option<Worker>,
    /// Where the last activation's session left its queues.
    handback: QueueHandback,
    /// How the device reaches its backend.
    link: Link,
    /// Set for the first activation of an adopted connection (see
    /// `Session::adopted`).
    first_start_adopted: Arc<AtomicBool>,
    /// The dirty log the backend writes while a migration runs.
    log: Option<Arc<BackendLog>>,
}

/// Finds a deferred device's backend when the machine starts: its socket,
/// or why there is none.
pub type FindBackend = Box<dyn FnOnce() -> Result<PathBuf, String> + Send>;

/// How a [`VhostUserBlock`] reaches its backend.
enum Link {
    /// Connected and negotiated.
    Ready,
    /// A connection handed over by a migration, not filled in from the
    /// saved device yet ([`VirtioDevice::restore`] does).
    Adopted,
    /// Restored from a saved machine and connected only when the machine
    /// starts ([`VirtioDevice::connect_backend`]): a kiln-store volume is
    /// attached (fencing its previous writer) only once a migration's
    /// source has committed. Until then what the guest sees comes from the
    /// saved device.
    Deferred {
        find: FindBackend,
        saved: Option<Box<VhostUserBlockSnapshot>>,
    },
}

impl VhostUserBlock {
    /// Connects to the backend and negotiates (see [`Negotiated::connect`]).
    /// Run it before any seccomp filter is installed.
    pub fn connect(cfg: VhostUserBlockConfig) -> Result<Self, Error> {
        let backend = Negotiated::connect(&cfg.socket, cfg.queues)?;
        let dev = Self::with_backend(cfg.socket, backend, Link::Ready);
        debug!(
            device = %dev.name,
            socket = %dev.socket.display(),
            sectors = dev.capacity_sectors(),
            backend_features = format_args!("{:#x}", dev.backend.backend_features),
            "vhost-user-blk backend connected"
        );
        Ok(dev)
    }

    /// Takes over `connection` to the backend at `cfg.socket`, handed over
    /// by the kiln-vmm this one migrates from (same host). Nothing is sent
    /// on it until the device is activated; [`VirtioDevice::restore`] must
    /// come first, with the state saved on the source, which tells what
    /// was negotiated.
    pub fn adopt(cfg: VhostUserBlockConfig, connection: UnixStream) -> Self {
        let backend = Negotiated::adopted(connection, cfg.queues);
        let dev = Self::with_backend(cfg.socket, backend, Link::Adopted);
        debug!(
            device = %dev.name,
            socket = %dev.socket.display(),
            "vhost-user-blk backend connection taken over"
        );
        dev
    }

    /// A device to be restored whose backend is found and connected to
    /// only when the machine starts ([`VirtioDevice::connect_backend`]).
    /// `what` names it in messages until then (e.g. "volume vm1").
    pub fn deferred(what: &str, queues: u16, find: FindBackend) -> io::Result<Self> {
        // A dead end in place of the connection: nothing is sent on it.
        let (placeholder, _) = UnixStream::pair()?;
        let backend = Negotiated::adopted(placeholder, queues);
        Ok(Self::with_backend(
            PathBuf::from(what),
            backend,
            Link::Deferred { find, saved: None },
        ))
    }

    fn with_backend(socket: PathBuf, mut backend: Negotiated, link: Link) -> Self {
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        let requests = Arc::new(Mutex::new(backend.backend_requests.take()));
        Self {
            name: format!("kiln-vublk{index}"),
            socket,
            queue_sizes: vec![QUEUE_SIZE; usize::from(backend.queues)],
            backend,
            requests,
            worker: None,
            handback: QueueHandback::default(),
            link,
            first_start_adopted: Arc::new(AtomicBool::new(false)),
            log: None,
        }
    }

    /// The disk size in 512-byte sectors, as the backend reported it.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.capacity_sectors()
    }

    /// The worker thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.backend.guest_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = handshake::config_bytes(&self.backend.config);
        crate::virtio::device::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No VIRTIO_BLK_F_CONFIG_WCE is offered: every field is read-only.
        debug!(
            device = %self.name,
            "ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn used_queue_interrupts_bypass_transport(&self) -> bool {
        true
    }

    fn spawn_worker(&mut self, hook: WorkerHook) -> io::Result<()> {
        Worker::spawn_into(&mut self.worker, &self.name, hook)
    }

    /// Runs on a vCPU thread: hands the handshake to the worker thread and
    /// waits for its outcome (a few round trips to a local backend), at most
    /// [`VCPU_DEADLINE`]: a backend that does not answer by then is hung up
    /// on, and the device fails (NEEDS_RESET) rather than the vCPU hang. A
    /// driver may set up fewer queues than offered (one per CPU it has).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.as_ref().is_some_and(Worker::is_busy) {
            return Err(ActivateError::AlreadyActive);
        }
        if !matches!(self.link, Link::Ready) {
            return Err(ActivateError::VhostUser(format!(
                "{}: the backend was never connected",
                self.socket.display()
            )));
        }
        let got = ctx.queues.len();
        if got == 0 || got > self.queue_sizes.len() || ctx.queue_events.len() != got {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got,
            });
        }
        let worker =
            Worker::get_or_spawn(&mut self.worker, &self.name).map_err(ActivateError::Spawn)?;
        let session = Session {
            name: self.name.clone(),
            socket: self.socket.clone(),
            frontend: self.backend.frontend.clone(),
            protocol_features: self.backend.protocol_features,
            features: self.backend.backend_ack(ctx.acked_features),
            mem: ctx.mem,
            queues: ctx.queues,
            kicks: ctx.queue_events,
            interrupt: ctx.interrupt,
            poller: worker.poller(),
            config: self.backend.config.clone(),
            config_changed: self.backend.config_changed.clone(),
            queue_count: self.backend.queues,
            requests: self.requests.clone(),
            adopted: self.first_start_adopted.clone(),
            handback: self.handback.clone(),
            socket_fd: self.backend.socket_fd,
            log: self.log.clone(),
        };
        self.handback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (started_tx, started) = mpsc::sync_channel(1);
        worker
            .submit(move || session.run(started_tx))
            .map_err(ActivateError::Worker)?;
        let outcome = match started.recv_timeout(VCPU_DEADLINE) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The worker waits for a reply: make its wait fail.
                hang_up(self.backend.socket_fd);
                Err(format!(
                    "the backend at {} did not answer within {} s (hung up on it)",
                    self.socket.display(),
                    VCPU_DEADLINE.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the device worker stopped without reporting".to_string())
            }
        };
        if let Err(e) = outcome {
            // The body has returned (or is about to): collect it so that the
            // driver may reset and try again.
            worker.stop();
            return Err(ActivateError::VhostUser(e));
        }
        Ok(())
    }

    /// Takes the rings back; a backend that does not answer within
    /// [`VCPU_DEADLINE`] is hung up on instead of holding the vCPU.
    fn reset(&mut self) {
        self.stop();
        self.take_queues();
    }

    /// Takes the rings back as a reset does: the backend completes the
    /// requests it took (kiln-store drains them before answering
    /// GET_VRING_BASE) and returns each ring's next available index; the
    /// queues come back with it and with the used ring's index.
    fn quiesce(&mut self) -> Result<Vec<Queue>, ActivateError> {
        self.stop();
        self.take_queues().ok_or_else(|| {
            ActivateError::VhostUser(format!(
                "the backend at {} did not return the rings' state",
                self.socket.display()
            ))
        })
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        Ok(DeviceSnapshot::VhostUserBlock(VhostUserBlockSnapshot {
            avail_features: self.backend.guest_features(),
            backend_features: self.backend.backend_features,
            protocol_features: self.backend.protocol_features.bits(),
            config: handshake::config_bytes(&self.backend.config).to_vec(),
            queues: self.backend.queues,
        }))
    }

    /// Refuses a backend whose disk has another size than the guest saw,
    /// or another queue count. Features: the transport checks that those
    /// the driver acked are still offered.
    fn restore(&mut self, state: &DeviceSnapshot) -> Result<(), RestoreError> {
        let DeviceSnapshot::VhostUserBlock(saved) = state else {
            return Err(RestoreError::WrongKind {
                saved: state.kind(),
                here: "vhost-user-blk",
            });
        };
        if self.worker.as_ref().is_some_and(Worker::is_busy) {
            return Err(RestoreError::InUse);
        }
        match &mut self.link {
            Link::Ready => {}
            Link::Adopted => return self.adopt_saved(saved),
            Link::Deferred { saved: slot, .. } => {
                if saved.queues != self.backend.queues {
                    return Err(RestoreError::QueueCount {
                        saved: usize::from(saved.queues),
                        here: usize::from(self.backend.queues),
                    });
                }
                let config = saved_config(saved)?;
                self.backend.backend_features = saved.backend_features;
                self.backend.protocol_features =
                    vhost::vhost_user::VhostUserProtocolFeatures::from_bits_truncate(
                        saved.protocol_features,
                    );
                *self
                    .backend
                    .config
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = config;
                *slot = Some(Box::new(saved.clone()));
                return Ok(());
            }
        }
        if saved.queues != self.backend.queues {
            return Err(RestoreError::QueueCount {
                saved: usize::from(saved.queues),
                here: usize::from(self.backend.queues),
            });
        }
        let saved_sectors = saved
            .config
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| RestoreError::Invalid("a config space of under 8 bytes".into()))?;
        if saved_sectors != self.capacity_sectors() {
            return Err(RestoreError::Capacity {
                disk: self.socket.display().to_string(),
                saved: saved_sectors,
                here: self.capacity_sectors(),
            });
        }
        Ok(())
    }

    fn connect_backend(&mut self) -> Result<(), String> {
        if !matches!(self.link, Link::Deferred { .. }) {
            return Ok(());
        }
        let Link::Deferred { find, saved } = std::mem::replace(&mut self.link, Link::Ready) else {
            unreachable!("matched above");
        };
        let socket = find()?;
        let mut backend = Negotiated::connect(&socket, self.backend.queues)
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        if let Some(saved) = saved {
            let was =
                handshake::capacity_sectors(&saved_config(&saved).map_err(|e| e.to_string())?);
            if backend.capacity_sectors() != was {
                return Err(format!(
                    "the disk at {} has {} sectors; the guest saw {was}",
                    socket.display(),
                    backend.capacity_sectors()
                ));
            }
            let gone = saved.avail_features & !backend.guest_features();
            if gone != 0 {
                return Err(format!(
                    "the backend at {} no longer offers features {gone:#x}",
                    socket.display()
                ));
            }
        }
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) = backend.backend_requests.take();
        self.backend = backend;
        self.socket = socket;
        debug!(device = %self.name, socket = %self.socket.display(), "vhost-user-blk backend connected at start");
        Ok(())
    }

    /// Takes effect at the next activation, which acks `VHOST_F_LOG_ALL`
    /// and hands the log over (see `Session::start`).
    fn log_backend_writes(&mut self, log: Option<Arc<BackendLog>>) -> Result<(), String> {
        if self.worker.as_ref().is_some_and(Worker::is_busy) {
            return Err("the device is active".into());
        }
        if log.is_some() && !self.backend.can_log() {
            return Err(format!(
                "the vhost-user backend at {} cannot log its writes to guest memory \
                 (it offers no VHOST_F_LOG_ALL or VHOST_USER_PROTOCOL_F_LOG_SHMFD)",
                self.socket.display()
            ));
        }
        self.log = log;
        Ok(())
    }

    fn backend_connection(&self) -> Option<(&Path, BorrowedFd<'_>)> {
        if !matches!(self.link, Link::Ready) {
            return None;
        }
        // SAFETY: `socket_fd` is the frontend's socket, owned by
        // `self.backend` and open for as long as `self` is borrowed.
        let fd = unsafe { BorrowedFd::borrow_raw(self.backend.socket_fd) };
        Some((&self.socket, fd))
    }
}

/// The config space of a saved device.
fn saved_config(
    saved: &VhostUserBlockSnapshot,
) -> Result<[u8; handshake::CONFIG_LEN], RestoreError> {
    <[u8; handshake::CONFIG_LEN]>::try_from(saved.config.as_slice()).map_err(|_| {
        RestoreError::Invalid(format!(
            "a config space of {} bytes (not {})",
            saved.config.len(),
            handshake::CONFIG_LEN
        ))
    })
}

impl VhostUserBlock {
    /// Fills a handed-over connection in with what the source negotiated.
    fn adopt_saved(&mut self, saved: &VhostUserBlockSnapshot) -> Result<(), RestoreError> {
        if saved.queues != self.backend.queues {
            return Err(RestoreError::QueueCount {
                saved: usize::from(saved.queues),
                here: usize::from(self.backend.queues),
            });
        }
        let config = saved_config(saved)?;
        self.backend
            .adopt_saved(saved.backend_features, saved.protocol_features, config)
            .map_err(|e| RestoreError::Invalid(e.to_string()))?;
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) =
            self.backend.backend_requests.take();
        self.first_start_adopted.store(true, Ordering::Release);
        self.link = Link::Ready;
        Ok(())
    }

    /// Stops the worker's session; see [`VirtioDevice::reset`].
    fn stop(&mut self) {
        let (fd, name, socket) = (self.backend.socket_fd, &self.name, &self.socket);
        if let Some(w) = &mut self.worker {
            w.stop_within(VCPU_DEADLINE, || {
                error!(
                    device = %name,
                    socket = %socket.display(),
                    "the vhost-user backend did not answer within {} s while the device was reset; hung up on it",
                    VCPU_DEADLINE.as_secs()
                );
                hang_up(fd);
            });
        }
    }

    /// Empties the handback slot, returning what it held.
    fn take_queues(&self) -> Option<Vec<Queue>> {
        self.handback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}
