//! Types that the engine produces and the wire protocol carries, shared
//! by both so that neither module needs the other.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::meta::ReplicaAddr;

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

/// A volume as one replica lays it out (see [`Request::Layout`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeLayout {
    /// (region, extent id on that replica) of the live volume, by region.
    pub live: Vec<(u64, u64)>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotLayout>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotLayout {
    pub name: String,
    pub size: u64,
    /// (region, extent id on that replica), by region.
    pub regions: Vec<(u64, u64)>,
}

/// Counters of one node's engine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeMetrics {
    /// Blocks that failed their checksum on this node (reads and scrubs).
    pub checksum_errors: u64,
    /// Blocks this node repaired by scrubbing.
    pub scrub_repaired_blocks: u64,
    pub scrubbed_bytes: u64,
}

/// The digest of one region of one replica (crc32c of its contents, as
/// DRBD's online verify may use); `bad`: some block failed its checksum.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionDigest {
    pub crc: u32,
    pub bad: bool,
}
