//! Becoming a volume's writer: fencing the previous one, settling what the
//! replicas know, and making the in-sync ones agree.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use super::order::RangeLock;
use super::{keys, Inner, Keys, Peer, PeerState, VolumeCrypt, Writer, WriterStats};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::meta::ReplicaAddr;
use crate::proto::{Request, Response};
use crate::transport::Connector;
use crate::types::VolumeInfo;

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
            .map(|r| {
                Peer::new(
                    &r.node,
                    &r.addr,
                    r.node == engine.node_id(),
                    PeerState::InSync,
                )
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
            gate: RwLock::new(()),
            ranges: RangeLock::default(),
            batches: Default::default(),
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
}
