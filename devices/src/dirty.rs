//! Which guest pages kiln-vmm's own device code wrote, for live migration.
//!
//! Pre-copy re-sends the pages dirtied since the last round. KVM's dirty log
//! (`vmm/src/vstate/dirty.rs`) sees only the *guest's* writes; the writes
//! kiln-vmm makes into guest RAM from user space or through the kernel on
//! its behalf are invisible to it. The devices report those here:
//! - virtio used rings (used elements, the used index, the flags and the
//!   `avail_event` field that notification suppression writes);
//! - virtio-blk: data read into the guest's buffers (by io_uring, by the
//!   thread pool's `preadv`, or by the bounce path), GET_ID serials, status
//!   bytes;
//! - virtio-net: received frames, control-queue acks;
//! - the VM generation id.
//!
//! A device marks a range *after* writing it (for io_uring and the pool:
//! when the op completes, before the request goes to the used ring). The
//! sender takes the marks after the write is done, so it copies the new
//! bytes, or takes them before the mark and sees the page again next round.
//! Quiescing the devices before the final round completes every request in
//! flight, so every write is marked before the last [`take`].
//!
//! Not here: a vhost-user backend (another process) writes guest RAM
//! through its own mapping of the memfd. It reports its writes in a
//! [`BackendLog`] (the vhost-user protocol's dirty log), which the
//! migration drains into this tracker each round.
//!
//! Pages are numbered as in the memory file and the migration protocol:
//! page `n` is byte offset `n * 4096` counting the RAM ranges one after
//! another in guest-address order.
//!
//! Cost: with no migration running, [`mark`] is one relaxed atomic load.
//! While one runs, a mark takes the process-wide tracker's read lock (one
//! atomic add, never waiting on [`take`], which takes it too; only
//! [`start`] and [`stop`] take it for writing) and ORs the bits in with
//! atomic `fetch_or`s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::GuestAddress;

mod backend_log;
pub use backend_log::BackendLog;

/// The page size of the dirty bitmap (the migration protocol's page).
pub const PAGE_SIZE: u64 = 4096;

/// One RAM range and where its pages start in the numbering.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    /// One past the last byte (saturated at `u64::MAX`).
    end: u64,
    /// RAM offset of `start`: the lengths of the ranges before it.
    offset: u64,
}

/// A dirty-page bitmap over guest RAM that many threads mark at once.
#[derive(Debug)]
pub struct DirtyTracker {
    ranges: Vec<Range>,
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DirtyTracker {
    /// A clean bitmap for RAM laid out as `ranges` (start address, length).
    /// The ranges are numbered in guest-address order; empty ones are
    /// ignored.
    pub fn new(ranges: &[(GuestAddress, u64)]) -> Self {
        let mut sorted: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|(start, len)| (start.0, *len))
            .collect();
        sorted.sort_unstable();
        let mut offset = 0u64;
        let ranges = sorted
            .into_iter()
            .map(|(start, len)| {
                let r = Range {
                    start,
                    end: start.saturating_add(len),
                    offset,
                };
                offset = offset.saturating_add(len);
                r
            })
            .collect();
        let pages = offset.div_ceil(PAGE_SIZE);
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self {
            ranges,
            words,
            pages,
        }
    }

    /// How many pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Records a write of `len` bytes at `addr`; the parts outside RAM are
    /// ignored.
    pub fn mark(&self, addr: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.0.saturating_add(len);
        for r in &self.ranges {
            let (from, to) = (addr.0.max(r.start), end.min(r.end));
            if from < to {
                let first = r.offset.saturating_add(from - r.start) / PAGE_SIZE;
                let last = r.offset.saturating_add(to - 1 - r.start) / PAGE_SIZE;
                self.mark_pages(first, last.min(self.pages.saturating_sub(1)));
            }
        }
    }

    /// Sets the bits of pages `first..=last`, a word at a time.
    fn mark_pages(&self, first: u64, last: u64) {
        let mut page = first;
        while page <= last {
            let word = page / 64;
            let Some(w) = usize::try_from(word).ok().and_then(|i| self.words.get(i)) else {
                return;
            };
            let lo = page % 64;
            let hi = if last / 64 == word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            // Release: whoever takes this bit sees the write it stands for.
            w.fetch_or(mask, Ordering::Release);
            page = (word + 1) * 64;
        }
    }

    /// The pages marked since the last take (bit `i % 64` of word `i / 64`
    /// is page `i`), cleared.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::Acquire))
            .collect()
    }
}

/// The process-wide tracker's state, when a migration runs.
static TRACKING: AtomicBool = AtomicBool::new(false);
static TRACKER: RwLock<Option<DirtyTracker>> = RwLock::new(None);

fn read() -> RwLockReadGuard<'static, Option<DirtyTracker>> {
    // The lock only guards the tracker's existence; the bits are atomics, so
    // a panic under the lock leaves nothing half-done.
    TRACKER.read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Option<DirtyTracker>> {
    TRACKER.write().unwrap_or_else(|e| e.into_inner())
}

/// Starts tracking for guest RAM laid out as `ranges` (start address,
/// length), pages numbered across the ranges in guest-address order (page
/// `n` = byte offset `n * 4096` counting the ranges one after another, the
/// numbering of `vmm/src/vstate/dirty.rs` and the migration protocol).
/// Replaces (and clears) a tracking already running. Writes made before
/// this returns are not recorded: the first pre-copy round sends all RAM
/// after it.
pub fn start(ranges: &[(GuestAddress, u64)]) {
    let tracker = DirtyTracker::new(ranges);
    let mut t = write();
    *t = Some(tracker);
    TRACKING.store(true, Ordering::SeqCst);
}

/// Records that kiln-vmm wrote `len` bytes of guest memory at `addr`.
/// Addresses outside RAM are ignored, `len` 0 does nothing, and any value is
/// safe (saturating arithmetic). One relaxed load when not tracking.
#[inline]
pub fn mark(addr: GuestAddress, len: u64) {
    if TRACKING.load(Ordering::Relaxed) {
        mark_slow(addr, len);
    }
}

#[cold]
fn mark_slow(addr: GuestAddress, len: u64) {
    if let Some(t) = read().as_ref() {
        t.mark(addr, len);
    }
}

/// The pages marked since [`start`] or the last take, as bitmap words (bit
/// `i % 64` of word `i / 64` is page `i`), and clears them. Empty when not
/// tracking.
pub fn take() -> Vec<u64> {
    read().as_ref().map(DirtyTracker::take).unwrap_or_default()
}

/// Stops tracking and frees the bitmap.
pub fn stop() {
    let mut t = write();
    TRACKING.store(false, Ordering::SeqCst);
    *t = None;
}

/// Whether a tracking runs.
pub fn is_tracking() -> bool {
    TRACKING.load(Ordering::Relaxed)
}

/// Serializes the tests that start the process-wide tracker (they share
/// it; each uses guest addresses no other test marks).
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
