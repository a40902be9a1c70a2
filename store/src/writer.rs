//! The writer: the daemon where a volume is attached mirrors every write to
//! all replicas and acknowledges only when each in-sync replica has it
//! (synchronous mirroring, like DRBD protocol C).
//!
//! Writes are serialized per volume (one lock), so every replica applies
//! them in the same order. A replica that fails a write is marked stale:
//! the surviving replicas durably record the regions it misses (the write
//! request names the stale replicas), and writes go on degraded. The resync
//! loop ([`crate::resync`]) brings it back. A replica that answers "fenced"
//! has seen a newer epoch: this writer then stops for good and acknowledges
//! nothing more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::{Engine, ReadOut, VolumeInfo};
use crate::error::{Error, Result};
use crate::io::VolumeIo;
use crate::meta::ReplicaAddr;
use crate::proto::{ReplicaStatus, Request, Response, SnapshotLayout, VolumeLayout, VolumeStatus};
use crate::transport::{Connector, Link};
use crate::{replica, BLOCK_SIZE, EXTENT_SIZE, MAX_IO};

mod keys;
mod rekey;

pub use keys::Keys;
use keys::VolumeCrypt;

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
    /// `None` for this node's own replica (served by the local engine).
    link: Option<Link>,
    local: bool,
    /// Regions left to copy while resyncing.
    pub pending: u64,
    /// This writer raised the replica to its epoch (or created it there):
    /// the replica's epoch equal to the writer's is then this writer's own,
    /// not a rival's that chose the same number.
    pub epoch_taken: bool,
}

impl Peer {
    pub(crate) fn local_engine(&self) -> bool {
        self.local
    }

    pub(crate) fn drop_link(&mut self) {
        self.link = None;
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
        if self.link.as_ref().is_some_and(Link::idle_too_long) {
            self.link = None;
        }
        if self.link.is_none() {
            self.link = Some(Link::peer(connector.connect(&self.node, &self.addr)?));
        }
        let r = self.link.as_mut().expect("link set above").call(req);
        if matches!(r, Err(Error::Unavailable(_)) | Err(Error::Protocol(_))) {
            self.link = None;
        }
        r
    }

    /// Sends `req` to a remote peer without waiting for the reply
    /// ([`Peer::call_finish`] reads it).
    fn call_start(&mut self, connector: &dyn Connector, req: &Request) -> Result<()> {
        if self.link.as_ref().is_some_and(Link::idle_too_long) {
            self.link = None;
        }
        if self.link.is_none() {
            self.link = Some(Link::peer(connector.connect(&self.node, &self.addr)?));
        }
        let r = self.link.as_mut().expect("link set above").send(req);
        if r.is_err() {
            self.link = None;
        }
        r
    }

    fn call_finish(&mut self) -> Result<Response> {
        let Some(link) = self.link.as_mut() else {
            return Err(Error::Unavailable("connection lost".into()));
        };
        let r = link.recv();
        if matches!(r, Err(Error::Unavailable(_)) | Err(Error::Protocol(_))) {
            self.link = None;
        }
        r
    }
}

#[derive(Debug, Default)]
pub struct WriterStats {
    pub resync_bytes: AtomicU64,
    pub resync_regions: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub checksum_errors: AtomicU64,
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
    fenced: AtomicBool,
    detached: AtomicBool,
    /// A rekey thread runs for this volume.
    rekeying: AtomicBool,
    pub stats: WriterStats,
}

