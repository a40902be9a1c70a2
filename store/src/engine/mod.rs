//! The local storage engine: one per node, pooling the node's data dirs.
//!
//! A volume's address space is split into 1 MiB extents; an extent is
//! allocated on first write (thin provisioning) in a slot of one of the
//! data dirs, chosen round-robin by extent id. A data dir's slots are packed
//! into a few large sparse slab files, so that a flush costs one fdatasync
//! per slab written instead of one per extent:
//!
//! ```text
//! DIR/slabs/<slab number as 8 hex digits>.slab   1024 slots of 1 MiB + 4 KiB
//!   slot s at (s mod 1024) × (1 MiB + 4 KiB) in slab s / 1024:
//!   [0, 1 MiB)               256 data blocks of 4 KiB, written in place
//!   [1 MiB, 1 MiB + 2 KiB)   256 sidecar entries (crc32c current, previous)
//!   [1 MiB + 2 KiB, + 4 KiB) padding, so that every slot's data is aligned
//! ```
//!
//! A free slot reads as zeros: a slot is hole-punched when its extent is
//! freed, and every free slot of the existing slabs again when the engine
//! opens (which covers allocations that a crash left uncommitted).
//!
//! Extent maps, extent reference counts, volumes, snapshots, epochs and
//! dirty-region maps live in redb ([`crate::meta`]). Snapshots share extents
//! by reference count; a write to a shared extent copies it first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::checksum::ENTRY_SIZE;
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;
use crate::meta::{Batch, ExtentRec, Meta, ReplicaAddr, VolumeRec};
use crate::types::CryptRec;
pub use crate::types::{
    BadBlock, NodeMetrics, ReadOut, RegionDigest, SnapshotLayout, VolumeInfo, VolumeLayout,
};
use crate::{validate_name, BLOCKS_PER_EXTENT, BLOCK_SIZE, EXTENT_SIZE, MAX_IO, MAX_VOLUME_SIZE};

const SIDECAR_SIZE: u64 = BLOCKS_PER_EXTENT * ENTRY_SIZE as u64;
/// One extent's room in a slab: its data, then its sidecar padded to a block.
const SLOT_SIZE: u64 = EXTENT_SIZE + BLOCK_SIZE;
const _: () = assert!(SIDECAR_SIZE <= BLOCK_SIZE);
const SLOTS_PER_SLAB: u64 = 1024;
const SLAB_SIZE: u64 = SLOT_SIZE * SLOTS_PER_SLAB;
/// Regions (1 MiB each) the activity log may keep across data-path flushes
/// (see [`Engine::flush_keep_hot`]); bounds what an attach after a crash
/// compares between replicas.
pub const ACTIVITY_LOG_LIMIT: usize = 1024;
/// Writes at least this large go around the page cache (`O_DIRECT`, see
/// [`write_blocks`]) where the file system allows it, and otherwise start
/// their writeback at once (see [`start_writeback`]).
const LARGE_WRITE: u64 = 128 << 10;
/// Regions logged ahead of a sequential run (see `Engine::log_ahead`).
const LOG_AHEAD: u64 = 64;
/// How far past a logged run a write may start and still extend it.
const LOG_BEHIND: u64 = 8;

/// Counters of the engine, reported by `volume show --json` and metrics.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub checksum_errors: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub scrubbed_bytes: AtomicU64,
}

struct State {
    volumes: BTreeMap<String, VolumeRec>,
    maps: HashMap<(u64, u64), u64>,
    extents: HashMap<u64, ExtentRec>,
    next_id: u64,
    /// Open slab files by (disk, slab number).
    slabs: HashMap<(u32, u64), Arc<File>>,
    /// The same slabs opened `O_DIRECT` for reads and large writes, by
    /// [`Engine::direct_slab`].
    direct: HashMap<(u32, u64), Option<Arc<File>>>,
    /// Per disk, the free slots below `next_slot`: cleared, durably.
    free: Vec<BTreeSet<u64>>,
    /// Slots cleared since the last flush: not handed out before a flush has
    /// made their clearing durable, or a power loss could leave a committed
    /// allocation pointing at the data of the extent that had it before.
    pending_free: Vec<(u32, u64)>,
    /// Per disk, the first slot never handed out since the engine opened.
    next_slot: Vec<u64>,
    /// Slabs written since the last flush.
    unsynced: HashSet<(u32, u64)>,
    dirs_dirty: bool,
    /// Per volume, the regions written since its last flush.
    recent: HashMap<String, BTreeSet<u64>>,
    /// Per volume, the regions with a write in flight here (counted): a
    /// flush keeps them in the activity log, since their data may reach
    /// the disk after it.
    writing: HashMap<String, BTreeMap<u64, u32>>,
    /// Per volume, the last activity-log commit: a write to a region
    /// logged by a commit not yet durable waits for it, as the write that
    /// logged it does.
    log_pending: HashMap<String, crate::meta::Pending>,
}

