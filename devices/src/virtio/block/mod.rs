//! virtio-blk: a disk backed by a [`BlockBackend`].
//!
//! `request` parses guest requests (pure, fuzzable); `inflight` serves a
//! queue with many requests in flight, starting reads, writes and flushes
//! on an `engine` (io_uring, or a thread pool where io_uring is missing)
//! with iovecs into guest memory and completing them as they finish; `io`
//! runs the rest (and unaligned direct I/O) synchronously through a bounce
//! buffer; `worker` is the epoll loop of the device's thread (all its queues);
//! `device` the model the transport sees (`VIRTIO_BLK_F_MQ` with several
//! queues); `raw` the raw-image backend.

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
