//! Serving one virtio-blk queue with many requests in flight.
//!
//! A [`QueueServer`] pops descriptor chains, parses each with
//! [`request::parse`] (the one parser), and starts reads, writes and flushes
//! on the queue's [`IoEngine`] without waiting for them; the worker calls
//! [`QueueServer::reap`] when the engine's eventfd fires, and each finished
//! request is put in the used ring then, in whatever order it finished. The
//! guest's buffers are handed to the engine directly (iovecs into guest
//! memory, from vm-memory's checked slices), except where the backend cannot
//! take them: with `O_DIRECT`, buffers, lengths or offsets not aligned to
//! the backend's block go through the synchronous bounce path
//! ([`Disk::execute`]), as do GET_ID, DISCARD and WRITE_ZEROES and every
//! request of a backend without a file descriptor.
//!
//! Bounds and ordering:
//! - At most `depth` (the queue size) requests are in flight; when all slots
//!   are taken the server stops popping until one finishes.
//! - A FLUSH waits on the ring until every request in flight has finished,
//!   then syncs: it covers every write acknowledged before it (virtio's
//!   promise), and every write started before it.
//! - A request over the rate limit goes back on the ring; completions of
//!   requests already started are still reaped and signalled meanwhile.
//! - Short transfers are continued from where they stopped; a transfer that
//!   makes no progress, or reports more than asked, fails with IOERR.
//! - Requests popped in one go that continue each other (same direction,
//!   the next starting at the sector where the one before ends) become one
//!   op, up to [`MAX_MERGED_BYTES`] and `IOV_MAX` iovecs, as QEMU's
//!   virtio-blk merges them: a guest's sequential stream at depth reaches
//!   the disk as fewer, larger transfers. The op's outcome is each of its
//!   requests' (all succeed or all fail, each with its own status and
//!   length). Requests in flight never overlap in what they merge, so the
//!   data is the same as with one op each.
//! - Dropping the server (device reset, VMM exit) first waits for every op
//!   in flight: the kernel may be writing into guest memory until then.
//!   Their results are dropped: after a reset the rings are not the
//!   device's to write. Quiescing the device (a snapshot, a migration)
//!   instead completes them ([`QueueServer::drain_and_complete`]): the
//!   guest must find them finished when the VM goes on.

use std::io;

use tracing::{error, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::AsyncIo;
use super::engine::{self, EngineSlot, IoDone, IoEngine, IoKind, IoOp};
use super::io::Disk;
use super::request::{self, Rejected, Request, RequestLimits, RequestType, SECTOR_SHIFT};
use crate::dirty;
use crate::rate_limiter::RateLimiter;
use crate::virtio::queue::{add_used, disable_notification, enable_notification};
use crate::virtio::worker::GuestErrorLog;

/// Most iovecs one op may carry (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// Largest op that merging adjacent requests makes.
pub const MAX_MERGED_BYTES: u64 = 4 << 20;

/// An op in flight: one request's I/O, or several adjacent requests'.
struct Pending {
    /// The requests it carries (chain head, request), in disk order.
    parts: Vec<(u16, Request)>,
    kind: IoKind,
    /// Where the rest of the transfer goes.
    offset: u64,
    /// Bytes still to move.
    remaining: u64,
    /// Bytes the op moves in all.
    total: u64,
    iovecs: Vec<libc::iovec>,
    /// The first iovec not fully moved yet.
    first: usize,
    /// A read's data buffers (guest address, length): what the kernel
    /// writes, marked dirty ([`crate::dirty`]) when the op is over.
    dirties: Vec<(GuestAddress, u32)>,
}

// SAFETY: the iovecs point into guest memory that the owning QueueServer
// keeps mapped (it holds `mem` and drains every op before dropping it); the
// server moves to its worker thread whole, pointers and memory together.
unsafe impl Send for Pending {}

impl Pending {
    /// Whether `next` continues this op (not started yet) on the disk in
    /// the same direction, and both fit in one op.
    fn continued_by(&self, next: &Pending) -> bool {
        self.kind == next.kind
            && self.kind != IoKind::Sync
            && self.first == 0
            && self.remaining == self.total
            && self.offset.checked_add(self.total) == Some(next.offset)
            && self.iovecs.len() + next.iovecs.len() <= MAX_IOVECS
            && self.total + next.total <= MAX_MERGED_BYTES
    }

    /// Appends `next` (see [`Pending::continued_by`]).
    fn absorb(&mut self, next: Pending) {
        self.total += next.total;
        self.remaining += next.total;
        self.iovecs.extend(next.iovecs);
        self.dirties.extend(next.dirties);
        self.parts.extend(next.parts);
    }
}

/// What became of a popped request.
enum Step {
    /// Finished already: put it in the used ring with this length.
    Done(u32),
    /// Handed to the engine.
    Started,
    /// Not now (rate limit, or a flush waiting for I/O in flight): back on
    /// the ring.
    Later,
}

/// How the requests of a [`QueueServer`] were carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Reads, writes and flushes handed to the engine.
    pub started: u64,
    /// Of those, requests that went in the op of the request before them
    /// (adjacent, same direction).
    pub merged: u64,
    /// Requests run synchronously (bounce path, or not engine work).
    pub synchronous: u64,
}