impl State {
    fn writing_regions(&self, name: &str) -> BTreeSet<u64> {
        self.writing
            .get(name)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    fn end_writing(&mut self, name: &str, regions: &[u64]) {
        if let Some(m) = self.writing.get_mut(name) {
            for r in regions {
                if let Some(n) = m.get_mut(r) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(r);
                    }
                }
            }
            if m.is_empty() {
                self.writing.remove(name);
            }
        }
    }
}

pub struct Engine {
    node_id: String,
    disks: Vec<PathBuf>,
    meta: Meta,
    state: Mutex<State>,
    /// Held shared by each read while it reads its slots outside the node
    /// lock, and exclusively (under the node lock) by a flush while it
    /// returns freed slots to use: so a slot a read located cannot be
    /// handed to another extent and rewritten under it.
    reading: RwLock<()>,
    pub metrics: EngineMetrics,
    /// Set when an fdatasync of data failed: Linux may have dropped the
    /// dirty pages and reports the error once, so a retry could succeed
    /// over lost data. The replica then acknowledges nothing more until the
    /// daemon restarts (after its operator has looked at the disk); its
    /// writer has marked it stale with every region not yet flushed.
    failed: Mutex<Option<String>>,
}

fn ext_count(size: u64) -> u64 {
    size.div_ceil(EXTENT_SIZE)
}

