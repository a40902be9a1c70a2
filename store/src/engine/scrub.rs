//! Checking what is on disk: region digests and allocation (to compare
//! replicas), scrub, adopting torn blocks after a power loss, repair.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::{
    ext_count, write_blocks, BadBlock, Engine, RegionDigest, SIDECAR_SIZE, SLOTS_PER_SLAB,
    SLOT_SIZE,
};
use crate::checksum::{block_crc, Entry, ENTRY_SIZE};
use crate::error::{Error, Result};
use crate::{BLOCKS_PER_EXTENT, BLOCK_SIZE, EXTENT_SIZE};

impl Engine {
    /// The digest of region `idx` of the live volume: crc32c of what it
    /// reads (zeros where unallocated, so a discarded region and one of
    /// written zeros compare equal).
    pub fn region_digest(&self, name: &str, idx: u64) -> Result<RegionDigest> {
        let size = {
            let st = self.lock();
            let rec = Self::vol(&st, name)?;
            if idx >= ext_count(rec.size) {
                return Err(Error::Invalid(format!("region {idx} is beyond the volume")));
            }
            rec.size
        };
        let start = idx * EXTENT_SIZE;
        let out = self.read(name, start, EXTENT_SIZE.min(size - start))?;
        Ok(RegionDigest {
            crc: crate::crc::crc32c(&out.data),
            bad: !out.bad_blocks.is_empty(),
        })
    }

    /// Is region (extent) `idx` of the live volume allocated?
    pub fn region_allocated(&self, name: &str, idx: u64) -> Result<bool> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        if idx >= ext_count(rec.size) {
            return Err(Error::Invalid(format!("region {idx} is beyond the volume")));
        }
        Ok(st.maps.contains_key(&(rec.map, idx)))
    }

    /// Re-reads and verifies every allocated block of the live volume.
    /// `pace` is called after each extent with the bytes read (for rate
    /// limiting and progress). Returns the blocks that failed.
    pub fn scrub(&self, name: &str, mut pace: impl FnMut(u64, u64)) -> Result<Vec<BadBlock>> {
        let n = ext_count(self.info(name)?.size);
        let mut bad = Vec::new();
        for idx in 0..n {
            {
                let mut st = self.lock();
                let rec = Self::vol(&st, name)?;
                let map = rec.map;
                if let Some(id) = st.maps.get(&(map, idx)).copied() {
                    let (f, base, _) = self.locate(&mut st, id)?;
                    let mut buf = vec![0u8; EXTENT_SIZE as usize];
                    let mut side = vec![0u8; SIDECAR_SIZE as usize];
                    f.read_exact_at(&mut buf, base)?;
                    f.read_exact_at(&mut side, base + EXTENT_SIZE)?;
                    for b in 0..BLOCKS_PER_EXTENT as usize {
                        let e = Entry::decode(&side[b * ENTRY_SIZE..]);
                        if e.is_unwritten() {
                            continue;
                        }
                        let blk = &buf[b * BLOCK_SIZE as usize..(b + 1) * BLOCK_SIZE as usize];
                        if !e.accepts(block_crc(blk)) {
                            bad.push(BadBlock {
                                block: idx * BLOCKS_PER_EXTENT + b as u64,
                                current: e.current,
                                previous: e.previous,
                            });
                        }
                    }
                    self.metrics
                        .scrubbed_bytes
                        .fetch_add(EXTENT_SIZE, Ordering::Relaxed);
                }
            }
            pace(idx + 1, n);
        }
        self.metrics
            .checksum_errors
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(bad)
    }

    /// After a crash: every written block of `regions` (of the live volume)
    /// that fails its checksum gets the checksum of what it holds. Only for
    /// regions written since the last flush (the activity log): a power
    /// loss can leave a block there with data and checksum from different,
    /// unacknowledged writes on every replica, and any of those contents is
    /// a valid outcome. Returns the number of blocks adopted.
    pub fn adopt_torn(&self, name: &str, epoch: u64, regions: &[u64]) -> Result<u64> {
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?;
        Self::check_epoch(rec, epoch)?;
        if regions.iter().any(|r| *r >= ext_count(rec.size)) {
            return Err(Error::Invalid("region beyond the volume".into()));
        }
        let map = rec.map;
        let mut adopted = 0;
        for &idx in regions {
            let Some(id) = st.maps.get(&(map, idx)).copied() else {
                continue;
            };
            let (f, base, slab) = self.locate(&mut st, id)?;
            let mut buf = vec![0u8; EXTENT_SIZE as usize];
            let mut side = vec![0u8; SIDECAR_SIZE as usize];
            f.read_exact_at(&mut buf, base)?;
            f.read_exact_at(&mut side, base + EXTENT_SIZE)?;
            let mut changed = false;
            for b in 0..BLOCKS_PER_EXTENT as usize {
                let e = Entry::decode(&side[b * ENTRY_SIZE..]);
                let c = block_crc(&buf[b * BLOCK_SIZE as usize..(b + 1) * BLOCK_SIZE as usize]);
                if !e.is_unwritten() && !e.accepts(c) {
                    Entry {
                        current: c,
                        previous: c,
                    }
                    .encode(&mut side[b * ENTRY_SIZE..]);
                    changed = true;
                    adopted += 1;
                }
            }
            if changed {
                f.write_all_at(&side, base + EXTENT_SIZE)?;
                st.unsynced.insert(slab);
            }
        }
        if adopted > 0 {
            tracing::warn!(
                volume = name,
                blocks = adopted,
                "took torn blocks of unflushed writes as they are"
            );
        }
        Ok(adopted)
    }

    /// Rewrites block `bad.block` with `data` if its sidecar entry is still
    /// the one seen when it failed (no write came in between). Returns
    /// whether it was repaired.
    pub fn repair_block(&self, name: &str, bad: BadBlock, data: &[u8]) -> Result<bool> {
        if data.len() as u64 != BLOCK_SIZE {
            return Err(Error::Invalid("repair needs exactly one block".into()));
        }
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?;
        let idx = bad.block / BLOCKS_PER_EXTENT;
        let Some(id) = st.maps.get(&(rec.map, idx)).copied() else {
            return Ok(false);
        };
        let (f, base, slab) = self.locate(&mut st, id)?;
        let b = bad.block % BLOCKS_PER_EXTENT;
        let mut e = [0u8; ENTRY_SIZE];
        f.read_exact_at(&mut e, base + EXTENT_SIZE + b * ENTRY_SIZE as u64)?;
        let e = Entry::decode(&e);
        if e.current != bad.current || e.previous != bad.previous {
            return Ok(false);
        }
        write_blocks(&f, None, base, b, data)?;
        st.unsynced.insert(slab);
        self.metrics.repaired_blocks.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Where block `block` of volume `name` lives: (extent file, byte
    /// offset of the block in it). For tests and debugging.
    pub fn block_location(&self, name: &str, block: u64) -> Result<Option<(PathBuf, u64)>> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        let idx = block / BLOCKS_PER_EXTENT;
        Ok(st.maps.get(&(rec.map, idx)).map(|id| {
            let e = st.extents[id];
            (
                self.slab_path(e.disk, e.slot / SLOTS_PER_SLAB),
                (e.slot % SLOTS_PER_SLAB) * SLOT_SIZE + (block % BLOCKS_PER_EXTENT) * BLOCK_SIZE,
            )
        }))
    }
}
