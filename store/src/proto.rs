//! The wire protocol, shared by node-to-node TCP and the local unix socket.
//!
//! Every message is one frame:
//!
//! ```text
//! offset size field
//! 0      4    magic "KLNS"
//! 4      2    version (u16 LE), currently 1
//! 6      2    kind (u16 LE): 1 request, 2 response, 3 progress
//! 8      4    body length (u32 LE), at most MAX_BODY
//! 12     4    crc32c of the body (u32 LE)
//! 16     n    body: postcard encoding of Request, Response or Progress
//! ```
//!
//! A connection carries one request at a time; a request gets zero or more
//! progress frames, then exactly one response. A peer that sends a bad
//! magic, version, length or checksum is disconnected; a well-framed but
//! invalid request gets an error response.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IoSlice, Read, Write};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::crypt::VolumeKey;
use crate::error::{Error, Result, WireError};
use crate::iobuf::IoBuf;
use crate::meta::ReplicaAddr;
pub use crate::types::{
    BadBlock, CryptRec, NodeMetrics, ReadOut, RegionDigest, SnapshotLayout, VolumeInfo,
    VolumeLayout,
};
use crate::MAX_IO;

pub const MAGIC: [u8; 4] = *b"KLNS";
pub const VERSION: u16 = 1;
pub const HEADER_SIZE: usize = 16;
/// Largest body accepted: one maximal I/O plus room for the envelope.
pub const MAX_BODY: u32 = (MAX_IO + (1 << 20)) as u32;
/// How long a peer may take to answer a request that does not wait for
/// its disk: past it, the peer is taken for failed.
pub const IO_DEADLINE: Duration = Duration::from_secs(3);
/// How long a peer may take to answer a request that waits for its disk
/// (a flush, a durable metadata commit): a slow flush is not a failure.
pub const SYNC_DEADLINE: Duration = Duration::from_secs(30);

/// A daemon closes a peer's connection that sent nothing for this long
/// (`serve --peer-idle-timeout`, default 600 s)...
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// ...so a link idle for this long is not reused: a new one is opened.
pub const LINK_MAX_IDLE: Duration = Duration::from_secs(300);

/// Most regions one [`Request::RegionDigests`] may ask for.
pub const MAX_DIGEST_REGIONS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Progress = 3,
}