/// Serves one queue of a virtio-blk device (see the module doc).
pub struct QueueServer {
    stats: ServerStats,
    mem: GuestMemoryMmap,
    disk: Disk,
    limits: RequestLimits,
    /// The engine and where it goes back to; `None` serves every request
    /// synchronously.
    engine: Option<(Box<dyn IoEngine>, EngineSlot)>,
    /// How the backend's file takes asynchronous I/O.
    target: Option<AsyncIo>,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// The slot of the op still taking adjacent requests: not pushed to
    /// the engine yet (its iovecs may still grow).
    open: Option<usize>,
    /// Requests in the slots' ops.
    requests: usize,
    /// Finished requests (head, used length) for the used ring.
    done: Vec<(u16, u32)>,
    /// Stopped popping (slots full, or a flush waiting): run the queue again
    /// once something finishes.
    stalled: bool,
    bounce: Vec<u8>,
    reaped: Vec<IoDone>,
    bad_requests: GuestErrorLog,
    io_errors: GuestErrorLog,
}

impl QueueServer {
    /// A server for one queue over `mem`. With `engine`, the engine is
    /// taken out of its slot for the server's lifetime (and put back on
    /// drop); without one, or if the slot is empty or the backend has no
    /// file descriptor, every request runs synchronously.
    pub fn new(
        mem: GuestMemoryMmap,
        disk: Disk,
        limits: RequestLimits,
        engine: Option<&EngineSlot>,
    ) -> Self {
        let target = disk.backend.async_io();
        let engine = match (engine, target) {
            (Some(slot), Some(_)) => engine::take(slot).map(|e| (e, slot.clone())),
            _ => None,
        };
        let depth = engine.as_ref().map_or(0, |(e, _)| e.depth());
        Self {
            stats: ServerStats::default(),
            mem,
            disk,
            limits,
            engine,
            target,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            open: None,
            requests: 0,
            done: Vec::new(),
            stalled: false,
            bounce: Vec::new(),
            reaped: Vec::new(),
            bad_requests: GuestErrorLog::default(),
            io_errors: GuestErrorLog::default(),
        }
    }

    /// The guest memory the server works in.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The engine's eventfd, for the worker to poll.
    pub fn notifier(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.engine.as_ref().map(|(e, _)| e.notifier())
    }

    /// Requests whose I/O is in flight.
    pub fn in_flight(&self) -> usize {
        self.requests
    }

