//! virtio-blk: a disk backed by a [`BlockBackend`].
//!
//! `request` parses guest requests (pure, fuzzable), `io` runs them against
//! the backend, `worker` is the thread serving the queue, `device` the model
//! the transport sees, `raw` the raw-image backend.

pub mod backend;
pub mod device;
pub mod engine;
pub mod inflight;
pub mod io;
pub mod raw;
pub mod request;
mod worker;

#[cfg(test)]
mod tests;

pub use backend::{AsyncIo, BlockBackend};
pub use device::{Block, BlockConfig, Error};
pub use raw::{RawFile, RawFileError};
