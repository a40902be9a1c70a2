//! The local storage engine: one per node, pooling the node's data dirs.
//!
//! A volume's address space is split into 1 MiB extents; an extent is
//! allocated on first write (thin provisioning) as one file on one of the
//! data dirs, chosen round-robin by extent id:
//!
//! ```text
//! DIR/extents/<id as 16 hex digits>.ext
//!   [0, 1 MiB)               256 data blocks of 4 KiB, written in place
//!   [1 MiB, 1 MiB + 2 KiB)   256 sidecar entries (crc32c current, previous)
//! ```
//!
//! Extent maps, extent reference counts, volumes, snapshots, epochs and
//! dirty-region maps live in redb ([`crate::meta`]). Snapshots share extents
//! by reference count; a write to a shared extent copies it first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::checksum::{block_crc, zero_crc, Entry, ENTRY_SIZE};
use crate::error::{Error, Result};
use crate::meta::{Batch, ExtentRec, Meta, ReplicaAddr, SnapRec, VolumeRec};
use crate::{validate_name, BLOCKS_PER_EXTENT, BLOCK_SIZE, EXTENT_SIZE, MAX_IO, MAX_VOLUME_SIZE};

const SIDECAR_SIZE: u64 = BLOCKS_PER_EXTENT * ENTRY_SIZE as u64;
const EXTENT_FILE_SIZE: u64 = EXTENT_SIZE + SIDECAR_SIZE;
const MAX_OPEN_FILES: usize = 1024;
/// Regions (1 MiB each) the activity log may keep across data-path flushes
/// (see [`Engine::flush_keep_hot`]); bounds what an attach after a crash
/// compares between replicas.
pub const ACTIVITY_LOG_LIMIT: usize = 1024;
/// Threads issuing a flush's fdatasyncs.
const SYNC_THREADS: usize = 8;
/// Regions logged ahead of a sequential run (see `Engine::log_ahead`).
const LOG_AHEAD: u64 = 16;

/// Counters of the engine, reported by `volume show --json` and metrics.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub checksum_errors: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub scrubbed_bytes: AtomicU64,
}

/// What a replica reports about one of its volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub epoch: u64,
    pub replicas: Vec<ReplicaAddr>,
    pub snapshots: Vec<String>,
    pub allocated_bytes: u64,
    /// Allocated regions (extent indexes) of the live volume.
    pub regions: Vec<u64>,
    pub activity: BTreeMap<u64, BTreeSet<u64>>,
    pub stale: BTreeMap<String, BTreeSet<u64>>,
}

/// Result of a read: the data (blocks that failed verification are zeroed)
/// and the volume block numbers that failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadOut {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub bad_blocks: Vec<u64>,
}

/// A block that failed verification during a scrub, with the sidecar entry
/// seen, so that a repair can make sure nothing wrote it meanwhile.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    pub block: u64,
    pub current: u32,
    pub previous: u32,
}

struct State {
    volumes: BTreeMap<String, VolumeRec>,
    maps: HashMap<(u64, u64), u64>,
    extents: HashMap<u64, ExtentRec>,
    next_id: u64,
    files: HashMap<u64, Arc<File>>,
    unsynced: HashSet<u64>,
    dirs_dirty: bool,
    /// Per volume, the regions written since its last flush.
    recent: HashMap<String, BTreeSet<u64>>,
}

pub struct Engine {
    node_id: String,
    disks: Vec<PathBuf>,
    meta: Meta,
    state: Mutex<State>,
    pub metrics: EngineMetrics,
}

fn ext_count(size: u64) -> u64 {
    size.div_ceil(EXTENT_SIZE)
}

