//! The threads that serve an export's requests: each queue's thread pops
//! descriptor chains and hands them here, so that many requests (of every
//! queue) are in flight into the replicated writer at once, and each one
//! is completed on its queue's used ring as soon as it is done, in any
//! order (virtio allows it).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads; [`Workers::drain`] waits until every request
/// handed over is done.
pub struct Workers {
    tx: Mutex<Sender<Job>>,
    inflight: Arc<(Mutex<usize>, Condvar)>,
}

impl Workers {
    /// Starts `n` threads named after the export. They end when the pool
    /// is dropped.
    pub fn new(name: &str, n: usize) -> std::io::Result<Workers> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("vhost-{name}-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Workers {
            tx: Mutex::new(tx),
            inflight: Arc::new((Mutex::new(0), Condvar::new())),
        })
    }

    /// Runs `job` on a worker thread.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let inflight = self.inflight.clone();
        *inflight.0.lock().expect(crate::POISONED) += 1;
        let wrapped: Job = Box::new(move || {
            job();
            let mut n = inflight.0.lock().expect(crate::POISONED);
            *n -= 1;
            if *n == 0 {
                inflight.1.notify_all();
            }
        });
        if let Err(e) = self.tx.lock().expect(crate::POISONED).send(wrapped) {
            // Only when every worker is gone (they never end while the pool
            // lives): run it here rather than lose the request.
            (e.0)();
        }
    }

    /// Waits until every request submitted so far is done (a frontend that
    /// went away, or stops a ring: nothing may touch its rings after).
    pub fn drain(&self) {
        let (n, done) = &*self.inflight;
        let mut n = n.lock().expect(crate::POISONED);
        while *n > 0 {
            n = done.wait(n).expect(crate::POISONED);
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().expect(crate::POISONED).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
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
}
