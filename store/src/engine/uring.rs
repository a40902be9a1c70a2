//! `O_DIRECT` writes submitted through io_uring, waited for by the caller;
//! and many reads submitted at once, each reported as it lands
//! ([`read_each`]).
//!
//! A plain `pwrite` on an `O_DIRECT` file of ext4 holds the file's inode
//! lock for the whole disk write: shared when it overwrites allocated
//! blocks, exclusive when it fills a hole (a fresh extent slot of a sparse
//! slab). Every buffered write to the same slab — the checksum sidecar
//! updates of every other write — takes that lock exclusively, so with
//! many writes in flight they queue behind each other's disk latency: on
//! the build machine 40% of a 1-replica depth-32 sequential run's context
//! switches were threads waiting for the lock in `ext4_buffered_write_iter`
//! (`perf record -e sched:sched_switch -g`). Submitted asynchronously, the
//! same write holds the lock only while it is submitted (and its blocks
//! allocated); the caller then waits for the completion without it. The
//! call is still synchronous for the engine: each of the three steps of a
//! write completes before the next begins.
//!
//! One small ring per thread that writes, made on its first large write.
//! Where io_uring cannot be had (an old kernel, a seccomp filter, a
//! container that forbids it) the write is a plain `pwrite`.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::iobuf::IoBuf;

/// Set once a ring could not be made: every thread then writes with
/// `pwrite`, without trying again.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
    static READ_RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Entries of a thread's read ring: the reads of a batch beyond it go in
/// further submissions.
const READ_ENTRIES: u32 = 128;

/// One read of [`read_each`]: `buf.len()` bytes at `at` of `file`, into a
/// buffer the read owns until it is reported done.
pub(super) struct Read {
    pub file: Arc<File>,
    pub buf: IoBuf,
    pub at: u64,
}

/// A round of finished reads: each one's index in the batch, the read
/// (its buffer filled), and its outcome.
pub(super) type Finished = Vec<(usize, Read, io::Result<()>)>;

/// Reads every one of `reads` whole, submitted to the disk together
/// through this thread's read ring (so a batch of random reads waits for
/// the disk about once, not once each), and hands them to `done` as they
/// finish, in rounds: each call gets the reads that completed since the
/// previous one, in any order. A caller can so pass each on (to a guest
/// waiting for it) while the slower ones are still at the disk. A read the
/// ring leaves short is finished with `pread`; without io_uring every read
/// is a `pread` and all are reported in one round. (A `done` that reads
/// again on the same thread gets a ring of its own.)
pub(super) fn read_each(reads: Vec<Read>, mut done: impl FnMut(Finished)) {
    if reads.is_empty() {
        return;
    }
    if !UNAVAILABLE.load(Ordering::Relaxed) {
        let ring = READ_RING.with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.is_none() {
                match IoUring::new(READ_ENTRIES) {
                    Ok(r) => *slot = Some(r),
                    Err(e) => {
                        if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                            tracing::info!(error = %e, "io_uring unavailable; reads use pread");
                        }
                        return None;
                    }
                }
            }
            slot.take()
        });
        if let Some(ring) = ring {
            let mut flight = InFlight::new(ring, reads.len());
            flight.run(reads, &mut done);
            // Put the ring back for this thread's next batch (the flight is
            // empty now; a panic above leaves the ring to its drop).
            let ring = flight.finish();
            READ_RING.with(|cell| *cell.borrow_mut() = Some(ring));
            return;
        }
    }
    let round = reads
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let got = r.file.read_exact_at(&mut r.buf, r.at);
            (i, r, got)
        })
        .collect();
    done(round);
}

/// The reads of one [`read_each`] call handed to the kernel and not yet
/// completed, each owning its buffer. Dropped early (a panic in the
/// caller's `done`), it waits for every one of them before their buffers
/// go, as the kernel may still be writing into them.
struct InFlight {
    ring: Option<IoUring>,
    slots: Vec<Option<Read>>,
    pending: usize,
}

impl InFlight {
    fn new(ring: IoUring, n: usize) -> InFlight {
        InFlight {
            ring: Some(ring),
            slots: (0..n).map(|_| None).collect(),
            pending: 0,
        }
    }

    fn run(&mut self, reads: Vec<Read>, done: &mut impl FnMut(Finished)) {
        let mut queue = reads.into_iter().enumerate().peekable();
        while queue.peek().is_some() || self.pending > 0 {
            let mut round: Finished = Vec::new();
            // Keep the ring as full as it goes: at most `READ_ENTRIES` in
            // flight, so that no completion can overflow its queue.
            while self.pending < READ_ENTRIES as usize {
                let Some((i, r)) = queue.next() else { break };
                if let Err(r) = self.push(i, r) {
                    let mut r = *r;
                    let got = r.file.read_exact_at(&mut r.buf, r.at);
                    round.push((i, r, got));
                }
            }
            if self.pending > 0 && round.is_empty() {
                submit_and_wait(self.ring.as_mut().expect("held until finish"), 1);
            } else if self.pending > 0 {
                // Reads finished the ordinary way go up now; the submitted
                // ones are collected next time round.
                let _ = self.ring.as_mut().expect("held until finish").submit();
            }
            self.reap(&mut round);
            if !round.is_empty() {
                done(round);
            }
        }
    }

