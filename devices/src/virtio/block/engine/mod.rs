//! Asynchronous I/O engines: how a virtio-blk queue keeps many reads and
//! writes of a file in flight at once.
//!
//! An [`IoEngine`] takes vectored reads, writes and data syncs on one file
//! descriptor and reports each one's result when it finishes, in any order.
//! Two implementations:
//!
//! - [`uring::Uring`]: an io_uring of its own per queue (one submitter, so no
//!   lock), whose completions signal an eventfd the queue's worker polls.
//! - [`pool::Pool`]: a bounded pool of threads doing `preadv`/`pwritev`/
//!   `fdatasync`, for hosts where `io_uring_setup` fails (an old kernel,
//!   `kernel.io_uring_disabled`, a container's seccomp profile). Its
//!   completions signal an eventfd too.
//!
//! Both are created when the VMM builds the device, before the seccomp
//! filters are installed: the ring, its eventfd and the pool's threads
//! cannot be created afterwards (the worker filter allows `io_uring_enter`
//! but not `io_uring_setup`, nor thread creation). The pool's threads run the
//! worker hook (the I/O filter) first, like the queue workers.
//!
//! The engine never looks inside the buffers: [`IoOp::iovecs`] points into
//! guest memory (or a bounce buffer) that the caller keeps mapped until the
//! op's [`IoDone`] is reaped (`super::inflight` drains every op before it
//! lets go of guest memory).

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Once};

use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::WorkerHook;

pub mod pool;
pub mod uring;

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// `preadv` into the iovecs.
    Read,
    /// `pwritev` from the iovecs.
    Write,
    /// `fdatasync`: every write completed before it is durable.
    Sync,
}

/// One operation handed to an engine.
#[derive(Debug)]
pub struct IoOp {
    /// Returned unchanged in the op's [`IoDone`].
    pub token: u64,
    pub kind: IoKind,
    /// File offset in bytes (reads and writes).
    pub offset: u64,
    /// The buffers (reads and writes): `iovcnt` `libc::iovec`s at `iovecs`,
    /// valid, with the memory they describe, until the op is reaped.
    pub iovecs: *const libc::iovec,
    pub iovcnt: u32,
}

// SAFETY: an IoOp is plain data; the memory its pointers describe is kept
// valid by the submitter until completion (module doc), whichever thread
// carries out the op.
unsafe impl Send for IoOp {}

/// A finished op: its token and the syscall's result (bytes moved, or a
/// negative errno). Reads and writes may move fewer bytes than asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDone {
    pub token: u64,
    pub result: i64,
}

/// An asynchronous I/O engine for one file descriptor.
pub trait IoEngine: Send {
    /// Queues `op`. At most [`IoEngine::depth`] ops may be in flight
    /// (pushed and not yet reaped); the caller keeps that bound.
    fn push(&mut self, op: IoOp) -> io::Result<()>;

    /// Starts every queued op.
    fn submit(&mut self) -> io::Result<()>;

    /// Appends the ops that finished since the last call to `out`, and
    /// clears the notifier.
    fn reap(&mut self, out: &mut Vec<IoDone>);

    /// Blocks until at least one op has finished (reaped or not), or returns
    /// at once when none is in flight.
    fn wait(&mut self) -> io::Result<()>;

    /// Readable when ops have finished: the queue worker polls it.
    fn notifier(&self) -> &EventFd;

    /// How many ops may be in flight at once.
    fn depth(&self) -> usize;

    /// Ops pushed and not yet reaped.
    fn in_flight(&self) -> usize;

    /// A short name for logs ("io_uring", "thread pool").
    fn name(&self) -> &'static str;
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring, else the thread pool (logged once per process).
    #[default]
    Auto,
    /// io_uring or nothing (tests).
    Uring,
    /// The thread pool (tests; hosts without io_uring).
    Pool,
}

/// An engine kept by its device across activations: each activation's
/// queue server takes it out and puts it back when it is done with it.
pub type EngineSlot = Arc<Mutex<Option<Box<dyn IoEngine>>>>;

/// Takes the engine out of `slot` (a poisoned lock is fine: the engine is
/// either there or not).
pub fn take(slot: &EngineSlot) -> Option<Box<dyn IoEngine>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Puts `engine` back into `slot`.
pub fn put_back(slot: &EngineSlot, engine: Box<dyn IoEngine>) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
}

/// Builds an engine of `kind` for `fd`, with room for `depth` ops in
/// flight. The pool's threads (named `name`-`i`) run `hook` first.
pub fn build(
    kind: EngineKind,
    fd: RawFd,
    depth: usize,
    name: &str,
    hook: Option<WorkerHook>,
) -> io::Result<Box<dyn IoEngine>> {
    static FALLBACK: Once = Once::new();
    match kind {
        EngineKind::Uring => Ok(Box::new(uring::Uring::new(fd, depth)?)),
        EngineKind::Pool => Ok(Box::new(pool::Pool::new(fd, depth, name, hook)?)),
        EngineKind::Auto => match uring::Uring::new(fd, depth) {
            Ok(u) => Ok(Box::new(u)),
            Err(e) => {
                FALLBACK.call_once(|| {
                    warn!(
                        "io_uring is unavailable ({e}): virtio-blk disks use a thread pool \
                         of {} threads per queue instead",
                        pool::THREADS
                    )
                });
                Ok(Box::new(pool::Pool::new(fd, depth, name, hook)?))
            }
        },
    }
}
