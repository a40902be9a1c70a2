//! What one frontend connection asked of an export and how long its
//! requests stayed here: counted as requests go (relaxed atomics, no lock
//! on the data path) and logged when the frontend goes, so that an
//! operator (or `scripts/bench-io`) can tell time spent in this daemon from
//! time spent in the guest and its VMM.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Counters of one connection, per export.
pub struct SessionStats {
    /// Requests popped, per queue.
    requests: Vec<AtomicU64>,
    /// Queue notifications handled (guest kicks), per queue.
    kicks: Vec<AtomicU64>,
    /// Used-queue interrupts signalled to the frontend.
    interrupts: AtomicU64,
    /// Reads served together (see `backend`): batches, and reads in them.
    read_batches: AtomicU64,
    batched_reads: AtomicU64,
    /// Requests popped and not yet completed, now.
    in_flight: AtomicU64,
    /// Sum over requests of `in_flight` when each was popped.
    in_flight_sum: AtomicU64,
    /// Sum over requests of the time from pop to a worker taking it.
    queued_ns: AtomicU64,
    /// Sum over requests of the time from a worker taking it to its used
    /// entry being written (the volume's own work).
    served_ns: AtomicU64,
    since: std::sync::Mutex<Instant>,
}

/// One request, from its pop: what [`SessionStats::started`] and
/// [`SessionStats::completed`] measure.
pub struct Timing {
    popped: Instant,
    started: Option<Instant>,
}

impl SessionStats {
    pub fn new(queues: usize) -> SessionStats {
        SessionStats {
            requests: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            kicks: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            interrupts: AtomicU64::new(0),
            read_batches: AtomicU64::new(0),
            batched_reads: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            in_flight_sum: AtomicU64::new(0),
            queued_ns: AtomicU64::new(0),
            served_ns: AtomicU64::new(0),
            since: std::sync::Mutex::new(Instant::now()),
        }
    }

    pub fn kicked(&self, queue: usize) {
        if let Some(k) = self.kicks.get(queue) {
            k.fetch_add(1, Relaxed);
        }
    }

    /// A request was popped from `queue`.
    pub fn popped(&self, queue: usize) -> Timing {
        if let Some(r) = self.requests.get(queue) {
            r.fetch_add(1, Relaxed);
        }
        let before = self.in_flight.fetch_add(1, Relaxed);
        self.in_flight_sum.fetch_add(before + 1, Relaxed);
        Timing {
            popped: Instant::now(),
            started: None,
        }
    }

    /// A worker took the request.
    pub fn started(&self, t: &mut Timing) {
        let now = Instant::now();
        self.queued_ns
            .fetch_add(nanos(now.duration_since(t.popped)), Relaxed);
        t.started = Some(now);
    }

    /// The request's used entry is written (or it was dropped).
    pub fn completed(&self, t: Timing) {
        let start = t.started.unwrap_or(t.popped);
        self.served_ns.fetch_add(nanos(start.elapsed()), Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub fn interrupted(&self) {
        self.interrupts.fetch_add(1, Relaxed);
    }

    /// `n` reads were served together.
    pub fn read_batch(&self, n: usize) {
        self.read_batches.fetch_add(1, Relaxed);
        self.batched_reads.fetch_add(n as u64, Relaxed);
    }

    /// The counters so far, and a fresh start for the next connection.
    pub fn take(&self) -> Summary {
        let take = |a: &AtomicU64| a.swap(0, Relaxed);
        let mut since = self.since.lock().expect(crate::POISONED);
        let s = Summary {
            secs: since.elapsed().as_secs_f64(),
            requests: self.requests.iter().map(take).collect(),
            kicks: self.kicks.iter().map(take).collect(),
            interrupts: take(&self.interrupts),
            read_batches: take(&self.read_batches),
            batched_reads: take(&self.batched_reads),
            in_flight_sum: take(&self.in_flight_sum),
            queued_ns: take(&self.queued_ns),
            served_ns: take(&self.served_ns),
        };
        *since = Instant::now();
        s
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What [`SessionStats::take`] returns; `Display` is the log's wording.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub secs: f64,
    pub requests: Vec<u64>,
    pub kicks: Vec<u64>,
    pub interrupts: u64,
    pub read_batches: u64,
    pub batched_reads: u64,
    in_flight_sum: u64,
    queued_ns: u64,
    served_ns: u64,
}

impl Summary {
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    fn mean(&self, sum: u64) -> f64 {
        match self.total_requests() {
            0 => 0.0,
            n => sum as f64 / n as f64,
        }
    }

    /// Mean requests in this daemon (popped, not completed) seen by each
    /// request as it was popped, itself included.
    pub fn mean_in_flight(&self) -> f64 {
        self.mean(self.in_flight_sum)
    }

    /// Mean microseconds from pop until a worker took a request.
    pub fn mean_queued_us(&self) -> f64 {
        self.mean(self.queued_ns) / 1000.0
    }

    /// Mean microseconds a worker spent on a request.
    pub fn mean_served_us(&self) -> f64 {
        self.mean(self.served_ns) / 1000.0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join("/");
        write!(
            f,
            "requests={} per_queue={} kicks={} interrupts={} read_batches={} batched_reads={} \
             mean_in_flight={:.1} mean_queued_us={:.0} mean_served_us={:.0} secs={:.1}",
            self.total_requests(),
            list(&self.requests),
            list(&self.kicks),
            self.interrupts,
            self.read_batches,
            self.batched_reads,
            self.mean_in_flight(),
            self.mean_queued_us(),
            self.mean_served_us(),
            self.secs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_per_queue_and_means_over_them() {
        let s = SessionStats::new(2);
        s.kicked(0);
        s.kicked(1);
        s.kicked(7); // no such queue: ignored
        let mut a = s.popped(0);
        let mut b = s.popped(1);
        let c = s.popped(1);
        s.started(&mut a);
        s.started(&mut b);
        s.completed(a);
        s.completed(b);
        s.completed(c);
        s.interrupted();
        s.read_batch(5);
        s.read_batch(2);
        let sum = s.take();
        assert_eq!(sum.requests, vec![1, 2]);
        assert_eq!(sum.kicks, vec![1, 1]);
        assert_eq!(sum.interrupts, 1);
        // In flight as each was popped: 1, 2, 3.
        assert!((sum.mean_in_flight() - 2.0).abs() < 1e-9);
        let line = sum.to_string();
        assert!(
            line.starts_with(
                "requests=3 per_queue=1/2 kicks=1/1 interrupts=1 read_batches=2 batched_reads=7 \
                 mean_in_flight=2.0"
            ),
            "{line}"
        );
        // Taken: the next connection starts from zero.
        let next = s.take();
        assert_eq!(next.total_requests(), 0);
        assert_eq!(next.mean_in_flight(), 0.0);
    }
}