impl Engine {
    /// Opens the engine on `dirs` (the first holds `meta.redb`). Extent
    /// files that no committed metadata refers to (left by a crash between
    /// creating a file and committing it) are removed.
    pub fn open(node_id: &str, dirs: &[PathBuf]) -> Result<Engine> {
        validate_name(node_id)?;
        if dirs.is_empty() {
            return Err(Error::Invalid("at least one data dir is needed".into()));
        }
        for d in dirs {
            std::fs::create_dir_all(d.join("extents"))?;
        }
        let meta = Meta::open(&dirs[0].join("meta.redb"), node_id)?;
        let loaded = meta.load()?;
        for d in dirs {
            for ent in std::fs::read_dir(d.join("extents"))? {
                let ent = ent?;
                let name = ent.file_name();
                let name = name.to_string_lossy();
                let id = name
                    .strip_suffix(".ext")
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                match id {
                    Some(id) if loaded.extents.contains_key(&id) => {}
                    _ => {
                        tracing::info!(file = %ent.path().display(), "removing unreferenced extent file");
                        std::fs::remove_file(ent.path())?;
                    }
                }
            }
        }
        Ok(Engine {
            node_id: node_id.to_string(),
            disks: dirs.to_vec(),
            meta,
            state: Mutex::new(State {
                volumes: loaded.volumes,
                maps: loaded.maps,
                extents: loaded.extents,
                next_id: loaded.next_id,
                files: HashMap::new(),
                unsynced: HashSet::new(),
                dirs_dirty: false,
                recent: HashMap::new(),
            }),
            metrics: EngineMetrics::default(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extent_path(&self, st: &State, id: u64) -> PathBuf {
        let disk = st.extents.get(&id).map(|e| e.disk).unwrap_or(0) as usize;
        self.disks[disk % self.disks.len()]
            .join("extents")
            .join(format!("{id:016x}.ext"))
    }

    fn file(&self, st: &mut State, id: u64) -> Result<Arc<File>> {
        if let Some(f) = st.files.get(&id) {
            return Ok(f.clone());
        }
        if st.files.len() >= MAX_OPEN_FILES {
            // Files closed here keep their dirty pages; flush reopens by path.
            st.files.clear();
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.extent_path(st, id))?,
        );
        st.files.insert(id, f.clone());
        Ok(f)
    }

    fn alloc_extent(&self, st: &mut State, batch: &mut Batch) -> Result<u64> {
        let id = st.next_id;
        st.next_id += 1;
        batch.next_id = Some(st.next_id);
        let disk = (id % self.disks.len() as u64) as u32;
        let rec = ExtentRec { disk, refs: 1 };
        st.extents.insert(id, rec);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.extent_path(st, id))?;
        f.set_len(EXTENT_FILE_SIZE)?;
        st.files.insert(id, Arc::new(f));
        st.dirs_dirty = true;
        st.unsynced.insert(id);
        batch.extents.push((id, Some(rec)));
        Ok(id)
    }

    /// Copies shared extent `old` into a new extent and drops one reference
    /// to `old`.
    fn cow(&self, st: &mut State, batch: &mut Batch, old: u64) -> Result<u64> {
        let src = self.file(st, old)?;
        let mut buf = vec![0u8; EXTENT_FILE_SIZE as usize];
        src.read_exact_at(&mut buf, 0)?;
        let new = self.alloc_extent(st, batch)?;
        self.file(st, new)?.write_all_at(&buf, 0)?;
        let rec = st
            .extents
            .get_mut(&old)
            .expect("shared extent has a record");
        rec.refs -= 1;
        let rec = *rec;
        batch.extents.push((old, Some(rec)));
        Ok(new)
    }

    /// Drops one reference to extent `id`; returns the file to unlink once
    /// the batch is committed if it was the last.
    fn release(&self, st: &mut State, batch: &mut Batch, id: u64) -> Option<PathBuf> {
        let rec = st.extents.get_mut(&id)?;
        rec.refs = rec.refs.saturating_sub(1);
        if rec.refs == 0 {
            let path = self.extent_path(st, id);
            st.extents.remove(&id);
            st.files.remove(&id);
            st.unsynced.remove(&id);
            batch.extents.push((id, None));
            Some(path)
        } else {
            let rec = *rec;
            batch.extents.push((id, Some(rec)));
            None
        }
    }

    fn vol<'a>(st: &'a State, name: &str) -> Result<&'a VolumeRec> {
        st.volumes
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    fn check_epoch(rec: &VolumeRec, epoch: u64) -> Result<()> {
        if epoch < rec.epoch {
            Err(Error::Fenced {
                request: epoch,
                current: rec.epoch,
            })
        } else if epoch > rec.epoch {
            Err(Error::EpochAhead {
                request: epoch,
                current: rec.epoch,
            })
        } else {
            Ok(())
        }
    }

    fn check_range(rec: &VolumeRec, offset: u64, len: u64, max: u64) -> Result<()> {
        if offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Err(Error::Invalid(format!(
                "offset {offset} and length {len} must be multiples of {BLOCK_SIZE}"
            )));
        }
        if len > max {
            return Err(Error::Invalid(format!("length {len} exceeds {max}")));
        }
        match offset.checked_add(len) {
            Some(end) if end <= rec.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                rec.size
            ))),
        }
    }

    fn commit_unlink(&self, batch: &Batch, unlink: Vec<PathBuf>) -> Result<()> {
        self.meta.commit(batch)?;
        for p in unlink {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove freed extent");
            }
        }
        Ok(())
    }

    fn info_of(st: &State, name: &str, rec: &VolumeRec) -> VolumeInfo {
        let n = ext_count(rec.size);
        let regions: Vec<u64> = (0..n)
            .filter(|i| st.maps.contains_key(&(rec.map, *i)))
            .collect();
        VolumeInfo {
            name: name.to_string(),
            size: rec.size,
            epoch: rec.epoch,
            replicas: rec.replicas.clone(),
            snapshots: rec.snapshots.keys().cloned().collect(),
            allocated_bytes: regions.len() as u64 * EXTENT_SIZE,
            regions,
            activity: rec.activity.clone(),
            stale: rec.stale.clone(),
        }
    }

    // ----- volumes -------------------------------------------------------

    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        replicas: Vec<ReplicaAddr>,
        epoch: u64,
    ) -> Result<VolumeInfo> {
        validate_name(name)?;
        if size == 0 || size % BLOCK_SIZE != 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::Invalid(format!(
                "size {size} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_VOLUME_SIZE}"
            )));
        }
        for r in &replicas {
            validate_name(&r.node)?;
        }
        let mut st = self.lock();
        if st.volumes.contains_key(name) {
            return Err(Error::Exists(name.to_string()));
        }
        let id = st.next_id;
        st.next_id += 2;
        let rec = VolumeRec {
            id,
            size,
            map: id + 1,
            epoch,
            replicas,
            snapshots: BTreeMap::new(),
            activity: BTreeMap::new(),
            stale: BTreeMap::new(),
        };
        let batch = Batch {
            volumes: vec![(name.to_string(), Some(rec.clone()))],
            next_id: Some(st.next_id),
            ..Batch::default()
        };
        self.meta.commit(&batch)?;
        let info = Self::info_of(&st, name, &rec);
        st.volumes.insert(name.to_string(), rec);
        Ok(info)
    }

    fn drop_map(&self, st: &mut State, batch: &mut Batch, map: u64, size: u64) -> Vec<PathBuf> {
        let mut unlink = Vec::new();
        for idx in 0..ext_count(size) {
            if let Some(id) = st.maps.remove(&(map, idx)) {
                batch.maps.push(((map, idx), None));
                unlink.extend(self.release(st, batch, id));
            }
        }
        unlink
    }

    /// Deletes a volume and its snapshots, freeing extents no one else uses.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?.clone();
        let mut batch = Batch::default();
        let mut unlink = self.drop_map(&mut st, &mut batch, rec.map, rec.size);
        for snap in rec.snapshots.values() {
            unlink.extend(self.drop_map(&mut st, &mut batch, snap.map, snap.size));
        }
        batch.volumes.push((name.to_string(), None));
        st.volumes.remove(name);
        self.commit_unlink(&batch, unlink)
    }

    pub fn info(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        Ok(Self::info_of(&st, name, rec))
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let st = self.lock();
        st.volumes
            .iter()
            .map(|(n, r)| Self::info_of(&st, n, r))
            .collect()
    }

    /// Number of extents allocated on this node (all volumes and snapshots).
    pub fn extent_count(&self) -> usize {
        self.lock().extents.len()
    }

    /// Raises the volume's epoch to `epoch` (a no-op if equal). Refuses to
    /// lower it.
    pub fn set_epoch(&self, name: &str, epoch: u64) -> Result<u64> {
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?;
        if epoch < rec.epoch {
            return Err(Error::Fenced {
                request: epoch,
                current: rec.epoch,
            });
        }
        if epoch > rec.epoch {
            let mut rec = rec.clone();
            rec.epoch = epoch;
            self.meta.commit(&Batch {
                volumes: vec![(name.to_string(), Some(rec.clone()))],
                ..Batch::default()
            })?;
            st.volumes.insert(name.to_string(), rec);
        }
        Ok(epoch)
    }

    /// Applies `change` to a volume record at `epoch` and commits it.
    fn update_rec(
        &self,
        name: &str,
        epoch: u64,
        change: impl FnOnce(&mut VolumeRec) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
        Self::check_epoch(&rec, epoch)?;
        change(&mut rec)?;
        self.meta.commit(&Batch {
            volumes: vec![(name.to_string(), Some(rec.clone()))],
            ..Batch::default()
        })?;
        st.volumes.insert(name.to_string(), rec);
        Ok(())
    }

    pub fn set_replicas(&self, name: &str, epoch: u64, replicas: Vec<ReplicaAddr>) -> Result<()> {
        for r in &replicas {
            validate_name(&r.node)?;
        }
        self.update_rec(name, epoch, |rec| {
            rec.replicas = replicas;
            Ok(())
        })
    }

    /// Records that `node` missed writes to `regions`.
    pub fn mark_stale(&self, name: &str, epoch: u64, node: &str, regions: &[u64]) -> Result<()> {
        validate_name(node)?;
        self.update_rec(name, epoch, |rec| {
            let n = ext_count(rec.size);
            if regions.iter().any(|r| *r >= n) {
                return Err(Error::Invalid("region beyond the volume".into()));
            }
            rec.stale
                .entry(node.to_string())
                .or_default()
                .extend(regions.iter().copied());
            Ok(())
        })
    }

    /// Replaces the whole stale map (used when a replica rejoins, and when a
    /// new writer merges what every replica knew).
    pub fn set_stale_map(
        &self,
        name: &str,
        epoch: u64,
        stale: BTreeMap<String, BTreeSet<u64>>,
    ) -> Result<()> {
        self.update_rec(name, epoch, |rec| {
            rec.stale = stale;
            Ok(())
        })
    }

    /// Forgets `regions` of `node`'s dirty map (they were resynced); drops
    /// the node from the map if `all`.
    pub fn clear_stale(&self, name: &str, epoch: u64, node: &str, all: bool) -> Result<()> {
        self.update_rec(name, epoch, |rec| {
            if all {
                rec.stale.remove(node);
            }
            Ok(())
        })
    }

    /// Grows or shrinks a volume. Shrinking frees the extents past the end
    /// and zeroes the rest of the last extent.
    pub fn resize(&self, name: &str, epoch: u64, size: u64) -> Result<()> {
        if size == 0 || size % BLOCK_SIZE != 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::Invalid(format!("bad size {size}")));
        }
        let old = self.info(name)?.size;
        if size < old {
            let end_first = size.div_ceil(EXTENT_SIZE) * EXTENT_SIZE;
            if end_first > size {
                self.discard(name, epoch, size, end_first.min(old) - size, &[])?;
            }
            let mut st = self.lock();
            let rec = Self::vol(&st, name)?.clone();
            let mut batch = Batch::default();
            let mut unlink = Vec::new();
            for idx in ext_count(size)..ext_count(old) {
                if let Some(id) = st.maps.remove(&(rec.map, idx)) {
                    batch.maps.push(((rec.map, idx), None));
                    unlink.extend(self.release(&mut st, &mut batch, id));
                }
            }
            self.commit_unlink(&batch, unlink)?;
        }
        self.update_rec(name, epoch, |rec| {
            rec.size = size;
            Ok(())
        })
    }

    // ----- data path -----------------------------------------------------

    /// Resolves (allocating or copying) the writable extent behind `idx` of
    /// map `map`, and records region `idx` as written at `epoch` and dirty
    /// for each of `stale`.
    fn prepare_extent(&self, st: &mut State, batch: &mut Batch, map: u64, idx: u64) -> Result<u64> {
        match st.maps.get(&(map, idx)).copied() {
            None => {
                let id = self.alloc_extent(st, batch)?;
                st.maps.insert((map, idx), id);
                batch.maps.push(((map, idx), Some(id)));
                Ok(id)
            }
            Some(id) if st.extents.get(&id).map(|e| e.refs).unwrap_or(1) > 1 => {
                let new = self.cow(st, batch, id)?;
                st.maps.insert((map, idx), new);
                batch.maps.push(((map, idx), Some(new)));
                Ok(new)
            }
            Some(id) => Ok(id),
        }
    }

    fn note_regions(rec: &mut VolumeRec, epoch: u64, regions: &[u64], stale: &[String]) -> bool {
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
    fn log_ahead(rec: &VolumeRec, epoch: u64, first: u64, last: u64) -> Vec<u64> {
        let Some(log) = rec.activity.get(&epoch) else {
            return Vec::new();
        };
        if first == 0 || !log.contains(&(first - 1)) || log.contains(&last) {
            return Vec::new();
        }
        let end = (last + LOG_AHEAD).min(ext_count(rec.size).saturating_sub(1));
        (last + 1..=end).collect()
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
        let mut rec = Self::vol(&st, name)?.clone();
        Self::check_epoch(&rec, epoch)?;
        Self::check_range(&rec, offset, data.len() as u64, MAX_IO)?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / EXTENT_SIZE;
        let last = (offset + data.len() as u64 - 1) / EXTENT_SIZE;
        let regions: Vec<u64> = (first..=last).collect();
        let mut batch = Batch::default();
        let mut ids = Vec::new();
        for &idx in &regions {
            ids.push(self.prepare_extent(&mut st, &mut batch, rec.map, idx)?);
        }
        st.recent
            .entry(name.to_string())
            .or_default()
            .extend(&regions);
        let ahead = Self::log_ahead(&rec, epoch, first, last);
        if Self::note_regions(&mut rec, epoch, &regions, stale)
            | Self::note_regions(&mut rec, epoch, &ahead, &[])
        {
            // The activity log must be durable before the data lands (the
            // regions may differ between replicas after a power loss).
            batch.volumes.push((name.to_string(), Some(rec.clone())));
            st.volumes.insert(name.to_string(), rec);
            self.meta.commit(&batch)?;
        } else {
            // Only allocations: they must survive kill -9 before the write is
            // acknowledged, and reach the disk by the next flush.
            self.meta.commit_logged(&batch)?;
        }
        let mut pos = 0usize;
        for (i, &idx) in regions.iter().enumerate() {
            let ext_start = idx * EXTENT_SIZE;
            let from = (offset + pos as u64).max(ext_start);
            let to = (offset + data.len() as u64).min(ext_start + EXTENT_SIZE);
            let n = (to - from) as usize;
            let f = self.file(&mut st, ids[i])?;
            write_blocks(&f, (from - ext_start) / BLOCK_SIZE, &data[pos..pos + n])?;
            st.unsynced.insert(ids[i]);
            pos += n;
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
            Self::check_range(rec, offset, len, u64::MAX)?;
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
                let mut unlink = Vec::new();
                if let Some(id) = st.maps.remove(&(rec.map, idx)) {
                    batch.maps.push(((rec.map, idx), None));
                    unlink.extend(self.release(&mut st, &mut batch, id));
                }
                if Self::note_regions(&mut rec, epoch, &[idx], stale) {
                    batch.volumes.push((name.to_string(), Some(rec.clone())));
                    st.volumes.insert(name.to_string(), rec);
                }
                self.commit_unlink(&batch, unlink)?;
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

    fn read_map(&self, st: &mut State, map: u64, offset: u64, len: u64) -> Result<ReadOut> {
        let mut data = vec![0u8; len as usize];
        let mut bad = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let idx = abs / EXTENT_SIZE;
            let ext_start = idx * EXTENT_SIZE;
            let n = (len - pos).min(ext_start + EXTENT_SIZE - abs);
            if let Some(id) = st.maps.get(&(map, idx)).copied() {
                let f = self.file(st, id)?;
                let b0 = (abs - ext_start) / BLOCK_SIZE;
                let buf = &mut data[pos as usize..(pos + n) as usize];
                for b in read_blocks(&f, b0, buf)? {
                    bad.push(idx * BLOCKS_PER_EXTENT + b0 + b);
                }
            }
            pos += n;
        }
        self.metrics
            .checksum_errors
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(ReadOut {
            data,
            bad_blocks: bad,
        })
    }

    /// Reads and verifies `[offset, offset+len)` of the live volume.
    pub fn read(&self, name: &str, offset: u64, len: u64) -> Result<ReadOut> {
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?;
        Self::check_range(rec, offset, len, MAX_IO)?;
        let map = rec.map;
        self.read_map(&mut st, map, offset, len)
    }

    /// Is region (extent) `idx` of the live volume allocated?
    pub fn region_allocated(&self, name: &str, idx: u64) -> Result<bool> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        Ok(st.maps.contains_key(&(rec.map, idx)))
    }

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
    /// regions written since the previous flush stay. Every write before
    /// the barrier is on every in-sync replica (the writer serializes writes
    /// and flushes), so dropping any region is safe and keeping one only
    /// means it is compared after a crash; keeping the hot ones spares the
    /// durable commit that the next write to them would need.
    pub fn flush_keep_hot(&self, name: &str, epoch: u64) -> Result<()> {
        self.sync_all_data(Some((name, epoch)))?;
        let mut st = self.lock();
        let recent = st.recent.remove(name).unwrap_or_default();
        let rec = Self::vol(&st, name)?;
        let cur = rec.activity.get(&epoch).map(|l| l.len()).unwrap_or(0);
        let only_current = rec.activity.keys().all(|e| *e == epoch);
        if only_current && cur <= ACTIVITY_LOG_LIMIT {
            return Ok(());
        }
        drop(st);
        self.update_rec(name, epoch, |rec| {
            let keep: BTreeSet<u64> = match rec.activity.get(&epoch) {
                Some(l) if recent.len() <= ACTIVITY_LOG_LIMIT => {
                    l.intersection(&recent).copied().collect()
                }
                _ => BTreeSet::new(),
            };
            rec.activity.clear();
            if !keep.is_empty() {
                rec.activity.insert(epoch, keep);
            }
            Ok(())
        })
    }

    /// fdatasync of every extent file written since the last flush, the
    /// extent directories if files were created, and the metadata log.
    fn sync_all_data(&self, checkpoint: Option<(&str, u64)>) -> Result<()> {
        let (files, dirs_dirty) = {
            let mut st = self.lock();
            if let Some((name, epoch)) = checkpoint {
                Self::check_epoch(Self::vol(&st, name)?, epoch)?;
            }
            let ids: Vec<u64> = st.unsynced.drain().collect();
            let mut files = Vec::new();
            for id in ids {
                files.push(self.file(&mut st, id)?);
            }
            let d = st.dirs_dirty;
            st.dirs_dirty = false;
            (files, d)
        };
        // Start writeback of every file first, so that the file system
        // can write them together and commit their allocations in one
        // journal transaction, then wait for each.
        for f in &files {
            // SAFETY: plain syscall on a valid fd; failure only means no
            // head start, sync_data below still waits for everything.
            unsafe {
                libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        // Several fdatasyncs in flight let the journal commit them
        // together (ext4 batches concurrent fsyncs into one transaction).
        let per = files.len().div_ceil(SYNC_THREADS).max(1);
        std::thread::scope(|s| {
            let jobs: Vec<_> = files
                .chunks(per)
                .map(|c| s.spawn(move || c.iter().try_for_each(|f| f.sync_data())))
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("fdatasync thread panicked")))
            })
        })?;
        if dirs_dirty {
            for d in &self.disks {
                File::open(d.join("extents"))?.sync_all()?;
            }
        }
        // Allocations committed through the metadata log become durable.
        self.meta.sync()
    }

    // ----- snapshots -----------------------------------------------------

    /// Freezes the volume's current extent map as snapshot `snap`.
    pub fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        validate_name(snap)?;
        let mut st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
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

    /// Deletes snapshot `snap`, freeing extents no one else references.
    pub fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let mut st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
        let s = rec
            .snapshots
            .remove(snap)
            .ok_or_else(|| Error::NotFound(format!("{name}@{snap}")))?;
        let mut batch = Batch::default();
        let unlink = self.drop_map(&mut st, &mut batch, s.map, s.size);
        batch.volumes.push((name.to_string(), Some(rec.clone())));
        st.volumes.insert(name.to_string(), rec);
        self.commit_unlink(&batch, unlink)
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
        };
        self.share_map(&mut st, &mut batch, s.map, rec.map, s.size);
        batch.volumes.push((new.to_string(), Some(rec.clone())));
        self.meta.commit(&batch)?;
        st.volumes.insert(new.to_string(), rec);
        Ok(())
    }

    // ----- scrub and repair ----------------------------------------------

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
                    let f = self.file(&mut st, id)?;
                    let mut buf = vec![0u8; EXTENT_SIZE as usize];
                    let mut side = vec![0u8; SIDECAR_SIZE as usize];
                    f.read_exact_at(&mut buf, 0)?;
                    f.read_exact_at(&mut side, EXTENT_SIZE)?;
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
        let f = self.file(&mut st, id)?;
        let b = bad.block % BLOCKS_PER_EXTENT;
        let mut e = [0u8; ENTRY_SIZE];
        f.read_exact_at(&mut e, EXTENT_SIZE + b * ENTRY_SIZE as u64)?;
        let e = Entry::decode(&e);
        if e.current != bad.current || e.previous != bad.previous {
            return Ok(false);
        }
        write_blocks(&f, b, data)?;
        st.unsynced.insert(id);
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
            (
                self.extent_path(&st, *id),
                (block % BLOCKS_PER_EXTENT) * BLOCK_SIZE,
            )
        }))
    }
}

