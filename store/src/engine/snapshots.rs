//! Snapshots and clones: frozen extent maps that share extents with the
//! live volume by reference count.

use std::collections::BTreeMap;

use super::{ext_count, Engine, ReadOut, SnapshotLayout, State, VolumeLayout};
use crate::error::{Error, Result};
use crate::meta::{Batch, SnapRec, VolumeRec};
use crate::types::CryptRec;
use crate::{validate_name, MAX_IO};

impl Engine {
    /// Freezes the volume's current extent map as snapshot `snap`.
    pub fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        validate_name(snap)?;
        let mut st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
        if rec.crypt.as_ref().is_some_and(|c| c.rekey.is_some()) {
            return Err(Error::Invalid(format!(
                "{name} is being rekeyed; snapshots wait until it is done"
            )));
        }
        if rec.snapshots.contains_key(snap) {
            return Err(Error::Exists(format!("{name}@{snap}")));
        }
        let smap = st.next_id;
        st.next_id += 1;
        let mut batch = Batch {
            next_id: Some(st.next_id),
            ..Batch::default()
        };
        self.share_map(&mut st, &mut batch, rec.map, smap, rec.size);
        rec.snapshots.insert(
            snap.to_string(),
            SnapRec {
                map: smap,
                size: rec.size,
            },
        );
        batch.volumes.push((name.to_string(), Some(rec.clone())));
        self.meta.commit(&batch)?;
        st.volumes.insert(name.to_string(), rec);
        Ok(())
    }

    fn share_map(&self, st: &mut State, batch: &mut Batch, from: u64, to: u64, size: u64) {
        for idx in 0..ext_count(size) {
            if let Some(id) = st.maps.get(&(from, idx)).copied() {
                st.maps.insert((to, idx), id);
                batch.maps.push(((to, idx), Some(id)));
                let rec = st.extents.get_mut(&id).expect("mapped extent has a record");
                rec.refs += 1;
                let rec = *rec;
                batch.extents.push((id, Some(rec)));
            }
        }
    }

    /// The extent behind each allocated region of the live volume and of
    /// each snapshot (oldest first).
    pub fn layout(&self, name: &str) -> Result<VolumeLayout> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        let regions = |map: u64, size: u64| -> Vec<(u64, u64)> {
            (0..ext_count(size))
                .filter_map(|i| st.maps.get(&(map, i)).map(|id| (i, *id)))
                .collect()
        };
        let mut snaps: Vec<(&String, &SnapRec)> = rec.snapshots.iter().collect();
        // Map ids are handed out in increasing order: creation order.
        snaps.sort_by_key(|(_, s)| s.map);
        Ok(VolumeLayout {
            live: regions(rec.map, rec.size),
            snapshots: snaps
                .into_iter()
                .map(|(n, s)| SnapshotLayout {
                    name: n.clone(),
                    size: s.size,
                    regions: regions(s.map, s.size),
                })
                .collect(),
        })
    }

    /// Reads and verifies `[offset, offset+len)` of snapshot `name@snap`.
    pub fn read_snapshot(&self, name: &str, snap: &str, offset: u64, len: u64) -> Result<ReadOut> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        let s = rec
            .snapshots
            .get(snap)
            .ok_or_else(|| Error::NotFound(format!("{name}@{snap}")))?;
        let (map, size) = (s.map, s.size);
        Self::check_range(size, offset, len, MAX_IO)?;
        self.read_map(st, map, offset, len)
    }

    /// Deletes snapshot `snap`, freeing extents no one else references.
    pub fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let mut st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
        let s = rec
            .snapshots
            .remove(snap)
            .ok_or_else(|| Error::NotFound(format!("{name}@{snap}")))?;
        let mut batch = Batch::default();
        let freed = self.drop_map(&mut st, &mut batch, s.map, s.size);
        batch.volumes.push((name.to_string(), Some(rec.clone())));
        st.volumes.insert(name.to_string(), rec);
        self.commit_free(&mut st, &batch, freed)
    }

    /// Creates volume `new` from snapshot `name@snap` without copying data.
    pub fn clone_volume(&self, name: &str, snap: &str, new: &str, epoch: u64) -> Result<()> {
        validate_name(new)?;
        let mut st = self.lock();
        let base = Self::vol(&st, name)?.clone();
        let s = base
            .snapshots
            .get(snap)
            .ok_or_else(|| Error::NotFound(format!("{name}@{snap}")))?
            .clone();
        if st.volumes.contains_key(new) {
            return Err(Error::Exists(new.to_string()));
        }
        let id = st.next_id;
        st.next_id += 2;
        let mut batch = Batch {
            next_id: Some(st.next_id),
            ..Batch::default()
        };
        let rec = VolumeRec {
            id,
            size: s.size,
            map: id + 1,
            epoch,
            replicas: base.replicas.clone(),
            snapshots: BTreeMap::new(),
            activity: BTreeMap::new(),
            stale: BTreeMap::new(),
            // A clone shares its parent's key (and so its key check).
            crypt: base.crypt.clone().map(|c| CryptRec {
                key_check: c.key_check,
                rekey: None,
            }),
        };
        self.share_map(&mut st, &mut batch, s.map, rec.map, s.size);
        batch.volumes.push((new.to_string(), Some(rec.clone())));
        self.meta.commit(&batch)?;
        st.volumes.insert(new.to_string(), rec);
        Ok(())
    }
}
