//! The threads that serve an export's requests: each queue's thread pops
//! descriptor chains and hands them here, so that many requests (of every
//! queue) are in flight into the replicated writer at once, and each one
//! is completed on its queue's used ring as soon as it is done, in any
//! order (virtio allows it).
//!
//! A queue thread also serves requests itself ([`Workers::run_one`])
//! between pops: waking a worker is a trip through the scheduler, which on
//! a loaded host (and in the test host, where it took 4 ms on average) costs
//! more than a request written into the page cache. So at low depth a
//! request is served by the thread that popped it, and at depth the
//! workers woken meanwhile take the rest.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or the pool closes.
    work: Condvar,
    /// Signalled when `in_flight` drops to 0.
    idle: Condvar,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Job>,
    /// Jobs submitted and not finished (queued or running).
    in_flight: usize,
    closed: bool,
}

/// A fixed pool of threads; [`Workers::drain`] waits until every request
/// handed over is done.
pub struct Workers {
    shared: Arc<Shared>,
}

impl Workers {
    /// Starts `n` threads named after the export. They end when the pool
    /// is dropped.
    pub fn new(name: &str, n: usize) -> std::io::Result<Workers> {
        let shared = Arc::new(Shared::default());
        let workers = Workers {
            shared: shared.clone(),
        };
        for i in 0..n.max(1) {
            let shared = shared.clone();
            // On failure `workers` is dropped, which ends those started.
            std::thread::Builder::new()
                .name(format!("vhost-{name}-{i}"))
                .spawn(move || work(&shared))?;
        }
        Ok(workers)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect(crate::POISONED)
    }

    /// Queues `job` for the first thread free: a worker, or a queue thread
    /// in [`Workers::run_one`].
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.queued.push_back(Box::new(job));
        drop(s);
        self.shared.work.notify_one();
    }

    /// Runs the oldest queued job on the calling thread, if there is one;
    /// whether there was.
    pub fn run_one(&self) -> bool {
        let job = self.lock().queued.pop_front();
        match job {
            Some(job) => {
                finish(&self.shared, job);
                true
            }
            None => false,
        }
    }

    /// Waits until every request submitted so far is done (a frontend that
    /// went away, or stops a ring: nothing may touch its rings after).
    pub fn drain(&self) {
        let mut s = self.lock();
        while s.in_flight > 0 {
            s = self.shared.idle.wait(s).expect(crate::POISONED);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.work.notify_all();
    }
}

/// Runs `job` and counts it done.
fn finish(shared: &Shared, job: Job) {
    job();
    let mut s = shared.state.lock().expect(crate::POISONED);
    s.in_flight -= 1;
    if s.in_flight == 0 {
        shared.idle.notify_all();
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut s = shared.state.lock().expect(crate::POISONED);
            loop {
                if let Some(job) = s.queued.pop_front() {
                    break job;
                }
                if s.closed {
                    return;
                }
                s = shared.work.wait(s).expect(crate::POISONED);
            }
        };
        finish(shared, job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_concurrently_and_drain_waits_for_them() {
        let w = Workers::new("t", 4).unwrap();
        // Four jobs that can only finish together: they must run at once.
        let barrier = Arc::new(Barrier::new(4));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (b, d) = (barrier.clone(), done.clone());
            w.submit(move || {
                b.wait();
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
        w.drain();
        assert_eq!(done.load(Ordering::SeqCst), 4);
        w.drain();
    }

    #[test]
    fn a_queue_thread_runs_queued_jobs_itself_and_drain_counts_them() {
        let w = Workers::new("t", 1).unwrap();
        // Keep the only worker busy until released.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (busy_tx, busy_rx) = std::sync::mpsc::channel::<()>();
        w.submit(move || {
            busy_tx.send(()).unwrap();
            hold_rx.recv().unwrap();
        });
        busy_rx.recv().unwrap();
        // Queued behind it; this thread takes it.
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        w.submit(move || *r.lock().unwrap() = Some(std::thread::current().id()));
        assert!(w.run_one());
        assert_eq!(*ran_on.lock().unwrap(), Some(std::thread::current().id()));
        assert!(!w.run_one(), "nothing left to take");
        hold_tx.send(()).unwrap();
        w.drain();
    }

    #[test]
    fn dropping_the_pool_ends_its_threads() {
        let w = Workers::new("t", 3).unwrap();
        let shared = w.shared.clone();
        drop(w);
        // Only this test's handle is left once every worker has returned.
        for _ in 0..500 {
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("workers still hold the pool");
    }
}
