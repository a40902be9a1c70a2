//! Connecting to a vhost-user-blk backend and learning what it offers:
//! SET_OWNER, the virtio and protocol features, the queue count
//! (GET_QUEUE_NUM, with `VHOST_USER_PROTOCOL_F_MQ`), the backend's request
//! channel (SET_BACKEND_REQ_FD, for config-change messages), and the
//! virtio-blk configuration space (GET_CONFIG), which kiln-vmm then serves to
//! the guest from a copy that a config-change message refreshes.
//!
//! The whole handshake has [`START_DEADLINE`]: a backend that accepts the
//! connection and never answers is hung up on (the vhost crate would wait
//! for its reply forever), and the error names the socket.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of `struct virtio_blk_config` read from the backend and shown to the
/// guest (up to `write_zeroes_may_unmap`, as kiln-vmm's own virtio-blk).
pub const CONFIG_LEN: usize = 60;

/// How long the backend has for the whole handshake at start.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a vCPU waits for the backend (activation, reset) before the
/// device hangs up on it.
pub const VCPU_DEADLINE: Duration = Duration::from_secs(5);

/// Where `num_queues` sits in `struct virtio_blk_config`.
const NUM_QUEUES_OFFSET: usize = 34;

/// The virtio features a guest may see when the backend offers them. Left
/// out: `VIRTIO_BLK_F_MQ` (offered only with `queues=` above 1, see
/// [`Negotiated::guest_features`]), `VIRTIO_BLK_F_CONFIG_WCE` (the config
/// space is a read-only copy), packed rings and ACCESS_PLATFORM (not in the
/// transport), and everything kiln-vmm does not know.
pub const SUPPORTED_FEATURES: u64 = (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_GEOMETRY)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_TOPOLOGY)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// The vhost-user protocol features kiln-vmm uses when offered: CONFIG is
/// required; REPLY_ACK makes every message acknowledged, so that a backend
/// refusing one is noticed there rather than later; MQ (required for more
/// than one queue) tells how many queues the backend has; BACKEND_REQ gives
/// the backend a channel for config-change messages (a resized volume).
/// LOG_SHMFD lets a migration hand the backend a dirty log (`log_base`).
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

/// `VHOST_F_LOG_ALL`: the backend logs its writes to guest memory.
pub const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// Why a vhost-user-blk backend cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {}: {}", path.display(), connect_reason(source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("the backend failed {step}: {source}")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the backend does not offer {0}, which kiln-vmm needs")]
    MissingFeature(&'static str),
    #[error("the backend reports a disk of 0 sectors")]
    Empty,
    #[error("the vhost-user backend at {} did not answer within {} s (hung up on it)", path.display(), after.as_secs())]
    NoAnswer { path: PathBuf, after: Duration },
    #[error("queues={asked}, but the vhost-user backend at {} serves {offered}", path.display())]
    TooFewQueues {
        path: PathBuf,
        asked: u16,
        offered: u64,
    },
    #[error("cannot set up the deadline of the handshake: {0}")]
    Deadline(#[source] io::Error),
    #[error("the backend failed SET_LOG_BASE (the dirty log of a migration): {0}")]
    LogBase(#[source] io::Error),
}

fn connect_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is the vhost-user backend running?)".into()
        }
        _ => e.to_string(),
    }
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { step, source }
}

/// The guest-visible config space, shared between the vCPUs that read it
/// and the worker that refreshes it on a config-change message.
pub type SharedConfig = Arc<Mutex<[u8; CONFIG_LEN]>>;

/// Reads the shared config space (a poisoned lock still holds bytes).
pub fn config_bytes(c: &SharedConfig) -> [u8; CONFIG_LEN] {
    *c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers that the backend said its config changed; the worker rereads
/// it (GET_CONFIG) after the message.
#[derive(Default)]
pub struct ConfigChanged(AtomicBool);

impl ConfigChanged {
    /// Whether a config change arrived since the last call.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl VhostUserFrontendReqHandler for ConfigChanged {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.store(true, Ordering::Release);
        Ok(0)
    }
}

/// The frontend's end of the backend's request channel.
pub type BackendRequests = FrontendReqHandler<ConfigChanged>;

