//! Durable metadata in redb: volumes (with snapshots, epoch, dirty-region
//! maps), extent maps and extent records.
//!
//! The engine keeps a full copy in memory and writes each change through a
//! [`Batch`] committed in one ACID redb transaction before the data write
//! that depends on it is acknowledged. The batch is first appended to a
//! write-ahead log (`meta.wal`), then committed to redb without an fsync.
//! A durable commit ([`Meta::commit`]) fdatasyncs the log; a logged one
//! (extent allocations on the data path, [`Meta::commit_logged`]) leaves
//! the record in the page cache, where it survives `kill -9` of the daemon,
//! until the next durable commit or flush ([`Meta::sync`]). The log is a
//! preallocated file written in place, so its fdatasync flushes data
//! without a file-system journal commit. When it is full, a durable redb
//! commit (a checkpoint) makes everything in it redundant and it starts
//! over; at startup, records newer than the last checkpoint are replayed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// volume name → postcard([`VolumeRec`])
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (map id, extent index) → extent id
const MAPS: TableDefinition<(u64, u64), u64> = TableDefinition::new("maps");
/// extent id → (disk index, reference count, slot on that disk)
const EXTENTS: TableDefinition<u64, (u32, u32, u64)> = TableDefinition::new("extent_slots");
/// "next_id" → next free id for volumes, maps and extents
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// "node_id" → this node's id, "disks" → number of data dirs at creation
const NODE: TableDefinition<&str, &str> = TableDefinition::new("node");

/// One member of a volume's replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAddr {
    pub node: String,
    pub addr: String,
}

/// A snapshot: a frozen extent map.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapRec {
    pub map: u64,
    pub size: u64,
}

/// A volume as one replica knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: u64,
    pub size: u64,
    /// The id of this volume's live extent map.
    pub map: u64,
    /// Highest epoch this replica has accepted; writes must carry it.
    pub epoch: u64,
    pub replicas: Vec<ReplicaAddr>,
    pub snapshots: BTreeMap<String, SnapRec>,
    /// Regions this replica wrote, per epoch, since its last flush
    /// (checkpoint): what may differ from the other replicas after a crash
    /// or after its writer was fenced.
    pub activity: BTreeMap<u64, BTreeSet<u64>>,
    /// Peers the writer marked stale, with the regions each missed.
    pub stale: BTreeMap<String, BTreeSet<u64>>,
    /// Encryption (key fingerprint, rekey progress); `None`: plaintext.
    pub crypt: Option<crate::types::CryptRec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentRec {
    pub disk: u32,
    pub refs: u32,
    /// Where the extent lives in its disk's slab files (see
    /// [`crate::engine`]).
    pub slot: u64,
}

/// Everything loaded at startup.
pub struct Loaded {
    pub volumes: BTreeMap<String, VolumeRec>,
    pub maps: HashMap<(u64, u64), u64>,
    pub extents: HashMap<u64, ExtentRec>,
    pub next_id: u64,
}

/// A set of changes committed together.
#[derive(Default, Serialize, Deserialize)]
pub struct Batch {
    pub volumes: Vec<(String, Option<VolumeRec>)>,
    pub maps: Vec<((u64, u64), Option<u64>)>,
    pub extents: Vec<(u64, Option<ExtentRec>)>,
    pub next_id: Option<u64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty()
            && self.maps.is_empty()
            && self.extents.is_empty()
            && self.next_id.is_none()
    }
}

pub struct Meta {
    db: Database,
    wal: Mutex<Wal>,
    /// The log file again, to fdatasync it without holding `wal` (appends
    /// go on meanwhile; see [`Meta::make_durable`]).
    wal_sync: File,
    /// Set when a sync of the log or a durable commit failed: what was in
    /// the page cache may be gone, so nothing is committed any more.
    failed: Mutex<Option<String>>,
}

