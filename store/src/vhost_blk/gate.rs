//! What stops one queue: every access to a ring (the queue thread popping
//! requests, each request until its used entry is written and the guest
//! signalled) holds a [`Pass`] taken *before* it touches the ring, and
//! [`Gate::stop`] (on `GET_VRING_BASE`) closes the gate and waits until no
//! pass is left. So once the frontend has the ring's `next_avail`, every
//! request popped is on the used ring and nothing writes to that ring (or
//! its call fd) until it is started again.

use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct State {
    stopped: bool,
    passes: usize,
}

/// The gate of one queue. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<State>, Condvar)>);

/// Leave to touch the ring; the gate's [`Gate::stop`] waits for it.
pub struct Pass(Gate);

impl Gate {
    /// A pass if the queue is not stopped. A stopped queue opens again when
    /// `restarted()` (asked under the gate's lock) says the frontend set
    /// the ring up anew since.
    pub fn enter(&self, restarted: impl FnOnce() -> bool) -> Option<Pass> {
        let mut s = self.0 .0.lock().expect(crate::POISONED);
        if s.stopped {
            if !restarted() {
                return None;
            }
            s.stopped = false;
        }
        s.passes += 1;
        Some(Pass(self.clone()))
    }

    /// Whether [`Gate::stop`] has closed the gate (a queue thread stops
    /// popping then).
    pub fn is_stopped(&self) -> bool {
        self.0 .0.lock().expect(crate::POISONED).stopped
    }

    /// Closes the gate and waits until every pass is returned.
    pub fn stop(&self) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().expect(crate::POISONED);
        s.stopped = true;
        while s.passes > 0 {
            s = cv.wait(s).expect(crate::POISONED);
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let (state, cv) = &*(self.0).0;
        let mut s = state.lock().expect(crate::POISONED);
        s.passes -= 1;
        if s.passes == 0 {
            cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn stop_waits_for_passes_and_refuses_new_ones_until_restarted() {
        let g = Gate::default();
        let pass = g.enter(|| unreachable!()).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let t = {
            let (g, released) = (g.clone(), released.clone());
            std::thread::spawn(move || {
                g.stop();
                // stop() returned: the pass must have been given back.
                assert!(released.load(Ordering::SeqCst));
            })
        };
        // Wait until the stopper has closed the gate (it then waits on us).
        while !g.is_stopped() {
            std::thread::yield_now();
        }
        assert!(g.enter(|| false).is_none(), "a stopped gate gave a pass");
        released.store(true, Ordering::SeqCst);
        drop(pass);
        t.join().unwrap();
        assert!(g.is_stopped());
        assert!(g.enter(|| false).is_none());
        let p = g.enter(|| true).expect("a restarted ring gets a pass");
        assert!(!g.is_stopped());
        drop(p);
        g.stop();
    }
}