/// Requests. The first group is served to other nodes over TCP (replica
/// operations on this node's local copy); all are served on the unix socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    // --- replica operations -------------------------------------------
    CreateReplica {
        name: String,
        size: u64,
        replicas: Vec<ReplicaAddr>,
        epoch: u64,
        /// Encryption metadata (the key's check, never the key).
        crypt: Option<CryptRec>,
    },
    /// Records an encrypted volume's key check and rekey progress.
    SetCrypt {
        name: String,
        epoch: u64,
        crypt: CryptRec,
    },
    /// Only the current writer deletes (its epoch must be the replica's).
    DeleteReplica {
        name: String,
        epoch: u64,
    },
    ReplicaInfo {
        name: String,
    },
    SetEpoch {
        name: String,
        epoch: u64,
    },
    SetReplicas {
        name: String,
        epoch: u64,
        replicas: Vec<ReplicaAddr>,
    },
    Write {
        name: String,
        epoch: u64,
        offset: u64,
        data: IoBuf,
        /// Replicas that miss this write; their dirty maps gain its regions.
        stale: Vec<String>,
    },
    Discard {
        name: String,
        epoch: u64,
        offset: u64,
        len: u64,
        stale: Vec<String>,
    },
    /// Reads this node's local copy (verified; bad blocks are listed).
    Read {
        name: String,
        offset: u64,
        len: u64,
    },
    /// Durability barrier plus activity-log checkpoint.
    Flush {
        name: String,
        epoch: u64,
    },
    MarkStale {
        name: String,
        epoch: u64,
        node: String,
        regions: Vec<u64>,
    },
    ClearStale {
        name: String,
        epoch: u64,
        node: String,
    },
    SetStaleMap {
        name: String,
        epoch: u64,
        stale: BTreeMap<String, BTreeSet<u64>>,
    },
    Resize {
        name: String,
        epoch: u64,
        size: u64,
    },
    Snapshot {
        name: String,
        snap: String,
        epoch: u64,
    },
    DeleteSnapshot {
        name: String,
        snap: String,
        epoch: u64,
    },
    CloneReplica {
        name: String,
        snap: String,
        new: String,
        epoch: u64,
    },
    /// Verify every block of the local copy, repairing from peers.
    ScrubReplica {
        name: String,
    },
    // --- local control (unix socket only) --------------------------------
    BlockLocation {
        name: String,
        block: u64,
    },
    /// Creates a volume; with `key`, encrypted with it (the replicas
    /// record only its check) and attached here with it.
    VolCreate {
        name: String,
        size: u64,
        replicas: Vec<ReplicaAddr>,
        key: Option<VolumeKey>,
    },
    VolList,
    VolShow {
        name: String,
    },
    VolDelete {
        name: String,
    },
    VolResize {
        name: String,
        size: u64,
    },
    VolSnapshot {
        name: String,
        snap: String,
    },
    VolDeleteSnapshot {
        name: String,
        snap: String,
    },
    VolClone {
        name: String,
        snap: String,
        new: String,
    },
    VolRebuild {
        name: String,
        add: ReplicaAddr,
        remove: Option<String>,
    },
    VolScrub {
        name: String,
    },
    VolAttach {
        name: String,
        /// Attach even without a majority of replicas reachable.
        force: bool,
        /// The key of an encrypted volume (refused for a plaintext one).
        key: Option<VolumeKey>,
        /// The new key of a rekey that was interrupted (resumed on attach).
        next_key: Option<VolumeKey>,
    },
    /// Re-encrypts an attached encrypted volume with `key`, online (progress
    /// frames: bytes done of total). Refused while it has snapshots.
    VolRekey {
        name: String,
        key: VolumeKey,
    },
    VolDetach {
        name: String,
    },
    VolRead {
        name: String,
        offset: u64,
        len: u64,
    },
    VolWrite {
        name: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    VolDiscard {
        name: String,
        offset: u64,
        len: u64,
    },
    VolFlush {
        name: String,
    },
    /// Serve the attached volume as a vhost-user-blk backend on the unix
    /// socket `socket` (replacing an earlier export of it). Detaching or
    /// deleting the volume stops the export.
    VolExportVhost {
        name: String,
        socket: String,
    },
    /// The writer's data-path flush: a durability barrier like `Flush`,
    /// but the activity log keeps the regions written recently (up to
    /// the engine's `ACTIVITY_LOG_LIMIT`), so that writes to them need no
    /// durable metadata commit (like DRBD's activity-log extents).
    FlushHot {
        name: String,
        epoch: u64,
    },
    /// Which extent backs each allocated region of the live volume and of
    /// each snapshot (so that a rebuild can tell which regions two of them
    /// share).
    Layout {
        name: String,
    },
    /// Reads (and verifies) a range of a snapshot.
    ReadSnapshot {
        name: String,
        snap: String,
        offset: u64,
        len: u64,
    },
    /// Is region `region` of the live volume allocated?
    RegionAllocated {
        name: String,
        region: u64,
    },
    /// A digest of each of `regions` of the live volume, as it reads (for
    /// comparing replicas: see `verify`). At most
    /// [`MAX_DIGEST_REGIONS`] regions.
    RegionDigests {
        name: String,
        regions: Vec<u64>,
    },
    /// Takes blocks of `regions` that fail their checksum as they are (see
    /// `Engine::adopt_torn`): only for regions written since the last
    /// flush, when a power loss may have torn them.
    AdoptTorn {
        name: String,
        epoch: u64,
        regions: Vec<u64>,
    },
    /// [`Request::VolExportVhost`] with `queues` queues (1 to 64) and,
    /// with `read_only`, refusing writes.
    VolExport {
        name: String,
        socket: String,
        queues: u16,
        read_only: bool,
    },
    /// [`Request::VolAttach`] then [`Request::VolExport`] as one step,
    /// answered as `VolAttach` is. The export is checked before the attach,
    /// and an export that still fails undoes an attach this request made:
    /// the volume is never left attached here with nothing serving it.
    VolAttachExport {
        name: String,
        force: bool,
        key: Option<VolumeKey>,
        next_key: Option<VolumeKey>,
        socket: String,
        queues: u16,
        read_only: bool,
    },
    /// Several [`Request::Write`]s of one volume as one request (the
    /// writer's group commit): applied in order, answered once, `Ok` only
    /// if every one of them is in. The writes never overlap.
    WriteBatch {
        name: String,
        epoch: u64,
        writes: Vec<BatchWrite>,
        stale: Vec<String>,
    },
}