/// The write-ahead log of commits since the last checkpoint (durable redb
/// commit). Record: len (u32 LE) | crc32c of the rest (u32 LE) | seq (u64
/// LE) | postcard(Batch); records are numbered consecutively and written
/// from the start of the file after each checkpoint, over the records of
/// earlier rounds (all numbered at or below the checkpoint's). Every redb
/// commit stores the sequence number of the last record it includes under
/// `wal_seq`.
struct Wal {
    file: File,
    /// Where the next record goes.
    len: u64,
    /// How much of the log is known durable.
    synced: u64,
    seq: u64,
    /// Checkpoints so far: a commit logged in an earlier round is durable.
    round: u64,
}

/// A commit logged but not yet durable: [`Meta::make_durable`] makes it so.
#[must_use = "a pending commit must be made durable before what depends on it"]
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    round: u64,
    end: u64,
}

const WAL_HEADER: usize = 8;
/// Size of the preallocated log; a full log is checkpointed (small in unit
/// tests, so that they wrap it).
const WAL_CAPACITY: u64 = if cfg!(test) { 64 << 10 } else { 4 << 20 };

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::Meta(e.to_string()))
}

impl Meta {
    /// Opens (or creates) the database at `path` for node `node_id`. Refuses
    /// a database that belongs to another node.
    pub fn open(path: &Path, node_id: &str) -> Result<Meta> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            let mut node = txn.open_table(NODE)?;
            let existing = node.get("node_id")?.map(|g| g.value().to_string());
            match existing {
                Some(id) if id != node_id => {
                    return Err(Error::Invalid(format!(
                        "data dir belongs to node {id:?}, not {node_id:?}"
                    )))
                }
                Some(_) => {}
                None => {
                    node.insert("node_id", node_id)?;
                }
            }
            txn.open_table(VOLUMES)?;
            txn.open_table(MAPS)?;
            txn.open_table(EXTENTS)?;
            let mut c = txn.open_table(COUNTERS)?;
            if c.get("next_id")?.is_none() {
                c.insert("next_id", 1)?;
            }
        }
        txn.commit()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.with_extension("wal"))?;
        let seq = Self::replay(&db, &file)?;
        // Replayed records were committed durably; the log starts over. Its
        // blocks are written once (zeros), so that later fdatasyncs of
        // records written in place need no journal commit.
        let size = file.metadata()?.len();
        if size < WAL_CAPACITY {
            file.write_all_at(&vec![0u8; (WAL_CAPACITY - size) as usize], size)?;
            file.sync_all()?;
        }
        Ok(Meta {
            failed: Mutex::new(None),
            db,
            wal_sync: file.try_clone()?,
            wal: Mutex::new(Wal {
                file,
                len: 0,
                synced: 0,
                seq,
                round: 0,
            }),
        })
    }

    /// Applies the log's records newer than the last durable commit, in
    /// order, and commits them durably. Stops at the first torn record (a
    /// write cut short by a crash was never acknowledged) and at the first
    /// that does not follow the one before (the end of this round's
    /// records, over an earlier round's). Returns the last sequence number.
    fn replay(db: &Database, file: &File) -> Result<u64> {
        let durable = db
            .begin_read()?
            .open_table(COUNTERS)?
            .get("wal_seq")?
            .map(|g| g.value())
            .unwrap_or(0);
        let mut buf = Vec::new();
        let size = file.metadata()?.len();
        buf.resize(size as usize, 0);
        file.read_exact_at(&mut buf, 0)?;
        let mut pos = 0usize;
        let mut seq = durable;
        let mut replayed = 0;
        while pos + WAL_HEADER <= buf.len() {
            let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes"));
            let body = pos + WAL_HEADER;
            if len < 8
                || body + len > buf.len()
                || crate::crc::crc32c(&buf[body..body + len]) != crc
            {
                break;
            }
            let s = u64::from_le_bytes(buf[body..body + 8].try_into().expect("8 bytes"));
            if s > durable && s != seq + 1 {
                break;
            }
            if s > durable {
                let batch: Batch = postcard::from_bytes(&buf[body + 8..body + len])
                    .map_err(|e| Error::Meta(format!("metadata log: {e}")))?;
                Self::apply(db, &batch, s, Durability::Immediate)?;
                seq = s;
                replayed += 1;
            }
            pos = body + len;
        }
        if replayed > 0 {
            tracing::info!(records = replayed, "replayed the metadata log");
        }
        Ok(seq)
    }

    fn wal(&self) -> MutexGuard<'_, Wal> {
        self.wal.lock().expect(crate::POISONED)
    }

    pub fn load(&self) -> Result<Loaded> {
        let txn = self.db.begin_read()?;
        let mut volumes = BTreeMap::new();
        for item in txn.open_table(VOLUMES)?.iter()? {
            let (k, v) = item?;
            let rec: VolumeRec =
                postcard::from_bytes(v.value()).map_err(|e| Error::Meta(e.to_string()))?;
            volumes.insert(k.value().to_string(), rec);
        }
        let mut maps = HashMap::new();
        for item in txn.open_table(MAPS)?.iter()? {
            let (k, v) = item?;
            maps.insert(k.value(), v.value());
        }
        let mut extents = HashMap::new();
        for item in txn.open_table(EXTENTS)?.iter()? {
            let (k, v) = item?;
            let (disk, refs, slot) = v.value();
            extents.insert(k.value(), ExtentRec { disk, refs, slot });
        }
        let next_id = txn
            .open_table(COUNTERS)?
            .get("next_id")?
            .map(|g| g.value())
            .unwrap_or(1);
        Ok(Loaded {
            volumes,
            maps,
            extents,
            next_id,
        })
    }

    /// Why the metadata stopped taking commits, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect(crate::POISONED).clone()
    }

    fn check(&self) -> Result<()> {
        match self.failure() {
            Some(why) => Err(Error::Io(format!("metadata failed earlier: {why}"))),
            None => Ok(()),
        }
    }

    /// Records a failed sync or durable commit; nothing commits after it.
    fn fail(&self, e: Error) -> Error {
        tracing::error!(error = %e, "metadata sync failed; this replica stops committing");
        self.failed
            .lock()
            .expect(crate::POISONED)
            .get_or_insert_with(|| e.to_string());
        e
    }

    /// Commits `batch` durably (fdatasync of the log before return), together
    /// with every logged commit before it.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        self.check()?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut wal = self.wal();
        if self.append(&mut wal, batch).map_err(|e| self.fail(e))? {
            Self::sync_log(&mut wal).map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    /// Logs `batch` now (in order with every other commit) and returns what
    /// [`Meta::make_durable`] needs to make it durable later: the caller can
    /// let go of its own locks before waiting for the disk, so that one
    /// volume's commit does not hold up the others.
    pub fn commit_pending(&self, batch: &Batch) -> Result<Pending> {
        self.check()?;
        let mut wal = self.wal();
        let logged = self.append(&mut wal, batch).map_err(|e| self.fail(e))?;
        Ok(Pending {
            round: wal.round,
            // Not logged: committed durably to redb already.
            end: if logged { wal.len } else { 0 },
        })
    }

    /// Returns once `p` is durable: fdatasyncs the log (without holding it,
    /// so appends continue) unless another sync or a checkpoint did already.
    pub fn make_durable(&self, p: Pending) -> Result<()> {
        self.check()?;
        let target = {
            let wal = self.wal();
            if wal.round != p.round || wal.synced >= p.end {
                return Ok(());
            }
            wal.len
        };
        crate::faults::before_sync()
            .and_then(|()| self.wal_sync.sync_data())
            .map_err(|e| self.fail(e.into()))?;
        let mut wal = self.wal();
        if wal.round == p.round {
            wal.synced = wal.synced.max(target);
        }
        Ok(())
    }

    /// Commits `batch` so that it survives the daemon being killed, but not
    /// necessarily a power loss until the next durable commit or
    /// [`Meta::sync`]: appended to the log (page cache), then committed to
    /// redb without fsync.
    pub fn commit_logged(&self, batch: &Batch) -> Result<()> {
        self.check()?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut wal = self.wal();
        self.append(&mut wal, batch).map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Makes every logged commit durable (a durability barrier for metadata).
    pub fn sync(&self) -> Result<()> {
        self.check()?;
        Self::sync_log(&mut self.wal()).map_err(|e| self.fail(e))
    }

    fn sync_log(wal: &mut Wal) -> Result<()> {
        if wal.synced < wal.len {
            crate::faults::before_sync()?;
            wal.file.sync_data()?;
            wal.synced = wal.len;
        }
        Ok(())
    }

    /// Logs `batch` as the next record and commits it to redb without
    /// durability. Returns false if, too large for the log, it was committed
    /// durably to redb instead (nothing left to sync).
    fn append(&self, wal: &mut Wal, batch: &Batch) -> Result<bool> {
        let seq = wal.seq + 1;
        let mut rec = vec![0u8; WAL_HEADER];
        rec.extend_from_slice(&seq.to_le_bytes());
        postcard::to_io(batch, &mut rec).map_err(|e| Error::Meta(e.to_string()))?;
        if wal.len + rec.len() as u64 > WAL_CAPACITY {
            self.checkpoint(wal)?;
            if rec.len() as u64 > WAL_CAPACITY {
                Self::apply(&self.db, batch, seq, Durability::Immediate)?;
                wal.seq = seq;
                return Ok(false);
            }
        }
        let len = (rec.len() - WAL_HEADER) as u32;
        let crc = crate::crc::crc32c(&rec[WAL_HEADER..]);
        rec[..4].copy_from_slice(&len.to_le_bytes());
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        wal.file.write_all_at(&rec, wal.len)?;
        wal.len += rec.len() as u64;
        wal.seq = seq;
        Self::apply(&self.db, batch, seq, Durability::None)?;
        Ok(true)
    }

    /// A durable redb commit of everything logged so far; the log starts
    /// over from its beginning.
    fn checkpoint(&self, wal: &mut Wal) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(COUNTERS)?.insert("wal_seq", wal.seq)?;
        txn.commit()?;
        wal.len = 0;
        wal.synced = 0;
        wal.round += 1;
        Ok(())
    }

    fn apply(db: &Database, batch: &Batch, seq: u64, durability: Durability) -> Result<()> {
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)
            .map_err(|e| Error::Meta(e.to_string()))?;
        {
            let mut vols = txn.open_table(VOLUMES)?;
            for (name, rec) in &batch.volumes {
                match rec {
                    Some(rec) => {
                        vols.insert(name.as_str(), encode(rec)?.as_slice())?;
                    }
                    None => {
                        vols.remove(name.as_str())?;
                    }
                }
            }
            let mut maps = txn.open_table(MAPS)?;
            for (k, v) in &batch.maps {
                match v {
                    Some(id) => {
                        maps.insert(*k, *id)?;
                    }
                    None => {
                        maps.remove(*k)?;
                    }
                }
            }
            let mut ext = txn.open_table(EXTENTS)?;
            for (id, rec) in &batch.extents {
                match rec {
                    Some(r) => {
                        ext.insert(*id, (r.disk, r.refs, r.slot))?;
                    }
                    None => {
                        ext.remove(*id)?;
                    }
                }
            }
            let mut c = txn.open_table(COUNTERS)?;
            if let Some(n) = batch.next_id {
                c.insert("next_id", n)?;
            }
            c.insert("wal_seq", seq)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn volume(size: u64) -> VolumeRec {
        VolumeRec {
            id: 1,
            size,
            map: 2,
            epoch: 1,
            replicas: Vec::new(),
            snapshots: BTreeMap::new(),
            activity: BTreeMap::new(),
            stale: BTreeMap::new(),
            crypt: None,
        }
    }

    fn set_volume(name: &str, rec: Option<VolumeRec>) -> Batch {
        Batch {
            volumes: vec![(name.to_string(), rec)],
            ..Batch::default()
        }
    }

    fn alloc(id: u64) -> Batch {
        Batch {
            maps: vec![((2, id), Some(id))],
            extents: vec![(
                id,
                Some(ExtentRec {
                    disk: 0,
                    refs: 1,
                    slot: id,
                }),
            )],
            next_id: Some(id + 1),
            ..Batch::default()
        }
    }

    /// What a `kill -9` leaves: the files as they are in the page cache
    /// now, with no shutdown work by redb (which, dropped, commits).
    fn crash_copy(from: &Path, to: &Path) -> PathBuf {
        std::fs::create_dir_all(to).unwrap();
        for f in ["meta.redb", "meta.wal"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
        to.join("meta.redb")
    }

    #[test]
    fn logged_commits_survive_a_crash_through_the_log() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("meta.redb");
        let m = Meta::open(&path, "n1").unwrap();
        m.commit(&set_volume("v", Some(volume(1 << 20)))).unwrap();
        for id in 10..20 {
            m.commit_logged(&alloc(id)).unwrap();
        }
        // Crashed without a checkpoint: redb has only its last durable
        // commit (the initial one); everything else comes from the log.
        let path = crash_copy(t.path(), &t.path().join("c1"));
        let m = Meta::open(&path, "n1").unwrap();
        let l = m.load().unwrap();
        assert_eq!(l.volumes["v"].size, 1 << 20);
        assert_eq!(l.extents.len(), 10);
        assert_eq!(l.next_id, 20);
        // After a second crash nothing is replayed twice or lost.
        m.commit_logged(&alloc(20)).unwrap();
        let path = crash_copy(&t.path().join("c1"), &t.path().join("c2"));
        let l = Meta::open(&path, "n1").unwrap().load().unwrap();
        assert_eq!(l.extents.len(), 11);
        assert_eq!(l.maps.len(), 11);
    }

    #[test]
    fn a_wrapped_log_never_replays_an_earlier_round() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("meta.redb");
        let m = Meta::open(&path, "n1").unwrap();
        // Round one: fills the log until it is checkpointed and starts over.
        m.commit(&set_volume("old", Some(volume(4096)))).unwrap();
        let mut id = 100;
        loop {
            let before = m.wal().len;
            m.commit_logged(&alloc(id)).unwrap();
            id += 1;
            if m.wal().len < before {
                break;
            }
        }
        // Round two, at the start of the log: "old" goes away, "new" comes.
        m.commit(&set_volume("old", None)).unwrap();
        m.commit(&set_volume("new", Some(volume(8192)))).unwrap();
        assert!(m.wal().len < 4096);
        let path = crash_copy(t.path(), &t.path().join("c"));
        let l = Meta::open(&path, "n1").unwrap().load().unwrap();
        assert!(!l.volumes.contains_key("old"), "an old record was replayed");
        assert_eq!(l.volumes["new"].size, 8192);
        assert_eq!(l.extents.len() as u64, id - 100);
    }

    #[test]
    fn a_torn_record_ends_the_replay() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("meta.redb");
        let m = Meta::open(&path, "n1").unwrap();
        m.commit_logged(&alloc(1)).unwrap();
        let end_of_first = m.wal().len;
        m.commit_logged(&alloc(2)).unwrap();
        m.commit_logged(&alloc(3)).unwrap();
        let path = crash_copy(t.path(), &t.path().join("c"));
        // The second record is cut short: it and everything after it are
        // dropped (never acknowledged as durable).
        let wal = OpenOptions::new()
            .write(true)
            .open(path.with_extension("wal"))
            .unwrap();
        wal.write_all_at(&[0xff; 4], end_of_first + WAL_HEADER as u64 + 9)
            .unwrap();
        let l = Meta::open(&path, "n1").unwrap().load().unwrap();
        assert_eq!(l.extents.keys().copied().collect::<Vec<_>>(), vec![1]);
    }
}
