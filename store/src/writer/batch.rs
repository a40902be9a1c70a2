//! Group commit of the data path's writes to remote replicas.
//!
//! Every write sent on its own costs each remote replica a request and an
//! answer: a TLS record each way, two socket calls at each end and the
//! wakeups of two threads, which on loopback was about 40% of a replicated
//! write's CPU (docs/benchmarks.md). When writes of one volume queue up
//! (a guest at queue depth), one of the waiting callers, the *leader*,
//! takes the writes queued so far and sends them as one
//! [`crate::proto::Request::WriteBatch`] to every replica; the others wait
//! for its outcome. A lone write goes at once, as before: batching only
//! gathers what is already waiting, it never waits for more.
//!
//! Ordering is not this module's business either: the writes queued here
//! hold tickets of the overlap tracker ([`super::order`]), so no two of
//! them overlap and any order of them is the submission order. A write is
//! acknowledged only when its batch is on every replica that gets writes
//! (or the failed ones are recorded as missing it), as a single write is.
//!
//! At most [`MAX_LEADERS`] batches of one volume are in flight at once;
//! a leader whose own write is done hands the lead to the first write
//! still queued, so no caller serves others' writes for long.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::iobuf::IoBuf;
use crate::MAX_IO;

/// Batches of one volume in flight at once.
pub const MAX_LEADERS: usize = 2;
/// Most writes in one batch.
pub const MAX_BATCH_WRITES: usize = 64;
/// Most data in one batch (a frame's body holds `MAX_IO` of data and
/// headroom for the rest of the request).
pub const MAX_BATCH_BYTES: usize = MAX_IO as usize;

/// One queued write: whole blocks, encrypted already if the volume is.
pub(crate) struct Queued {
    pub offset: u64,
    pub data: IoBuf,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// This caller is to lead (it may find its write sent already).
    lead: bool,
    result: Option<Result<()>>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect(crate::POISONED)
    }

    fn finish(&self, r: Result<()>) {
        self.lock().result = Some(r);
        self.changed.notify_one();
    }

    fn make_leader(&self) {
        self.lock().lead = true;
        self.changed.notify_one();
    }

    fn is_done(&self) -> bool {
        self.lock().result.is_some()
    }

    /// Waits until this caller is to lead (`Err(())`; it may find its
    /// write done meanwhile) or its write is done (`Ok(result)`).
    fn wait(&self) -> std::result::Result<Result<()>, ()> {
        let mut s = self.lock();
        loop {
            if std::mem::take(&mut s.lead) {
                return Err(());
            }
            if let Some(r) = s.result.take() {
                return Ok(r);
            }
            s = self.changed.wait(s).expect(crate::POISONED);
        }
    }

    fn is_leader(&self) -> bool {
        self.lock().lead
    }
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Queued>,
    leaders: usize,
}

/// The queue of one volume's writes to remote replicas.
#[derive(Default)]
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
}

impl Batcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect(crate::POISONED)
    }

    /// Writes `data` at `offset` in a batch; `send` sends one batch (in
    /// queue order, never empty) and says how it went for all of it.
    pub fn submit(
        &self,
        offset: u64,
        data: IoBuf,
        send: &dyn Fn(Vec<Queued>) -> Result<()>,
    ) -> Result<()> {
        let slot = Arc::new(Slot::default());
        let mut q = self.lock();
        q.waiting.push(Queued {
            offset,
            data,
            slot: slot.clone(),
        });
        let mut lead = q.leaders < MAX_LEADERS;
        if lead {
            q.leaders += 1;
        }
        drop(q);
        let mut stake = Stake {
            batcher: self,
            slot: slot.clone(),
            armed: true,
        };
        loop {
            if lead {
                self.lead(&slot, send);
            }
            match slot.wait() {
                Ok(r) => {
                    stake.armed = false;
                    return r;
                }
                Err(()) => lead = true,
            }
        }
    }

    /// Sends batches until this caller's own write is done or nothing is
    /// queued, then hands the lead on (or gives it up).
    fn lead(&self, me: &Slot, send: &dyn Fn(Vec<Queued>) -> Result<()>) {
        loop {
            let mut q = self.lock();
            if me.is_done() || q.waiting.is_empty() {
                self.step_down(&mut q);
                return;
            }
            let batch = take_batch(&mut q.waiting);
            drop(q);
            let sending = Sending {
                batcher: self,
                slots: batch.iter().map(|w| w.slot.clone()).collect(),
            };
            let r = send(batch);
            sending.done(r);
        }
    }

    /// Gives up the lead: the first queued write not led already leads
    /// next, or there is one leader fewer.
    fn step_down(&self, q: &mut Queue) {
        match q.waiting.iter().find(|w| !w.slot.is_leader()) {
            Some(next) => next.slot.make_leader(),
            None => q.leaders -= 1,
        }
    }
}

