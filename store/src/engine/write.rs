//! The write path of the engine: logging the regions a write touches in
//! the activity log (durably, before the data; ahead of a sequential run),
//! the three pwrites per block, and discards. Several writes of one volume
//! may run at once (the writer never sends two that overlap): each counts
//! its regions as being written until its data is in, so that a flush
//! keeps them logged ([`Engine::flush_keep_hot`]).

use std::fs::File;
use std::sync::Arc;

use super::{
    ext_count, start_writeback, write_blocks, Batch, Engine, VolumeRec, LARGE_WRITE, LOG_AHEAD,
    LOG_BEHIND,
};
use crate::error::Result;
use crate::{validate_name, BLOCK_SIZE, EXTENT_SIZE, MAX_IO};

impl Engine {
    pub(super) fn note_regions(
        rec: &mut VolumeRec,
        epoch: u64,
        regions: &[u64],
        stale: &[String],
    ) -> bool {
        let mut changed = false;
        for &r in regions {
            changed |= rec.activity.entry(epoch).or_default().insert(r);
            for p in stale {
                changed |= rec.stale.entry(p.clone()).or_default().insert(r);
            }
        }
        changed
    }

    /// Regions to add to the activity log ahead of a write to
    /// `[first, last]` that extends a run already in the log (sequential
    /// I/O), so that the run costs one durable commit per
    /// [`LOG_AHEAD`] regions instead of one per region. Logging a region
    /// that is not written only means it is compared after a crash.
    ///
    /// With several sequential writes in flight at once the run's regions
    /// arrive a little out of order, so a write that starts up to
    /// [`LOG_BEHIND`] regions past the run's logged end extends it too (the
    /// gap is logged with it).
    pub(super) fn log_ahead(rec: &VolumeRec, epoch: u64, first: u64, last: u64) -> Vec<u64> {
        let Some(log) = rec.activity.get(&epoch) else {
            return Vec::new();
        };
        if log.contains(&last) {
            return Vec::new();
        }
        let Some(back) = (1..=LOG_BEHIND).find(|k| first >= *k && log.contains(&(first - k)))
        else {
            return Vec::new();
        };
        let end = (last + LOG_AHEAD).min(ext_count(rec.size).saturating_sub(1));
        (first + 1 - back..=end)
            .filter(|r| *r < first || *r > last)
            .collect()
    }

    /// Would [`Engine::note_regions`] change `rec`?
    pub(super) fn notes_missing(
        rec: &VolumeRec,
        epoch: u64,
        regions: &[u64],
        stale: &[String],
    ) -> bool {
        let logged = rec.activity.get(&epoch);
        regions.iter().any(|r| {
            !logged.is_some_and(|l| l.contains(r))
                || stale
                    .iter()
                    .any(|p| !rec.stale.get(p).is_some_and(|s| s.contains(r)))
        })
    }

    /// Writes `data` at `offset` (both multiples of 4 KiB) under `epoch`.
    /// `stale` names the replicas that miss this write: their dirty maps
    /// here gain the regions written. Metadata changes are durable before
    /// the data is written; data reaches the page cache before return.
    pub fn write(
        &self,
        name: &str,
        epoch: u64,
        offset: u64,
        data: &[u8],
        stale: &[String],
    ) -> Result<()> {
        for s in stale {
            validate_name(s)?;
        }
        let mut st = self.lock();
        // The record is only looked at here; it is cloned (activity log,
        // dirty maps and all) only when this write changes it.
        let rec = Self::vol(&st, name)?;
        Self::check_epoch(rec, epoch)?;
        Self::check_range(rec.size, offset, data.len() as u64, MAX_IO)?;
        if data.is_empty() {
            return Ok(());
        }
        let map = rec.map;
        let first = offset / EXTENT_SIZE;
        let last = (offset + data.len() as u64 - 1) / EXTENT_SIZE;
        let regions: Vec<u64> = (first..=last).collect();
        let mut batch = Batch::default();
        let mut ids = Vec::new();
        for &idx in &regions {
            ids.push(self.prepare_extent(&mut st, &mut batch, map, idx)?);
        }
        st.recent
            .entry(name.to_string())
            .or_default()
            .extend(&regions);
        let places = ids
            .iter()
            .map(|id| self.locate(&mut st, *id))
            .collect::<Result<Vec<_>>>()?;
        // Large writes go around the page cache (see `write_blocks`).
        let directs: Vec<Option<Arc<File>>> = places
            .iter()
            .map(|p| {
                (data.len() as u64 >= LARGE_WRITE)
                    .then(|| self.direct_slab(&mut st, p.2))
                    .flatten()
            })
            .collect();
        let rec = Self::vol(&st, name)?;
        let changed = Self::notes_missing(rec, epoch, &regions, stale);
        let wait = if changed {
            let ahead = Self::log_ahead(rec, epoch, first, last);
            let mut rec = rec.clone();
            Self::note_regions(&mut rec, epoch, &regions, stale);
            Self::note_regions(&mut rec, epoch, &ahead, &[]);
            // The activity log must be durable before the data lands (the
            // regions may differ between replicas after a power loss). The
            // node-wide lock is let go meanwhile: other volumes, and this
            // volume's writes to other blocks, go on. The writer never has
            // two writes of the same blocks in flight at once, so nothing
            // else touches these blocks until we are done.
            batch.volumes.push((name.to_string(), Some(rec.clone())));
            st.volumes.insert(name.to_string(), rec);
            let pending = self.meta.commit_pending(&batch)?;
            st.log_pending.insert(name.to_string(), pending);
            Some(pending)
        } else {
            // Only allocations: they must survive kill -9 before the write is
            // acknowledged, and reach the disk by the next flush.
            self.meta.commit_logged(&batch)?;
            // The regions are logged, but maybe by a concurrent write whose
            // commit is not durable yet: wait for it too.
            st.log_pending.get(name).copied()
        };
        let counts = st.writing.entry(name.to_string()).or_default();
        for &r in &regions {
            *counts.entry(r).or_default() += 1;
        }
        drop(st);
        let r = self.write_logged(offset, data, &regions, &places, &directs, wait);
        self.lock().end_writing(name, &regions);
        r
    }