    /// How requests were carried out so far.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Whether the server stopped popping until a request finishes.
    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Pops, parses and starts every available request (as far as the depth,
    /// the rate limiter and flush ordering allow); returns how many it put
    /// in the used ring (rejected and synchronous ones). The caller
    /// interrupts the guest if that is not 0.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mut limiter: Option<&mut RateLimiter>,
    ) -> usize {
        let mut used = 0;
        self.stalled = false;
        // Passes in a row that found the ring empty.
        let mut empty_passes = 0;
        loop {
            if let Err(e) = disable_notification(queue, &self.mem) {
                warn!("virtio-blk: cannot disable queue notifications: {e}");
            }
            let mut popped = 0usize;
            let mut held = false;
            loop {
                if self.engine.is_some() && self.free.is_empty() {
                    self.stalled = true;
                    held = true;
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let parsed = request::parse(&self.mem, chain, &self.limits);
                match self.start(head, parsed, limiter.as_deref_mut()) {
                    Step::Done(len) => {
                        add_used(queue, &self.mem, head, len);
                        used += 1;
                    }
                    Step::Started => {}
                    Step::Later => {
                        queue.go_to_previous_position();
                        held = true;
                        break;
                    }
                }
            }
            self.submit();
            used += self.put_done(queue);
            if held {
                // Notifications stay off: a completion or the rate
                // limiter's timer brings the worker back.
                break;
            }
            empty_passes = if popped == 0 { empty_passes + 1 } else { 0 };
            match enable_notification(queue, &self.mem) {
                // More requests arrived while notifications were off: go
                // again. One may have come between the last pop and the
                // enable, when a guest without EVENT_IDX saw NO_NOTIFY and
                // did not kick, so a pass that found the ring empty is tried
                // once more; only a second one in a row means a corrupt
                // ring, which would otherwise loop here forever.
                Ok(true) if empty_passes < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!("virtio-blk: cannot enable queue notifications: {e}");
                    break;
                }
            }
        }
        used
    }

    /// Collects finished I/O and puts the requests it completes in the used
    /// ring; returns how many. When the server had stalled, the caller runs
    /// [`QueueServer::process_queue`] next.
    pub fn reap(&mut self, queue: &mut Queue) -> usize {
        let Some((engine, _)) = self.engine.as_mut() else {
            return 0;
        };
        engine.reap(&mut self.reaped);
        let mut reaped = std::mem::take(&mut self.reaped);
        for done in reaped.drain(..) {
            self.finish(done, true);
        }
        self.reaped = reaped;
        self.submit();
        self.put_done(queue)
    }

    /// Puts the finished requests in the used ring; returns how many.
    fn put_done(&mut self, queue: &mut Queue) -> usize {
        let n = self.done.len();
        for (head, len) in self.done.drain(..) {
            add_used(queue, &self.mem, head, len);
        }
        n
    }

    /// Parses `parsed`'s request and starts or runs it.
    fn start(
        &mut self,
        head: u16,
        parsed: Result<Request, Rejected>,
        limiter: Option<&mut RateLimiter>,
    ) -> Step {
        let req = match parsed {
            Ok(req) => req,
            Err(Rejected { error, status }) => {
                if let Some(n) = self.bad_requests.hit() {
                    warn!(head, occurrences = n, "virtio-blk: bad request: {error}");
                }
                return Step::Done(match status {
                    Some(addr) => complete(&self.mem, addr, error.status(), 0),
                    // Nowhere to put a status: hand the chain back empty.
                    None => 0,
                });
            }
        };
        if req.request_type == RequestType::Flush && self.in_flight() > 0 {
            // Drained first: the flush then covers everything before it.
            self.stalled = true;
            return Step::Later;
        }
        if let Some(limiter) = limiter {
            match limiter.admit(req.data_len) {
                Ok(true) => {}
                Ok(false) => return Step::Later,
                // Without a working timer, throttling could stall the disk
                // forever: let the request through.
                Err(e) => warn!("virtio-blk: rate limiter timer failed: {e}"),
            }
        }
        let Some(mut pending) = self.async_op(&req) else {
            return self.run_sync(head, &req);
        };
        pending.parts.push((head, req));
        if let Some(open) = self.open.and_then(|s| self.slots.get_mut(s)?.as_mut()) {
            if open.continued_by(&pending) {
                open.absorb(pending);
                self.requests += 1;
                self.stats.started += 1;
                self.stats.merged += 1;
                return Step::Started;
            }
        }
        self.push_open();
        let Some(slot) = self.free.pop() else {
            // The caller checked for a free slot before popping.
            let Some((head, req)) = pending.parts.pop() else {
                return Step::Done(0);
            };
            return self.run_sync(head, &req);
        };
        self.slots[slot] = Some(pending);
        self.open = Some(slot);
        self.requests += 1;
        self.stats.started += 1;
        Step::Started
    }

