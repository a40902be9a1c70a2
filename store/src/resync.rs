//! Bringing stale replicas back, online.
//!
//! For each stale replica the loop reconnects, raises its epoch to the
//! writer's (which also fences a previous writer still running on that
//! node), and computes the regions to copy: the in-sync replicas' dirty map
//! for it (regions written while it was away) united with its own activity
//! log of earlier epochs (regions it wrote that the others may not have —
//! e.g. writes a fenced old writer made to its local replica after the
//! epoch was raised). From
//! then on the replica receives new writes, and those regions are copied one
//! at a time with no write in flight (the writer's I/O gate), so a copy never
//! races a write.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{Request, Response};
use crate::transport::Link;
use crate::writer::{PeerState, Writer};

/// How long after attaching the first resync attempt waits: time for the
/// attach's own view of the replicas to settle.
const FIRST_ATTEMPT_DELAY: Duration = Duration::from_secs(1);

/// Runs until the writer is detached or fenced.
pub fn run(w: Arc<Writer>) {
    std::thread::sleep(FIRST_ATTEMPT_DELAY);
    while !w.is_detached() && !w.is_fenced() {
        let stale: Vec<String> = w
            .lock()
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Stale)
            .map(|p| p.node.clone())
            .collect();
        for node in stale {
            if let Err(e) = resync_one(&w, &node) {
                tracing::debug!(volume = %w.name, peer = %node, error = %e, "resync attempt failed");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn info(link: &mut Link, name: &str) -> Result<crate::types::VolumeInfo> {
    match link.call(&Request::ReplicaInfo {
        name: name.to_string(),
    })? {
        Response::Info(i) => Ok(i),
        _ => Err(Error::Protocol("unexpected reply to info".into())),
    }
}

/// The regions a replica logged as written under epochs before `epoch`.
/// Its log entries of this writer's own epoch are left out: each such write
/// either succeeded on every in-sync replica or failed somewhere, and then
/// this writer recorded its regions in the survivors' dirty map for the
/// replica before acknowledging it. (Data-path flushes keep hot regions in
/// the log, so including them would resync regions that did not change.)
fn earlier_activity(info: &crate::types::VolumeInfo, epoch: u64) -> BTreeSet<u64> {
    info.activity
        .iter()
        .filter(|(e, _)| **e != epoch)
        .flat_map(|(_, r)| r.iter().copied())
        .collect()
}

/// Records that this writer took its epoch on `node`'s replica.
fn mark_taken(w: &Writer, node: &str) {
    if let Some(p) = w.lock().peers.iter_mut().find(|p| p.node == node) {
        p.epoch_taken = true;
    }
}

/// A replica past this writer's epoch has a newer writer.
fn check_still_ours(w: &Writer, replica_epoch: u64) -> Result<()> {
    if replica_epoch > w.epoch {
        return Err(Error::Fenced {
            request: w.epoch,
            current: replica_epoch,
        });
    }
    Ok(())
}

/// One attempt to resync `node`.
pub fn resync_one(w: &Writer, node: &str) -> Result<()> {
    let (addr, local, taken) = {
        let inner = w.lock();
        let p = inner
            .peers
            .iter()
            .find(|p| p.node == node)
            .ok_or_else(|| Error::NotFound(node.to_string()))?;
        (p.addr.clone(), node == w.engine.node_id(), p.epoch_taken)
    };
    // Probe without holding the writer lock: a hung peer must not stall I/O.
    let own_activity: BTreeSet<u64> = if local {
        if !taken {
            w.engine.set_epoch(&w.name, w.epoch)?;
            mark_taken(w, node);
        }
        let i = w.engine.info(&w.name)?;
        check_still_ours(w, i.epoch)?;
        earlier_activity(&i, w.epoch)
    } else {
        let mut link = Link::peer(w.connector.connect(node, &addr)?);
        // Probe with a harmless request first: a frozen node then only has
        // that queued, not an epoch raise that would land whenever it wakes
        // up, even after this writer stepped back.
        check_still_ours(w, info(&mut link, &w.name)?.epoch)?;
        if w.is_detached() || w.is_fenced() {
            return Ok(());
        }
        if !taken {
            link.call(&Request::SetEpoch {
                name: w.name.clone(),
                epoch: w.epoch,
            })
            .map_err(|e| {
                if matches!(e, Error::Fenced { .. }) {
                    tracing::error!(volume = %w.name, peer = node, "replica has a newer epoch");
                }
                e
            })?;
            mark_taken(w, node);
        }
        let i = info(&mut link, &w.name)?;
        check_still_ours(w, i.epoch)?;
        earlier_activity(&i, w.epoch)
    };
    let regions: Vec<u64> = {
        // No write in flight: every write that named it stale has reached
        // the survivors' dirty maps before they are read.
        let _quiet = w.quiesce();
        let mut inner = w.lock();
        let Some(pi) = inner.peers.iter().position(|p| p.node == node) else {
            return Ok(());
        };
        if inner.peers[pi].state != PeerState::Stale {
            return Ok(());
        }
        let src = (0..inner.peers.len())
            .find(|i| inner.peers[*i].state == PeerState::InSync)
            .ok_or_else(|| Error::Unavailable("no in-sync replica".into()))?;
        let dirty = match w.peer_call(
            &mut inner,
            src,
            &Request::ReplicaInfo {
                name: w.name.clone(),
            },
        )? {
            Response::Info(i) => i.stale.get(node).cloned().unwrap_or_default(),
            _ => return Err(Error::Protocol("unexpected reply to info".into())),
        };
        let all: BTreeSet<u64> = dirty.union(&own_activity).copied().collect();
        // Its activity log is checkpointed by the flushes it now receives:
        // record those regions in the survivors' dirty map first, so an
        // interrupted resync still knows them.
        let n = inner.size.div_ceil(crate::EXTENT_SIZE);
        let extra: Vec<u64> = own_activity
            .difference(&dirty)
            .copied()
            .filter(|r| *r < n)
            .collect();
        if !extra.is_empty() {
            for i in 0..inner.peers.len() {
                if inner.peers[i].state != PeerState::InSync {
                    continue;
                }
                w.peer_call(
                    &mut inner,
                    i,
                    &Request::MarkStale {
                        name: w.name.clone(),
                        epoch: w.epoch,
                        node: node.to_string(),
                        regions: extra.clone(),
                    },
                )?;
            }
        }
        inner.peers[pi].state = PeerState::Resyncing;
        inner.peers[pi].pending = all.len() as u64;
        tracing::info!(volume = %w.name, peer = node, regions = all.len(), "resync started");
        all.into_iter().collect()
    };
    for r in regions {
        let _quiet = w.quiesce();
        let mut inner = w.lock();
        let Some(pi) = inner.peers.iter().position(|p| p.node == node) else {
            return Ok(());
        };
        if inner.peers[pi].state != PeerState::Resyncing {
            return Err(Error::Unavailable(format!("{node} failed during resync")));
        }
        let mut srcs: Vec<usize> = (0..inner.peers.len())
            .filter(|i| inner.peers[*i].state == PeerState::InSync)
            .collect();
        srcs.sort_by_key(|i| !inner.peers[*i].local_engine());
        let Some(&src) = srcs.first() else {
            return Err(Error::Unavailable("no in-sync replica".into()));
        };
        match w.copy_region(&mut inner, src, pi, r) {
            Ok(n) => {
                w.stats.resync_bytes.fetch_add(n, Ordering::Relaxed);
                w.stats.resync_regions.fetch_add(1, Ordering::Relaxed);
                inner.peers[pi].pending = inner.peers[pi].pending.saturating_sub(1);
            }
            Err(e @ Error::Fenced { .. }) => return Err(e),
            Err(e) => {
                inner.peers[pi].state = PeerState::Stale;
                inner.peers[pi].drop_link();
                return Err(e);
            }
        }
    }
    let _quiet = w.quiesce();
    let mut inner = w.lock();
    let Some(pi) = inner.peers.iter().position(|p| p.node == node) else {
        return Ok(());
    };
    if inner.peers[pi].state != PeerState::Resyncing {
        return Err(Error::Unavailable(format!("{node} failed during resync")));
    }
    // In sync: everyone forgets its dirty map; the rejoined replica takes the
    // survivors' view of the other members.
    let mut stale_map = None;
    for i in 0..inner.peers.len() {
        if inner.peers[i].state != PeerState::InSync {
            continue;
        }
        w.peer_call(
            &mut inner,
            i,
            &Request::ClearStale {
                name: w.name.clone(),
                epoch: w.epoch,
                node: node.to_string(),
            },
        )?;
        if stale_map.is_none() {
            if let Response::Info(i) = w.peer_call(
                &mut inner,
                i,
                &Request::ReplicaInfo {
                    name: w.name.clone(),
                },
            )? {
                stale_map = Some(i.stale);
            }
        }
    }
    w.peer_call(
        &mut inner,
        pi,
        &Request::SetStaleMap {
            name: w.name.clone(),
            epoch: w.epoch,
            stale: stale_map.unwrap_or_default(),
        },
    )?;
    // It may have missed a rekey's progress (or all of it).
    w.send_crypt(&mut inner, pi)?;
    inner.peers[pi].state = PeerState::InSync;
    inner.peers[pi].pending = 0;
    tracing::info!(volume = %w.name, peer = node, "replica back in sync");
    Ok(())
}