/// A caller's place in the queue while it is in [`Batcher::submit`]. If
/// the caller unwinds instead of returning (its `send` panicked), its
/// write leaves the queue if it is still there (it failed: it is not sent
/// later behind its caller's back), and a lead handed to it meanwhile is
/// handed on: a lead given to a caller that is gone would never be given
/// up, and with [`MAX_LEADERS`] of them lost no write would go again.
struct Stake<'a> {
    batcher: &'a Batcher,
    slot: Arc<Slot>,
    armed: bool,
}

impl Drop for Stake<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Neither lock is held while sending, so neither is poisoned.
        let mut q = self.batcher.lock();
        q.waiting.retain(|w| !Arc::ptr_eq(&w.slot, &self.slot));
        let handed = std::mem::take(&mut self.slot.lock().lead);
        if handed {
            self.batcher.step_down(&mut q);
        }
    }
}

/// A batch on its way. If `send` panics, dropping this while unwinding
/// fails the batch's writes and passes the lead on, so that no caller
/// waits forever for an outcome that will not come.
struct Sending<'a> {
    batcher: &'a Batcher,
    slots: Vec<Arc<Slot>>,
}

impl Sending<'_> {
    fn done(mut self, r: Result<()>) {
        for s in std::mem::take(&mut self.slots) {
            s.finish(r.clone());
        }
        std::mem::forget(self);
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        for s in self.slots.drain(..) {
            s.finish(Err(Error::Unavailable(
                "the replication of this write failed (its sender panicked)".into(),
            )));
        }
        // The queue's lock is not held while sending, so it is not poisoned.
        let mut q = self.batcher.lock();
        self.batcher.step_down(&mut q);
    }
}

