//! Where a virtio-blk device keeps its data.
//!
//! The device model only speaks [`BlockBackend`]; a raw file
//! ([`super::raw::RawFile`]) is its one implementation. A kiln-store volume
//! reaches a guest another way: the store serves it over vhost-user-blk, and
//! kiln-vmm's vhost-user device hands the queues to it. Offsets and lengths
//! are in bytes and, coming from a parsed request, always lie inside
//! `[0, capacity)`.

use std::io;
use std::os::fd::RawFd;

/// How a backend's file takes asynchronous, vectored I/O straight from guest
/// buffers (see `super::engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncIo {
    /// The file the engine reads, writes and syncs; it stays open as long as
    /// the backend.
    pub fd: RawFd,
    /// Buffer addresses, lengths and file offsets must be multiples of this
    /// (1 for buffered I/O; the direct-I/O block with `O_DIRECT`). Requests
    /// that are not go through [`BlockBackend::read_at`] and
    /// [`BlockBackend::write_at`].
    pub align: u64,
}

/// Storage behind a virtio-blk device. Methods take `&self` so that a backend
/// can be shared between the device and its worker thread.
pub trait BlockBackend: Send + Sync {
    /// The size of the disk in bytes.
    fn capacity(&self) -> u64;

    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// Tells the backend that `len` bytes at `offset` are no longer needed;
    /// they may read back as anything afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read back as zeroes; with `unmap` the
    /// backend may deallocate them.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// Whether `discard` does anything useful (sets `VIRTIO_BLK_F_DISCARD`).
    fn supports_discard(&self) -> bool {
        true
    }

    /// Whether `write_zeroes` is supported (sets `VIRTIO_BLK_F_WRITE_ZEROES`).
    fn supports_write_zeroes(&self) -> bool {
        true
    }

    /// The file descriptor reads, writes and flushes may go to directly,
    /// many at once, with `preadv`/`pwritev`/`fdatasync` semantics; `None`
    /// (the default) runs every request through the methods above.
    fn async_io(&self) -> Option<AsyncIo> {
        None
    }
}
