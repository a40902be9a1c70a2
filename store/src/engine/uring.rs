//! `O_DIRECT` writes submitted through io_uring, waited for by the caller.
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
    let mut failures = 0;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failures += 1;
                // Once submitted, the write may still be reading `buf`:
                // returning now would let the caller free it. The kernel
                // does not fail a wait this way in practice.
                if failures >= 1000 {
                    tracing::error!(error = %e, "cannot wait for a submitted io_uring write; aborting");
                    std::process::abort();
                }
                continue;
            }
        }
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