impl Writer {
    /// Becomes the writer of `name`: raises the epoch on every reachable
    /// replica above any seen (fencing the previous writer), merges what
    /// the replicas know about stale members, makes the in-sync replicas
    /// agree on every region any replica may have written without the others
    /// (their activity logs), and starts serving I/O. Replicas not reached
    /// start out stale and are resynced when they come back.
    ///
    /// Only replicas that answer can tell which members missed writes, so
    /// attaching needs a majority of the replica set unless `force`.
    ///
    /// An encrypted volume needs its key (and, while a rekey is in
    /// progress, the new key too); wrong or missing keys are refused before
    /// any epoch is raised, so nothing changes.
    pub fn attach(
        name: &str,
        replicas: Vec<ReplicaAddr>,
        engine: Arc<Engine>,
        connector: Arc<dyn Connector>,
        force: bool,
        keys: Keys,
    ) -> Result<Arc<Writer>> {
        crate::validate_name(name)?;
        let mut peers: Vec<Peer> = replicas
            .iter()
            .map(|r| Peer {
                node: r.node.clone(),
                addr: r.addr.clone(),
                state: PeerState::InSync,
                link: None,
                local: r.node == engine.node_id(),
                pending: 0,
                epoch_taken: false,
            })
            .collect();
        let info_req = Request::ReplicaInfo {
            name: name.to_string(),
        };
        // 1. Find the highest epoch.
        let mut reachable = vec![false; peers.len()];
        let mut max_epoch = 0;
        let mut early: Vec<Option<VolumeInfo>> = vec![None; peers.len()];
        for (i, p) in peers.iter_mut().enumerate() {
            match p.call(&engine, connector.as_ref(), &info_req) {
                Ok(Response::Info(info)) => {
                    reachable[i] = true;
                    max_epoch = max_epoch.max(info.epoch);
                    early[i] = Some(info);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = name, peer = %p.node, error = %e, "replica not reachable at attach")
                }
            }
        }
        // The keys are checked before anything changes, against the
        // record of the replica step 4 will choose (current, this node's
        // first): a stale one may hold an older key check. Step 4 checks
        // again once the epochs are raised.
        if let Some(info) = Self::current_info(&peers, &early) {
            keys::check_keys(
                name,
                info.crypt.as_ref(),
                keys.key.as_ref(),
                keys.next_key.as_ref(),
            )?;
        }
        let answered = reachable.iter().filter(|r| **r).count();
        if answered == 0 {
            return Err(Error::Unavailable(format!(
                "no replica of {name} is reachable"
            )));
        }
        if !force && answered * 2 <= peers.len() {
            return Err(Error::Unavailable(format!(
                "only {answered} of {} replicas of {name} are reachable; a majority is needed \
                 to know which are current (--force to attach anyway)",
                peers.len()
            )));
        }
        let epoch = max_epoch.checked_add(1).ok_or_else(|| {
            Error::Invalid(format!(
                "the epoch of {name} cannot be raised past {max_epoch}"
            ))
        })?;
        // 2. Fence the previous writer, then 3. read each replica's state.
        let mut infos: Vec<Option<VolumeInfo>> = vec![None; peers.len()];
        for (i, p) in peers.iter_mut().enumerate() {
            if !reachable[i] {
                continue;
            }
            let set = p.call(
                &engine,
                connector.as_ref(),
                &Request::SetEpoch {
                    name: name.to_string(),
                    epoch,
                },
            );
            if let Err(e) = set {
                if matches!(e, Error::Fenced { .. }) {
                    return Err(Error::Unavailable(format!(
                        "another writer raised the epoch of {name} meanwhile: {e}"
                    )));
                }
                continue;
            }
            p.epoch_taken = true;
            if let Ok(Response::Info(info)) = p.call(&engine, connector.as_ref(), &info_req) {
                infos[i] = Some(info);
            }
        }
        // 4. Who is current?
        let mut stale: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        let mut size = 0;
        for info in infos.iter().flatten() {
            for (n, regions) in &info.stale {
                stale.entry(n.clone()).or_default().extend(regions);
            }
            for regions in info.activity.values() {
                touched.extend(regions);
            }
            size = size.max(info.size);
        }
        // A log may name regions a shrink has since cut off.
        touched.retain(|r| *r < size.div_ceil(crate::EXTENT_SIZE));
        let candidates: Vec<usize> = (0..peers.len())
            .filter(|i| infos[*i].is_some() && !stale.contains_key(&peers[*i].node))
            .collect();
        let Some(&first) = candidates
            .iter()
            .find(|i| peers[**i].local)
            .or(candidates.first())
        else {
            return Err(Error::Unavailable(format!(
                "no in-sync replica of {name} is reachable"
            )));
        };
        for (i, p) in peers.iter_mut().enumerate() {
            if !candidates.contains(&i) {
                p.state = PeerState::Stale;
                stale.entry(p.node.clone()).or_default().extend(&touched);
            }
        }
        let crypt = VolumeCrypt::open(
            name,
            infos[first].as_ref().and_then(|i| i.crypt.as_ref()),
            keys,
        )?;
        let w = Arc::new(Writer {
            name: name.to_string(),
            epoch,
            engine,
            connector,
            inner: Mutex::new(Inner {
                peers,
                size,
                unflushed: BTreeSet::new(),
                crypt,
            }),
            fenced: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            rekeying: AtomicBool::new(false),
            stats: WriterStats::default(),
        });
        // 5. Make the in-sync replicas agree on regions written in flight.
        //    A power loss can leave blocks there torn (data and checksum
        //    from different writes) on every replica; those writes were
        //    never acknowledged as durable, so the source keeps whatever
        //    its blocks hold, and the others get a copy of that.
        {
            let mut inner = w.lock();
            if !touched.is_empty() {
                w.peer_call(
                    &mut inner,
                    first,
                    &Request::AdoptTorn {
                        name: w.name.clone(),
                        epoch: w.epoch,
                        regions: touched.iter().copied().collect(),
                    },
                )?;
            }
            for &i in &candidates {
                if i == first {
                    continue;
                }
                for &r in &touched {
                    w.copy_region(&mut inner, first, i, r)?;
                }
            }
            // 6. Everyone in sync agrees on who is stale; start a clean
            //    activity log.
            for &i in &candidates {
                w.peer_call(
                    &mut inner,
                    i,
                    &Request::SetStaleMap {
                        name: name.to_string(),
                        epoch,
                        stale: stale.clone(),
                    },
                )?;
                w.peer_call(
                    &mut inner,
                    i,
                    &Request::Flush {
                        name: name.to_string(),
                        epoch,
                    },
                )?;
            }
            // 7. Every replica in sync records the same encryption state;
            //    a rekey interrupted inside a region finishes that region.
            w.settle_rekey(&mut inner)?;
        }
        tracing::info!(volume = name, epoch, "attached as writer");
        Ok(w)
    }

    /// The info of a replica no other replica names stale, this node's
    /// first.
    fn current_info<'a>(peers: &[Peer], infos: &'a [Option<VolumeInfo>]) -> Option<&'a VolumeInfo> {
        let stale: BTreeSet<&String> = infos
            .iter()
            .flatten()
            .flat_map(|i| i.stale.keys())
            .collect();
        let mut current = (0..peers.len())
            .filter(|i| infos[*i].is_some() && !stale.contains(&peers[*i].node))
            .collect::<Vec<_>>();
        current.sort_by_key(|i| !peers[*i].local);
        current.first().and_then(|i| infos[*i].as_ref())
    }

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

    fn fence(&self, e: &Error) -> Error {
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

    fn check_usable(&self) -> Result<()> {
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

    fn stale_nodes(inner: &Inner) -> Vec<String> {
        inner
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Stale)
            .map(|p| p.node.clone())
            .collect()
    }

    /// Sends `req` to every replica that gets writes (in-sync and
    /// resyncing), in parallel: the request goes out on every remote link
    /// first, then the local engine runs it, then the remote replies are
    /// read (one connection per peer, so each has it in flight at once; no
    /// thread per write). Returns each one's result by peer index.
    fn fanout(&self, inner: &mut Inner, req: &Request) -> Vec<(usize, Result<Response>)> {
        let engine = &self.engine;
        let connector = self.connector.as_ref();
        let mut results = Vec::new();
        let mut started = Vec::new();
        for (i, p) in inner.peers.iter_mut().enumerate() {
            if p.state == PeerState::Stale || p.local {
                continue;
            }
            match p.call_start(connector, req) {
                Ok(()) => started.push(i),
                Err(e) => results.push((i, Err(e))),
            }
        }
        for (i, p) in inner.peers.iter_mut().enumerate() {
            if p.state != PeerState::Stale && p.local {
                results.push((i, p.call(engine, connector, req)));
            }
        }
        for i in started {
            results.push((i, inner.peers[i].call_finish()));
        }
        results.sort_by_key(|(i, _)| *i);
        results
    }

    /// Sends a data-changing request to all replicas that get writes and
    /// settles the outcome: fenced → stop; failures → mark stale (recorded
    /// durably on the in-sync survivors) before returning success.
    fn replicate(&self, inner: &mut Inner, req: &Request, regions: &[u64]) -> Result<()> {
        let results = self.fanout(inner, req);
        let mut failed = Vec::new();
        let mut ok_in_sync = 0;
        for (i, r) in results {
            match r {
                Ok(_) => {
                    if inner.peers[i].state == PeerState::InSync {
                        ok_in_sync += 1;
                    }
                }
                Err(e @ Error::Fenced { .. }) => return Err(self.fence(&e)),
                Err(e) => {
                    tracing::warn!(volume = %self.name, peer = %inner.peers[i].node, error = %e, "replica failed; marking it stale");
                    failed.push(i);
                }
            }
        }
        if ok_in_sync == 0 {
            return Err(Error::Io(format!(
                "no in-sync replica of {} accepted the write",
                self.name
            )));
        }
        self.mark_stale(inner, failed, regions)
    }

    /// Marks peers stale and records `regions` as missed by them on every
    /// in-sync replica (which may fail in turn).
    fn mark_stale(&self, inner: &mut Inner, mut failed: Vec<usize>, regions: &[u64]) -> Result<()> {
        while !failed.is_empty() {
            let mut next = Vec::new();
            for &f in &failed {
                inner.peers[f].state = PeerState::Stale;
                inner.peers[f].link = None;
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
                            inner.peers[i].link = None;
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

    fn regions_of(offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        (offset / EXTENT_SIZE..=(offset + len - 1) / EXTENT_SIZE).collect()
    }

    fn check_range(inner: &Inner, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= inner.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                inner.size
            ))),
        }
    }

    /// Aligned write of whole blocks (at most MAX_IO) with `inner` held,
    /// encrypted first if the volume is.
    fn write_locked(&self, inner: &mut Inner, offset: u64, data: &[u8]) -> Result<()> {
        match &inner.crypt {
            None => self.write_raw(inner, offset, data.to_vec()),
            Some(c) => {
                let mut buf = data.to_vec();
                c.encrypt(&mut buf, offset)?;
                self.write_raw(inner, offset, buf)
            }
        }
    }

    /// Reads whole blocks (decrypted if the volume is encrypted).
    fn read_locked(&self, inner: &mut Inner, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut data = self.read_raw(inner, offset, len)?;
        if let Some(c) = &inner.crypt {
            c.decrypt(&mut data, offset)?;
        }
        Ok(data)
    }

    /// Aligned write of whole blocks (at most MAX_IO) as they are.
    fn write_raw(&self, inner: &mut Inner, offset: u64, data: Vec<u8>) -> Result<()> {
        let regions = Self::regions_of(offset, data.len() as u64);
        let req = Request::Write {
            name: self.name.clone(),
            epoch: self.epoch,
            offset,
            data,
            stale: Self::stale_nodes(inner),
        };
        inner.unflushed.extend(&regions);
        self.replicate(inner, &req, &regions)
    }

    /// Reads whole blocks as stored from the best replica, repairing
    /// blocks that fail their checksum from another replica.
    fn read_raw(&self, inner: &mut Inner, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut order: Vec<usize> = (0..inner.peers.len())
            .filter(|i| inner.peers[*i].state == PeerState::InSync)
            .collect();
        order.sort_by_key(|i| !inner.peers[*i].local);
        let req = Request::Read {
            name: self.name.clone(),
            offset,
            len,
        };
        for (k, &i) in order.iter().enumerate() {
            let out = match self.peer_call(inner, i, &req) {
                Ok(Response::Read(out)) => out,
                Ok(_) => return Err(Error::Protocol("unexpected reply to read".into())),
                Err(e @ (Error::Fenced { .. } | Error::Invalid(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(volume = %self.name, peer = %inner.peers[i].node, error = %e, "read failed; marking replica stale");
                    self.mark_stale(inner, vec![i], &[])?;
                    continue;
                }
            };
            return self.fix_bad_blocks(inner, i, &order[k + 1..], offset, out);
        }
        Err(Error::Io(format!(
            "no in-sync replica of {} could be read",
            self.name
        )))
    }

    fn fix_bad_blocks(
        &self,
        inner: &mut Inner,
        from: usize,
        others: &[usize],
        offset: u64,
        mut out: ReadOut,
    ) -> Result<Vec<u8>> {
        for &b in &out.bad_blocks {
            self.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
            let off = b * BLOCK_SIZE;
            let mut good = None;
            for &o in others {
                let req = Request::Read {
                    name: self.name.clone(),
                    offset: off,
                    len: BLOCK_SIZE,
                };
                if let Ok(Response::Read(r)) = self.peer_call(inner, o, &req) {
                    if r.bad_blocks.is_empty() {
                        good = Some(r.data);
                        break;
                    }
                }
            }
            let Some(good) = good else {
                return Err(Error::Io(format!(
                    "block {b} of {} fails its checksum on every replica",
                    self.name
                )));
            };
            tracing::warn!(volume = %self.name, block = b, replica = %inner.peers[from].node, "checksum mismatch; repairing from another replica");
            let req = Request::Write {
                name: self.name.clone(),
                epoch: self.epoch,
                offset: off,
                data: good.clone(),
                stale: Self::stale_nodes(inner),
            };
            match self.peer_call(inner, from, &req) {
                Ok(_) => {
                    self.stats.repaired_blocks.fetch_add(1, Ordering::Relaxed);
                }
                Err(e @ Error::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "repair write failed; marking replica stale");
                    self.mark_stale(inner, vec![from], &Self::regions_of(off, BLOCK_SIZE))?;
                }
            }
            let at = (off - offset) as usize;
            out.data[at..at + BLOCK_SIZE as usize].copy_from_slice(&good);
        }
        Ok(out.data)
    }

    /// Copies region `r` from peer `src` to peer `dst` (a hole stays a hole).
    pub(crate) fn copy_region(
        &self,
        inner: &mut Inner,
        src: usize,
        dst: usize,
        r: u64,
    ) -> Result<u64> {
        let start = r * EXTENT_SIZE;
        if start >= inner.size {
            return Ok(0);
        }
        let len = EXTENT_SIZE.min(inner.size - start);
        let allocated = match self.peer_call(
            inner,
            src,
            &Request::RegionAllocated {
                name: self.name.clone(),
                region: r,
            },
        )? {
            Response::Allocated(a) => a,
            _ => return Err(Error::Protocol("unexpected reply to region query".into())),
        };
        if !allocated {
            self.peer_call(
                inner,
                dst,
                &Request::Discard {
                    name: self.name.clone(),
                    epoch: self.epoch,
                    offset: start,
                    len,
                    stale: Self::stale_nodes(inner),
                },
            )?;
            return Ok(0);
        }
        let out = match self.peer_call(
            inner,
            src,
            &Request::Read {
                name: self.name.clone(),
                offset: start,
                len,
            },
        )? {
            Response::Read(o) => o,
            _ => return Err(Error::Protocol("unexpected reply to read".into())),
        };
        let others: Vec<usize> = (0..inner.peers.len())
            .filter(|i| *i != src && *i != dst && inner.peers[*i].state == PeerState::InSync)
            .collect();
        let data = self.fix_bad_blocks(inner, src, &others, start, out)?;
        self.peer_call(
            inner,
            dst,
            &Request::Write {
                name: self.name.clone(),
                epoch: self.epoch,
                offset: start,
                data,
                stale: Self::stale_nodes(inner),
            },
        )?;
        Ok(len)
    }

    /// The data-path flush with `inner` held.
    fn flush_locked(&self, inner: &mut Inner) -> Result<()> {
        let req = Request::FlushHot {
            name: self.name.clone(),
            epoch: self.epoch,
        };
        let unflushed: Vec<u64> = inner.unflushed.iter().copied().collect();
        self.replicate(inner, &req, &unflushed)?;
        inner.unflushed.clear();
        Ok(())
    }

    /// Runs `req` on every replica; all must be in sync and all must succeed.
    fn on_all(&self, req: &Request) -> Result<()> {
        self.check_usable()?;
        let mut inner = self.lock();
        if let Some(p) = inner.peers.iter().find(|p| p.state != PeerState::InSync) {
            return Err(Error::Unavailable(format!(
                "replica {} of {} is {}; this needs every replica in sync",
                p.node,
                self.name,
                p.state.as_str()
            )));
        }
        for i in 0..inner.peers.len() {
            self.peer_call(&mut inner, i, req)?;
        }
        Ok(())
    }

    pub fn snapshot(&self, snap: &str) -> Result<()> {
        crate::validate_name(snap)?;
        self.refuse_during_rekey("snapshots")?;
        self.on_all(&Request::Snapshot {
            name: self.name.clone(),
            snap: snap.to_string(),
            epoch: self.epoch,
        })
    }

    pub fn delete_snapshot(&self, snap: &str) -> Result<()> {
        self.on_all(&Request::DeleteSnapshot {
            name: self.name.clone(),
            snap: snap.to_string(),
            epoch: self.epoch,
        })
    }

    /// Creates volume `new` from snapshot `snap` on every replica; the
    /// caller attaches it.
    pub fn clone_to(&self, snap: &str, new: &str) -> Result<()> {
        crate::validate_name(new)?;
        self.on_all(&Request::CloneReplica {
            name: self.name.clone(),
            snap: snap.to_string(),
            new: new.to_string(),
            epoch: 1,
        })
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        self.refuse_during_rekey("resizing")?;
        self.on_all(&Request::Resize {
            name: self.name.clone(),
            epoch: self.epoch,
            size,
        })?;
        self.lock().size = size;
        Ok(())
    }

    pub fn replicas(&self) -> Vec<ReplicaAddr> {
        self.lock()
            .peers
            .iter()
            .map(|p| ReplicaAddr {
                node: p.node.clone(),
                addr: p.addr.clone(),
            })
            .collect()
    }

    /// The replica set after adding `add` and removing `remove`.
    fn rebuilt_set(
        inner: &Inner,
        add: &ReplicaAddr,
        remove: Option<&str>,
    ) -> Result<Vec<ReplicaAddr>> {
        if inner.peers.iter().any(|p| p.node == add.node) {
            return Err(Error::Exists(format!("replica on {}", add.node)));
        }
        let mut set: Vec<ReplicaAddr> = inner
            .peers
            .iter()
            .filter(|p| Some(p.node.as_str()) != remove)
            .map(|p| ReplicaAddr {
                node: p.node.clone(),
                addr: p.addr.clone(),
            })
            .collect();
        if let Some(r) = remove {
            if set.len() == inner.peers.len() {
                return Err(Error::NotFound(format!("replica on {r}")));
            }
        }
        set.push(add.clone());
        if set.len() > 3 {
            return Err(Error::Invalid("a volume has at most 3 replicas".into()));
        }
        Ok(set)
    }

    fn layout_of(&self, peer: &mut Peer) -> Result<VolumeLayout> {
        match peer.call(
            &self.engine,
            self.connector.as_ref(),
            &Request::Layout {
                name: self.name.clone(),
            },
        )? {
            Response::Layout(l) => Ok(l),
            _ => Err(Error::Protocol("unexpected reply to layout".into())),
        }
    }

    /// Gives the new replica `dst` the snapshots of `src`, oldest first:
    /// before each snapshot, the regions that differ from the previous one
    /// are copied into (or discarded from) its live volume, so that
    /// snapshots share extents there as they do on `src`. Snapshots are
    /// immutable, so this runs without the writer's lock while the volume
    /// keeps serving I/O. Leaves `dst`'s live volume as the last snapshot.
    fn copy_snapshots(
        &self,
        src: &mut Peer,
        dst: &mut Peer,
        snaps: &[SnapshotLayout],
    ) -> Result<()> {
        let call = |p: &mut Peer, req: Request| p.call(&self.engine, self.connector.as_ref(), &req);
        let mut prev: HashMap<u64, u64> = HashMap::new();
        let mut size = None;
        for snap in snaps {
            if size != Some(snap.size) {
                call(
                    dst,
                    Request::Resize {
                        name: self.name.clone(),
                        epoch: self.epoch,
                        size: snap.size,
                    },
                )?;
                size = Some(snap.size);
            }
            let cur: HashMap<u64, u64> = snap.regions.iter().copied().collect();
            let mut regions: Vec<u64> = cur.keys().chain(prev.keys()).copied().collect();
            regions.sort_unstable();
            regions.dedup();
            for r in regions {
                let start = r * EXTENT_SIZE;
                if start >= snap.size || cur.get(&r) == prev.get(&r) {
                    continue;
                }
                let len = EXTENT_SIZE.min(snap.size - start);
                let req = if cur.contains_key(&r) {
                    let out = match call(
                        src,
                        Request::ReadSnapshot {
                            name: self.name.clone(),
                            snap: snap.name.clone(),
                            offset: start,
                            len,
                        },
                    )? {
                        Response::Read(o) => o,
                        _ => return Err(Error::Protocol("unexpected reply to read".into())),
                    };
                    if !out.bad_blocks.is_empty() {
                        return Err(Error::Io(format!(
                            "snapshot {}@{} has {} bad blocks on {} (scrub it, then rebuild again)",
                            self.name,
                            snap.name,
                            out.bad_blocks.len(),
                            src.node
                        )));
                    }
                    Request::Write {
                        name: self.name.clone(),
                        epoch: self.epoch,
                        offset: start,
                        data: out.data,
                        stale: Vec::new(),
                    }
                } else {
                    Request::Discard {
                        name: self.name.clone(),
                        epoch: self.epoch,
                        offset: start,
                        len,
                        stale: Vec::new(),
                    }
                };
                call(dst, req)?;
                self.stats.resync_bytes.fetch_add(len, Ordering::Relaxed);
            }
            call(
                dst,
                Request::Snapshot {
                    name: self.name.clone(),
                    snap: snap.name.clone(),
                    epoch: self.epoch,
                },
            )?;
            prev = cur;
        }
        Ok(())
    }

    /// Adds a replica on `add` (removing the one on `remove`, if given),
    /// online. The new replica first gets the volume's snapshots, copied
    /// from an in-sync replica without holding up I/O; then, under the
    /// writer's lock, it joins the set as stale for every region whose live
    /// data differs from the last snapshot, and the resync copies those
    /// while the guest keeps writing.
    pub fn rebuild(&self, add: ReplicaAddr, remove: Option<&str>) -> Result<()> {
        self.check_usable()?;
        crate::validate_name(&add.node)?;
        let (set, size, mut src, crypt) = {
            let inner = self.lock();
            let set = Self::rebuilt_set(&inner, &add, remove)?;
            let p = inner
                .peers
                .iter()
                .find(|p| p.state == PeerState::InSync)
                .ok_or_else(|| Error::Unavailable("no in-sync replica".into()))?;
            let src = Peer {
                node: p.node.clone(),
                addr: p.addr.clone(),
                state: PeerState::InSync,
                link: None,
                local: p.local,
                pending: 0,
                epoch_taken: p.epoch_taken,
            };
            let crypt = inner.crypt.as_ref().map(|c| c.rec.clone());
            (set, inner.size, src, crypt)
        };
        let mut newp = Peer {
            node: add.node.clone(),
            addr: add.addr.clone(),
            state: PeerState::Stale,
            link: None,
            local: add.node == self.engine.node_id(),
            pending: 0,
            // Created below at this writer's epoch.
            epoch_taken: true,
        };
        newp.call(
            &self.engine,
            self.connector.as_ref(),
            &Request::CreateReplica {
                name: self.name.clone(),
                size,
                replicas: set.clone(),
                epoch: self.epoch,
                crypt,
            },
        )?;
        let copied = self.layout_of(&mut src).and_then(|l| {
            self.copy_snapshots(&mut src, &mut newp, &l.snapshots)?;
            Ok(l.snapshots)
        });
        let drop_new = |newp: &mut Peer, e: Error| {
            let _ = newp.call(
                &self.engine,
                self.connector.as_ref(),
                &Request::DeleteReplica {
                    name: self.name.clone(),
                    epoch: self.epoch,
                },
            );
            e
        };
        let snaps = copied.map_err(|e| drop_new(&mut newp, e))?;

        let mut inner = self.lock();
        let set = Self::rebuilt_set(&inner, &add, remove)?;
        let layout = self.layout_of(&mut src)?;
        let names = |s: &[SnapshotLayout]| s.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
        if names(&layout.snapshots) != names(&snaps) {
            return Err(drop_new(
                &mut newp,
                Error::Invalid(
                    "snapshots were taken or deleted during the rebuild; run it again".into(),
                ),
            ));
        }
        newp.call(
            &self.engine,
            self.connector.as_ref(),
            &Request::Resize {
                name: self.name.clone(),
                epoch: self.epoch,
                size: inner.size,
            },
        )?;
        // What the new replica lacks: every region whose live extent on the
        // source is not the last snapshot's (written or discarded since).
        let base: HashMap<u64, u64> = snaps
            .last()
            .map(|s| s.regions.iter().copied().collect())
            .unwrap_or_default();
        let live: HashMap<u64, u64> = layout.live.iter().copied().collect();
        let mut regions: Vec<u64> = live
            .keys()
            .chain(base.keys())
            .copied()
            .filter(|r| live.get(r) != base.get(r))
            .collect();
        regions.sort_unstable();
        regions.dedup();
        if let Some(r) = remove {
            let idx = inner
                .peers
                .iter()
                .position(|p| p.node == r)
                .expect("checked");
            inner.peers.remove(idx);
        }
        inner.peers.push(newp);
        let n = inner.peers.len() - 1;
        // Record what the new replica lacks before it counts as a member.
        self.mark_stale(&mut inner, vec![n], &regions)?;
        for i in 0..inner.peers.len() {
            if inner.peers[i].state == PeerState::Stale {
                continue;
            }
            self.peer_call(
                &mut inner,
                i,
                &Request::SetReplicas {
                    name: self.name.clone(),
                    epoch: self.epoch,
                    replicas: set.clone(),
                },
            )?;
        }
        Ok(())
    }

    pub fn status(&self) -> VolumeStatus {
        let inner = self.lock();
        let local = self.engine.info(&self.name).ok();
        VolumeStatus {
            name: self.name.clone(),
            size: inner.size,
            epoch: self.epoch,
            attached: !self.is_detached(),
            fenced: self.is_fenced(),
            replicas: inner
                .peers
                .iter()
                .map(|p| ReplicaStatus {
                    node: p.node.clone(),
                    addr: p.addr.clone(),
                    state: p.state.as_str().to_string(),
                    dirty_regions: if p.state == PeerState::InSync {
                        0
                    } else {
                        p.pending.max(
                            local
                                .as_ref()
                                .and_then(|l| l.stale.get(&p.node))
                                .map(|s| s.len() as u64)
                                .unwrap_or(0),
                        )
                    },
                })
                .collect(),
            snapshots: local
                .as_ref()
                .map(|l| l.snapshots.clone())
                .unwrap_or_default(),
            allocated_bytes: local.as_ref().map(|l| l.allocated_bytes).unwrap_or(0),
            resync_bytes: self.stats.resync_bytes.load(Ordering::Relaxed),
            resync_regions: self.stats.resync_regions.load(Ordering::Relaxed),
            repaired_blocks: self.stats.repaired_blocks.load(Ordering::Relaxed),
            checksum_errors: self.stats.checksum_errors.load(Ordering::Relaxed),
            node: crate::proto::NodeMetrics::default(),
            encrypted: inner.crypt.is_some(),
            key_check: inner.crypt.as_ref().map(|c| c.rec.key_check.clone()),
            rekey: inner
                .crypt
                .as_ref()
                .and_then(|c| c.rekey_status(inner.size)),
        }
    }
}