/// One write of a [`Request::WriteBatch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchWrite {
    pub offset: u64,
    pub data: IoBuf,
}

impl Request {
    /// How long the node that sends this to a peer waits for the answer.
    pub fn deadline(&self) -> Duration {
        match self {
            Request::Write { .. }
            | Request::WriteBatch { .. }
            | Request::Discard { .. }
            | Request::Read { .. }
            | Request::ReplicaInfo { .. }
            | Request::Layout { .. }
            | Request::ReadSnapshot { .. }
            | Request::RegionAllocated { .. } => IO_DEADLINE,
            _ => SYNC_DEADLINE,
        }
    }

    /// This [`Request::VolAttach`] as a [`Request::VolAttachExport`] that
    /// also serves the volume on `socket`; any other request as it is.
    pub fn with_export(self, socket: String, queues: u16, read_only: bool) -> Request {
        match self {
            Request::VolAttach {
                name,
                force,
                key,
                next_key,
            } => Request::VolAttachExport {
                name,
                force,
                key,
                next_key,
                socket,
                queues,
                read_only,
            },
            other => other,
        }
    }

    /// Does this request carry key material? (Its encoded frame is wiped
    /// after use; it is never a replica operation.)
    pub fn carries_key(&self) -> bool {
        match self {
            Request::VolCreate { key, .. } => key.is_some(),
            Request::VolAttach { key, next_key, .. }
            | Request::VolAttachExport { key, next_key, .. } => key.is_some() || next_key.is_some(),
            Request::VolRekey { .. } => true,
            _ => false,
        }
    }

    /// May this request come from another node? An allow-list: a new
    /// request type is refused on the network until it is added here.
    pub fn is_replica_op(&self) -> bool {
        matches!(
            self,
            Request::CreateReplica { .. }
                | Request::SetCrypt { .. }
                | Request::DeleteReplica { .. }
                | Request::ReplicaInfo { .. }
                | Request::SetEpoch { .. }
                | Request::SetReplicas { .. }
                | Request::Write { .. }
                | Request::WriteBatch { .. }
                | Request::Discard { .. }
                | Request::Read { .. }
                | Request::Flush { .. }
                | Request::MarkStale { .. }
                | Request::ClearStale { .. }
                | Request::SetStaleMap { .. }
                | Request::Resize { .. }
                | Request::Snapshot { .. }
                | Request::DeleteSnapshot { .. }
                | Request::CloneReplica { .. }
                | Request::ScrubReplica { .. }
                | Request::FlushHot { .. }
                | Request::Layout { .. }
                | Request::ReadSnapshot { .. }
                | Request::RegionAllocated { .. }
                | Request::RegionDigests { .. }
                | Request::AdoptTorn { .. }
        )
    }
}

/// State of one replica as the writer sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub node: String,
    pub addr: String,
    /// "in-sync", "stale" or "resyncing" (or "unknown" when not attached).
    pub state: String,
    /// Regions this replica still has to resync.
    pub dirty_regions: u64,
}

/// What `volume show` and `volume list` report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub epoch: u64,
    /// Is this daemon the volume's writer?
    pub attached: bool,
    pub fenced: bool,
    pub replicas: Vec<ReplicaStatus>,
    pub snapshots: Vec<String>,
    /// Bytes allocated on this node's replica (0 if it has none).
    pub allocated_bytes: u64,
    /// Bytes and regions copied to resyncing replicas by this writer.
    pub resync_bytes: u64,
    pub resync_regions: u64,
    /// Blocks this writer repaired on a replica after a checksum mismatch.
    pub repaired_blocks: u64,
    /// Checksum mismatches this writer saw on reads.
    pub checksum_errors: u64,
    /// Counters of this node's engine (all volumes).
    pub node: NodeMetrics,
    pub encrypted: bool,
    /// The public fingerprint of the volume's key (`None`: plaintext).
    pub key_check: Option<String>,
    /// An online rekey in progress.
    pub rekey: Option<RekeyStatus>,
    /// Replicas' answers this writer polled for (a lone small write; see
    /// `serve --reply-poll-us`), and how many arrived while it polled.
    pub replies_polled: u64,
    pub replies_caught_polling: u64,
}

