//! Ordering of a volume's concurrent I/O: an overlap tracker.
//!
//! Many writes of one volume are in flight to every replica at once, each
//! on a connection of its own (see [`super::links`]), and a replica serves
//! its connections concurrently. Requests in flight at the same time may
//! therefore land in any order on a replica, which is harmless only if
//! they commute. They do when they touch different blocks, so the writer
//! lets two requests travel together only if their block ranges do not
//! overlap: each request first takes a [`RangeLock`] ticket on its blocks
//! and waits until every *earlier* ticket that overlaps it (and is not
//! shared with it: two reads commute) is released. Tickets are numbered in
//! submission order, so overlapping writes reach every replica in
//! submission order and the replicas never diverge, while writes to
//! different blocks pipeline freely. A read takes a shared ticket: it
//! sees each overlapping write either entirely before or entirely after,
//! and the repair of a bad block it found (a write of the good copy) never
//! races a guest write of that block.
//!
//! This was chosen over per-link sequence numbers with in-order
//! application on each replica: the replica side stays as it is (one
//! request at a time per connection, any number of connections), and a
//! slow write holds up only the writes that overlap it, not every later
//! one.

use std::sync::{Condvar, Mutex};

/// Block ranges of the requests in flight (or waiting) on one volume.
#[derive(Default)]
pub struct RangeLock {
    state: Mutex<Tickets>,
    released: Condvar,
}

#[derive(Default)]
struct Tickets {
    next: u64,
    /// (ticket, first block, end block, shared), in ticket order.
    held: Vec<(u64, u64, u64, bool)>,
}

