//! The data path: reads, writes, discards and flushes of the guest (or of
//! any [`VolumeIo`] user), many at once.
//!
//! Each request holds the writer's I/O gate shared and a ticket of the
//! overlap tracker ([`super::order`]) on its blocks for its whole life,
//! takes the writer's lock only to look at the replica set (and to
//! encrypt), and is sent to every replica without any lock held. So
//! writes to different blocks are in flight together, each replica
//! applies overlapping writes in submission order, and a write is
//! acknowledged once every in-sync replica has it (or, for a replica that
//! failed it, once the survivors have durably recorded that it missed it).
//!
//! The `*_raw` functions and [`Writer::flush_locked`] are the same
//! operations for control paths that hold the writer's lock and the gate
//! exclusively (rekey, region copies).

use std::sync::atomic::Ordering;

use super::batch::Queued;
use super::{Inner, PeerState, Target, Writer};
use crate::error::{Error, Result};
use crate::io::{ReadsDone, VolumeIo};
use crate::iobuf::IoBuf;
use crate::proto::{BatchWrite, Request, Response};
use crate::types::ReadOut;
use crate::{replica, BLOCK_SIZE, MAX_IO};

impl Writer {
    /// Aligned write of whole blocks (at most MAX_IO) as they are.
    pub(crate) fn write_raw(&self, inner: &mut Inner, offset: u64, data: Vec<u8>) -> Result<()> {
        let regions = Self::regions_of(offset, data.len() as u64);
        let req = Request::Write {
            name: self.name.clone(),
            epoch: self.epoch,
            offset,
            data: data.into(),
            stale: Self::stale_nodes(inner),
        };
        inner.unflushed.extend(&regions);
        self.replicate(inner, &req, &regions)
    }

