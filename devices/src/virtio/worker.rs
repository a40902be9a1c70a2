//! Device worker threads: spawned on activation, stopped on reset or drop.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use tracing::{debug, error};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::WorkerHook;

/// A running worker thread and the eventfd that asks it to stop.
pub(crate) struct Worker {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawns `body` on a thread called `name`, after running `hook`.
    ///
    /// `body` gets the stop eventfd and must return soon after it becomes
    /// readable; [`Worker::stop_eventfd`] builds a clone to register first.
    pub(crate) fn spawn<F>(
        name: String,
        hook: Option<WorkerHook>,
        stop: EventFd,
        body: F,
    ) -> io::Result<Self>
    where
        F: FnOnce() + Send + 'static,
    {
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(hook) = hook {
                    hook();
                }
                body();
            })?;
        debug!(worker = %name, "device worker started");
        Ok(Self {
            name,
            stop,
            thread: Some(thread),
        })
    }

    /// A fresh non-blocking eventfd for [`Worker::spawn`].
    pub(crate) fn stop_eventfd() -> io::Result<EventFd> {
        EventFd::new(EFD_NONBLOCK)
    }

    /// Asks the thread to stop and waits for it.
    pub(crate) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            error!(worker = %self.name, "cannot signal the worker to stop: {e}");
            return;
        }
        if thread.join().is_err() {
            error!(worker = %self.name, "device worker panicked");
        } else {
            debug!(worker = %self.name, "device worker stopped");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_hook_first_and_stops_on_request() {
        let hooked = Arc::new(AtomicBool::new(false));
        let h = hooked.clone();
        let hook: WorkerHook = Arc::new(move || h.store(true, Ordering::SeqCst));
        let stop = Worker::stop_eventfd().unwrap();
        let stop_in = stop.try_clone().unwrap();
        let saw_hook = Arc::new(AtomicBool::new(false));
        let s = saw_hook.clone();
        let hooked2 = hooked.clone();
        let w = Worker::spawn("kiln-test0".into(), Some(hook), stop, move || {
            s.store(hooked2.load(Ordering::SeqCst), Ordering::SeqCst);
            assert_eq!(std::thread::current().name(), Some("kiln-test0"));
            let poller = EventSetPoller::new().unwrap();
            poller.add(&stop_in, 7).unwrap();
            let mut evs = [EpollEvent::default(); 4];
            let n = poller.wait(&mut evs).unwrap();
            assert_eq!(n, 1);
            assert_eq!(evs[0].data(), 7);
        })
        .unwrap();
        w.stop();
        assert!(saw_hook.load(Ordering::SeqCst));
    }

    #[test]
    fn guest_error_log_backs_off() {
        let mut log = GuestErrorLog::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| log.hit()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16]);
    }
}