impl Engine {
    /// Opens the engine on `dirs` (the first holds `meta.redb`). Slots that
    /// no committed metadata refers to (freed, or allocated by writes that a
    /// crash left uncommitted) are hole-punched so that they read as zeros
    /// when handed out again; slabs with no slot in use are removed.
    pub fn open(node_id: &str, dirs: &[PathBuf]) -> Result<Engine> {
        validate_name(node_id)?;
        if dirs.is_empty() {
            return Err(Error::Invalid("at least one data dir is needed".into()));
        }
        for d in dirs {
            std::fs::create_dir_all(d.join("slabs"))?;
        }
        let meta = Meta::open(&dirs[0].join("meta.redb"), node_id)?;
        let loaded = meta.load()?;
        let mut used: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); dirs.len()];
        for e in loaded.extents.values() {
            let disk = e.disk as usize;
            if disk >= dirs.len() {
                return Err(Error::Invalid(format!(
                    "an extent lives on data dir #{} but only {} are given",
                    disk + 1,
                    dirs.len()
                )));
            }
            used[disk].insert(e.slot);
        }
        let mut slabs = HashMap::new();
        for (disk, d) in dirs.iter().enumerate() {
            for ent in std::fs::read_dir(d.join("slabs"))? {
                let path = ent?.path();
                let num = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".slab"))
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                let Some(num) = num else {
                    tracing::warn!(file = %path.display(), "ignoring a file that is no slab");
                    continue;
                };
                let first = num * SLOTS_PER_SLAB;
                if used[disk]
                    .range(first..first + SLOTS_PER_SLAB)
                    .next()
                    .is_none()
                {
                    tracing::info!(file = %path.display(), "removing a slab with no extent in use");
                    std::fs::remove_file(&path)?;
                    continue;
                }
                let f = OpenOptions::new().read(true).write(true).open(&path)?;
                // A crash between creating a slab and sizing it leaves it
                // short; reads of its slots must not hit the end of file.
                if f.metadata()?.len() < SLAB_SIZE {
                    f.set_len(SLAB_SIZE)?;
                }
                for slot in first..first + SLOTS_PER_SLAB {
                    if !used[disk].contains(&slot) {
                        clear_slot(&f, slot)?;
                    }
                }
                f.sync_data()?;
                advise_random(&f);
                slabs.insert((disk as u32, num), Arc::new(f));
            }
        }
        let next_slot: Vec<u64> = used
            .iter()
            .map(|u| u.last().map(|s| s + 1).unwrap_or(0))
            .collect();
        let free = used
            .iter()
            .zip(&next_slot)
            .map(|(u, &n)| (0..n).filter(|s| !u.contains(s)).collect())
            .collect();
        Ok(Engine {
            node_id: node_id.to_string(),
            disks: dirs.to_vec(),
            meta,
            state: Mutex::new(State {
                volumes: loaded.volumes,
                maps: loaded.maps,
                extents: loaded.extents,
                next_id: loaded.next_id,
                slabs,
                direct: HashMap::new(),
                free,
                next_slot,
                pending_free: Vec::new(),
                unsynced: HashSet::new(),
                dirs_dirty: false,
                recent: HashMap::new(),
                writing: HashMap::new(),
                log_pending: HashMap::new(),
            }),
            reading: RwLock::new(()),
            metrics: EngineMetrics::default(),
            failed: Mutex::new(None),
        })
    }

    /// Refuses everything once a sync failed (see `failed`).
    pub fn check_healthy(&self) -> Result<()> {
        let why = self
            .failed
            .lock()
            .expect(crate::POISONED)
            .clone()
            .or_else(|| self.meta.failure());
        match why {
            Some(why) => Err(Error::Io(format!(
                "this replica on node {} has failed ({why}) and acknowledges nothing until \
                 kiln-store is restarted; check the disk first",
                self.node_id
            ))),
            None => Ok(()),
        }
    }

    /// fdatasync (or fsync, `all`) of `f`; a failure fails the replica.
    fn sync_file(&self, f: &File, all: bool) -> Result<()> {
        let r =
            crate::faults::before_sync().and_then(
                |()| {
                    if all {
                        f.sync_all()
                    } else {
                        f.sync_data()
                    }
                },
            );
        r.map_err(|e| {
            tracing::error!(error = %e, "a data sync failed; this replica stops acknowledging");
            let why = format!("a data sync failed: {e}");
            self.failed
                .lock()
                .expect(crate::POISONED)
                .get_or_insert_with(|| why.clone());
            Error::Io(why)
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect(crate::POISONED)
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

    /// Is `epoch` the epoch of `name` here (a request from its current
    /// writer)? For requests that change the replica without going through
    /// an epoch-checked update of its record.
    pub fn check_writer(&self, name: &str, epoch: u64) -> Result<()> {
        let st = self.lock();
        Self::check_epoch(Self::vol(&st, name)?, epoch)
    }

    fn check_range(size: u64, offset: u64, len: u64, max: u64) -> Result<()> {
        if offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Err(Error::Invalid(format!(
                "offset {offset} and length {len} must be multiples of {BLOCK_SIZE}"
            )));
        }
        if len > max {
            return Err(Error::Invalid(format!("length {len} exceeds {max}")));
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {size}"
            ))),
        }
    }

    /// Commits `batch` durably, then clears the slots it freed; the next
    /// flush makes them available again. A slot that cannot be cleared stays
    /// out of use until the next open clears it.
    fn commit_free(&self, st: &mut State, batch: &Batch, freed: Vec<(u32, u64)>) -> Result<()> {
        self.meta.commit(batch)?;
        for (disk, slot) in freed {
            let cleared = self.slab(st, disk, slot).and_then(|f| clear_slot(&f, slot));
            match cleared {
                Ok(()) => {
                    st.pending_free.push((disk, slot));
                    st.unsynced.insert((disk, slot / SLOTS_PER_SLAB));
                }
                Err(e) => tracing::warn!(disk, slot, error = %e, "could not clear a freed slot"),
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
            crypt: rec.crypt.clone(),
        }
    }

    // ----- volumes -------------------------------------------------------

    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        replicas: Vec<ReplicaAddr>,
        epoch: u64,
        crypt: Option<CryptRec>,
    ) -> Result<VolumeInfo> {
        validate_name(name)?;
        if size == 0 || size % BLOCK_SIZE != 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::Invalid(format!(
                "size {size} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_VOLUME_SIZE}"
            )));
        }
        if let Some(c) = &crypt {
            c.validate(size)?;
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
            crypt,
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

    fn drop_map(&self, st: &mut State, batch: &mut Batch, map: u64, size: u64) -> Vec<(u32, u64)> {
        let mut freed = Vec::new();
        for idx in 0..ext_count(size) {
            if let Some(id) = st.maps.remove(&(map, idx)) {
                batch.maps.push(((map, idx), None));
                freed.extend(self.release(st, batch, id));
            }
        }
        freed
    }

    /// Deletes a volume and its snapshots, freeing extents no one else uses.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut st = self.lock();
        let rec = Self::vol(&st, name)?.clone();
        let mut batch = Batch::default();
        let mut freed = self.drop_map(&mut st, &mut batch, rec.map, rec.size);
        for snap in rec.snapshots.values() {
            freed.extend(self.drop_map(&mut st, &mut batch, snap.map, snap.size));
        }
        batch.volumes.push((name.to_string(), None));
        st.volumes.remove(name);
        self.commit_free(&mut st, &batch, freed)
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

    /// Raises the volume's epoch to `epoch`. An epoch is taken once: only
    /// a strictly greater value succeeds, so two writers that both chose
    /// the same epoch cannot both take it on this replica (the second is
    /// refused as fenced), and a majority cannot agree on both of them.
    pub fn set_epoch(&self, name: &str, epoch: u64) -> Result<u64> {
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        if epoch <= rec.epoch {
            return Err(Error::Fenced {
                request: epoch,
                current: rec.epoch,
            });
        }
        let mut rec = rec.clone();
        rec.epoch = epoch;
        self.commit_rec(st, name, rec)?;
        Ok(epoch)
    }

    /// Commits the new record of volume `name` and puts it in place; the
    /// node-wide lock `st` is let go while the commit reaches the disk, so
    /// other volumes go on. Returns once it is durable.
    fn commit_rec(&self, mut st: MutexGuard<'_, State>, name: &str, rec: VolumeRec) -> Result<()> {
        let pending = self.meta.commit_pending(&Batch {
            volumes: vec![(name.to_string(), Some(rec.clone()))],
            ..Batch::default()
        })?;
        st.volumes.insert(name.to_string(), rec);
        drop(st);
        self.meta.make_durable(pending)
    }

    /// Applies `change` to a volume record at `epoch` and commits it.
    fn update_rec(
        &self,
        name: &str,
        epoch: u64,
        change: impl FnOnce(&mut VolumeRec) -> Result<()>,
    ) -> Result<()> {
        let st = self.lock();
        let mut rec = Self::vol(&st, name)?.clone();
        Self::check_epoch(&rec, epoch)?;
        change(&mut rec)?;
        self.commit_rec(st, name, rec)
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

    /// Records the volume's encryption state (its key check, a rekey's
    /// progress). A plaintext volume stays plaintext.
    pub fn set_crypt(&self, name: &str, epoch: u64, crypt: CryptRec) -> Result<()> {
        self.update_rec(name, epoch, |rec| {
            crypt.validate(rec.size)?;
            if rec.crypt.is_none() {
                return Err(Error::Invalid(format!("{name} is not encrypted")));
            }
            rec.crypt = Some(crypt);
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
        for node in stale.keys() {
            validate_name(node)?;
        }
        self.update_rec(name, epoch, |rec| {
            let n = ext_count(rec.size);
            if stale.values().flatten().any(|r| *r >= n) {
                return Err(Error::Invalid("region beyond the volume".into()));
            }
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
            let mut freed = Vec::new();
            for idx in ext_count(size)..ext_count(old) {
                if let Some(id) = st.maps.remove(&(rec.map, idx)) {
                    batch.maps.push(((rec.map, idx), None));
                    freed.extend(self.release(&mut st, &mut batch, id));
                }
            }
            self.commit_free(&mut st, &batch, freed)?;
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

    /// Reads `[offset, offset+len)` of `map`: where its blocks are is
    /// looked up under the node lock `st`, which is then let go, so that
    /// reads (of every volume here) and writes run at once; `reading` keeps
    /// the slots found from being reused meanwhile.
    fn read_map(
        &self,
        mut st: MutexGuard<'_, State>,
        map: u64,
        offset: u64,
        len: u64,
    ) -> Result<ReadOut> {
        // (position in the read, its length, extent index, first block, slab, slot base)
        let mut pieces = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let idx = abs / EXTENT_SIZE;
            let ext_start = idx * EXTENT_SIZE;
            let n = (len - pos).min(ext_start + EXTENT_SIZE - abs);
            if let Some(id) = st.maps.get(&(map, idx)).copied() {
                let (f, base, key) = self.locate(&mut st, id)?;
                let direct = self.direct_slab(&mut st, key);
                pieces.push((pos, n, idx, (abs - ext_start) / BLOCK_SIZE, f, direct, base));
            }
            pos += n;
        }
        let _reading = self.reading.read().expect(crate::POISONED);
        drop(st);
        let mut data = IoBuf::zeroed(len as usize);
        let mut bad = Vec::new();
        for (pos, n, idx, b0, f, direct, base) in pieces {
            let buf = &mut data[pos as usize..(pos + n) as usize];
            for b in read_blocks(&f, direct.as_deref(), base, b0, buf)? {
                bad.push(idx * BLOCKS_PER_EXTENT + b0 + b);
            }
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
        let st = self.lock();
        let rec = Self::vol(&st, name)?;
        Self::check_range(rec.size, offset, len, MAX_IO)?;
        let map = rec.map;
        self.read_map(st, map, offset, len)
    }

    /// This node's counters.
    pub fn node_metrics(&self) -> NodeMetrics {
        use std::sync::atomic::Ordering::Relaxed;
        NodeMetrics {
            checksum_errors: self.metrics.checksum_errors.load(Relaxed),
            scrub_repaired_blocks: self.metrics.repaired_blocks.load(Relaxed),
            scrubbed_bytes: self.metrics.scrubbed_bytes.load(Relaxed),
        }
    }
}

mod blocks;
mod flush;
mod read_many;
mod scrub;
mod slots;
mod snapshots;
#[cfg(test)]
mod tests;
mod uring;
mod write;

pub use blocks::slab_space;
use blocks::{advise_random, clear_slot, read_blocks, start_writeback, write_blocks};
