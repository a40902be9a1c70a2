//! Where extents live: the slab files (created sparse and full size on
//! first use, and opened again `O_DIRECT`), a slot for a new extent, the
//! copy of a shared one (copy-on-write after a snapshot), and dropping a
//! reference to one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use super::blocks::advise_random;
use super::{Engine, State, SIDECAR_SIZE, SLAB_SIZE, SLOTS_PER_SLAB, SLOT_SIZE};
use crate::error::{Error, Result};
use crate::meta::{Batch, ExtentRec};
use crate::EXTENT_SIZE;

impl Engine {
    pub(super) fn slab_path(&self, disk: u32, num: u64) -> PathBuf {
        self.disks[disk as usize]
            .join("slabs")
            .join(format!("{num:08x}.slab"))
    }

    /// The slab file holding `slot` of `disk`, created (sparse, full size)
    /// on first use.
    pub(super) fn slab(&self, st: &mut State, disk: u32, slot: u64) -> Result<Arc<File>> {
        let num = slot / SLOTS_PER_SLAB;
        if let Some(f) = st.slabs.get(&(disk, num)) {
            return Ok(f.clone());
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.slab_path(disk, num))?;
        f.set_len(SLAB_SIZE)?;
        advise_random(&f);
        let f = Arc::new(f);
        st.slabs.insert((disk, num), f.clone());
        st.dirs_dirty = true;
        Ok(f)
    }

    /// Slab `key` opened again with `O_DIRECT`, for reads of data
    /// ([`read_blocks`]) and large writes ([`write_blocks`]), on first use;
    /// `None` where the file system has no direct I/O (tmpfs), and both go
    /// through the page cache.
    pub(super) fn direct_slab(&self, st: &mut State, key: (u32, u64)) -> Option<Arc<File>> {
        if let Some(d) = st.direct.get(&key) {
            return d.clone();
        }
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.slab_path(key.0, key.1))
            .inspect_err(|e| {
                tracing::debug!(error = %e, "no direct reads of this slab; reading through the page cache")
            })
            .ok()
            .map(Arc::new);
        st.direct.insert(key, d.clone());
        d
    }

    /// Extent `id`: its slab file, the byte offset of its slot there, and
    /// the slab's key (for flush bookkeeping).
    pub(super) fn locate(&self, st: &mut State, id: u64) -> Result<(Arc<File>, u64, (u32, u64))> {
        let rec = *st
            .extents
            .get(&id)
            .ok_or_else(|| Error::Meta(format!("extent {id} has no record")))?;
        let f = self.slab(st, rec.disk, rec.slot)?;
        let base = (rec.slot % SLOTS_PER_SLAB) * SLOT_SIZE;
        Ok((f, base, (rec.disk, rec.slot / SLOTS_PER_SLAB)))
    }

    pub(super) fn alloc_extent(&self, st: &mut State, batch: &mut Batch) -> Result<u64> {
        let id = st.next_id;
        let disk = (id % self.disks.len() as u64) as u32;
        let d = disk as usize;
        let slot = match st.free[d].pop_first() {
            Some(s) => s,
            None => {
                st.next_slot[d] += 1;
                st.next_slot[d] - 1
            }
        };
        if let Err(e) = self.slab(st, disk, slot) {
            st.free[d].insert(slot);
            return Err(e);
        }
        st.next_id += 1;
        batch.next_id = Some(st.next_id);
        let rec = ExtentRec {
            disk,
            refs: 1,
            slot,
        };
        st.extents.insert(id, rec);
        st.unsynced.insert((disk, slot / SLOTS_PER_SLAB));
        batch.extents.push((id, Some(rec)));
        Ok(id)
    }

    /// Copies shared extent `old` into a new extent and drops one reference
    /// to `old`.
    pub(super) fn cow(&self, st: &mut State, batch: &mut Batch, old: u64) -> Result<u64> {
        let (src, at, _) = self.locate(st, old)?;
        let mut buf = vec![0u8; (EXTENT_SIZE + SIDECAR_SIZE) as usize];
        src.read_exact_at(&mut buf, at)?;
        let new = self.alloc_extent(st, batch)?;
        let (dst, at, _) = self.locate(st, new)?;
        dst.write_all_at(&buf, at)?;
        // The copy must be durable before any durable commit can carry the
        // map entry that points to it (a later write's activity-log commit
        // may come before the next flush): otherwise a power loss could
        // leave the volume reading zeros where the snapshot's data was.
        self.sync_file(&dst, false)?;
        let rec = st
            .extents
            .get_mut(&old)
            .expect("shared extent has a record");
        rec.refs -= 1;
        let rec = *rec;
        batch.extents.push((old, Some(rec)));
        Ok(new)
    }

    /// Drops one reference to extent `id`; returns its (disk, slot) to free
    /// once the batch is committed if it was the last.
    pub(super) fn release(&self, st: &mut State, batch: &mut Batch, id: u64) -> Option<(u32, u64)> {
        let rec = st.extents.get_mut(&id)?;
        rec.refs = rec.refs.saturating_sub(1);
        if rec.refs == 0 {
            let rec = *rec;
            st.extents.remove(&id);
            batch.extents.push((id, None));
            Some((rec.disk, rec.slot))
        } else {
            let rec = *rec;
            batch.extents.push((id, Some(rec)));
            None
        }
    }
}