impl Tickets {
    /// Does an earlier ticket than `t` conflict with `[a, b)`?
    fn blocked(&self, t: u64, a: u64, b: u64, shared: bool) -> bool {
        self.held
            .iter()
            .take_while(|h| h.0 < t)
            .any(|&(_, x, y, s)| x < b && a < y && !(s && shared))
    }
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    /// Takes a ticket on blocks `[first, end)` and waits until no earlier
    /// conflicting ticket is held. `shared`: a read (reads do not conflict
    /// with each other).
    pub fn acquire(&self, first: u64, end: u64, shared: bool) -> RangeGuard<'_> {
        let mut st = self.state.lock().expect(crate::POISONED);
        let t = st.next;
        st.next += 1;
        st.held.push((t, first, end, shared));
        while st.blocked(t, first, end, shared) {
            st = self.released.wait(st).expect(crate::POISONED);
        }
        RangeGuard {
            lock: self,
            ticket: t,
        }
    }

    /// Takes shared tickets (reads) on several block ranges `[first, end)`
    /// at once, numbered one after the other with no other request's
    /// ticket between them, and waits until none is blocked. Taken one at
    /// a time they could deadlock: a write ticketed between two of them
    /// and overlapping both would wait for the first while the second
    /// waits for it. Reads never block each other, so the set waits only
    /// for earlier writes, none of which waits for it.
    pub fn acquire_reads(&self, ranges: &[(u64, u64)]) -> Vec<RangeGuard<'_>> {
        let mut st = self.state.lock().expect(crate::POISONED);
        let first = st.next;
        for &(a, b) in ranges {
            let t = st.next;
            st.next += 1;
            st.held.push((t, a, b, true));
        }
        while ranges
            .iter()
            .zip(first..)
            .any(|(&(a, b), t)| st.blocked(t, a, b, true))
        {
            st = self.released.wait(st).expect(crate::POISONED);
        }
        (first..first + ranges.len() as u64)
            .map(|ticket| RangeGuard { lock: self, ticket })
            .collect()
    }

    /// Takes a ticket covering byte range `[offset, offset + len)`, rounded
    /// out to whole blocks.
    pub fn acquire_bytes(&self, offset: u64, len: u64, shared: bool) -> RangeGuard<'_> {
        let bs = crate::BLOCK_SIZE;
        let end = offset.saturating_add(len).div_ceil(bs);
        self.acquire(offset / bs, end.max(offset / bs + 1), shared)
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().expect(crate::POISONED).held.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.lock.state.lock().expect(crate::POISONED);
        st.held.retain(|h| h.0 != self.ticket);
        drop(st);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};

    #[test]
    fn disjoint_ranges_and_reads_do_not_wait() {
        let l = RangeLock::default();
        let a = l.acquire(0, 8, false);
        let b = l.acquire(8, 16, false);
        let r1 = l.acquire(20, 30, true);
        let r2 = l.acquire(25, 26, true);
        assert_eq!(l.held(), 4);
        drop((a, b, r1, r2));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn overlapping_requests_run_in_ticket_order() {
        let l = Arc::new(RangeLock::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = l.acquire(0, 8, false);
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        // Each thread takes its ticket before the next one starts.
        for i in 1..=3u64 {
            let (l2, order, tx) = (l.clone(), order.clone(), tx.clone());
            let ticketed = Arc::new(AtomicU64::new(0));
            let t2 = ticketed.clone();
            threads.push(std::thread::spawn(move || {
                // Overlaps the first range and each other; the read is
                // blocked by the writes around it.
                let shared = i == 2;
                let g = {
                    let g = l2.acquire_bytes(4096 * (i - 1), 4096 * 4, shared);
                    t2.store(1, Ordering::SeqCst);
                    g
                };
                order.lock().unwrap().push(i);
                drop(g);
                tx.send(i).unwrap();
            }));
            // Wait until thread i holds its ticket (queued behind `first`).
            while l.held() < (i + 1) as usize {
                std::thread::yield_now();
            }
            assert_eq!(ticketed.load(Ordering::SeqCst), 0);
        }
        assert!(rx.try_recv().is_err(), "nothing passes the first write");
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn reads_taken_together_wait_for_earlier_writes_and_hold_later_ones() {
        let l = Arc::new(RangeLock::default());
        // A write holds blocks 0..4; a second write over 0..20 queues
        // behind it. Reads of 2..3 and 10..11 taken together come after
        // both: they wait for the writes, and the writes never for them.
        let w1 = l.acquire(0, 4, false);
        let l2 = l.clone();
        let w2 = std::thread::spawn(move || {
            let _g = l2.acquire(0, 20, false);
        });
        while l.held() < 2 {
            std::thread::yield_now();
        }
        let l3 = l.clone();
        let (tx, rx) = mpsc::channel();
        let reads = std::thread::spawn(move || {
            let g = l3.acquire_reads(&[(2, 3), (10, 11)]);
            tx.send(g.len()).unwrap();
        });
        while l.held() < 4 {
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err(), "the reads wait for the writes");
        drop(w1);
        w2.join().unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)), Ok(2));
        reads.join().unwrap();
        assert_eq!(l.held(), 0);
        // And a write after the reads waits for them.
        let r = l.acquire_reads(&[(0, 1), (5, 6)]);
        let l4 = l.clone();
        let (tx, rx) = mpsc::channel();
        let w3 = std::thread::spawn(move || {
            let _g = l4.acquire(5, 6, false);
            tx.send(()).unwrap();
        });
        while l.held() < 3 {
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err(), "the write waits for the reads");
        drop(r);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        w3.join().unwrap();
    }

    #[test]
    fn a_later_disjoint_request_overtakes_a_waiting_one() {
        let l = Arc::new(RangeLock::default());
        let first = l.acquire(0, 8, false);
        let l2 = l.clone();
        let waiting = std::thread::spawn(move || {
            let _g = l2.acquire(4, 12, false);
        });
        while l.held() < 2 {
            std::thread::yield_now();
        }
        // Disjoint from both: not held up.
        let other = l.acquire(100, 101, false);
        drop(other);
        drop(first);
        waiting.join().unwrap();
        assert_eq!(l.held(), 0);
    }
}
