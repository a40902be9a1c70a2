//! Device worker threads: one per device, created before the guest runs and
//! reused by every activation.
//!
//! kiln-vmm confines each kind of thread with a seccomp filter, and a filter
//! is inherited by the threads its thread creates. Activation runs on a vCPU
//! thread, which may neither create threads nor epoll sets nor eventfds (nor
//! dup them), so a device's worker thread, its epoll set and its stop eventfd
//! are all created once, when the VMM builds the device and before any filter
//! is in place. The thread runs the worker hook (the I/O filter) once, then
//! waits for jobs: each activation hands it a body that serves the queues
//! until the stop eventfd fires, and a reset waits for that body to return.
//! The thread ends when its [`Worker`] is dropped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, error};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::WorkerHook;

/// The epoll token of the stop eventfd, registered in every worker's epoll
/// set when the thread is created. Bodies use other tokens for their fds.
pub(crate) const TOKEN_STOP: u64 = 0;

/// What an activation hands to the worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// A device's long-lived worker thread.
pub(crate) struct Worker {
    name: String,
    poller: Arc<EventSetPoller>,
    stop: Arc<EventFd>,
    /// Dropping it ends the thread.
    jobs: Option<Sender<Job>>,
    /// One message per finished job.
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    /// A job was submitted and [`Worker::stop`] has not collected it yet.
    busy: bool,
}

impl Worker {
    /// Creates the epoll set (with the stop eventfd registered under
    /// [`TOKEN_STOP`]) and the thread `name`, which runs `hook`, then serves
    /// jobs until the `Worker` is dropped. Returns once the hook has run.
    pub(crate) fn spawn(name: String, hook: Option<WorkerHook>) -> io::Result<Self> {
        let poller = Arc::new(EventSetPoller::new()?);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        poller.add(&*stop, TOKEN_STOP)?;
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                if let Some(hook) = hook {
                    hook();
                }
                if done_tx.send(()).is_err() {
                    return;
                }
                // Until the Worker drops the sender.
                while let Ok(job) = job_rx.recv() {
                    job();
                    if done_tx.send(()).is_err() {
                        break;
                    }
                }
            })?;
        if done.recv().is_err() {
            let _ = thread.join();
            return Err(io::Error::other(format!(
                "the device worker thread {name} died in its start hook"
            )));
        }
        debug!(worker = %name, "device worker thread started");
        Ok(Self {
            name,
            poller,
            stop,
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            busy: false,
        })
    }

    /// Spawns the worker into `slot`, running `hook` first; fails if there
    /// already is one.
    pub(crate) fn spawn_into(
        slot: &mut Option<Worker>,
        name: &str,
        hook: WorkerHook,
    ) -> io::Result<()> {
        if slot.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("the worker thread {name} already exists"),
            ));
        }
        *slot = Some(Self::spawn(name.to_string(), Some(hook))?);
        Ok(())
    }

    /// The worker in `slot`, spawned (without a hook) if there is none yet:
    /// for devices activated without a transport, as unit tests do.
    pub(crate) fn get_or_spawn<'a>(
        slot: &'a mut Option<Worker>,
        name: &str,
    ) -> io::Result<&'a mut Worker> {
        let worker = match slot.take() {
            Some(w) => w,
            None => Self::spawn(name.to_string(), None)?,
        };
        Ok(slot.insert(worker))
    }

    /// The thread's epoll set, for a body to register its fds in (on the
    /// worker thread) and wait on.
    pub(crate) fn poller(&self) -> Arc<EventSetPoller> {
        self.poller.clone()
    }

    /// The stop eventfd: readable (under [`TOKEN_STOP`]) when the body must
    /// return.
    pub(crate) fn stop_eventfd(&self) -> Arc<EventFd> {
        self.stop.clone()
    }

    /// Whether a body was handed over and not yet stopped.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy
    }

    /// Hands `body` to the thread. It must return soon after the stop
    /// eventfd becomes readable, and unregister the fds it registered.
    /// Creates no thread and no fd: the only syscall is a futex wake.
    pub(crate) fn submit<F>(&mut self, body: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        if self.busy {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the device worker is already serving an activation",
            ));
        }
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Box::new(body)).is_ok());
        if !sent {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the device worker thread {} has exited", self.name),
            ));
        }
        self.busy = true;
        Ok(())
    }

    /// Asks the running body to return and waits until it has; the thread
    /// stays, ready for the next [`Worker::submit`]. Does nothing when idle.
    /// Syscalls: a write and a read of the stop eventfd, futex waits.
    pub(crate) fn stop(&mut self) {
        if !self.busy {
            return;
        }
        if let Err(e) = self.stop.write(1) {
            // Waiting would hang; stay busy so the body is not doubled up.
            error!(worker = %self.name, "cannot signal the worker to stop: {e}");
            return;
        }
        self.busy = false;
        if self.done.recv().is_err() {
            error!(worker = %self.name, "the device worker thread died");
        } else {
            debug!(worker = %self.name, "device worker idle");
        }
        // A body that had already returned on its own left the signal set.
        drain_eventfd(&self.stop);
    }
}

