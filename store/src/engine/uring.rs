//! `O_DIRECT` writes submitted through io_uring, waited for by the caller;
//! and many reads submitted at once ([`read_all`]).
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

use io_uring::{opcode, types, IoUring};

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

/// One read of [`read_all`]: `buf.len()` bytes at `at` of `file`.
pub(super) struct Read<'a> {
    pub file: &'a File,
    pub buf: &'a mut [u8],
    pub at: u64,
}

/// Reads every one of `reads` whole, all submitted to the disk together
/// through this thread's read ring (so a batch of random reads waits for
/// the disk once, not once each), and returns each one's outcome in order.
/// A read the ring leaves short is finished with `pread`; without io_uring
/// every read is a `pread`.
pub(super) fn read_all(reads: &mut [Read]) -> Vec<io::Result<()>> {
    let mut out: Vec<io::Result<()>> = Vec::with_capacity(reads.len());
    if UNAVAILABLE.load(Ordering::Relaxed) {
        out.extend(reads.iter_mut().map(|r| r.file.read_exact_at(r.buf, r.at)));
        return out;
    }
    READ_RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match IoUring::new(READ_ENTRIES) {
                Ok(r) => *slot = Some(r),
                Err(e) => {
                    if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                        tracing::info!(error = %e, "io_uring unavailable; reads use pread");
                    }
                    out.extend(reads.iter_mut().map(|r| r.file.read_exact_at(r.buf, r.at)));
                    return;
                }
            }
        }
        let ring = slot.as_mut().expect("just made");
        for chunk in reads.chunks_mut(READ_ENTRIES as usize) {
            let got = read_chunk(ring, chunk);
            for (r, n) in chunk.iter_mut().zip(got) {
                out.push(n.and_then(|n| match n {
                    n if n >= r.buf.len() => Ok(()),
                    // Short (a signal, or the end of the file): the rest
                    // the ordinary way, which says which.
                    n => r.file.read_exact_at(&mut r.buf[n..], r.at + n as u64),
                }));
            }
        }
    });
    out
}

/// Submits every read of `chunk` (at most the ring's size) and waits for
/// all their completions; returns the bytes each read.
fn read_chunk(ring: &mut IoUring, chunk: &mut [Read]) -> Vec<io::Result<usize>> {
    let mut got: Vec<Option<io::Result<usize>>> = (0..chunk.len()).map(|_| None).collect();
    let mut pushed = 0usize;
    for (i, r) in chunk.iter_mut().enumerate() {
        let len = r.buf.len().min(1 << 30) as u32;
        let entry = opcode::Read::new(types::Fd(r.file.as_raw_fd()), r.buf.as_mut_ptr(), len)
            .offset(r.at)
            .build()
            .user_data(i as u64);
        // SAFETY: the entry points at `r.buf` and `r.file`'s descriptor,
        // both borrowed for this whole call, and the call returns only
        // after every pushed entry's completion has been reaped below (or
        // the process aborts), so the kernel never writes into a buffer
        // after its borrow ends.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // More than the ring holds (the caller's chunks fit it): read
            // it the ordinary way.
            got[i] = Some(r.file.read_at(r.buf, r.at));
            continue;
        }
        pushed += 1;
    }
    let mut reaped = 0usize;
    while reaped < pushed {
        submit_and_wait(ring, pushed - reaped);
        for cqe in ring.completion() {
            let r = cqe.result();
            let i = cqe.user_data() as usize;
            if let Some(g) = got.get_mut(i) {
                *g = Some(if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                });
                reaped += 1;
            }
        }
    }
    got.into_iter()
        .map(|g| g.unwrap_or_else(|| Err(io::Error::other("read not completed"))))
        .collect()
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

    #[test]
    fn many_reads_come_back_whole_and_in_order() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        let data: Vec<u8> = (0..(2 << 20)).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        // More reads than the ring holds, of odd sizes and places, and
        // two past the end of the file (one short, one empty).
        let n = READ_ENTRIES as usize * 2 + 5;
        let places: Vec<(u64, usize)> = (0..n)
            .map(|i| ((i as u64 * 7919) % (2 << 20), 1 + (i * 613) % 9000))
            .chain([((2 << 20) - 100, 200), ((2 << 20) + 4096, 10)])
            .collect();
        let mut bufs: Vec<Vec<u8>> = places.iter().map(|&(_, l)| vec![0u8; l]).collect();
        let mut reads: Vec<Read> = bufs
            .iter_mut()
            .zip(&places)
            .map(|(buf, &(at, _))| Read { file: &f, buf, at })
            .collect();
        let got = read_all(&mut reads);
        drop(reads);
        assert!(
            !UNAVAILABLE.load(Ordering::Relaxed),
            "no io_uring on this machine: the test ran pread"
        );
        assert_eq!(got.len(), places.len());
        for (i, (&(at, l), buf)) in places.iter().zip(&bufs).enumerate() {
            let at = at as usize;
            if at + l <= data.len() {
                got[i].as_ref().unwrap();
                assert_eq!(&buf[..], &data[at..at + l], "read {i}");
            } else {
                let e = got[i].as_ref().unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "read {i}");
            }
        }
        // A handle that cannot read gives each read its error.
        let wo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut b = [0u8; 16];
        let got = read_all(&mut [Read {
            file: &wo,
            buf: &mut b,
            at: 0,
        }]);
        assert_eq!(
            got[0].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
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
