//! Blocks in a slab slot: verified reads, writes with their sidecar
//! checksums, writeback, and freeing a slot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::{SIDECAR_SIZE, SLOTS_PER_SLAB, SLOT_SIZE};
use crate::checksum::{block_crc, zero_crc, Entry, ENTRY_SIZE};
use crate::error::Result;
use crate::iobuf::IoBuf;
use crate::{BLOCK_SIZE, EXTENT_SIZE};

/// Reads blocks starting at block `b0` of the extent slot at byte `base` of
/// slab `f` into `buf` and verifies them; returns the indexes (relative to
/// `b0`) that failed, zeroed in `buf`. Never-written blocks read as zeros.
///
/// The data comes through `direct` (the same slab opened `O_DIRECT`) when
/// there is one and `buf` starts on a block boundary in memory: the disk
/// fills `buf` itself, with no page-cache page to fill, copy and reclaim
/// later (the guest above keeps its own cache). The kernel writes any dirty
/// page of the range back before such a read, so it sees every write that
/// returned before it. The sidecar entries, small and rewritten with every
/// write, are read through the page cache.
pub(super) fn read_blocks(
    f: &File,
    direct: Option<&File>,
    base: u64,
    b0: u64,
    buf: &mut [u8],
) -> Result<Vec<u64>> {
    let mut side = vec![0u8; sidecar_len(buf.len())];
    f.read_exact_at(&mut side, sidecar_at(base, b0))?;
    let at = base + b0 * BLOCK_SIZE;
    match direct.filter(|_| is_block_aligned(buf)) {
        Some(d) => {
            if let Err(e) = d.read_exact_at(buf, at) {
                // A file system may refuse a direct read it accepted at
                // open; the page cache still serves it.
                tracing::debug!(error = %e, "direct read refused; reading through the page cache");
                f.read_exact_at(buf, at)?;
            }
        }
        None => f.read_exact_at(buf, at)?,
    }
    Ok(verify_blocks(&side, buf))
}

/// Bytes of sidecar entries that cover `data_len` bytes of blocks.
pub(super) fn sidecar_len(data_len: usize) -> usize {
    data_len / BLOCK_SIZE as usize * ENTRY_SIZE
}

/// Where in a slab the sidecar entry of block `b0` of the slot at `base` is.
pub(super) fn sidecar_at(base: u64, b0: u64) -> u64 {
    base + EXTENT_SIZE + b0 * ENTRY_SIZE as u64
}

/// Checks the blocks in `buf` read against their sidecar entries `side`
/// (read before them); zeroes never-written blocks and those that fail,
/// and returns the indexes of the failed ones.
pub(super) fn verify_blocks(side: &[u8], buf: &mut [u8]) -> Vec<u64> {
    let n = buf.len() / BLOCK_SIZE as usize;
    let mut bad = Vec::new();
    for i in 0..n {
        let e = Entry::decode(&side[i * ENTRY_SIZE..]);
        let blk = &mut buf[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
        if e.is_unwritten() {
            blk.fill(0);
        } else if !e.accepts(block_crc(blk)) {
            blk.fill(0);
            bad.push(i as u64);
        }
    }
    bad
}

/// Whether `buf` may be the buffer of an `O_DIRECT` read: its address and
/// length are multiples of the block size.
pub(super) fn is_block_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(BLOCK_SIZE as usize) == 0 && buf.len() % BLOCK_SIZE as usize == 0
}