    /// The rest of [`Engine::write`], once the regions are logged.
    fn write_logged(
        &self,
        offset: u64,
        data: &[u8],
        regions: &[u64],
        places: &[(Arc<File>, u64, (u32, u64))],
        directs: &[Option<Arc<File>>],
        wait: Option<crate::meta::Pending>,
    ) -> Result<()> {
        if let Some(p) = wait {
            self.meta.make_durable(p)?;
        }
        let mut pos = 0usize;
        let mut written = Vec::new();
        for (i, &idx) in regions.iter().enumerate() {
            let ext_start = idx * EXTENT_SIZE;
            let from = (offset + pos as u64).max(ext_start);
            let to = (offset + data.len() as u64).min(ext_start + EXTENT_SIZE);
            let n = (to - from) as usize;
            let (f, base, slab) = &places[i];
            let b0 = (from - ext_start) / BLOCK_SIZE;
            write_blocks(f, directs[i].as_deref(), *base, b0, &data[pos..pos + n])?;
            // Marked after the data is in: a flush that took the list
            // before did not need it, this volume's next flush will.
            self.lock().unsynced.insert(*slab);
            if data.len() as u64 >= LARGE_WRITE && directs[i].is_none() {
                written.push((f.clone(), base + b0 * BLOCK_SIZE, n as u64));
            }
            pos += n;
        }
        for (f, off, len) in written {
            start_writeback(&f, off, len);
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: whole extents are unmapped (space
    /// freed), partial ones zeroed. Reads return zeros afterwards.
    pub fn discard(
        &self,
        name: &str,
        epoch: u64,
        offset: u64,
        len: u64,
        stale: &[String],
    ) -> Result<()> {
        {
            let st = self.lock();
            let rec = Self::vol(&st, name)?;
            Self::check_epoch(rec, epoch)?;
            Self::check_range(rec.size, offset, len, u64::MAX)?;
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / EXTENT_SIZE;
            let ext_end = ((idx + 1) * EXTENT_SIZE).min(end);
            if pos == idx * EXTENT_SIZE && ext_end == (idx + 1) * EXTENT_SIZE {
                let mut st = self.lock();
                let mut rec = Self::vol(&st, name)?.clone();
                let mut batch = Batch::default();
                let mut freed = Vec::new();
                if let Some(id) = st.maps.remove(&(rec.map, idx)) {
                    batch.maps.push(((rec.map, idx), None));
                    freed.extend(self.release(&mut st, &mut batch, id));
                }
                if Self::note_regions(&mut rec, epoch, &[idx], stale) {
                    batch.volumes.push((name.to_string(), Some(rec.clone())));
                    st.volumes.insert(name.to_string(), rec);
                }
                self.commit_free(&mut st, &batch, freed)?;
            } else {
                let mapped = {
                    let st = self.lock();
                    let rec = Self::vol(&st, name)?;
                    st.maps.contains_key(&(rec.map, idx))
                };
                if mapped {
                    let zeros = vec![0u8; (ext_end - pos) as usize];
                    self.write(name, epoch, pos, &zeros, stale)?;
                }
            }
            pos = ext_end;
        }
        Ok(())
    }
}