/// A connected backend, owned by us (SET_OWNER), with what it offered.
pub struct Negotiated {
    pub frontend: Frontend,
    /// The main socket's descriptor, to hang up on a backend that does not
    /// answer (the frontend's own accessor takes a lock that a stuck request
    /// holds).
    pub socket_fd: RawFd,
    /// The backend's virtio feature bits (GET_FEATURES).
    pub backend_features: u64,
    /// The protocol features acked with SET_PROTOCOL_FEATURES.
    pub protocol_features: VhostUserProtocolFeatures,
    /// The queues kiln-vmm sets up (`queues=`).
    pub queues: u16,
    /// The backend's `struct virtio_blk_config` (GET_CONFIG), `num_queues`
    /// set to `queues`.
    pub config: SharedConfig,
    /// The backend's request channel, when it offered BACKEND_REQ.
    pub backend_requests: Option<BackendRequests>,
    /// Set by a config-change message on that channel.
    pub config_changed: Arc<ConfigChanged>,
}

/// Shuts a socket down both ways: a thread blocked on it (ours or the vhost
/// crate's) gets an error instead of waiting for a reply that never comes.
pub(crate) fn hang_up(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; on a descriptor that is not a
    // socket (or closed) it fails with an error, ignored here.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Hangs up on a socket when a deadline passes, unless disarmed first. Its
/// thread is created when armed: only before the seccomp filters.
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn arm(fd: RawFd, after: Duration) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kiln-vu-deadline".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || match rx.recv_timeout(after) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hang_up(fd);
                    true
                }
                _ => false,
            })?;
        Ok(Self {
            disarm: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the watchdog; returns whether it fired.
    fn disarm(mut self) -> bool {
        self.disarm = None;
        self.thread
            .take()
            .is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Negotiated {
    /// Connects to the backend listening on `socket` and negotiates, for
    /// `queues` queues, within [`START_DEADLINE`].
    pub fn connect(socket: &Path, queues: u16) -> Result<Self, Error> {
        Self::connect_within(socket, queues, START_DEADLINE)
    }

    /// [`Negotiated::connect`] with another deadline.
    pub fn connect_within(socket: &Path, queues: u16, deadline: Duration) -> Result<Self, Error> {
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            path: socket.to_owned(),
            source,
        })?;
        let fd = stream.as_raw_fd();
        let watchdog = Watchdog::arm(fd, deadline).map_err(Error::Deadline)?;
        let result = Self::negotiate(socket, stream, queues);
        if watchdog.disarm() {
            return Err(Error::NoAnswer {
                path: socket.to_owned(),
                after: deadline,
            });
        }
        result
    }

    fn negotiate(socket: &Path, stream: UnixStream, queues: u16) -> Result<Self, Error> {
        let socket_fd = stream.as_raw_fd();
        let queues = queues.max(1);
        let mut frontend = Frontend::from_stream(stream, u64::from(queues));
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::MissingFeature("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::MissingFeature(
                "VHOST_USER_PROTOCOL_F_CONFIG (its disk size would be unknown)",
            ));
        }
        if queues > 1 {
            if !offered.contains(VhostUserProtocolFeatures::MQ) {
                return Err(Error::MissingFeature(
                    "VHOST_USER_PROTOCOL_F_MQ (queues= asks for more than one queue)",
                ));
            }
            if backend_features & (1 << VIRTIO_BLK_F_MQ) == 0 {
                return Err(Error::MissingFeature(
                    "VIRTIO_BLK_F_MQ (queues= asks for more than one queue)",
                ));
            }
        }
        let protocol_features = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol_features)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let offered = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            if offered < u64::from(queues) {
                return Err(Error::TooFewQueues {
                    path: socket.to_owned(),
                    asked: queues,
                    offered,
                });
            }
        }
        let reply_ack = protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let config_changed = Arc::new(ConfigChanged::default());
        let backend_requests = if protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            let mut handler = FrontendReqHandler::new(config_changed.clone()).map_err(|e| {
                step("the backend request channel")(vhost::Error::VhostUserProtocol(e))
            })?;
            handler.set_reply_ack_flag(reply_ack);
            frontend
                .set_backend_request_fd(&handler.get_tx_raw_fd())
                .map_err(step("SET_BACKEND_REQ_FD"))?;
            Some(handler)
        } else {
            None
        };
        let config = read_config(&mut frontend, queues)?;
        let negotiated = Self {
            frontend,
            socket_fd,
            backend_features,
            protocol_features,
            queues,
            config: Arc::new(Mutex::new(config)),
            backend_requests,
            config_changed,
        };
        if negotiated.capacity_sectors() == 0 {
            return Err(Error::Empty);
        }
        Ok(negotiated)
    }

    /// Takes over `stream`, a connection another kiln-vmm negotiated and
    /// handed over (a migration on this host), sending nothing: what was
    /// negotiated comes from the saved device ([`Negotiated::adopt_saved`])
    /// and the backend hears from us only when the device is activated.
    pub fn adopted(stream: UnixStream, queues: u16) -> Self {
        let socket_fd = stream.as_raw_fd();
        let queues = queues.max(1);
        Self {
            frontend: Frontend::from_stream(stream, u64::from(queues)),
            socket_fd,
            backend_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
            queues,
            config: Arc::new(Mutex::new([0u8; CONFIG_LEN])),
            backend_requests: None,
            config_changed: Arc::new(ConfigChanged::default()),
        }
    }

    /// Fills an adopted connection in with what was negotiated on it.
    /// With BACKEND_REQ a new request channel is made here, to be given to
    /// the backend (SET_BACKEND_REQ_FD) at the next activation.
    pub fn adopt_saved(
        &mut self,
        backend_features: u64,
        protocol_features: u64,
        config: [u8; CONFIG_LEN],
    ) -> Result<(), Error> {
        let protocol_features = VhostUserProtocolFeatures::from_bits_truncate(protocol_features)
            & WANTED_PROTOCOL_FEATURES;
        // Replies are asked for (NEED_REPLY) only once the first start has
        // agreed on REPLY_ACK again (`Session::adopted`).
        let reply_ack = protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut handler =
                FrontendReqHandler::new(self.config_changed.clone()).map_err(|e| {
                    step("the backend request channel")(vhost::Error::VhostUserProtocol(e))
                })?;
            handler.set_reply_ack_flag(reply_ack);
            self.backend_requests = Some(handler);
        }
        self.backend_features = backend_features;
        self.protocol_features = protocol_features;
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The features offered to the guest: the backend's, as far as kiln-vmm
    /// supports them.
    pub fn guest_features(&self) -> u64 {
        let mq = if self.queues > 1 {
            1 << VIRTIO_BLK_F_MQ
        } else {
            0
        };
        self.backend_features & (SUPPORTED_FEATURES | mq)
    }

    /// The features to acknowledge with SET_FEATURES once the driver has
    /// accepted `driver_features` (a subset of [`Negotiated::guest_features`]):
    /// those plus `VHOST_USER_F_PROTOCOL_FEATURES`, which the backend offered.
    pub fn backend_ack(&self, driver_features: u64) -> u64 {
        (driver_features & self.guest_features())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Whether the backend can log the guest pages it writes for a
    /// migration (`VHOST_F_LOG_ALL` offered, `LOG_SHMFD` acked).
    pub fn can_log(&self) -> bool {
        self.backend_features & LOG_ALL != 0
            && self
                .protocol_features
                .contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// The disk size in 512-byte sectors (`capacity`).
    pub fn capacity_sectors(&self) -> u64 {
        capacity_sectors(&config_bytes(&self.config))
    }
}

/// `capacity` of a `struct virtio_blk_config`.
pub fn capacity_sectors(config: &[u8; CONFIG_LEN]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&config[..8]);
    u64::from_le_bytes(b)
}

/// The backend's config space (GET_CONFIG), with `num_queues` = `queues`
/// (the backend may have more than kiln-vmm sets up).
pub fn read_config(frontend: &mut Frontend, queues: u16) -> Result<[u8; CONFIG_LEN], Error> {
    let (_, payload) = frontend
        .get_config(
            0,
            CONFIG_LEN as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_LEN],
        )
        .map_err(step("GET_CONFIG"))?;
    let mut config = [0u8; CONFIG_LEN];
    // get_config checked that the payload has the size we asked for.
    config.copy_from_slice(&payload[..CONFIG_LEN]);
    config[NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2].copy_from_slice(&queues.to_le_bytes());
    Ok(config)
}