/// Reads blocks starting at block `b0` of an extent file into `buf` and
/// verifies them; returns the indexes (relative to `b0`) that failed, zeroed
/// in `buf`. Never-written blocks read as zeros.
fn read_blocks(f: &File, b0: u64, buf: &mut [u8]) -> Result<Vec<u64>> {
    let n = buf.len() / BLOCK_SIZE as usize;
    let mut side = vec![0u8; n * ENTRY_SIZE];
    f.read_exact_at(&mut side, EXTENT_SIZE + b0 * ENTRY_SIZE as u64)?;
    f.read_exact_at(buf, b0 * BLOCK_SIZE)?;
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
    Ok(bad)
}

/// Writes whole blocks starting at block `b0` of an extent file, in the
/// three crash-safe steps described in [`crate::checksum`].
fn write_blocks(f: &File, b0: u64, data: &[u8]) -> Result<()> {
    let n = data.len() / BLOCK_SIZE as usize;
    let side_off = EXTENT_SIZE + b0 * ENTRY_SIZE as u64;
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
            f.read_exact_at(&mut blk, (b0 + i as u64) * BLOCK_SIZE)?;
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
    f.write_all_at(data, b0 * BLOCK_SIZE)?;
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

/// Size on disk of one extent file.
pub fn extent_file_size() -> u64 {
    EXTENT_FILE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(dirs: &[PathBuf]) -> Engine {
        Engine::open("n1", dirs).unwrap()
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn flip(e: &Engine, vol: &str, block: u64, at: u64) {
        let (path, off) = e.block_location(vol, block).unwrap().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off + at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, off + at).unwrap();
    }

    #[test]
    fn write_read_roundtrip_across_extents_and_disks() {
        let t = tempfile::tempdir().unwrap();
        let dirs = vec![t.path().join("d1"), t.path().join("d2")];
        let e = engine(&dirs);
        e.create_volume("v", 8 * EXTENT_SIZE, vec![], 1).unwrap();
        let data = pattern(1, 3 * EXTENT_SIZE as usize);
        // Straddles extents 0..=3 (not aligned on an extent).
        e.write("v", 1, EXTENT_SIZE / 2, &data, &[]).unwrap();
        let out = e.read("v", EXTENT_SIZE / 2, data.len() as u64).unwrap();
        assert!(out.bad_blocks.is_empty());
        assert_eq!(out.data, data);
        // Extents spread over both disks.
        for d in &dirs {
            assert!(std::fs::read_dir(d.join("extents")).unwrap().count() > 0);
        }
        // Survives reopening.
        drop(e);
        let e = engine(&dirs);
        assert_eq!(
            e.read("v", EXTENT_SIZE / 2, data.len() as u64)
                .unwrap()
                .data,
            data
        );
    }

    #[test]
    fn thin_provisioning_allocates_on_first_write() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", 1 << 30, vec![], 1).unwrap();
        assert_eq!(e.info("v").unwrap().allocated_bytes, 0);
        let out = e.read("v", 5 * EXTENT_SIZE, 8192).unwrap();
        assert!(out.data.iter().all(|b| *b == 0));
        e.write("v", 1, 5 * EXTENT_SIZE + 4096, &pattern(2, 4096), &[])
            .unwrap();
        assert_eq!(e.info("v").unwrap().allocated_bytes, EXTENT_SIZE);
        assert_eq!(e.extent_count(), 1);
    }

    #[test]
    fn rejects_bad_ranges_and_epochs() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", EXTENT_SIZE, vec![], 3).unwrap();
        assert!(matches!(
            e.write("v", 3, 100, &[0u8; 4096], &[]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            e.write("v", 3, EXTENT_SIZE, &[0u8; 4096], &[]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            e.write("v", 2, 0, &[0u8; 4096], &[]),
            Err(Error::Fenced { .. })
        ));
        assert!(matches!(e.set_epoch("v", 2), Err(Error::Fenced { .. })));
        e.set_epoch("v", 4).unwrap();
        assert!(matches!(
            e.write("v", 3, 0, &[0u8; 4096], &[]),
            Err(Error::Fenced { .. })
        ));
        assert!(e.write("v", 4, 0, &[1u8; 4096], &[]).is_ok());
        assert!(e.create_volume("../x", EXTENT_SIZE, vec![], 1).is_err());
    }

    #[test]
    fn checksum_mismatch_is_reported_not_returned() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", EXTENT_SIZE, vec![], 1).unwrap();
        e.write("v", 1, 0, &pattern(3, 16384), &[]).unwrap();
        flip(&e, "v", 2, 100);
        let out = e.read("v", 0, 16384).unwrap();
        assert_eq!(out.bad_blocks, vec![2]);
        assert!(out.data[8192..12288].iter().all(|b| *b == 0));
        assert_eq!(out.data[..8192], pattern(3, 16384)[..8192]);
        assert_eq!(e.metrics.checksum_errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn interrupted_write_reads_old_or_new() {
        // Simulate kill -9 after step 1 (sidecar has (new, old)) and after
        // step 2 (data written, sidecar still (new, old)).
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", EXTENT_SIZE, vec![], 1).unwrap();
        let old = pattern(4, 4096);
        let new = pattern(5, 4096);
        e.write("v", 1, 0, &old, &[]).unwrap();
        let (path, _) = e.block_location("v", 0).unwrap().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut side = [0u8; ENTRY_SIZE];
        Entry {
            current: block_crc(&new),
            previous: block_crc(&old),
        }
        .encode(&mut side);
        f.write_all_at(&side, EXTENT_SIZE).unwrap();
        assert_eq!(e.read("v", 0, 4096).unwrap().data, old);
        f.write_all_at(&new, 0).unwrap();
        assert_eq!(e.read("v", 0, 4096).unwrap().data, new);
        // A later write after such a crash keeps verifying.
        let newer = pattern(6, 4096);
        e.write("v", 1, 0, &newer, &[]).unwrap();
        let out = e.read("v", 0, 4096).unwrap();
        assert!(out.bad_blocks.is_empty());
        assert_eq!(out.data, newer);
    }

    #[test]
    fn snapshot_clone_cow_and_delete_reclaims() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1).unwrap();
        let a = pattern(7, 2 * EXTENT_SIZE as usize);
        e.write("v", 1, 0, &a, &[]).unwrap();
        assert_eq!(e.extent_count(), 2);
        e.snapshot("v", "s1").unwrap();
        assert_eq!(e.extent_count(), 2, "a snapshot copies nothing");
        let b = pattern(8, 4096);
        e.write("v", 1, 0, &b, &[]).unwrap();
        assert_eq!(
            e.extent_count(),
            3,
            "first write to a shared extent copies it"
        );
        e.clone_volume("v", "s1", "c", 1).unwrap();
        assert_eq!(e.extent_count(), 3, "a clone copies nothing");
        assert_eq!(e.read("c", 0, a.len() as u64).unwrap().data, a);
        let c = pattern(9, 4096);
        e.write("c", 1, EXTENT_SIZE, &c, &[]).unwrap();
        assert_eq!(e.read("c", EXTENT_SIZE, 4096).unwrap().data, c);
        let v = e.read("v", 0, a.len() as u64).unwrap().data;
        assert_eq!(v[..4096], b[..]);
        assert_eq!(
            v[4096..],
            a[4096..],
            "writes to the clone leave the base alone"
        );
        // The clone still references the snapshot's extent 0; extent 1 of
        // the snapshot is shared with v.
        e.delete_volume("c").unwrap();
        let before = e.extent_count();
        e.delete_snapshot("v", "s1").unwrap();
        assert!(
            e.extent_count() < before,
            "deleting the snapshot frees extents"
        );
        assert_eq!(e.extent_count(), 2);
        let files = std::fs::read_dir(t.path().join("extents")).unwrap().count();
        assert_eq!(files, 2, "freed extents' files are removed");
        e.delete_volume("v").unwrap();
        assert_eq!(e.extent_count(), 0);
    }

    #[test]
    fn scrub_finds_flip_and_repair_fixes_it() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", 2 * EXTENT_SIZE, vec![], 1).unwrap();
        let data = pattern(10, 2 * EXTENT_SIZE as usize);
        e.write("v", 1, 0, &data, &[]).unwrap();
        assert!(e.scrub("v", |_, _| {}).unwrap().is_empty());
        flip(&e, "v", 300, 7);
        let bad = e.scrub("v", |_, _| {}).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].block, 300);
        let good = &data[300 * 4096..301 * 4096];
        assert!(e.repair_block("v", bad[0], good).unwrap());
        assert!(e.scrub("v", |_, _| {}).unwrap().is_empty());
        assert_eq!(e.read("v", 300 * 4096, 4096).unwrap().data, good);
        // A stale repair (the block was rewritten since) is skipped.
        flip(&e, "v", 300, 9);
        let bad = e.scrub("v", |_, _| {}).unwrap();
        let newer = pattern(11, 4096);
        e.write("v", 1, 300 * 4096, &newer, &[]).unwrap();
        assert!(!e.repair_block("v", bad[0], good).unwrap());
        assert_eq!(e.read("v", 300 * 4096, 4096).unwrap().data, newer);
    }

    #[test]
    fn activity_and_stale_maps_track_regions() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", 8 * EXTENT_SIZE, vec![], 1).unwrap();
        e.write("v", 1, 3 * EXTENT_SIZE, &[1u8; 4096], &["n2".into()])
            .unwrap();
        let i = e.info("v").unwrap();
        assert_eq!(i.activity[&1], BTreeSet::from([3]));
        assert_eq!(i.stale["n2"], BTreeSet::from([3]));
        e.flush(Some(("v", 1))).unwrap();
        let i = e.info("v").unwrap();
        assert!(
            i.activity.is_empty(),
            "a flush checkpoints the activity log"
        );
        assert_eq!(
            i.stale["n2"],
            BTreeSet::from([3]),
            "stale maps survive flushes"
        );
        e.discard("v", 1, 3 * EXTENT_SIZE, EXTENT_SIZE, &[])
            .unwrap();
        assert_eq!(e.info("v").unwrap().allocated_bytes, 0);
    }
}
