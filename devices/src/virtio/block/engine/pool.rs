//! The thread-pool engine: [`THREADS`] threads per queue doing positional
//! vectored I/O, for hosts without io_uring.
//!
//! The threads are started when the device is built (before the seccomp
//! filters: a confined thread may not create threads) and run the worker
//! hook first, so they are confined like the queue worker. Ops wait in a
//! queue under a mutex; finished ones are collected under the same mutex
//! and announced on an eventfd. Syscalls on the pool's threads: `preadv`,
//! `pwritev`, `fdatasync`, futex, and the eventfd write, all in the I/O
//! worker filter.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IoDone, IoEngine, IoKind, IoOp};
use crate::virtio::device::WorkerHook;
use crate::virtio::worker::drain_eventfd;

/// Threads per queue: enough to keep a disk busy at the queue depths guests
/// use without a thread per request.
pub const THREADS: usize = 8;

#[derive(Default)]
struct State {
    jobs: VecDeque<IoOp>,
    done: Vec<IoDone>,
    /// Ops taken by a thread and not yet in `done`.
    running: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Jobs arrived, or shutdown.
    work: Condvar,
    /// An op finished.
    finished: Condvar,
    notifier: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded pool of I/O threads serving one file descriptor.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Pushed, not yet submitted.
    pending: Vec<IoOp>,
    depth: usize,
    /// Pushed and not yet reaped.
    in_flight: usize,
}

impl Pool {
    /// Starts [`THREADS`] threads named `name`-p`i`, each running `hook`
    /// first; returns once every hook has run.
    pub fn new(fd: RawFd, depth: usize, name: &str, hook: Option<WorkerHook>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            finished: Condvar::new(),
            notifier: EventFd::new(EFD_NONBLOCK)?,
        });
        let mut pool = Self {
            shared: shared.clone(),
            threads: Vec::with_capacity(THREADS),
            pending: Vec::new(),
            depth: depth.max(1),
            in_flight: 0,
        };
        let (ready_tx, ready) = mpsc::channel();
        for i in 0..THREADS {
            let shared = shared.clone();
            let hook = hook.clone();
            let ready_tx = ready_tx.clone();
            // Linux thread names are 15 bytes.
            let mut tname = format!("{name}p{i}");
            tname.truncate(15);
            let t = std::thread::Builder::new()
                .name(tname)
                .stack_size(crate::THREAD_STACK_SIZE)
                .spawn(move || {
                    if let Some(hook) = hook {
                        hook();
                    }
                    if ready_tx.send(()).is_ok() {
                        serve(&shared, fd);
                    }
                })?;
            pool.threads.push(t);
        }
        drop(ready_tx);
        for _ in 0..THREADS {
            // Dropping `pool` on error ends the threads that did start.
            ready
                .recv()
                .map_err(|_| io::Error::other("an I/O pool thread died in its start hook"))?;
        }
        Ok(pool)
    }
}

/// A pool thread: runs ops until shutdown.
fn serve(shared: &Shared, fd: RawFd) {
    let mut state = shared.lock();
    loop {
        if let Some(op) = state.jobs.pop_front() {
            state.running += 1;
            drop(state);
            let result = run(fd, &op);
            state = shared.lock();
            state.running -= 1;
            state.done.push(IoDone {
                token: op.token,
                result,
            });
            shared.finished.notify_all();
            if let Err(e) = shared.notifier.write(1) {
                error!("I/O pool: cannot signal a completion: {e}");
            }
            continue;
        }
        if state.shutdown {
            return;
        }
        state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
    }
}

/// Carries out one op; bytes moved or a negative errno.
fn run(fd: RawFd, op: &IoOp) -> i64 {
    let iovcnt = i32::try_from(op.iovcnt).unwrap_or(i32::MAX);
    let Ok(offset) = libc::off_t::try_from(op.offset) else {
        return -i64::from(libc::EINVAL);
    };
    loop {
        // SAFETY: the iovecs and the memory they describe are valid until
        // the op is reaped (IoOp's contract); the kernel checks the fd and
        // every address and length.
        let r = unsafe {
            match op.kind {
                IoKind::Read => libc::preadv(fd, op.iovecs, iovcnt, offset) as i64,
                IoKind::Write => libc::pwritev(fd, op.iovecs, iovcnt, offset) as i64,
                IoKind::Sync => i64::from(libc::fdatasync(fd)),
            }
        };
        if r >= 0 {
            return r;
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return -i64::from(errno);
        }
    }
}

impl IoEngine for Pool {
    fn push(&mut self, op: IoOp) -> io::Result<()> {
        if self.in_flight >= self.depth {
            return Err(io::Error::other("I/O pool: more ops than its depth"));
        }
        self.pending.push(op);
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut state = self.shared.lock();
        state.jobs.extend(self.pending.drain(..));
        drop(state);
        self.shared.work.notify_all();
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        drain_eventfd(&self.shared.notifier);
        let mut state = self.shared.lock();
        self.in_flight = self.in_flight.saturating_sub(state.done.len());
        out.append(&mut state.done);
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.submit()?;
        let mut state = self.shared.lock();
        while state.done.is_empty() {
            if state.jobs.is_empty() && state.running == 0 {
                // Nothing left that could finish (cannot happen while
                // in_flight counts right): do not wait forever.
                return Ok(());
            }
            state = self
                .shared
                .finished
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn notifier(&self) -> &EventFd {
        &self.shared.notifier
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "thread pool"
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("an I/O pool thread panicked");
            }
        }
    }
}