/// The longest run from the front of `waiting` within the batch limits
/// (at least one write).
fn take_batch(waiting: &mut Vec<Queued>) -> Vec<Queued> {
    let mut bytes = 0;
    let mut n = 0;
    for w in waiting.iter() {
        if n == MAX_BATCH_WRITES || (n > 0 && bytes + w.data.len() > MAX_BATCH_BYTES) {
            break;
        }
        bytes += w.data.len();
        n += 1;
    }
    waiting.drain(..n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const POISON: u64 = 13 * 4096;

    /// Many callers at once: each write is sent exactly once, in a batch
    /// within the limits, at most MAX_LEADERS batches are in flight, and
    /// each caller gets its own batch's outcome (the batch holding
    /// `POISON` fails, every other succeeds).
    #[test]
    fn queued_writes_go_out_together_and_each_gets_its_batch_outcome() {
        let b = Batcher::default();
        let sent: Mutex<Vec<Vec<u64>>> = Mutex::default();
        let (in_flight, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let send = |writes: Vec<Queued>| -> Result<()> {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            assert!(!writes.is_empty() && writes.len() <= MAX_BATCH_WRITES);
            let offsets: Vec<u64> = writes.iter().map(|w| w.offset).collect();
            assert!(writes
                .iter()
                .all(|w| w.data == vec![(w.offset / 4096) as u8; 4096]));
            std::thread::sleep(std::time::Duration::from_millis(2));
            sent.lock().unwrap().push(offsets.clone());
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if offsets.contains(&POISON) {
                Err(Error::Unavailable("injected".into()))
            } else {
                Ok(())
            }
        };
        let results: Mutex<BTreeMap<u64, bool>> = Mutex::default();
        std::thread::scope(|s| {
            for t in 0..16u64 {
                let (b, send, results) = (&b, &send, &results);
                s.spawn(move || {
                    for i in 0..20u64 {
                        let off = (t * 20 + i) * 4096;
                        let ok = b
                            .submit(off, vec![(off / 4096) as u8; 4096].into(), send)
                            .is_ok();
                        results.lock().unwrap().insert(off, ok);
                    }
                });
            }
        });
        let sent = sent.into_inner().unwrap();
        let mut all: Vec<u64> = sent.iter().flatten().copied().collect();
        all.sort_unstable();
        let want: Vec<u64> = (0..320u64).map(|k| k * 4096).collect();
        assert_eq!(all, want, "every write sent exactly once");
        assert!(most.load(Ordering::SeqCst) <= MAX_LEADERS);
        assert!(sent.iter().any(|batch| batch.len() > 1), "nothing batched");
        let poisoned: Vec<u64> = sent.iter().find(|b| b.contains(&POISON)).unwrap().clone();
        for (off, ok) in results.into_inner().unwrap() {
            assert_eq!(ok, !poisoned.contains(&off), "write at {off}");
        }
        let q = b.lock();
        assert!(q.waiting.is_empty());
        assert_eq!(q.leaders, 0, "every leader stepped down");
    }

    /// A sender that panics fails its batch's writes and hands the lead
    /// on: nobody hangs, the writes queued behind it still go, and no
    /// leader is left counted.
    #[test]
    fn a_panicking_sender_fails_its_batch_and_nobody_waits_forever() {
        let b = Arc::new(Batcher::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = Arc::new(Mutex::new(Vec::new()));
        for t in 0..8u64 {
            let (b, tx, sent) = (b.clone(), tx.clone(), sent.clone());
            std::thread::spawn(move || {
                let send = |writes: Vec<Queued>| -> Result<()> {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    let offsets: Vec<u64> = writes.iter().map(|w| w.offset).collect();
                    if offsets.contains(&POISON) {
                        panic!("injected");
                    }
                    sent.lock().unwrap().extend(offsets);
                    Ok(())
                };
                for i in 0..10u64 {
                    let off = (t * 10 + i) * 4096;
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        b.submit(off, vec![0; 4096].into(), &send)
                    }));
                    let outcome = match r {
                        Ok(Ok(())) => "ok",
                        Ok(Err(_)) => "failed",
                        Err(_) => "panicked",
                    };
                    tx.send((off, outcome)).unwrap();
                }
            });
        }
        drop(tx);
        let mut outcomes = BTreeMap::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while outcomes.len() < 80 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (off, o) = rx.recv_timeout(left).expect("a caller hangs");
            outcomes.insert(off, o);
        }
        assert_eq!(outcomes.values().filter(|o| **o == "panicked").count(), 1);
        let sent = sent.lock().unwrap().clone();
        for (off, o) in &outcomes {
            // The panicked caller's own write may have gone in another
            // batch; every other caller's outcome is what happened.
            if *o != "panicked" {
                assert_eq!(*o == "ok", sent.contains(off), "write at {off}: {o}");
            }
        }
        assert_ne!(outcomes[&POISON], "ok");
        let q = b.lock();
        assert!(q.waiting.is_empty());
        assert_eq!(q.leaders, 0, "the panicked leader stepped down");
    }

    #[test]
    fn a_lone_write_goes_at_once_by_itself() {
        let b = Batcher::default();
        let calls = AtomicUsize::new(0);
        b.submit(0, vec![1u8; 4096].into(), &|w| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(w.len(), 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(b.lock().leaders, 0);
    }

    #[test]
    fn a_batch_stays_within_its_limits() {
        let queued = |n: usize, len: usize| -> Vec<Queued> {
            (0..n)
                .map(|i| Queued {
                    offset: i as u64,
                    data: vec![0; len].into(),
                    slot: Arc::default(),
                })
                .collect()
        };
        let mut w = queued(100, 4096);
        assert_eq!(take_batch(&mut w).len(), MAX_BATCH_WRITES);
        assert_eq!(w.len(), 100 - MAX_BATCH_WRITES);
        assert_eq!(w[0].offset, MAX_BATCH_WRITES as u64, "taken from the front");
        let mut w = queued(3, MAX_BATCH_BYTES / 2);
        assert_eq!(take_batch(&mut w).len(), 2);
        assert_eq!(take_batch(&mut w).len(), 1);
        // A write as large as a whole batch still goes.
        let mut w = queued(2, MAX_BATCH_BYTES);
        assert_eq!(take_batch(&mut w).len(), 1);
    }
}