    /// Hands read `i` to the kernel (not yet submitted); gives it back if
    /// the submission queue is full.
    fn push(&mut self, i: usize, mut r: Read) -> Result<(), Box<Read>> {
        let len = r.buf.len().min(1 << 30) as u32;
        let entry = opcode::Read::new(types::Fd(r.file.as_raw_fd()), r.buf.as_mut_ptr(), len)
            .offset(r.at)
            .build()
            .user_data(i as u64);
        let ring = self.ring.as_mut().expect("held until finish");
        // SAFETY: the entry points into `r.buf`'s heap allocation and at
        // `r.file`'s descriptor, and `r` is kept in `self.slots[i]` (neither
        // moves nor is freed: moving an `IoBuf` does not move its data)
        // until the entry's completion is reaped; `Drop` waits for every
        // pending completion before the slots go, so the kernel never
        // writes into freed memory or reads a closed descriptor.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            return Err(Box::new(r));
        }
        self.slots[i] = Some(r);
        self.pending += 1;
        Ok(())
    }

    /// Takes every completion there is into `round`.
    fn reap(&mut self, round: &mut Finished) {
        let ring = self.ring.as_mut().expect("held until finish");
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            let Some(mut r) = self.slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            self.pending -= 1;
            let n = cqe.result();
            let got = if n < 0 {
                Err(io::Error::from_raw_os_error(-n))
            } else if n as usize >= r.buf.len() {
                Ok(())
            } else {
                // Short (a signal, or the end of the file): the rest the
                // ordinary way, which says which.
                let n = n as usize;
                let at = r.at + n as u64;
                r.file.read_exact_at(&mut r.buf[n..], at)
            };
            round.push((i, r, got));
        }
    }

    /// The ring, once nothing is in flight.
    fn finish(mut self) -> IoUring {
        self.ring.take().expect("held until finish")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        while self.pending > 0 {
            submit_and_wait(ring, 1);
            for cqe in ring.completion() {
                if let Some(slot) = self.slots.get_mut(cqe.user_data() as usize) {
                    if slot.take().is_some() {
                        self.pending -= 1;
                    }
                }
            }
        }
    }
}

/// Writes all of `buf` at `at` of `f`, through this thread's ring if there
/// is one (see the module), else with `pwrite`. Returns once the kernel
/// has completed the write, as `write_all_at` does.
pub(super) fn write_all_at(f: &File, buf: &[u8], at: u64) -> io::Result<()> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return f.write_all_at(buf, at);
    }
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match IoUring::new(2) {
                Ok(r) => *slot = Some(r),
                Err(e) => {
                    if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                        tracing::info!(error = %e, "io_uring unavailable; direct writes use pwrite");
                    }
                    return f.write_all_at(buf, at);
                }
            }
        }
        let ring = slot.as_mut().expect("just made");
        let mut done = 0usize;
        while done < buf.len() {
            match write_once(ring, f, &buf[done..], at + done as u64)? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => done += n,
            }
        }
        Ok(())
    })
}

/// Submits what `ring` holds and waits for `want` completions, retrying
/// an interrupted wait. Once submitted, an op may still be using its
/// buffer, so a caller must never return before its completion: a wait
/// that keeps failing (the kernel does not fail it this way in practice)
/// aborts the process rather than let the buffer be freed.
fn submit_and_wait(ring: &mut IoUring, want: usize) {
    let mut failures = 0;
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failures += 1;
                if failures >= 1000 {
                    tracing::error!(error = %e, "cannot wait for submitted io_uring ops; aborting");
                    std::process::abort();
                }
            }
        }
    }
}

