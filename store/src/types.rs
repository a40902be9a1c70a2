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
    /// `None`: not encrypted.
    pub crypt: Option<CryptRec>,
}

/// A volume's encryption, as every replica records it: the public
/// fingerprint of its key ([`crate::crypt::key_check`]), never the key,
/// and an online rekey's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CryptRec {
    pub key_check: String,
    pub rekey: Option<RekeyRec>,
}

/// An online rekey in progress: regions below `watermark` (bytes, a
/// multiple of the region size) are under the new key, the rest under the
/// old one, except `hot`, the region being re-encrypted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RekeyRec {
    pub next_key_check: String,
    pub watermark: u64,
    pub hot: Option<HotRegion>,
}

/// The region a rekey was re-encrypting: a fingerprint of each block's old
/// ciphertext (first 8 bytes of its SHA-256; 0 for a hole), so that after a
/// crash each block can be told old (fingerprint matches) from new.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HotRegion {
    pub region: u64,
    pub old: Vec<u64>,
}

impl CryptRec {
    /// Bounds on what a peer may ask a replica to record.
    pub fn validate(&self, size: u64) -> crate::Result<()> {
        let ok_check = |c: &str| c.len() == 16 && c.bytes().all(|b| b.is_ascii_hexdigit());
        let bad = |m: &str| Err(crate::Error::Invalid(format!("bad encryption record: {m}")));
        if !ok_check(&self.key_check) {
            return bad("key check");
        }
        if let Some(r) = &self.rekey {
            if !ok_check(&r.next_key_check) {
                return bad("next key check");
            }
            if r.watermark % crate::EXTENT_SIZE != 0
                || r.watermark > size.next_multiple_of(crate::EXTENT_SIZE)
            {
                return bad("watermark");
            }
            if let Some(h) = &r.hot {
                if h.old.len() as u64 > crate::BLOCKS_PER_EXTENT
                    || h.region >= size.div_ceil(crate::EXTENT_SIZE)
                {
                    return bad("hot region");
                }
            }
        }
        Ok(())
    }
}

/// Result of a read: the data (blocks that failed verification are zeroed)
/// and the volume block numbers that failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadOut {
    pub data: crate::iobuf::IoBuf,
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