/// Progress of an online rekey (bytes of the volume re-encrypted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RekeyStatus {
    pub done: u64,
    pub total: u64,
    pub next_key_check: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ScrubReport {
    pub scanned_bytes: u64,
    pub bad_blocks: Vec<BadBlock>,
    pub repaired: u64,
    pub unrepaired: u64,
    /// Regions whose copies were compared across the replicas (by the
    /// writer; 0 where there is no writer or one replica).
    pub compared_regions: u64,
    /// Regions found to differ from the writer's copy, and copied over it.
    pub diverged_regions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Err(WireError),
    Info(VolumeInfo),
    Read(ReadOut),
    Scrub(ScrubReport),
    Location(Option<(String, u64)>),
    Status(VolumeStatus),
    Volumes(Vec<VolumeStatus>),
    Layout(VolumeLayout),
    Allocated(bool),
    Digests(Vec<RegionDigest>),
}

impl Response {
    pub fn from_result(r: Result<Response>) -> Response {
        r.unwrap_or_else(|e| Response::Err(e.into()))
    }

    /// Turns an error response into an `Err`.
    pub fn into_result(self) -> Result<Response> {
        match self {
            Response::Err(e) => Err(e.into()),
            r => Ok(r),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

pub fn write_frame(w: &mut dyn Write, kind: Kind, body: &[u8]) -> Result<()> {
    if body.len() > MAX_BODY as usize {
        return Err(Error::Protocol(format!(
            "frame of {} bytes too large",
            body.len()
        )));
    }
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crate::crc::crc32c(body).to_le_bytes());
    // Header and body in one vectored write: no copy of the body (up to
    // MAX_IO of data) into a frame buffer, and one segment on the wire.
    let mut parts = [IoSlice::new(&h), IoSlice::new(body)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    w.flush()?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream before a header.
pub fn read_frame(r: &mut dyn Read) -> Result<Option<(Kind, Vec<u8>)>> {
    let mut h = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Protocol("truncated header".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Unavailable(e.to_string())),
        }
    }
    if h[0..4] != MAGIC {
        return Err(Error::Protocol("bad magic".into()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "unsupported protocol version {version}"
        )));
    }
    let kind = match u16::from_le_bytes([h[6], h[7]]) {
        1 => Kind::Request,
        2 => Kind::Response,
        3 => Kind::Progress,
        k => return Err(Error::Protocol(format!("unknown frame kind {k}"))),
    };
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_BODY {
        return Err(Error::Protocol(format!("frame of {len} bytes too large")));
    }
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    // Room for the whole body at once (grown as it arrived, a large
    // write's data was copied again at every doubling). Only address space
    // until the data arrives: a header that announces 5 MiB and sends
    // nothing costs no memory, and at most MAX_BODY per connection.
    let mut body = Vec::with_capacity(len as usize);
    r.take(u64::from(len))
        .read_to_end(&mut body)
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    if body.len() != len as usize {
        return Err(Error::Unavailable("connection closed in a frame".into()));
    }
    if crate::crc::crc32c(&body) != crc {
        return Err(Error::Protocol("frame checksum mismatch".into()));
    }
    Ok(Some((kind, body)))
}

pub fn send<T: Serialize>(w: &mut dyn Write, kind: Kind, msg: &T) -> Result<()> {
    let body = to_body(msg)?;
    write_frame(w, kind, &body)
}

/// The encoding of `msg`, in a buffer of exactly its size: serialized into
/// a growing one, a 4 MiB write's data was copied again at each doubling
/// (about one more copy of it in all; a tenth of a replica's CPU in a
/// sequential pass), and a key-carrying request left its partial copies in
/// freed memory, where [`send_request`]'s wipe does not reach.
fn to_body<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>> {
    let err = |e: postcard::Error| Error::Protocol(e.to_string());
    let size = postcard::experimental::serialized_size(msg).map_err(err)?;
    postcard::to_extend(msg, Vec::with_capacity(size)).map_err(err)
}

/// Encodes a request once, for [`write_frame`] on several connections
/// (a write goes to every replica). Never for a request that carries a key.
pub fn encode(req: &Request) -> Result<Vec<u8>> {
    if req.carries_key() {
        return Err(Error::Invalid(
            "a request with a key is sent, not kept".into(),
        ));
    }
    to_body(req)
}

/// Sends a request; the encoding of one that carries a key is wiped once
/// written.
pub fn send_request(w: &mut dyn Write, req: &Request) -> Result<()> {
    let mut body = to_body(req)?;
    let r = write_frame(w, Kind::Request, &body);
    if req.carries_key() {
        zeroize::Zeroize::zeroize(&mut body);
    }
    r
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    postcard::from_bytes(body).map_err(|e| Error::Protocol(format!("bad message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_rejects_garbage() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Request, &Request::VolList).unwrap();
        let (k, body) = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(k, Kind::Request);
        assert!(matches!(
            decode::<Request>(&body).unwrap(),
            Request::VolList
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(read_frame(&mut bad.as_slice()).is_err());
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut bad.as_slice()).is_err());
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(read_frame(&mut bad.as_slice()).is_err());
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_large_write_is_encoded_and_read_in_buffers_of_its_exact_size() {
        let req = Request::Write {
            name: "vol".into(),
            epoch: 3,
            offset: 1 << 20,
            data: IoBuf::copy_from(&[7u8; 300 << 10]),
            stale: vec!["n2".into()],
        };
        let body = encode(&req).unwrap();
        assert_eq!(body, postcard::to_stdvec(&req).unwrap());
        assert_eq!(body.capacity(), body.len(), "encoded without regrowing");
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Request, &body).unwrap();
        let (_, got) = read_frame(&mut wire.as_slice()).unwrap().unwrap();
        assert_eq!(got, body);
        assert_eq!(got.capacity(), got.len(), "read without regrowing");
    }

    #[test]
    fn a_frame_that_announces_more_than_it_sends_is_refused() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Request, &Request::VolList).unwrap();
        buf[8..12].copy_from_slice(&MAX_BODY.to_le_bytes());
        let err = read_frame(&mut buf.as_slice()).unwrap_err();
        assert!(err.to_string().contains("closed in a frame"), "{err}");
    }

    #[test]
    fn requests_with_keys_stay_local_and_never_print_their_keys() {
        let key = VolumeKey::random().unwrap();
        let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
        let reqs = [
            Request::VolAttach {
                name: "v".into(),
                force: false,
                key: Some(key.clone()),
                next_key: None,
            },
            Request::VolRekey {
                name: "v".into(),
                key: key.clone(),
            },
            Request::VolCreate {
                name: "v".into(),
                size: 4096,
                replicas: vec![],
                key: Some(key.clone()),
            },
        ];
        for r in &reqs {
            assert!(r.carries_key() && !r.is_replica_op());
            let dbg = format!("{r:?}");
            assert!(
                !dbg.contains(&hex[..16]) && dbg.contains(&key.check()),
                "{dbg}"
            );
            // The key survives the trip over the control socket.
            let mut buf = Vec::new();
            send_request(&mut buf, r).unwrap();
            let (_, body) = read_frame(&mut buf.as_slice()).unwrap().unwrap();
            match decode::<Request>(&body).unwrap() {
                Request::VolAttach { key: Some(k), .. }
                | Request::VolRekey { key: k, .. }
                | Request::VolCreate { key: Some(k), .. } => assert_eq!(k.expose(), key.expose()),
                other => panic!("{other:?}"),
            }
        }
        let plain = Request::VolAttach {
            name: "v".into(),
            force: false,
            key: None,
            next_key: None,
        };
        assert!(!plain.carries_key());
        assert!(Request::SetCrypt {
            name: "v".into(),
            epoch: 1,
            crypt: CryptRec {
                key_check: key.check(),
                rekey: None,
            },
        }
        .is_replica_op());
    }

    #[test]
    fn every_request_has_a_deadline_and_only_replica_requests_reach_the_network() {
        let flush = Request::Flush {
            name: "v".into(),
            epoch: 1,
        };
        assert_eq!(flush.deadline(), SYNC_DEADLINE);
        let read = Request::Read {
            name: "v".into(),
            offset: 0,
            len: 4096,
        };
        assert_eq!(read.deadline(), IO_DEADLINE);
        assert!(read.is_replica_op() && flush.is_replica_op());
        assert!(!Request::VolList.is_replica_op());
        assert!(!Request::VolFlush { name: "v".into() }.is_replica_op());
    }
}
