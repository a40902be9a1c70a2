//! Connecting to a vhost-user-blk backend and learning what it offers:
//! SET_OWNER, the virtio and protocol features, and the virtio-blk
//! configuration space (GET_CONFIG), which kiln-vmm then serves to the guest
//! from this copy.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of `struct virtio_blk_config` read from the backend and shown to the
/// guest (up to `write_zeroes_may_unmap`, as kiln-vmm's own virtio-blk).
pub const CONFIG_LEN: usize = 60;

/// The queues kiln-vmm sets up: one (no `VIRTIO_BLK_F_MQ` for the guest).
pub const QUEUE_COUNT: usize = 1;

/// The virtio features a guest may see when the backend offers them. Left
/// out: `VIRTIO_BLK_F_MQ` (one queue), `VIRTIO_BLK_F_CONFIG_WCE` (the config
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
/// refusing one is noticed there rather than later.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::CONFIG.union(VhostUserProtocolFeatures::REPLY_ACK);

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

/// A connected backend, owned by us (SET_OWNER), with what it offered.
pub struct Negotiated {
    pub frontend: Frontend,
    /// The backend's virtio feature bits (GET_FEATURES).
    pub backend_features: u64,
    /// The protocol features acked with SET_PROTOCOL_FEATURES.
    pub protocol_features: VhostUserProtocolFeatures,
    /// The backend's `struct virtio_blk_config` (GET_CONFIG).
    pub config: [u8; CONFIG_LEN],
}

impl Negotiated {
    /// Connects to the backend listening on `socket` and negotiates.
    pub fn connect(socket: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            path: socket.to_owned(),
            source,
        })?;
        let mut frontend = Frontend::from_stream(stream, QUEUE_COUNT as u64);
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
        let protocol_features = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol_features)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
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
        let negotiated = Self {
            frontend,
            backend_features,
            protocol_features,
            config,
        };
        if negotiated.capacity_sectors() == 0 {
            return Err(Error::Empty);
        }
        Ok(negotiated)
    }

    /// The features offered to the guest: the backend's, as far as kiln-vmm
    /// supports them.
    pub fn guest_features(&self) -> u64 {
        self.backend_features & SUPPORTED_FEATURES
    }

    /// The features to acknowledge with SET_FEATURES once the driver has
    /// accepted `driver_features` (a subset of [`Negotiated::guest_features`]):
    /// those plus `VHOST_USER_F_PROTOCOL_FEATURES`, which the backend offered.
    pub fn backend_ack(&self, driver_features: u64) -> u64 {
        (driver_features & self.guest_features())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The disk size in 512-byte sectors (`capacity`).
    pub fn capacity_sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(b)
    }
}