    /// Hands the open op (if any) to the engine; if the engine refuses it,
    /// runs its requests synchronously (finished in `done`).
    fn push_open(&mut self) {
        let Some(slot) = self.open.take() else {
            return;
        };
        let Some(p) = self.slots.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let op = op(slot, p);
        let pushed = match self.engine.as_mut() {
            Some((engine, _)) => engine.push(op),
            None => Err(io::Error::other("no engine")),
        };
        if let Err(e) = pushed {
            error!("virtio-blk: cannot queue I/O, running it synchronously: {e}");
            let Some(p) = self.slots[slot].take() else {
                return;
            };
            self.free.push(slot);
            self.requests = self.requests.saturating_sub(p.parts.len());
            self.stats.started = self.stats.started.saturating_sub(p.parts.len() as u64);
            for (head, req) in p.parts {
                if let Step::Done(len) = self.run_sync(head, &req) {
                    self.done.push((head, len));
                }
            }
        }
    }

    /// The in-flight form of `req`, when the engine can take it: reads,
    /// writes (not on a read-only disk) and flushes, with guest buffers the
    /// backend can use as they are.
    fn async_op(&self, req: &Request) -> Option<Pending> {
        let target = self.target?;
        self.engine.as_ref()?;
        let kind = match req.request_type {
            RequestType::In => IoKind::Read,
            RequestType::Out if !self.disk.read_only => IoKind::Write,
            RequestType::Flush if !self.disk.read_only => IoKind::Sync,
            _ => return None,
        };
        let offset = req.sector.checked_mul(1 << SECTOR_SHIFT)?;
        let dirties = match kind {
            IoKind::Read => req.data.iter().map(|s| (s.addr, s.len)).collect(),
            _ => Vec::new(),
        };
        let iovecs = if kind == IoKind::Sync {
            Vec::new()
        } else {
            let v = guest_iovecs(&self.mem, req, kind == IoKind::Read)?;
            let align = target.align.max(1);
            let aligned = offset.is_multiple_of(align)
                && v.iter().all(|i| {
                    (i.iov_base as u64).is_multiple_of(align)
                        && (i.iov_len as u64).is_multiple_of(align)
                });
            if !aligned {
                return None;
            }
            v
        };
        Some(Pending {
            parts: Vec::with_capacity(1),
            kind,
            offset,
            remaining: req.data_len,
            total: req.data_len,
            iovecs,
            first: 0,
            dirties,
        })
    }

    /// Runs `req` on this thread through the bounce buffer.
    fn run_sync(&mut self, head: u16, req: &Request) -> Step {
        self.stats.synchronous += 1;
        Step::Done(match self.disk.execute(&self.mem, req, &mut self.bounce) {
            Ok(written) => complete(&self.mem, req.status, VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                if let Some(n) = self.io_errors.hit() {
                    warn!(
                        head,
                        occurrences = n,
                        "virtio-blk: {:?} request failed: {e}",
                        req.request_type
                    );
                }
                complete(&self.mem, req.status, VIRTIO_BLK_S_IOERR as u8, 0)
            }
        })
    }

