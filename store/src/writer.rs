//! The writer: the daemon where a volume is attached mirrors every write to
//! all replicas and acknowledges only when each in-sync replica has it
//! (synchronous mirroring, like DRBD protocol C).
//!
//! Many requests of one volume are in flight at once: each goes to every
//! replica on a connection of its own ([`links`]), and requests whose
//! blocks overlap wait for each other in submission order ([`order`]), so
//! every replica applies overlapping writes in the same order. What must
//! see no request in flight (peer state changes, snapshots, resize,
//! resync copies, rekey regions, replica comparison) takes the volume's
//! I/O gate exclusively; the data path holds it shared. A replica that
//! fails a write is marked stale: the surviving replicas durably record
//! the regions it misses (the write request names the stale replicas),
//! and writes go on degraded. The resync loop ([`crate::resync`]) brings it
//! back. A replica that answers "fenced" has seen a newer epoch: this
//! writer then stops for good and acknowledges nothing more.
//!
//! - [`attach`]: becoming the writer (fencing, reconciling the replicas).
//! - [`data`]: the data path (reads, writes, discards, flushes).
//! - [`control`]: snapshots, resize, rebuild, status, region copies.
//! - [`keys`], [`rekey`]: encryption and online rekey.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::proto::{Request, Response};
use crate::replica;
use crate::transport::{poll, Connector};
use crate::EXTENT_SIZE;

mod attach;
mod batch;
mod control;
mod data;
mod keys;
pub mod links;
pub mod order;
mod rekey;
#[cfg(test)]
mod tests;

pub use keys::Keys;
use keys::VolumeCrypt;
use links::PeerLinks;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    InSync,
    /// Misses writes; recorded in the in-sync replicas' dirty maps.
    Stale,
    /// Receives new writes while its dirty regions are copied.
    Resyncing,
}

impl PeerState {
    fn as_str(self) -> &'static str {
        match self {
            PeerState::InSync => "in-sync",
            PeerState::Stale => "stale",
            PeerState::Resyncing => "resyncing",
        }
    }
}

pub(crate) struct Peer {
    pub node: String,
    pub addr: String,
    pub state: PeerState,
    /// Connections to a remote replica (unused for this node's own replica,
    /// which is served by the local engine).
    links: Arc<PeerLinks>,
    local: bool,
    /// Regions left to copy while resyncing.
    pub pending: u64,
    /// This writer raised the replica to its epoch (or created it there):
    /// the replica's epoch equal to the writer's is then this writer's own,
    /// not a rival's that chose the same number.
    pub epoch_taken: bool,
}

impl Peer {
    pub(crate) fn new(node: &str, addr: &str, local: bool, state: PeerState) -> Peer {
        Peer {
            node: node.to_string(),
            addr: addr.to_string(),
            state,
            links: Arc::new(PeerLinks::new(node, addr)),
            local,
            pending: 0,
            epoch_taken: false,
        }
    }

    pub(crate) fn local_engine(&self) -> bool {
        self.local
    }

    pub(crate) fn drop_link(&mut self) {
        self.links.clear();
    }

    fn call(
        &mut self,
        engine: &Engine,
        connector: &dyn Connector,
        req: &Request,
    ) -> Result<Response> {
        if self.local {
            return replica::handle(engine, connector, req).into_result();
        }
        self.links.call(connector, req)
    }
}

/// A replica a data-path request goes to, as seen when it was sent.
#[derive(Clone)]
pub(crate) struct Target {
    /// Index in [`Inner::peers`] (stable while the I/O gate is held).
    pub index: usize,
    links: Arc<PeerLinks>,
    local: bool,
    in_sync: bool,
}

#[derive(Debug, Default)]
pub struct WriterStats {
    pub resync_bytes: AtomicU64,
    pub resync_regions: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub checksum_errors: AtomicU64,
    /// Replicas' answers polled for (transport::poll), and how many of
    /// them arrived while polling.
    pub replies_polled: AtomicU64,
    pub replies_caught_polling: AtomicU64,
}

pub(crate) struct Inner {
    pub peers: Vec<Peer>,
    pub size: u64,
    /// Regions written or discarded since the last flush that succeeded: a
    /// replica whose flush fails may have lost any of them (a failed
    /// fdatasync can drop dirty pages), so its dirty map gets them all.
    pub unflushed: BTreeSet<u64>,
    /// An encrypted volume's keys (`None`: plaintext). Data is encrypted
    /// here, before it is replicated, and decrypted after it is read.
    pub(crate) crypt: Option<VolumeCrypt>,
}

