//! The block I/O interface a vhost-user-blk backend (or anything else that
//! serves a volume) calls.

use crate::error::Result;
use crate::iobuf::IoBuf;

/// Block I/O on one volume. Offsets and lengths are in bytes; the store
/// works in 4 KiB blocks, and unaligned requests are read-modify-written
/// (a backend should advertise a 4 KiB block size to avoid that).
pub trait VolumeIo: Send + Sync {
    /// Volume size in bytes.
    fn size(&self) -> Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// `len` bytes at `offset` in a buffer of the implementation's own
    /// (one it would otherwise copy into the caller's).
    fn read_vec(&self, offset: u64, len: usize) -> Result<IoBuf> {
        read_into_new(self, offset, len)
    }
    /// [`VolumeIo::read_vec`] of each `(offset, len)`, each with its own
    /// outcome, in order. An implementation that can read several ranges
    /// at once (submitting them to the disk together) does; by default
    /// they are read one after another.
    fn read_batch(&self, reads: &[(u64, usize)]) -> Vec<Result<IoBuf>> {
        reads.iter().map(|&(o, l)| self.read_vec(o, l)).collect()
    }
    /// Whether reads are served by this node's disk (it holds an in-sync
    /// replica), so that [`VolumeIo::read_batch`] waits for that disk only.
    /// A hint, as [`VolumeIo::writes_stay_local`].
    fn reads_stay_local(&self) -> bool {
        false
    }
    /// Returns once every healthy replica has the data.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// [`VolumeIo::write_at`] of a buffer the caller no longer needs: an
    /// implementation that would copy the data anyway (to encrypt it, or
    /// to hand it to the replicas) takes it as it is instead.
    fn write_vec(&self, buf: IoBuf, offset: u64) -> Result<()> {
        self.write_at(&buf, offset)
    }
    /// Durability barrier on every replica (virtio-blk flush).
    fn flush(&self) -> Result<()>;
    /// Unmaps the range (reads then return zeros); frees whole extents.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes the range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }
    /// Whether writes go to this node's disk only (every replica that gets
    /// them is local): no network round trip, so a small write is quick
    /// and a caller may serve it on a thread it does not want to block for
    /// long. A hint; false unless the implementation knows.
    fn writes_stay_local(&self) -> bool {
        false
    }
}

/// [`VolumeIo::read_at`] into a zeroed buffer of its own: what `read_vec`
/// does where an implementation has no buffer to hand over.
pub fn read_into_new<T: VolumeIo + ?Sized>(io: &T, offset: u64, len: usize) -> Result<IoBuf> {
    let mut buf = IoBuf::zeroed(len);
    io.read_at(&mut buf, offset)?;
    Ok(buf)
}
