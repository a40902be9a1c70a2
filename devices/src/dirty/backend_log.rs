//! The dirty log vhost-user backends write: which guest pages another
//! process wrote while a migration runs.
//!
//! A vhost-user backend writes guest RAM through its own mapping of the
//! memfd (data read from the disk, used-ring entries, status bytes); KVM's
//! dirty log never sees those writes. The vhost-user protocol lets the
//! frontend hand the backend a log: shared memory holding one bit per
//! 4 KiB page of *guest physical* address space, bit `p % 8` of byte
//! `p / 8` for page `p` (`VHOST_USER_SET_LOG_BASE` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`). Once `VHOST_F_LOG_ALL` is acked the
//! backend sets the bit of every page it writes, with an atomic OR, before
//! it puts the request on the used ring.
//!
//! One log serves every vhost-user device of a VM. kiln-vmm reads it a
//! 64-bit word at a time with an atomic swap to zero, so a bit set while it
//! reads is either taken now or left for the next round; after the devices
//! are quiesced (every backend stopped its rings) one last read takes
//! everything.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PAGE_SIZE;

/// Bits in one word of the log as kiln-vmm reads it.
const WORD_BITS: u64 = u64::BITS as u64;

/// A log covering guest physical addresses `0..end`, in a memfd that
/// backends map.
#[derive(Debug)]
pub struct BackendLog {
    memfd: File,
    base: NonNull<AtomicU64>,
    words: usize,
    map_len: usize,
}

// SAFETY: the mapping is owned by the log and only reached through atomic
// operations on `AtomicU64`s, which may be shared between threads.
unsafe impl Send for BackendLog {}
// SAFETY: as above: every access to the shared words is atomic.
unsafe impl Sync for BackendLog {}

impl BackendLog {
    /// A clean log for guest physical addresses below `end` (the end of
    /// the highest RAM range). Refuses 0 and sizes the address space
    /// cannot have.
    pub fn new(end: u64) -> io::Result<Self> {
        let pages = end.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(WORD_BITS);
        let bytes = words
            .checked_mul(8)
            .map(|b| b.div_ceil(PAGE_SIZE) * PAGE_SIZE)
            .filter(|b| *b > 0 && *b <= 1 << 40)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no dirty log for a guest address space of {end:#x} bytes"),
                )
            })?;
        let (words, map_len) = (
            usize::try_from(words).map_err(io::Error::other)?,
            usize::try_from(bytes).map_err(io::Error::other)?,
        );
        // SAFETY: the name is a NUL-terminated string and the flags valid.
        let fd = unsafe { libc::memfd_create(c"kiln-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(bytes)?;
        // SAFETY: a new shared mapping of a file we own, of its whole
        // length, at an address the kernel picks; it is unmapped on drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned 0"))?;
        Ok(Self {
            memfd,
            base,
            words,
            map_len,
        })
    }

    /// The memfd a backend maps (`VHOST_USER_SET_LOG_BASE`'s descriptor).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// How many bytes of the memfd a backend maps (`mmap_size`), from
    /// offset 0.
    pub fn mmap_size(&self) -> u64 {
        self.map_len as u64
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: `i` is within the mapping (`words * 8 <= map_len`), which
        // is page aligned (so each u64 is aligned) and lives as long as
        // `self`; the memory is only ever accessed atomically.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    /// Calls `f(address, length)` for every run of pages marked since the
    /// last drain, in address order, and clears them.
    pub fn drain(&self, mut f: impl FnMut(u64, u64)) {
        let mut run: Option<(u64, u64)> = None;
        for i in 0..self.words {
            let mut bits = self.word(i).swap(0, Ordering::AcqRel);
            if bits == 0 {
                continue;
            }
            // The log is little endian: byte b, bit k is page 8b + k, which
            // is bit 8b + k of the word read on x86.
            let first_page = i as u64 * WORD_BITS;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let addr = (first_page + bit) * PAGE_SIZE;
                run = match run {
                    Some((start, len)) if start + len == addr => Some((start, len + PAGE_SIZE)),
                    Some((start, len)) => {
                        f(start, len);
                        Some((addr, PAGE_SIZE))
                    }
                    None => Some((addr, PAGE_SIZE)),
                };
            }
        }
        if let Some((start, len)) = run {
            f(start, len);
        }
    }
}

impl Drop for BackendLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a backend does: map the memfd and OR bits in, a byte at a time.
    fn backend_marks(log: &BackendLog, pages: &[u64]) {
        let len = log.mmap_size() as usize;
        // SAFETY: a new shared mapping of the log's memfd, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                log.fd().as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        for &page in pages {
            let byte = (page / 8) as usize;
            assert!(byte < len);
            // SAFETY: within the mapping; bytes are accessed atomically.
            let b = unsafe { &*(p.cast::<std::sync::atomic::AtomicU8>().add(byte)) };
            b.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }

    fn drained(log: &BackendLog) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        log.drain(|a, l| runs.push((a, l)));
        runs
    }

    #[test]
    fn a_backends_marks_come_back_as_address_runs_once() {
        let log = BackendLog::new(1 << 30).unwrap();
        assert_eq!(log.mmap_size(), 32 * 1024);
        backend_marks(&log, &[0, 1, 2, 9, 63, 64, 65, (1 << 18) - 1]);
        assert_eq!(
            drained(&log),
            vec![
                (0, 3 * PAGE_SIZE),
                (9 * PAGE_SIZE, PAGE_SIZE),
                (63 * PAGE_SIZE, 3 * PAGE_SIZE),
                (((1 << 18) - 1) * PAGE_SIZE, PAGE_SIZE),
            ]
        );
        assert!(drained(&log).is_empty(), "a drain clears what it took");
        backend_marks(&log, &[7]);
        assert_eq!(drained(&log), vec![(7 * PAGE_SIZE, PAGE_SIZE)]);
    }

    #[test]
    fn a_log_covers_ram_above_4_gib_and_refuses_nonsense() {
        let log = BackendLog::new(6 << 30).unwrap();
        let last = (6u64 << 30) / PAGE_SIZE - 1;
        backend_marks(&log, &[last]);
        assert_eq!(drained(&log), vec![(last * PAGE_SIZE, PAGE_SIZE)]);
        assert!(BackendLog::new(0).is_err());
        assert!(BackendLog::new(u64::MAX).is_err());
    }
}