    /// Reads whole blocks as stored from the best replica, repairing
    /// blocks that fail their checksum from another replica.
    pub(crate) fn read_raw(&self, inner: &mut Inner, offset: u64, len: u64) -> Result<Vec<u8>> {
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
            return Ok(self
                .fix_bad_blocks(inner, i, &order[k + 1..], offset, out)?
                .into_vec());
        }
        Err(Error::Io(format!(
            "no in-sync replica of {} could be read",
            self.name
        )))
    }

    pub(crate) fn fix_bad_blocks(
        &self,
        inner: &mut Inner,
        from: usize,
        others: &[usize],
        offset: u64,
        mut out: ReadOut,
    ) -> Result<IoBuf> {
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

    /// The data-path flush with `inner` held (control paths).
    pub(crate) fn flush_locked(&self, inner: &mut Inner) -> Result<()> {
        let req = Request::FlushHot {
            name: self.name.clone(),
            epoch: self.epoch,
        };
        let unflushed: Vec<u64> = inner.unflushed.iter().copied().collect();
        self.replicate(inner, &req, &unflushed)?;
        inner.unflushed.clear();
        Ok(())
    }

    // ----- the concurrent data path ---------------------------------------

    /// Writes whole blocks (at most `MAX_IO`) to every replica that gets
    /// writes, encrypted first if the volume is. The caller holds the gate
    /// and a ticket on the blocks. `buf` becomes the request's data (no
    /// copy: a caller with a borrowed buffer copies it before the lock is
    /// taken, since other writes need the lock meanwhile).
    fn write_blocks(&self, offset: u64, mut buf: IoBuf) -> Result<()> {
        let regions = Self::regions_of(offset, buf.len() as u64);
        let (targets, req) = {
            let mut inner = self.lock();
            Self::check_range(&inner, offset, buf.len() as u64)?;
            if let Some(c) = &inner.crypt {
                c.encrypt(&mut buf, offset)?;
            }
            inner.unflushed.extend(&regions);
            let targets = Self::targets(&inner);
            if targets.iter().any(|t| !t.local) {
                // Over the network: with the writes waiting meanwhile.
                drop(inner);
                return self
                    .batches
                    .submit(offset, buf, &|writes| self.send_batch(writes));
            }
            let req = Request::Write {
                name: self.name.clone(),
                epoch: self.epoch,
                offset,
                data: buf,
                stale: Self::stale_nodes(&inner),
            };
            (targets, req)
        };
        let results = self.fanout(&targets, &req);
        self.settle(None, &targets, results, &|_| regions.clone())
    }

    /// Sends writes queued by [`Writer::write_blocks`] to every replica
    /// that gets writes, as one request (see [`super::batch`]).
    fn send_batch(&self, writes: Vec<Queued>) -> Result<()> {
        let regions: Vec<u64> = writes
            .iter()
            .flat_map(|w| Self::regions_of(w.offset, w.data.len() as u64))
            .collect::<std::collections::BTreeSet<u64>>()
            .into_iter()
            .collect();
        let (targets, req) = {
            let inner = self.lock();
            let (name, epoch, stale) = (self.name.clone(), self.epoch, Self::stale_nodes(&inner));
            let req = match <[Queued; 1]>::try_from(writes) {
                Ok([w]) => Request::Write {
                    name,
                    epoch,
                    offset: w.offset,
                    data: w.data,
                    stale,
                },
                Err(writes) => Request::WriteBatch {
                    name,
                    epoch,
                    writes: writes
                        .into_iter()
                        .map(|w| BatchWrite {
                            offset: w.offset,
                            data: w.data,
                        })
                        .collect(),
                    stale,
                },
            };
            (Self::targets(&inner), req)
        };
        let results = match &req {
            Request::WriteBatch { .. } => self.fanout_batch(&targets, &req),
            _ => self.fanout(&targets, &req),
        };
        self.settle(None, &targets, results, &|_| regions.clone())
    }

    /// [`Writer::fanout`] of a `WriteBatch`, to replicas that may predate
    /// it too (a rolling update: this node runs the newer kiln-store, a
    /// peer still the older one). Such a peer answers the batch as a
    /// message it cannot decode, having applied none of it; it then gets
    /// the batch's writes one by one, in order, and from then on (until
    /// its links are cleared) only single writes. A replica failing for
    /// any other reason fails as before.
    fn fanout_batch(&self, targets: &[Target], req: &Request) -> Vec<Result<Response>> {
        let (batched, single): (Vec<usize>, Vec<usize>) =
            (0..targets.len()).partition(|&k| targets[k].links.takes_batches());
        let mut results: Vec<Option<Result<Response>>> = targets.iter().map(|_| None).collect();
        let sent: Vec<Target> = batched.iter().map(|&k| targets[k].clone()).collect();
        let mut again = single;
        for (k, r) in batched.into_iter().zip(self.fanout(&sent, req)) {
            match r {
                Err(Error::Protocol(m)) if !targets[k].local && m.starts_with("bad message") => {
                    if targets[k].links.refused_batches() {
                        tracing::warn!(volume = %self.name, peer = %targets[k].links.node, "replica does not take write batches (an older kiln-store?); sending it single writes");
                    }
                    again.push(k);
                }
                r => results[k] = Some(r),
            }
        }
        for k in again {
            results[k] = Some(self.send_singly(&targets[k], req));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Unavailable("not sent".into()))))
            .collect()
    }

    /// The writes of `batch` (a `WriteBatch`) to one replica one after
    /// another, as single `Write`s; the first failure ends it.
    fn send_singly(&self, t: &Target, batch: &Request) -> Result<Response> {
        let Request::WriteBatch {
            name,
            epoch,
            writes,
            stale,
        } = batch
        else {
            return Err(Error::Invalid("not a write batch".into()));
        };
        for w in writes {
            let single = Request::Write {
                name: name.clone(),
                epoch: *epoch,
                offset: w.offset,
                data: w.data.clone(),
                stale: stale.clone(),
            };
            t.links.call(self.connector.as_ref(), &single)?;
        }
        Ok(Response::Ok)
    }

    /// Reads whole blocks (at most `MAX_IO`) from the best in-sync replica
    /// (this node's first), decrypted; a block that fails its checksum is
    /// fetched from another replica and repaired. The caller holds the
    /// gate and a (shared) ticket on the blocks.
    fn read_blocks(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let order: Vec<(usize, std::sync::Arc<super::PeerLinks>, bool)> = {
            let inner = self.lock();
            Self::check_range(&inner, offset, len)?;
            let mut o: Vec<_> = inner
                .peers
                .iter()
                .enumerate()
                .filter(|(_, p)| p.state == PeerState::InSync)
                .map(|(i, p)| (i, p.links.clone(), p.local))
                .collect();
            o.sort_by_key(|(_, _, local)| !local);
            o
        };
        let req = Request::Read {
            name: self.name.clone(),
            offset,
            len,
        };
        let connector = self.connector.as_ref();
        for (k, (i, links, local)) in order.iter().enumerate() {
            let r = if *local {
                replica::handle(&self.engine, connector, &req).into_result()
            } else {
                links.call(connector, &req)
            };
            let out = match r {
                Ok(Response::Read(out)) if out.data.len() as u64 == len => out,
                Ok(Response::Read(out)) => {
                    // Never trusted as it is: a short answer would leave
                    // the caller's buffer part unread.
                    tracing::warn!(volume = %self.name, peer = %links.node, want = len, got = out.data.len(), "read answered with the wrong length; marking replica stale");
                    self.mark_stale(&mut self.lock(), vec![*i], &[])?;
                    continue;
                }
                Ok(_) => return Err(Error::Protocol("unexpected reply to read".into())),
                Err(e @ Error::Fenced { .. }) => return Err(self.fence(&e)),
                Err(e @ Error::Invalid(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(volume = %self.name, peer = %links.node, error = %e, "read failed; marking replica stale");
                    self.mark_stale(&mut self.lock(), vec![*i], &[])?;
                    continue;
                }
            };
            let mut inner = self.lock();
            let mut data = if out.bad_blocks.is_empty() {
                out.data
            } else {
                let others: Vec<usize> = order[k + 1..]
                    .iter()
                    .map(|(j, _, _)| *j)
                    .filter(|j| inner.peers[*j].state == PeerState::InSync)
                    .collect();
                self.fix_bad_blocks(&mut inner, *i, &others, offset, out)?
            };
            if let Some(c) = &inner.crypt {
                c.decrypt(&mut data, offset)?;
            }
            return Ok(data);
        }
        Err(Error::Io(format!(
            "no in-sync replica of {} could be read",
            self.name
        )))
    }

    /// Writes any byte range (unaligned edges read-modify-written); the
    /// caller holds the gate and a ticket covering the range's blocks.
    fn write_bytes(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = pos / BLOCK_SIZE * BLOCK_SIZE;
            let remaining = (buf.len() - done) as u64;
            if pos == start && remaining >= BLOCK_SIZE {
                let n = (remaining / BLOCK_SIZE * BLOCK_SIZE).min(MAX_IO) as usize;
                self.write_blocks(pos, IoBuf::copy_from(&buf[done..done + n]))?;
                done += n;
            } else {
                // Read-modify-write of one partial block.
                let mut blk = self.read_blocks(start, BLOCK_SIZE)?;
                let skip = (pos - start) as usize;
                let n = (BLOCK_SIZE as usize - skip).min(buf.len() - done);
                blk[skip..skip + n].copy_from_slice(&buf[done..done + n]);
                self.write_blocks(start, blk)?;
                done += n;
            }
        }
        Ok(())
    }

    fn check_size(&self, offset: u64, len: u64) -> Result<()> {
        Self::check_range(&self.lock(), offset, len)
    }
}

