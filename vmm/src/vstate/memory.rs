//! Guest RAM laid out around the MMIO gap below 4 GiB: anonymous private
//! mappings, or one shared memfd when another process (a vhost-user backend)
//! must map the same pages.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot allocate {} MiB of guest memory: {source}", size >> 20)]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create {} MiB of shareable guest memory (memfd): {source}", size >> 20)]
    Memfd { size: u64, source: io::Error },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous mappings: nothing else can map them.
    Anonymous,
    /// One memfd mapped `MAP_SHARED`: its fd can be handed to a vhost-user
    /// backend (`VHOST_USER_SET_MEM_TABLE`), which maps the same pages.
    SharedMemfd,
}

/// The RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of guest RAM. Pages are only backed when touched.
pub fn create(size: u64, backing: Backing) -> Result<GuestMemoryMmap, Error> {
    let ranges = ram_ranges(size);
    let mem = match backing {
        Backing::Anonymous => GuestMemoryMmap::from_ranges(&ranges),
        Backing::SharedMemfd => {
            let file = Arc::new(memfd(size).map_err(|source| Error::Memfd { size, source })?);
            // The ranges are consecutive in the file: the second starts where
            // the first ends.
            let mut offset = 0u64;
            let with_files: Vec<_> = ranges
                .iter()
                .map(|&(addr, len)| {
                    let f = FileOffset::from_arc(file.clone(), offset);
                    offset += len as u64;
                    (addr, len, Some(f))
                })
                .collect();
            GuestMemoryMmap::from_ranges_with_files(&with_files)
        }
    };
    mem.map_err(|source| Error::Allocate { size, source })
}

/// An anonymous memory file of `size` bytes (sparse: nothing is allocated
/// until the guest touches it). Sealed against shrinking, so that no one
/// holding the fd can pull pages from under the guest's mappings.
fn memfd(size: u64) -> io::Result<File> {
    const NAME: &CStr = c"kiln-guest-ram";
    // SAFETY: NAME is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal flags.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if sealed < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn anonymous_memory_has_no_file() {
        let mem = create(64 << 20, Backing::Anonymous).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }

    /// Both ranges of a guest larger than the low RAM share one memfd, at
    /// consecutive offsets, and a second mapping of that file (what a
    /// vhost-user backend makes) sees what the guest wrote.
    #[test]
    fn shared_memory_is_one_memfd_seen_by_another_mapping() {
        let size = MMIO_GAP_START + (64 << 20);
        let mem = create(size, Backing::SharedMemfd).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let (a, b) = (
            regions[0].file_offset().unwrap(),
            regions[1].file_offset().unwrap(),
        );
        assert!(Arc::ptr_eq(a.arc(), b.arc()));
        assert_eq!((a.start(), b.start()), (0, MMIO_GAP_START));
        assert_eq!(a.file().metadata().unwrap().len(), size);

        let high = GuestAddress(MMIO_GAP_END + 4096);
        mem.write_obj(0x1234_5678_9abc_def0u64, high).unwrap();
        let file_off = MMIO_GAP_START + 4096;
        // SAFETY: a fresh shared read-only mapping of one page of the memfd,
        // read once and unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                b.file().as_raw_fd(),
                file_off as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: p maps 4096 readable bytes.
        let seen = unsafe { std::ptr::read_volatile(p as *const u64) };
        // SAFETY: unmapping the page mapped above.
        unsafe { libc::munmap(p, 4096) };
        assert_eq!(seen, 0x1234_5678_9abc_def0);
    }

    #[test]
    fn shared_memory_cannot_be_shrunk() {
        let mem = create(32 << 20, Backing::SharedMemfd).unwrap();
        let f = mem.iter().next().unwrap().file_offset().unwrap().file();
        assert!(f.set_len(4096).is_err());
    }
}