/// Writes whole blocks starting at block `b0` of the extent slot at byte
/// `base` of slab `f`, in the three crash-safe steps described in
/// [`crate::checksum`].
///
/// With `direct` (the slab opened `O_DIRECT`; the engine passes it for
/// large writes) the data goes to the disk without a page-cache copy to
/// make, write back and reclaim later, as QEMU's `cache=none` does; small
/// writes stay buffered, where the page cache absorbs them far faster than
/// a synchronous disk write. The kernel keeps the two coherent: a direct
/// write first writes back dirty pages of its range and drops the cached
/// ones after it. Durability is the flush's business either way (the data
/// may sit in the disk's volatile cache until its `fdatasync`), and each
/// step still completes before the next begins, so a `kill -9` leaves
/// every block verifying as before.
pub(super) fn write_blocks(
    f: &File,
    direct: Option<&File>,
    base: u64,
    b0: u64,
    data: &[u8],
) -> Result<()> {
    let n = data.len() / BLOCK_SIZE as usize;
    let side_off = base + EXTENT_SIZE + b0 * ENTRY_SIZE as u64;
    let mut side = vec![0u8; n * ENTRY_SIZE];
    f.read_exact_at(&mut side, side_off)?;
    let mut crcs = Vec::with_capacity(n);
    for i in 0..n {
        let old = Entry::decode(&side[i * ENTRY_SIZE..]);
        let new = block_crc(&data[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize]);
        let on_disk = if old.is_unwritten() {
            zero_crc()
        } else if old.current == old.previous {
            old.current
        } else {
            // A previous write was cut short: find out which version the
            // block holds. If neither verifies, keep `current` so that the
            // damage stays visible.
            let mut blk = vec![0u8; BLOCK_SIZE as usize];
            f.read_exact_at(&mut blk, base + (b0 + i as u64) * BLOCK_SIZE)?;
            let c = block_crc(&blk);
            if old.accepts(c) {
                c
            } else {
                old.current
            }
        };
        Entry {
            current: new,
            previous: on_disk,
        }
        .encode(&mut side[i * ENTRY_SIZE..]);
        crcs.push(new);
    }
    f.write_all_at(&side, side_off)?;
    let at = base + b0 * BLOCK_SIZE;
    match direct {
        Some(d) => write_direct(f, d, at, data)?,
        None => f.write_all_at(data, at)?,
    }
    for (i, c) in crcs.into_iter().enumerate() {
        Entry {
            current: c,
            previous: c,
        }
        .encode(&mut side[i * ENTRY_SIZE..]);
    }
    f.write_all_at(&side, side_off)?;
    Ok(())
}

/// Writes `data` at `at` through `direct` (`O_DIRECT`), from a
/// block-aligned copy if `data` is not aligned in memory; through the page
/// cache (`f`) if the file system refuses the direct write.
fn write_direct(f: &File, direct: &File, at: u64, data: &[u8]) -> Result<()> {
    let r = if is_block_aligned(data) {
        super::uring::write_all_at(direct, data, at)
    } else {
        let buf = IoBuf::copy_from(data);
        if buf.is_aligned() {
            super::uring::write_all_at(direct, &buf, at)
        } else {
            // No aligned buffer could be had.
            return Ok(f.write_all_at(data, at)?);
        }
    };
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(error = %e, "direct write refused; writing through the page cache");
            Ok(f.write_all_at(data, at)?)
        }
        r => Ok(r?),
    }
}

/// Disk space held by the slabs of data dir `dir`, in bytes (what `du`
/// would say: holes of free slots do not count).
pub fn slab_space(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for ent in std::fs::read_dir(dir.join("slabs"))? {
        total += ent?.metadata()?.blocks() * 512;
    }
    Ok(total)
}

/// Tells the kernel that slab `f` is read at random: no readahead. A read
/// wants one block's data (direct) or one sidecar page; readahead would
/// fetch the pages after it, which belong to the next slot, an unrelated
/// extent.
pub(super) fn advise_random(f: &File) {
    // SAFETY: plain syscall on a valid, owned fd with no pointers involved.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::from_raw_os_error(rc), "posix_fadvise(RANDOM) refused");
    }
}

/// Starts writing `[off, off+len)` of `f` to disk without waiting for it.
/// Large sequential writes would otherwise sit in the page cache until the
/// next flush, which then waits for all of them at once; started early,
/// the disk works while the guest keeps writing and the flush finds little
/// left to do. A failure only loses the head start.
pub(super) fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: plain syscall on a valid, owned fd with no pointers involved.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Makes `slot` of slab `f` read as zeros and gives its space back: a hole
/// is punched over it, or, where the file system cannot punch holes, its
/// sidecar is zeroed (which makes every block read as never written).
pub(super) fn clear_slot(f: &File, slot: u64) -> Result<()> {
    let base = (slot % SLOTS_PER_SLAB) * SLOT_SIZE;
    // SAFETY: fallocate on a valid, owned fd with no pointers involved.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            base as libc::off_t,
            SLOT_SIZE as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err.into());
    }
    f.write_all_at(&[0u8; SIDECAR_SIZE as usize], base + EXTENT_SIZE)?;
    Ok(())
}
