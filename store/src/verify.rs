//! Comparing the replicas with each other, as DRBD's online verify does.
//!
//! A replica's own scrub checks each block against its checksum, which
//! cannot see a block that was overwritten with a valid checksum (a bug, a
//! peer that misbehaved, an operator's mistake): the replicas then differ
//! and each one looks healthy. The writer therefore asks every in-sync
//! replica for a digest of each region and copies its source's region
//! (its own copy when it holds one) over any replica whose digest differs.
//! Regions are compared a few at a time with the writer's I/O gate held
//! exclusively, so no write is in flight while a region is compared or
//! copied.

use crate::error::{Error, Result};
use crate::proto::{RegionDigest, Request, Response, MAX_DIGEST_REGIONS};
use crate::writer::{PeerState, Writer};
use crate::EXTENT_SIZE;

/// Regions compared per turn of the writer's I/O gate: at most this many MiB
/// are read on each replica while guest I/O waits.
const BATCH: u64 = 4;

/// What a comparison found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub compared: u64,
    /// Regions copied from the source over a replica that differed.
    pub diverged: u64,
    /// Regions the source could not read cleanly (left alone: its own
    /// scrub repairs them first).
    pub skipped: u64,
}

fn digests(
    w: &Writer,
    inner: &mut crate::writer::Inner,
    i: usize,
    regions: &[u64],
) -> Result<Vec<RegionDigest>> {
    match w.peer_call(
        inner,
        i,
        &Request::RegionDigests {
            name: w.name.clone(),
            regions: regions.to_vec(),
        },
    )? {
        Response::Digests(d) if d.len() == regions.len() => Ok(d),
        _ => Err(Error::Protocol(
            "unexpected reply to a digest request".into(),
        )),
    }
}

/// Compares every region of the writer's in-sync replicas; `pace(done,
/// total)` is called per batch.
pub fn compare_replicas(w: &Writer, pace: &mut dyn FnMut(u64, u64)) -> Result<Comparison> {
    let mut found = Comparison::default();
    let mut next = 0u64;
    loop {
        let quiet = w.quiesce();
        let mut inner = w.lock();
        let total = inner.size.div_ceil(EXTENT_SIZE);
        if next >= total {
            return Ok(found);
        }
        let in_sync: Vec<usize> = (0..inner.peers.len())
            .filter(|i| inner.peers[*i].state == PeerState::InSync)
            .collect();
        if in_sync.len() < 2 {
            return Ok(found);
        }
        let src = in_sync
            .iter()
            .copied()
            .find(|i| inner.peers[*i].local_engine())
            .unwrap_or(in_sync[0]);
        let end = total.min(next + BATCH.min(MAX_DIGEST_REGIONS as u64));
        let regions: Vec<u64> = (next..end).collect();
        let theirs = digests(w, &mut inner, src, &regions)?;
        for &dst in in_sync.iter().filter(|i| **i != src) {
            let node = inner.peers[dst].node.clone();
            let mine = match digests(w, &mut inner, dst, &regions) {
                Ok(d) => d,
                Err(e @ Error::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(volume = %w.name, peer = %node, error = %e, "cannot compare with replica");
                    continue;
                }
            };
            for (k, &r) in regions.iter().enumerate() {
                if theirs[k].bad {
                    found.skipped += 1;
                    continue;
                }
                if mine[k] != theirs[k] {
                    tracing::warn!(volume = %w.name, peer = %node, region = r, "replica differs from the writer's copy; copying it over");
                    w.copy_region(&mut inner, src, dst, r)?;
                    found.diverged += 1;
                }
            }
        }
        found.compared += regions.len() as u64;
        next = end;
        drop(inner);
        drop(quiet);
        pace(next, total);
    }
}