impl VolumeIo for Writer {
    fn size(&self) -> Result<u64> {
        Ok(self.lock().size)
    }

    /// Every replica that gets writes is this node's engine (a 1-replica
    /// volume, or one whose other replicas are stale).
    fn writes_stay_local(&self) -> bool {
        Self::targets(&self.lock()).iter().all(|t| t.local)
    }

    fn reads_stay_local(&self) -> bool {
        self.lock()
            .peers
            .iter()
            .any(|p| p.local && p.state == PeerState::InSync)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let _gate = self.io_gate();
        let _range = self.ranges.acquire_bytes(offset, buf.len() as u64, true);
        self.check_size(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = pos / BLOCK_SIZE * BLOCK_SIZE;
            let want = (buf.len() - done) as u64;
            let len = ((pos - start + want).div_ceil(BLOCK_SIZE) * BLOCK_SIZE).min(MAX_IO);
            let data = self.read_blocks(start, len)?;
            let skip = (pos - start) as usize;
            let n = (data.len() - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// Whole blocks, at most `MAX_IO`, come back in the buffer the replica's
    /// answer arrived in; anything else as [`VolumeIo::read_at`].
    fn read_vec(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let n = len as u64;
        if n == 0 || n > MAX_IO || offset % BLOCK_SIZE != 0 || n % BLOCK_SIZE != 0 {
            return crate::io::read_into_new(self, offset, len);
        }
        self.check_usable()?;
        let _gate = self.io_gate();
        let _range = self.ranges.acquire_bytes(offset, n, true);
        self.check_size(offset, n)?;
        self.read_blocks(offset, n)
    }

    /// Whole-block reads, when this node holds an in-sync replica, are
    /// read from it together ([`crate::engine::Engine::read_many_each`]:
    /// one submission to the disk for the batch, each range handed on as
    /// it lands). A range that fails there, or has a block that fails its
    /// checksum, is read again the ordinary way (the next replica, the
    /// repair), still under the batch's tickets.
    fn read_batch_each(&self, reads: &[(u64, usize)], done: &mut ReadsDone) {
        let whole = |&(o, l): &(u64, usize)| {
            let n = l as u64;
            n > 0 && n <= MAX_IO && o % BLOCK_SIZE == 0 && n % BLOCK_SIZE == 0
        };
        if reads.len() < 2 || !reads.iter().all(whole) {
            for (i, &(o, l)) in reads.iter().enumerate() {
                done(vec![(i, self.read_vec(o, l))]);
            }
            return;
        }
        if let Err(e) = self.check_usable() {
            done((0..reads.len()).map(|i| (i, Err(e.clone()))).collect());
            return;
        }
        let _gate = self.io_gate();
        let blocks: Vec<(u64, u64)> = reads
            .iter()
            .map(|&(o, l)| (o / BLOCK_SIZE, (o + l as u64) / BLOCK_SIZE))
            .collect();
        let _tickets = self.ranges.acquire_reads(&blocks);
        let checked: Vec<Result<()>> = {
            let inner = self.lock();
            reads
                .iter()
                .map(|&(o, l)| Self::check_range(&inner, o, l as u64))
                .collect()
        };
        // One range as the guest gets it: from the local replica if that
        // read it whole and sound, else the ordinary way.
        let answer = |i: usize, local: Option<Result<ReadOut>>| -> Result<IoBuf> {
            let (offset, len) = reads[i];
            checked[i].clone()?;
            match local {
                Some(Ok(out)) if out.bad_blocks.is_empty() && out.data.len() == len => {
                    let mut data = out.data;
                    if let Some(c) = &self.lock().crypt {
                        c.decrypt(&mut data, offset)?;
                    }
                    Ok(data)
                }
                _ => self.read_blocks(offset, len as u64),
            }
        };
        if !self.reads_stay_local() {
            for i in 0..reads.len() {
                done(vec![(i, answer(i, None))]);
            }
            return;
        }
        let ranges: Vec<(u64, u64)> = reads.iter().map(|&(o, l)| (o, l as u64)).collect();
        // `done` runs under the engine's read guard, so nothing in it may
        // wait for a lock that a thread waiting for the engine can hold: a
        // flush that frees slots holds the engine's lock while it waits
        // for that guard, and a writer thread that holds this writer's
        // lock may be waiting for the engine's. So a range the local
        // replica could not give whole and sound (read again the ordinary
        // way, through the engine), and every range of an encrypted volume
        // (decrypted with the keys under this writer's lock), is answered
        // once the batch is over; the others as they land.
        let encrypted = self.lock().crypt.is_some();
        let mut later: Vec<(usize, Option<Result<ReadOut>>)> = Vec::new();
        self.engine.read_many_each(&self.name, &ranges, |round| {
            let mut ready = Vec::with_capacity(round.len());
            for (i, out) in round {
                if let Err(e) = &checked[i] {
                    ready.push((i, Err(e.clone())));
                    continue;
                }
                match out {
                    Ok(out) if out.bad_blocks.is_empty() && out.data.len() == reads[i].1 => {
                        if encrypted {
                            later.push((i, Some(Ok(out))));
                        } else {
                            ready.push((i, Ok(out.data)));
                        }
                    }
                    _ => later.push((i, None)),
                }
            }
            if !ready.is_empty() {
                done(ready);
            }
        });
        for (i, out) in later {
            done(vec![(i, answer(i, out))]);
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let _gate = self.io_gate();
        let _range = self.ranges.acquire_bytes(offset, buf.len() as u64, false);
        self.check_size(offset, buf.len() as u64)?;
        self.write_bytes(buf, offset)
    }

    /// Whole blocks, at most `MAX_IO`, go to the replicas in `buf` itself;
    /// anything else as [`VolumeIo::write_at`].
    fn write_vec(&self, buf: IoBuf, offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 || len > MAX_IO || offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return self.write_at(&buf, offset);
        }
        self.check_usable()?;
        let _gate = self.io_gate();
        let _range = self.ranges.acquire_bytes(offset, len, false);
        self.check_size(offset, len)?;
        self.write_blocks(offset, buf)
    }

    /// Every write acknowledged before this call is on every replica that
    /// got it (in its page cache); the flush makes it durable there. A
    /// write still in flight may or may not be covered, as a block device
    /// promises.
    fn flush(&self) -> Result<()> {
        self.check_usable()?;
        let _gate = self.io_gate();
        let (targets, unflushed) = {
            let mut inner = self.lock();
            (Self::targets(&inner), std::mem::take(&mut inner.unflushed))
        };
        let req = Request::FlushHot {
            name: self.name.clone(),
            epoch: self.epoch,
        };
        let results = self.fanout(&targets, &req);
        // A replica whose flush failed may have lost anything written to it
        // since its last good flush: the regions taken here and any written
        // meanwhile.
        let r = self.settle(None, &targets, results, &|inner: &Inner| {
            unflushed.union(&inner.unflushed).copied().collect()
        });
        if r.is_err() {
            self.lock().unflushed.extend(&unflushed);
        }
        r
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_usable()?;
        let _gate = self.io_gate();
        let _range = self.ranges.acquire_bytes(offset, len, false);
        self.check_size(offset, len)?;
        let end = offset + len;
        let a = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let b = end / BLOCK_SIZE * BLOCK_SIZE;
        if a < b {
            let regions = Self::regions_of(a, b - a);
            let (targets, req) = {
                let mut inner = self.lock();
                inner.unflushed.extend(&regions);
                let req = Request::Discard {
                    name: self.name.clone(),
                    epoch: self.epoch,
                    offset: a,
                    len: b - a,
                    stale: Self::stale_nodes(&inner),
                };
                (Self::targets(&inner), req)
            };
            let results = self.fanout(&targets, &req);
            self.settle(None, &targets, results, &|_| regions.clone())?;
        }
        // Unaligned edges are zeroed by read-modify-write.
        for (s, e) in [(offset, a.min(end)), (b.max(offset).max(a), end)] {
            if s < e {
                self.write_bytes(&vec![0u8; (e - s) as usize], s)?;
            }
        }
        Ok(())
    }
}
