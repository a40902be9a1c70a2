//! Serving replica operations on this node's local copy, and the
//! replica-side scrub that repairs bad blocks from peers.

use crate::engine::{BadBlock, Engine};
use crate::error::{Error, Result};
use crate::proto::{Request, Response, ScrubReport};
use crate::transport::{Connector, Link};
use crate::{validate_name, BLOCK_SIZE};

/// Executes a replica operation against the local engine.
pub fn handle(engine: &Engine, connector: &dyn Connector, req: &Request) -> Response {
    Response::from_result(dispatch(engine, connector, req))
}

fn dispatch(engine: &Engine, connector: &dyn Connector, req: &Request) -> Result<Response> {
    // A replica whose disk failed a sync answers nothing: to its writer it
    // is like one that is down.
    engine.check_healthy()?;
    match req {
        Request::CreateReplica {
            name,
            size,
            replicas,
            epoch,
            crypt,
        } => {
            engine.create_volume(name, *size, replicas.clone(), *epoch, crypt.clone())?;
            Ok(Response::Ok)
        }
        Request::SetCrypt { name, epoch, crypt } => {
            engine.set_crypt(name, *epoch, crypt.clone())?;
            Ok(Response::Ok)
        }
        Request::DeleteReplica { name, epoch } => {
            engine.check_writer(name, *epoch)?;
            engine.delete_volume(name)?;
            Ok(Response::Ok)
        }
        Request::ReplicaInfo { name } => Ok(Response::Info(engine.info(name)?)),
        Request::SetEpoch { name, epoch } => {
            engine.set_epoch(name, *epoch)?;
            Ok(Response::Ok)
        }
        Request::SetReplicas {
            name,
            epoch,
            replicas,
        } => {
            engine.set_replicas(name, *epoch, replicas.clone())?;
            Ok(Response::Ok)
        }
        Request::Write {
            name,
            epoch,
            offset,
            data,
            stale,
        } => {
            engine.write(name, *epoch, *offset, data, stale)?;
            Ok(Response::Ok)
        }
        Request::WriteBatch {
            name,
            epoch,
            writes,
            stale,
        } => {
            for w in writes {
                engine.write(name, *epoch, w.offset, &w.data, stale)?;
            }
            Ok(Response::Ok)
        }
        Request::Discard {
            name,
            epoch,
            offset,
            len,
            stale,
        } => {
            engine.discard(name, *epoch, *offset, *len, stale)?;
            Ok(Response::Ok)
        }
        Request::Read { name, offset, len } => {
            Ok(Response::Read(engine.read(name, *offset, *len)?))
        }
        Request::Flush { name, epoch } => {
            engine.flush(Some((name, *epoch)))?;
            Ok(Response::Ok)
        }
        Request::Layout { name } => Ok(Response::Layout(engine.layout(name)?)),
        Request::AdoptTorn {
            name,
            epoch,
            regions,
        } => {
            engine.adopt_torn(name, *epoch, regions)?;
            Ok(Response::Ok)
        }
        Request::RegionDigests { name, regions } => {
            if regions.len() > crate::proto::MAX_DIGEST_REGIONS {
                return Err(Error::Invalid(format!(
                    "at most {} regions per digest request",
                    crate::proto::MAX_DIGEST_REGIONS
                )));
            }
            Ok(Response::Digests(
                regions
                    .iter()
                    .map(|r| engine.region_digest(name, *r))
                    .collect::<Result<_>>()?,
            ))
        }
        Request::RegionAllocated { name, region } => {
            Ok(Response::Allocated(engine.region_allocated(name, *region)?))
        }
        Request::ReadSnapshot {
            name,
            snap,
            offset,
            len,
        } => Ok(Response::Read(
            engine.read_snapshot(name, snap, *offset, *len)?,
        )),
        Request::FlushHot { name, epoch } => {
            engine.flush_keep_hot(name, *epoch)?;
            Ok(Response::Ok)
        }
        Request::MarkStale {
            name,
            epoch,
            node,
            regions,
        } => {
            engine.mark_stale(name, *epoch, node, regions)?;
            Ok(Response::Ok)
        }
        Request::ClearStale { name, epoch, node } => {
            engine.clear_stale(name, *epoch, node, true)?;
            Ok(Response::Ok)
        }
        Request::SetStaleMap { name, epoch, stale } => {
            for n in stale.keys() {
                validate_name(n)?;
            }
            engine.set_stale_map(name, *epoch, stale.clone())?;
            Ok(Response::Ok)
        }
        Request::Resize { name, epoch, size } => {
            engine.resize(name, *epoch, *size)?;
            Ok(Response::Ok)
        }
        Request::Snapshot { name, snap, epoch } => {
            engine.check_writer(name, *epoch)?;
            engine.snapshot(name, snap)?;
            Ok(Response::Ok)
        }
        Request::DeleteSnapshot { name, snap, epoch } => {
            engine.check_writer(name, *epoch)?;
            engine.delete_snapshot(name, snap)?;
            Ok(Response::Ok)
        }
        Request::CloneReplica {
            name,
            snap,
            new,
            epoch,
        } => {
            engine.clone_volume(name, snap, new, *epoch)?;
            Ok(Response::Ok)
        }
        Request::ScrubReplica { name } => Ok(Response::Scrub(scrub_and_repair(
            engine,
            connector,
            name,
            &mut |_, _| {},
        )?)),
        _ => Err(Error::Invalid(
            "not a replica operation (use the local socket)".into(),
        )),
    }
}

/// Verifies every block of this node's copy of `name`; each bad block is
/// fetched from another replica that verifies it and rewritten here, unless
/// a write changed the block in between. `pace(done, total)` is called per
/// extent.
pub fn scrub_and_repair(
    engine: &Engine,
    connector: &dyn Connector,
    name: &str,
    pace: &mut dyn FnMut(u64, u64),
) -> Result<ScrubReport> {
    let info = engine.info(name)?;
    let bad = engine.scrub(name, pace)?;
    let mut report = ScrubReport {
        scanned_bytes: info.allocated_bytes,
        bad_blocks: bad.clone(),
        ..ScrubReport::default()
    };
    for b in bad {
        if repair_from_peers(engine, connector, name, b, &info.replicas)? {
            report.repaired += 1;
        } else {
            report.unrepaired += 1;
        }
    }
    if report.unrepaired > 0 {
        tracing::error!(
            volume = name,
            count = report.unrepaired,
            "blocks failed their checksum and could not be repaired"
        );
    }
    Ok(report)
}

fn repair_from_peers(
    engine: &Engine,
    connector: &dyn Connector,
    name: &str,
    bad: BadBlock,
    replicas: &[crate::meta::ReplicaAddr],
) -> Result<bool> {
    for r in replicas.iter().filter(|r| r.node != engine.node_id()) {
        let got = connector.connect(&r.node, &r.addr).and_then(|c| {
            Link::peer(c).call(&Request::Read {
                name: name.to_string(),
                offset: bad.block * BLOCK_SIZE,
                len: BLOCK_SIZE,
            })
        });
        match got {
            Ok(Response::Read(out)) if out.bad_blocks.is_empty() => {
                let done = engine.repair_block(name, bad, &out.data)?;
                tracing::warn!(volume = name, block = bad.block, from = %r.node, done, "repaired block after checksum mismatch");
                return Ok(done);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(peer = %r.node, error = %e, "peer could not supply a good block")
            }
        }
    }
    Ok(false)
}