impl Worker {
    /// [`Worker::stop`], but if the body has not returned within `deadline`,
    /// runs `unstick` (which must make the body return: the vhost-user
    /// device hangs up on a backend that does not answer) and then waits.
    /// Syscalls: those of `stop`, futex waits with a timeout, `unstick`'s.
    pub(crate) fn stop_within(&mut self, deadline: std::time::Duration, unstick: impl FnOnce()) {
        if !self.busy {
            return;
        }
        if let Err(e) = self.stop.write(1) {
            error!(worker = %self.name, "cannot signal the worker to stop: {e}");
            return;
        }
        self.busy = false;
        let done = match self.done.recv_timeout(deadline) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                unstick();
                self.done.recv().map_err(|_| ())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
        };
        if done.is_err() {
            error!(worker = %self.name, "the device worker thread died");
        }
        drain_eventfd(&self.stop);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        if self.busy {
            // The body could not be told to stop: joining would hang.
            return;
        }
        // Ends the thread's receive loop.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!(worker = %self.name, "device worker thread panicked");
            } else {
                debug!(worker = %self.name, "device worker thread ended");
            }
        }
    }
}

/// An epoll set whose events carry a small token instead of an fd.
pub(crate) struct EventSetPoller {
    epoll: Epoll,
}

impl EventSetPoller {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
        })
    }

    /// Watches `fd` for readability (level-triggered), reporting `token`.
    pub(crate) fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Turns readability interest for `fd` on or off, keeping it registered.
    pub(crate) fn set_readable_interest(
        &self,
        fd: &impl AsRawFd,
        token: u64,
        on: bool,
    ) -> io::Result<()> {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.epoll.ctl(
            ControlOperation::Modify,
            fd.as_raw_fd(),
            EpollEvent::new(events, token),
        )
    }

    /// Stops watching `fd`.
    pub(crate) fn remove(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        )
    }

    /// Waits (without timeout) and returns the ready `(token, events)` pairs,
    /// retrying on `EINTR`.
    pub(crate) fn wait(&self, out: &mut [EpollEvent]) -> io::Result<usize> {
        loop {
            match self.epoll.wait(-1, out) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// Reads (and so clears) an eventfd, ignoring "nothing to read".
pub(crate) fn drain_eventfd(evt: &EventFd) {
    match evt.read() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => error!("cannot read eventfd: {e}"),
    }
}

/// Rate-limits warnings caused by guest behaviour, so that a hostile guest
/// cannot flood the host log: it logs the 1st, 2nd, 4th, 8th... occurrence.
#[derive(Default)]
pub(crate) struct GuestErrorLog {
    count: u64,
}

impl GuestErrorLog {
    /// Counts one occurrence; returns `Some(total)` when this one should be
    /// logged.
    pub(crate) fn hit(&mut self) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        self.count.is_power_of_two().then_some(self.count)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    /// The thread ids (tids) of this process's threads called `name`.
    pub(crate) fn threads_named(name: &str) -> Vec<i32> {
        let mut tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?;
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                (comm.trim_end() == name).then_some(())?;
                task.file_name().to_str()?.parse().ok()
            })
            .collect();
        tids.sort_unstable();
        tids
    }

    /// A body like the devices': waits on the worker's epoll set until the
    /// stop eventfd fires, recording the thread it ran on.
    fn waiting_body(w: &Worker, seen: Arc<Mutex<Vec<ThreadId>>>) -> impl FnOnce() + Send {
        let poller = w.poller();
        let stop = w.stop_eventfd();
        move || {
            seen.lock().unwrap().push(std::thread::current().id());
            let mut evs = [EpollEvent::default(); 4];
            let n = poller.wait(&mut evs).unwrap();
            assert_eq!(n, 1);
            assert_eq!(evs[0].data(), TOKEN_STOP);
            drain_eventfd(&stop);
        }
    }

    #[test]
    fn one_thread_runs_the_hook_once_and_serves_every_activation() {
        let hooks = Arc::new(AtomicUsize::new(0));
        let h = hooks.clone();
        let hook: WorkerHook = Arc::new(move || {
            assert_eq!(std::thread::current().name(), Some("kiln-test0"));
            h.fetch_add(1, Ordering::SeqCst);
        });
        let mut w = Worker::spawn("kiln-test0".into(), Some(hook)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..3 {
            w.submit(waiting_body(&w, seen.clone())).unwrap();
            assert!(w.is_busy());
            assert!(w.submit(|| {}).is_err());
            w.stop();
            assert!(!w.is_busy());
        }
        w.stop();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|&t| t == seen[0]));
        assert_ne!(seen[0], std::thread::current().id());
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
        drop(w);
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_hook_that_dies_fails_the_spawn() {
        let hook: WorkerHook = Arc::new(|| panic!("cannot confine this thread"));
        assert!(Worker::spawn("kiln-test5".into(), Some(hook)).is_err());
    }

    #[test]
    fn stop_waits_for_the_body_to_return() {
        let mut w = Worker::spawn("kiln-test1".into(), None).unwrap();
        let returned = Arc::new(AtomicBool::new(false));
        let r = returned.clone();
        let body = waiting_body(&w, Default::default());
        w.submit(move || {
            body();
            std::thread::sleep(std::time::Duration::from_millis(50));
            r.store(true, Ordering::SeqCst);
        })
        .unwrap();
        w.stop();
        assert!(returned.load(Ordering::SeqCst));
    }

    #[test]
    fn a_body_that_returned_early_does_not_leave_a_stale_stop() {
        let mut w = Worker::spawn("kiln-test2".into(), None).unwrap();
        w.submit(|| {}).unwrap();
        w.stop();
        // The stop signal nobody consumed was drained: the next body waits.
        let (tx, rx) = mpsc::channel();
        let body = waiting_body(&w, Default::default());
        w.submit(move || {
            body();
            tx.send(()).unwrap();
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(rx.try_recv().is_err());
        w.stop();
        assert!(rx.try_recv().is_ok());
    }

    /// Signals a channel when the thread it lives on exits.
    struct ExitGuard(mpsc::Sender<()>);

    impl Drop for ExitGuard {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    thread_local! {
        static EXIT_GUARD: std::cell::RefCell<Option<ExitGuard>> = const {
            std::cell::RefCell::new(None)
        };
    }

    #[test]
    fn dropping_the_worker_ends_the_thread() {
        let (tx, exited) = mpsc::channel();
        let mut w = Worker::spawn("kiln-test3".into(), None).unwrap();
        w.submit(move || EXIT_GUARD.with(|g| *g.borrow_mut() = Some(ExitGuard(tx))))
            .unwrap();
        w.stop();
        let seen = Arc::new(Mutex::new(Vec::new()));
        w.submit(waiting_body(&w, seen.clone())).unwrap();
        assert!(exited.try_recv().is_err());
        // Stops the running body, then ends and joins the thread.
        drop(w);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(exited.try_recv().is_ok());
    }

    #[test]
    fn spawns_lazily_once() {
        let mut slot = None;
        let first = Worker::get_or_spawn(&mut slot, "kiln-test4")
            .unwrap()
            .poller();
        let again = Worker::get_or_spawn(&mut slot, "kiln-test4")
            .unwrap()
            .poller();
        assert!(Arc::ptr_eq(&first, &again));
    }

    #[test]
    fn guest_error_log_backs_off() {
        let mut log = GuestErrorLog::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| log.hit()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16]);
    }
}