    /// Accounts for a finished op: continues a short transfer, or frees the
    /// slot and (with `report`) writes its requests' statuses, adding them
    /// to `done`.
    fn finish(&mut self, done: IoDone, report: bool) {
        let Some(slot) = usize::try_from(done.token).ok() else {
            return;
        };
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            error!(
                token = done.token,
                "virtio-blk: completion for no request in flight"
            );
            return;
        };
        let ok = match (p.kind, u64::try_from(done.result)) {
            (IoKind::Sync, Ok(_)) => true,
            (_, Ok(n)) if n == p.remaining => true,
            (_, Ok(n)) if n > 0 && n < p.remaining && report => {
                // Short: continue from there.
                p.remaining -= n;
                p.offset += n;
                advance(&mut p.iovecs, &mut p.first, n);
                let op = op(slot, p);
                let pushed = match self.engine.as_mut() {
                    Some((engine, _)) => engine.push(op),
                    None => Err(io::Error::other("no engine")),
                };
                match pushed {
                    Ok(()) => return,
                    Err(e) => {
                        error!("virtio-blk: cannot continue a short transfer: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        let Some(p) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        self.requests = self.requests.saturating_sub(p.parts.len());
        // The kernel is done writing the buffers (all of them, or a part:
        // mark them all either way, results dropped or not).
        mark_dirties(&p);
        if !report {
            return;
        }
        if !ok {
            if let Some(n) = self.io_errors.hit() {
                let e = match done.result {
                    r if r < 0 => io::Error::from_raw_os_error((-r) as i32).to_string(),
                    r => format!("moved {r} of {} bytes", p.remaining),
                };
                warn!(
                    head = p.parts.first().map_or(0, |(h, _)| *h),
                    requests = p.parts.len(),
                    occurrences = n,
                    "virtio-blk: {:?} request failed: {e}",
                    p.kind
                );
            }
        }
        if ok && p.parts.len() > 1 {
            self.disk.counters.merged(p.parts.len() as u64 - 1);
        }
        for (head, req) in &p.parts {
            let (status, written) = if ok {
                match p.kind {
                    IoKind::Read => self.disk.counters.read(req.data_len),
                    IoKind::Write => self.disk.counters.wrote(req.data_len),
                    IoKind::Sync => {}
                }
                let written = match p.kind {
                    IoKind::Read => u32::try_from(req.data_len).unwrap_or(u32::MAX),
                    _ => 0,
                };
                (VIRTIO_BLK_S_OK as u8, written)
            } else {
                (VIRTIO_BLK_S_IOERR as u8, 0)
            };
            self.done
                .push((*head, complete(&self.mem, req.status, status, written)));
        }
    }

    /// Pushes the open op, then submits what was pushed.
    fn submit(&mut self) {
        self.push_open();
        if let Some((engine, _)) = self.engine.as_mut() {
            if let Err(e) = engine.submit() {
                error!(
                    "virtio-blk: cannot submit I/O to the {}: {e}",
                    engine.name()
                );
            }
        }
    }

    /// Waits for every op in flight and completes the requests they belong
    /// to, as [`QueueServer::reap`] would (status written, chain put in the
    /// used ring), without starting new ones: the device is being quiesced
    /// and the guest must see every request it handed over finished.
    /// Returns how many chains went to the used ring; the caller interrupts
    /// the guest if that is not 0.
    pub fn drain_and_complete(&mut self, queue: &mut Queue) -> usize {
        self.drain(Some(queue))
    }

    /// Waits for every op in flight; with `queue`, completes their requests
    /// in it, else (device reset) drops the results.
    fn drain(&mut self, mut queue: Option<&mut Queue>) -> usize {
        let mut used = 0;
        // An op still open goes to the engine first (or runs now).
        self.submit();
        while self.in_flight() > 0 {
            let Some((engine, _)) = self.engine.as_mut() else {
                break;
            };
            if engine.in_flight() == 0 {
                // Nothing left that could complete: never wait forever.
                error!(
                    "virtio-blk: {} requests in flight but none in the {}",
                    self.requests,
                    engine.name()
                );
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    if let Some(p) = slot.take() {
                        // Parts may have been moved already.
                        mark_dirties(&p);
                        self.free.push(i);
                    }
                }
                self.requests = 0;
                break;
            }
            if let Err(e) = engine.wait() {
                error!(
                    "virtio-blk: cannot wait for I/O in flight ({e}); keeping guest memory mapped"
                );
                // The kernel may still write into guest memory: never unmap it.
                std::mem::forget(self.mem.clone());
                break;
            }
            engine.reap(&mut self.reaped);
            let mut reaped = std::mem::take(&mut self.reaped);
            for done in reaped.drain(..) {
                self.finish(done, queue.is_some());
            }
            self.reaped = reaped;
            // The rest of short transfers, pushed by `finish`.
            self.submit();
            if let Some(q) = queue.as_deref_mut() {
                used += self.put_done(q);
            }
        }
        match queue {
            Some(q) => used += self.put_done(q),
            // After a reset the rings are not the device's.
            None => self.done.clear(),
        }
        used
    }
}

impl Drop for QueueServer {
    fn drop(&mut self) {
        self.drain(None);
        if let Some((engine, slot)) = self.engine.take() {
            engine::put_back(&slot, engine);
        }
    }
}

/// The op for the rest of `p`'s transfer, under token `slot`.
fn op(slot: usize, p: &Pending) -> IoOp {
    let rest = p.iovecs.get(p.first..).unwrap_or(&[]);
    IoOp {
        token: slot as u64,
        kind: p.kind,
        offset: p.offset,
        iovecs: rest.as_ptr(),
        iovcnt: rest.len() as u32,
    }
}

/// The request's data segments as iovecs into guest memory (split where a
/// segment crosses guest memory regions), or `None` if they cannot be (a
/// segment vm-memory does not map, too many pieces, lengths that do not add
/// up).
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    req: &Request,
    device_writes: bool,
) -> Option<Vec<libc::iovec>> {
    let mut v = Vec::with_capacity(req.data.len());
    let mut total = 0u64;
    for seg in &req.data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.ok()?;
            let base = if device_writes {
                slice.ptr_guard_mut().as_ptr()
            } else {
                slice.ptr_guard().as_ptr().cast_mut()
            };
            v.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
            total += slice.len() as u64;
        }
    }
    (total == req.data_len && !v.is_empty() && v.len() <= MAX_IOVECS).then_some(v)
}

/// Marks a finished op's guest buffers dirty (a read's; nothing for others).
fn mark_dirties(p: &Pending) {
    for &(addr, len) in &p.dirties {
        dirty::mark(addr, u64::from(len));
    }
}

/// Moves the start of `iovecs[*first..]` on by `n` bytes.
fn advance(iovecs: &mut [libc::iovec], first: &mut usize, mut n: u64) {
    while n > 0 {
        let Some(v) = iovecs.get_mut(*first) else {
            return;
        };
        let len = v.iov_len as u64;
        if n >= len {
            n -= len;
            *first += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n as usize).cast();
            v.iov_len -= n as usize;
            n = 0;
        }
    }
}

/// Writes the status byte (marked dirty, [`crate::dirty`]); returns the
/// used length.
pub(crate) fn complete(
    mem: &GuestMemoryMmap,
    status_addr: GuestAddress,
    status: u8,
    written: u32,
) -> u32 {
    match mem.write_obj(status, status_addr) {
        Ok(()) => {
            dirty::mark(status_addr, 1);
            written.saturating_add(1)
        }
        Err(e) => {
            warn!("virtio-blk: cannot write the status byte: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests;
