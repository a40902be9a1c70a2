//! vhost-user-blk backend: serves a volume attached to this daemon to a VMM
//! (kiln-vmm `--disk vhost-user=SOCK`, QEMU's `vhost-user-blk`, ...) over a
//! unix socket, using rust-vmm's `vhost-user-backend`.
//!
//! - [`config`]: the virtio-blk features and config space offered.
//! - [`request`]: parsing and executing one request from a descriptor chain
//!   (all guest input validated; a bad request gets an error status).
//! - [`backend`]: the `VhostUserBackend` (queue processing, EVENT_IDX).
//! - [`workers`]: the threads that serve requests of all queues at once.
//! - [`stats`]: counters of a frontend connection, logged when it ends.
//! - [`gate`]: what makes a stopped ring (GET_VRING_BASE) settled.
//! - [`export`]: the listening socket and its accept / serve / reconnect loop.
//! - [`relay`]: the frontend's connection relayed to the library, keeping
//!   the backend-request channel (config-change messages).

pub mod backend;
pub mod config;
pub mod export;
pub mod gate;
pub mod relay;
pub mod request;
pub mod stats;
pub mod workers;

use std::sync::Arc;

pub use config::ExportOptions;
pub use export::Export;

/// Resolves the volume's block I/O at request time, so an export keeps
/// working across a re-attach (a new writer) of the same volume.
pub type VolumeSource = Arc<dyn Fn() -> crate::Result<Arc<dyn crate::VolumeIo>> + Send + Sync>;

/// Errors setting up an export.
#[derive(Debug, thiserror::Error)]
pub enum VhostBlkError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
    #[error("bad export options: {0}")]
    Options(String),
    #[error("{0} exists and is not a socket")]
    NotASocket(String),
    #[error("cannot start the export thread: {0}")]
    Thread(#[from] std::io::Error),
}