/// One write through `ring`: submits it and waits for its completion.
fn write_once(ring: &mut IoUring, f: &File, buf: &[u8], at: u64) -> io::Result<usize> {
    // (A longer buffer is written in several goes by the caller.)
    let len = buf.len().min(1 << 30) as u32;
    let entry = opcode::Write::new(types::Fd(f.as_raw_fd()), buf.as_ptr(), len)
        .offset(at)
        .build()
        .user_data(1);
    // SAFETY: the entry points at `buf` and at `f`'s descriptor, both
    // borrowed for this whole call; the call does not return before the
    // entry's completion has been reaped below (or the process aborts),
    // so the kernel never touches `buf` after the borrow ends.
    unsafe {
        if ring.submission().push(&entry).is_err() {
            // The ring is empty between calls: this cannot happen, but a
            // plain write is always correct.
            return f.write_at(buf, at);
        }
    }
    loop {
        submit_and_wait(ring, 1);
        if let Some(cqe) = ring.completion().next() {
            let r = cqe.result();
            return if r < 0 {
                Err(io::Error::from_raw_os_error(-r))
            } else {
                Ok(r as usize)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// Runs [`read_each`] and gathers what it reports, checking that
    /// every read is reported exactly once.
    fn read_gathered(reads: Vec<Read>) -> (Vec<(IoBuf, io::Result<()>)>, usize) {
        let n = reads.len();
        let mut got: Vec<Option<(IoBuf, io::Result<()>)>> = (0..n).map(|_| None).collect();
        let mut rounds = 0;
        read_each(reads, |round| {
            rounds += 1;
            assert!(!round.is_empty(), "an empty round");
            for (i, r, outcome) in round {
                assert!(got[i].is_none(), "read {i} reported twice");
                got[i] = Some((r.buf, outcome));
            }
        });
        let got = got
            .into_iter()
            .enumerate()
            .map(|(i, g)| g.unwrap_or_else(|| panic!("read {i} never reported")))
            .collect();
        (got, rounds)
    }

    #[test]
    fn many_reads_come_back_whole_each_once() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        // More reads than the ring holds, of odd sizes and places, and
        // two past the end of the file (one short, one empty).
        let n = READ_ENTRIES as usize * 2 + 5;
        let places: Vec<(u64, usize)> = (0..n)
            .map(|i| ((i as u64 * 7919) % (2 << 20), 1 + (i * 613) % 9000))
            .chain([((2 << 20) - 100, 200), ((2 << 20) + 4096, 10)])
            .collect();
        let reads = places
            .iter()
            .map(|&(at, l)| Read {
                file: f.clone(),
                buf: IoBuf::zeroed(l),
                at,
            })
            .collect();
        let (got, rounds) = read_gathered(reads);
        assert!(
            !UNAVAILABLE.load(Ordering::Relaxed),
            "no io_uring on this machine: the test ran pread"
        );
        // More reads than the ring holds take more than one round.
        assert!(rounds >= 3, "{rounds} rounds");
        assert_eq!(got.len(), places.len());
        for (i, (&(at, l), (buf, outcome))) in places.iter().zip(&got).enumerate() {
            let at = at as usize;
            if at + l <= data.len() {
                outcome.as_ref().unwrap();
                assert_eq!(&buf[..], &data[at..at + l], "read {i}");
            } else {
                let e = outcome.as_ref().unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "read {i}");
            }
        }
        // A handle that cannot read gives each read its error.
        let wo = Arc::new(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
        let (got, _) = read_gathered(vec![Read {
            file: wo,
            buf: IoBuf::zeroed(16),
            at: 0,
        }]);
        assert_eq!(
            got[0].1.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        // Nothing to read, nothing reported.
        read_each(Vec::new(), |_| panic!("a round for no reads"));
    }

    #[test]
    fn a_panic_in_done_waits_for_the_reads_in_flight() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        let reads = (0..64)
            .map(|i| Read {
                file: f.clone(),
                buf: IoBuf::zeroed(4096),
                at: i * 4096,
            })
            .collect();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_each(reads, |_| panic!("the caller fails"))
        }));
        assert!(caught.is_err());
        // The thread reads on afterwards (with a new ring).
        let (got, _) = read_gathered(vec![Read {
            file: f,
            buf: IoBuf::zeroed(8),
            at: 10,
        }]);
        assert_eq!(&got[0].0[..], &[5u8; 8]);
    }

    #[test]
    fn writes_land_where_pwrite_would_put_them() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..(256 << 10) + 7).map(|i| (i % 251) as u8).collect();
        write_all_at(&f, &data, 4096 + 3).unwrap();
        assert!(
            !UNAVAILABLE.load(Ordering::Relaxed),
            "no io_uring on this machine: the test ran pwrite"
        );
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096 + 3).unwrap();
        assert_eq!(back, data);
        // An O_DIRECT handle with an aligned buffer (tmpfs may refuse
        // O_DIRECT: then only the buffered case above runs).
        if let Ok(d) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            let buf = crate::iobuf::IoBuf::copy_from(&data[..128 << 10]);
            write_all_at(&d, &buf, 64 << 10).unwrap();
            let mut back = vec![0u8; buf.len()];
            f.read_exact_at(&mut back, 64 << 10).unwrap();
            assert_eq!(back, &buf[..]);
        }
        // Errors come back as errors: a read-only handle refuses writes.
        let ro = File::open(&path).unwrap();
        let e = write_all_at(&ro, &data[..4096], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