impl VolumeIo for Writer {
    fn size(&self) -> Result<u64> {
        Ok(self.lock().size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let mut inner = self.lock();
        Self::check_range(&inner, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = pos / BLOCK_SIZE * BLOCK_SIZE;
            let want = (buf.len() - done) as u64;
            let len = ((pos - start + want).div_ceil(BLOCK_SIZE) * BLOCK_SIZE).min(MAX_IO);
            let data = self.read_locked(&mut inner, start, len)?;
            let skip = (pos - start) as usize;
            let n = (data.len() - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let mut inner = self.lock();
        Self::check_range(&inner, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = pos / BLOCK_SIZE * BLOCK_SIZE;
            let remaining = (buf.len() - done) as u64;
            if pos == start && remaining >= BLOCK_SIZE {
                let n = (remaining / BLOCK_SIZE * BLOCK_SIZE).min(MAX_IO) as usize;
                self.write_locked(&mut inner, pos, &buf[done..done + n])?;
                done += n;
            } else {
                // Read-modify-write of one partial block.
                let mut blk = self.read_locked(&mut inner, start, BLOCK_SIZE)?;
                let skip = (pos - start) as usize;
                let n = (BLOCK_SIZE as usize - skip).min(buf.len() - done);
                blk[skip..skip + n].copy_from_slice(&buf[done..done + n]);
                self.write_locked(&mut inner, start, &blk)?;
                done += n;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.check_usable()?;
        let mut inner = self.lock();
        self.flush_locked(&mut inner)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_usable()?;
        let mut inner = self.lock();
        Self::check_range(&inner, offset, len)?;
        let end = offset + len;
        let a = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let b = end / BLOCK_SIZE * BLOCK_SIZE;
        if a < b {
            let req = Request::Discard {
                name: self.name.clone(),
                epoch: self.epoch,
                offset: a,
                len: b - a,
                stale: Self::stale_nodes(&inner),
            };
            let regions = Self::regions_of(a, b - a);
            inner.unflushed.extend(&regions);
            self.replicate(&mut inner, &req, &regions)?;
        }
        drop(inner);
        // Unaligned edges are zeroed by read-modify-write.
        for (s, e) in [(offset, a.min(end)), (b.max(offset).max(a), end)] {
            if s < e {
                self.write_at(&vec![0u8; (e - s) as usize], s)?;
            }
        }
        Ok(())
    }
}