pub struct Writer {
    pub name: String,
    pub epoch: u64,
    pub(crate) engine: Arc<Engine>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) inner: Mutex<Inner>,
    /// Held shared by every data-path request while it is in flight, and
    /// exclusively by whatever needs none in flight (see the module doc).
    gate: RwLock<()>,
    /// Overlapping requests wait for each other, in submission order.
    ranges: order::RangeLock,
    /// Writes to remote replicas waiting to go as one request.
    batches: batch::Batcher,
    fenced: AtomicBool,
    detached: AtomicBool,
    /// A rekey thread runs for this volume.
    rekeying: AtomicBool,
    pub stats: WriterStats,
}

impl Writer {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect(crate::POISONED)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    pub fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    pub(crate) fn fence(&self, e: &Error) -> Error {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(volume = %self.name, epoch = self.epoch, error = %e, "fenced by a newer writer; refusing all further I/O");
        }
        Error::Fenced {
            request: self.epoch,
            current: match e {
                Error::Fenced { current, .. } => *current,
                _ => self.epoch.saturating_add(1),
            },
        }
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.is_fenced() {
            return Err(Error::Fenced {
                request: self.epoch,
                current: self.epoch.saturating_add(1),
            });
        }
        if self.is_detached() {
            return Err(Error::Invalid(format!("{} is detached", self.name)));
        }
        Ok(())
    }

    pub(crate) fn peer_call(&self, inner: &mut Inner, i: usize, req: &Request) -> Result<Response> {
        let r = inner.peers[i].call(&self.engine, self.connector.as_ref(), req);
        if let Err(e @ Error::Fenced { .. }) = &r {
            return Err(self.fence(e));
        }
        r
    }

    pub(crate) fn stale_nodes(inner: &Inner) -> Vec<String> {
        inner
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Stale)
            .map(|p| p.node.clone())
            .collect()
    }

    /// The replicas that get writes (in-sync and resyncing), as the data
    /// path needs them without the writer's lock.
    pub(crate) fn targets(inner: &Inner) -> Vec<Target> {
        inner
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state != PeerState::Stale)
            .map(|(i, p)| Target {
                index: i,
                links: p.links.clone(),
                local: p.local,
                in_sync: p.state == PeerState::InSync,
            })
            .collect()
    }

    /// Sends `req` to every target in parallel: the request (encoded once)
    /// goes out on a link to every remote replica first, then the local
    /// engine runs it, then the remote replies are read (polled for a
    /// moment first when this is a small write and the only replicated
    /// request in flight on this node: [`poll`]). No lock is held: many
    /// calls run at once, each on links of its own. Returns each target's
    /// result.
    pub(crate) fn fanout(&self, targets: &[Target], req: &Request) -> Vec<Result<Response>> {
        let connector = self.connector.as_ref();
        let mut results: Vec<Option<Result<Response>>> = targets.iter().map(|_| None).collect();
        let mut started = Vec::new();
        let remote = targets.iter().any(|t| !t.local);
        // A request to other nodes is counted while its answers are
        // awaited: a lone small write polls for them (see transport::poll).
        let outstanding = remote.then(poll::Outstanding::enter);
        let quick = poll::worth_polling(req);
        let body = if remote {
            match crate::proto::encode(req) {
                Ok(b) => Some(b),
                Err(e) => return targets.iter().map(|_| Err(e.clone())).collect(),
            }
        } else {
            None
        };
        for (k, t) in targets.iter().enumerate() {
            if t.local {
                continue;
            }
            let body = body.as_deref().unwrap_or_default();
            match t.links.start_encoded(connector, body, req.deadline()) {
                Ok(f) => started.push((k, f)),
                Err(e) => results[k] = Some(Err(e)),
            }
        }
        for (k, t) in targets.iter().enumerate() {
            if t.local {
                results[k] = Some(replica::handle(&self.engine, connector, req).into_result());
            }
        }
        for (k, mut f) in started {
            let Some(outstanding) = outstanding.as_ref().filter(|o| quick && o.alone()) else {
                results[k] = Some(targets[k].links.finish(f));
                continue;
            };
            let (awaited, spin) = (std::time::Instant::now(), outstanding.spin());
            if !spin.is_zero() {
                let caught = f.poll(spin);
                self.stats.replies_polled.fetch_add(1, Ordering::Relaxed);
                if caught {
                    self.stats
                        .replies_caught_polling
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            results[k] = Some(targets[k].links.finish(f));
            outstanding.learn(awaited.elapsed());
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Unavailable("not sent".into()))))
            .collect()
    }

    /// Settles the outcome of a data-changing request sent to `targets`:
    /// fenced → stop; failures → mark stale (recorded durably on the
    /// in-sync survivors) before returning success. `inner` is taken only
    /// when a replica failed.
    pub(crate) fn settle(
        &self,
        inner: Option<&mut Inner>,
        targets: &[Target],
        results: Vec<Result<Response>>,
        regions: &dyn Fn(&Inner) -> Vec<u64>,
    ) -> Result<()> {
        let mut failed = Vec::new();
        let mut ok_in_sync = 0;
        for (t, r) in targets.iter().zip(results) {
            match r {
                Ok(_) => {
                    if t.in_sync {
                        ok_in_sync += 1;
                    }
                }
                Err(e @ Error::Fenced { .. }) => return Err(self.fence(&e)),
                Err(e) => {
                    tracing::warn!(volume = %self.name, peer = %t.links.node, error = %e, "replica failed; marking it stale");
                    failed.push(t.index);
                }
            }
        }
        if failed.is_empty() && ok_in_sync > 0 {
            return Ok(());
        }
        let mut guard;
        let inner = match inner {
            Some(i) => i,
            None => {
                guard = self.lock();
                &mut guard
            }
        };
        if ok_in_sync == 0 {
            return Err(Error::Io(format!(
                "no in-sync replica of {} accepted the write",
                self.name
            )));
        }
        let regions = regions(inner);
        self.mark_stale(inner, failed, &regions)
    }

    /// Sends a data-changing request to all replicas that get writes, with
    /// `inner` held (control paths, which hold the I/O gate exclusively).
    pub(crate) fn replicate(
        &self,
        inner: &mut Inner,
        req: &Request,
        regions: &[u64],
    ) -> Result<()> {
        let targets = Self::targets(inner);
        let results = self.fanout(&targets, req);
        self.settle(Some(inner), &targets, results, &|_| regions.to_vec())
    }

    /// Marks peers stale and records `regions` as missed by them on every
    /// in-sync replica (which may fail in turn).
    pub(crate) fn mark_stale(
        &self,
        inner: &mut Inner,
        mut failed: Vec<usize>,
        regions: &[u64],
    ) -> Result<()> {
        while !failed.is_empty() {
            let mut next = Vec::new();
            for &f in &failed {
                inner.peers[f].state = PeerState::Stale;
                inner.peers[f].drop_link();
            }
            for &f in &failed {
                let req = Request::MarkStale {
                    name: self.name.clone(),
                    epoch: self.epoch,
                    node: inner.peers[f].node.clone(),
                    regions: regions.to_vec(),
                };
                for i in 0..inner.peers.len() {
                    if inner.peers[i].state != PeerState::InSync {
                        continue;
                    }
                    match self.peer_call(inner, i, &req) {
                        Ok(_) => {}
                        Err(e @ Error::Fenced { .. }) => return Err(e),
                        Err(_) => {
                            inner.peers[i].state = PeerState::Stale;
                            inner.peers[i].drop_link();
                            next.push(i);
                        }
                    }
                }
            }
            if !inner.peers.iter().any(|p| p.state == PeerState::InSync) {
                return Err(Error::Io(format!("every replica of {} failed", self.name)));
            }
            failed = next;
        }
        Ok(())
    }

    pub(crate) fn regions_of(offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        (offset / EXTENT_SIZE..=(offset + len - 1) / EXTENT_SIZE).collect()
    }

    pub(crate) fn check_range(inner: &Inner, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= inner.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                inner.size
            ))),
        }
    }

    /// Waits until no data-path request is in flight and keeps new ones
    /// out while the guard lives.
    pub(crate) fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().expect(crate::POISONED)
    }

    pub(crate) fn io_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().expect(crate::POISONED)
    }
}
