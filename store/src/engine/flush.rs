//! Durability: flushes (fdatasync of every slab written since the last
//! one, then the metadata log) and the activity log they checkpoint.

use std::collections::BTreeSet;
use std::fs::File;

use super::{Engine, ACTIVITY_LOG_LIMIT, SLOTS_PER_SLAB};
use crate::error::{Error, Result};

impl Engine {
    /// Durability barrier: fdatasync every extent file written since the last
    /// flush (and the extent directories if files were created), then, if
    /// `checkpoint` names a volume and epoch, forget the volume's activity
    /// log: every write before this flush is on every in-sync replica.
    pub fn flush(&self, checkpoint: Option<(&str, u64)>) -> Result<()> {
        self.sync_all_data(checkpoint)?;
        if let Some((name, epoch)) = checkpoint {
            self.lock().recent.remove(name);
            let logged = !Self::vol(&self.lock(), name)?.activity.is_empty();
            if logged {
                self.update_rec(name, epoch, |rec| {
                    rec.activity.clear();
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// The data-path flush: the same durability barrier as [`Engine::flush`],
    /// but the activity log of `name` keeps its current-epoch regions while
    /// it holds at most [`ACTIVITY_LOG_LIMIT`] of them; past that, only the
    /// regions written since the previous flush stay. Every write
    /// acknowledged before the barrier is on every in-sync replica, so
    /// dropping a region no write is still changing is safe, and keeping
    /// one only means it is compared after a crash; keeping the hot ones
    /// spares the durable commit that the next write to them would need.
    ///
    /// Writes of this volume may run during the flush (the writer pipelines
    /// them), so a region is dropped from the log only if every write to
    /// it was done before the sync began: regions with a write in flight
    /// then, or written since, stay.
    pub fn flush_keep_hot(&self, name: &str, epoch: u64) -> Result<()> {
        let (recent, writing_before) = {
            let mut st = self.lock();
            (
                st.recent.remove(name).unwrap_or_default(),
                st.writing_regions(name),
            )
        };
        self.sync_all_data(Some((name, epoch)))?;
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        let cur = rec.activity.get(&epoch).map(|l| l.len()).unwrap_or(0);
        let only_current = rec.activity.keys().all(|e| *e == epoch);
        if only_current && cur <= ACTIVITY_LOG_LIMIT {
            return Ok(());
        }
        let mut must_keep = writing_before;
        must_keep.extend(st.writing_regions(name));
        must_keep.extend(st.recent.get(name).into_iter().flatten().copied());
        let mut rec = rec.clone();
        Self::check_epoch(&rec, epoch)?;
        let keep: BTreeSet<u64> = match rec.activity.get(&epoch) {
            Some(l) => l
                .iter()
                .copied()
                .filter(|r| {
                    must_keep.contains(r)
                        || (recent.len() <= ACTIVITY_LOG_LIMIT && recent.contains(r))
                })
                .collect(),
            None => BTreeSet::new(),
        };
        rec.activity.clear();
        if !keep.is_empty() {
            rec.activity.insert(epoch, keep);
        }
        self.commit_rec(st, name, rec)
    }

    /// fdatasync of every slab written since the last flush (one thread per
    /// slab when there are several, so that different disks sync at once),
    /// the slab directories if slabs were created, and the metadata log.
    fn sync_all_data(&self, checkpoint: Option<(&str, u64)>) -> Result<()> {
        let (files, cleared, dirs_dirty) = {
            let mut st = self.lock();
            if let Some((name, epoch)) = checkpoint {
                Self::check_epoch(Self::vol(&st, name)?, epoch)?;
            }
            let keys: Vec<(u32, u64)> = st.unsynced.drain().collect();
            let mut files = Vec::new();
            for &(disk, num) in &keys {
                files.push(self.slab(&mut st, disk, num * SLOTS_PER_SLAB)?);
            }
            let cleared = std::mem::take(&mut st.pending_free);
            let d = st.dirs_dirty;
            st.dirs_dirty = false;
            (files, cleared, d)
        };
        self.check_healthy()?;
        let synced = match files.as_slice() {
            [] => Ok(()),
            [f] => self.sync_file(f, false),
            _ => std::thread::scope(|s| {
                let jobs: Vec<_> = files
                    .iter()
                    .map(|f| s.spawn(|| self.sync_file(f, false)))
                    .collect();
                // Join them all (each failure is recorded), then report.
                let done: Vec<Result<()>> = jobs
                    .into_iter()
                    .map(|j| {
                        j.join()
                            .unwrap_or_else(|_| Err(Error::Io("fdatasync thread panicked".into())))
                    })
                    .collect();
                done.into_iter().collect::<Result<()>>()
            }),
        };
        // No retry after a failure: the replica has failed (sync_file).
        synced?;
        {
            let mut st = self.lock();
            // No read may still be reading a slot about to be reused.
            let _no_reads = self.reading.write().expect(crate::POISONED);
            for (disk, slot) in cleared {
                st.free[disk as usize].insert(slot);
            }
        }
        if dirs_dirty {
            for d in &self.disks {
                self.sync_file(&File::open(d.join("slabs"))?, true)?;
            }
        }
        // Allocations committed through the metadata log become durable.
        self.meta.sync()
    }
}
