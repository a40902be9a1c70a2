//! Durable metadata in redb: volumes (with snapshots, epoch, dirty-region
//! maps), extent maps and extent records.
//!
//! The engine keeps a full copy in memory and writes each change through a
//! [`Batch`] committed in one ACID redb transaction with immediate
//! durability, before the data write that depends on it is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// volume name → postcard([`VolumeRec`])
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// (map id, extent index) → extent id
const MAPS: TableDefinition<(u64, u64), u64> = TableDefinition::new("maps");
/// extent id → (disk index, reference count)
const EXTENTS: TableDefinition<u64, (u32, u32)> = TableDefinition::new("extents");
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRec {
    pub disk: u32,
    pub refs: u32,
}

/// Everything loaded at startup.
pub struct Loaded {
    pub volumes: BTreeMap<String, VolumeRec>,
    pub maps: HashMap<(u64, u64), u64>,
    pub extents: HashMap<u64, ExtentRec>,
    pub next_id: u64,
}

/// A set of changes committed together.
#[derive(Default)]
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
}

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
        Ok(Meta { db })
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
            let (disk, refs) = v.value();
            extents.insert(k.value(), ExtentRec { disk, refs });
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

    /// Commits `batch` durably (fsync before return).
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
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
                        ext.insert(*id, (r.disk, r.refs))?;
                    }
                    None => {
                        ext.remove(*id)?;
                    }
                }
            }
            if let Some(n) = batch.next_id {
                txn.open_table(COUNTERS)?.insert("next_id", n)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}
