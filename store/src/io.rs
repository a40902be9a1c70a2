//! The block I/O interface a vhost-user-blk backend (or anything else that
//! serves a volume) calls.

use crate::error::Result;
use crate::iobuf::IoBuf;

/// What [`VolumeIo::read_batch_each`] hands a round of finished reads to:
/// each one's index in the batch and its outcome.
pub type ReadsDone<'a> = dyn FnMut(Vec<(usize, Result<IoBuf>)>) + 'a;

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
    /// outcome, in order ([`VolumeIo::read_batch_each`], gathered).
    fn read_batch(&self, reads: &[(u64, usize)]) -> Vec<Result<IoBuf>> {
        let mut out: Vec<Option<Result<IoBuf>>> = (0..reads.len()).map(|_| None).collect();
        self.read_batch_each(reads, &mut |round| {
            for (i, got) in round {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(got);
                }
            }
        });
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(crate::Error::Io("no answer for a read of a batch".into())))
            })
            .collect()
    }
    /// [`VolumeIo::read_vec`] of each `(offset, len)`, each handed to
    /// `done` with its index as soon as it is read, in rounds (each call
    /// gets those finished since the previous one), so that a caller can
    /// pass each on while the others are still being read. Every read is
    /// reported exactly once, before this returns. An implementation that
    /// can read several ranges at once (submitting them to the disk
    /// together) does; by default they are read one after another.
    fn read_batch_each(&self, reads: &[(u64, usize)], done: &mut ReadsDone) {
        for (i, &(o, l)) in reads.iter().enumerate() {
            done(vec![(i, self.read_vec(o, l))]);
        }
    }
    /// Whether reads are served by this node's disk (it holds an in-sync
    /// replica), so that [`VolumeIo::read_batch_each`] waits for that disk only.
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
