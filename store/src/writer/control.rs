//! Control operations of an attached volume: snapshots, clones, resize,
//! rebuild, status, and copying a region between replicas. Each holds the
//! I/O gate exclusively where no write may be in flight.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{Inner, Peer, PeerState, Writer};
use crate::error::{Error, Result};
use crate::meta::ReplicaAddr;
use crate::proto::{ReplicaStatus, Request, Response, SnapshotLayout, VolumeLayout, VolumeStatus};
use crate::EXTENT_SIZE;

impl Writer {
    /// Is region `r` allocated on replica `i`? (Copies and rekeys skip or
    /// discard holes.)
    pub(crate) fn region_allocated(&self, inner: &mut Inner, i: usize, r: u64) -> Result<bool> {
        match self.peer_call(
            inner,
            i,
            &Request::RegionAllocated {
                name: self.name.clone(),
                region: r,
            },
        )? {
            Response::Allocated(a) => Ok(a),
            _ => Err(Error::Protocol("unexpected reply to region query".into())),
        }
    }

    /// Copies region `r` from peer `src` to peer `dst` (a hole stays a hole).
    /// The caller holds the I/O gate exclusively (no write races the copy).
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
        if !self.region_allocated(inner, src, r)? {
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
    /// No write is in flight meanwhile, so every replica sees the same
    /// writes before it (a snapshot is the same on all of them).
    fn on_all(&self, req: &Request) -> Result<()> {
        self.check_usable()?;
        let _quiet = self.quiesce();
        self.on_all_quiet(req)
    }

    fn on_all_quiet(&self, req: &Request) -> Result<()> {
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
        self.check_usable()?;
        let _quiet = self.quiesce();
        self.on_all_quiet(&Request::Resize {
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
            let mut src = Peer::new(&p.node, &p.addr, p.local, PeerState::InSync);
            src.epoch_taken = p.epoch_taken;
            let crypt = inner.crypt.as_ref().map(|c| c.rec.clone());
            (set, inner.size, src, crypt)
        };
        let mut newp = Peer::new(
            &add.node,
            &add.addr,
            add.node == self.engine.node_id(),
            PeerState::Stale,
        );
        // Created below at this writer's epoch.
        newp.epoch_taken = true;
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

        let _quiet = self.quiesce();
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
            replies_polled: self.stats.replies_polled.load(Ordering::Relaxed),
            replies_caught_polling: self.stats.replies_caught_polling.load(Ordering::Relaxed),
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
