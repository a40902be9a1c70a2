//! Guest RAM laid out around the MMIO gap below 4 GiB: anonymous private
//! mappings, or one shared memfd when another process (a vhost-user backend)
//! must map the same pages.
//!
//! Each range is mapped at a 2 MiB-aligned host address, as its guest
//! address is. KVM maps guest memory with 2 MiB pages only where guest and
//! host addresses agree modulo 2 MiB and the host backs the range with a
//! transparent huge page; otherwise every 4 KiB the guest touches costs a
//! nested page fault (about 20,000 of them in a 256 MiB boot, most of its
//! VM exits).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {} MiB of guest memory: {source}", size >> 20)]
    Map { size: u64, source: io::Error },
    #[error("cannot set up {} MiB of guest memory: {source}", size >> 20)]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map guest memory at {addr:#x}, where the migration's source has it: {source}")]
    MapAt { addr: u64, source: io::Error },
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
///
/// The mappings are never unmapped: guest RAM lives as long as the
/// process, which runs one VM (a guest reboot with `--on-reboot restart`
/// is a new process).
pub fn create(size: u64, backing: Backing) -> Result<GuestMemoryMmap, Error> {
    match backing {
        Backing::Anonymous => map_ranges(size, None, Mapping::Anonymous),
        Backing::SharedMemfd => {
            let file = memfd(size).map_err(|source| Error::Memfd { size, source })?;
            map_ranges(size, Some((Arc::new(file), 0)), Mapping::Shared)
        }
    }
}

/// Maps `size` bytes of guest RAM from `file`, starting at `offset`,
/// `MAP_PRIVATE`: pages are read from the file as the guest touches them,
/// and what the guest writes stays in this process (copy on write). A
/// snapshot's memory file is restored this way. The file must not change
/// while the VM runs: pages the guest has not written yet would see it.
pub fn map_file_private(file: Arc<File>, offset: u64, size: u64) -> Result<GuestMemoryMmap, Error> {
    map_ranges(size, Some((file, offset)), Mapping::PrivateFile)
}

/// Maps `size` bytes of guest RAM from `file`, a memfd another kiln-vmm
/// handed over (a migration on this host), `MAP_SHARED`: the same pages as
/// the other process's, and, like [`create`]'s memfd, shareable with a
/// vhost-user backend. Each range goes at `host_addrs`, where the other
/// process has it: a vhost-user backend whose connection was handed over
/// too knows the rings by those addresses (qemu-storage-daemon remaps
/// them through each new memory table, and fails if they are not in it).
/// An address taken here is an error, never a mapping elsewhere.
pub fn map_memfd_shared_at(
    file: File,
    size: u64,
    host_addrs: &[u64],
) -> Result<GuestMemoryMmap, Error> {
    if host_addrs.len() != ram_ranges(size).len() {
        return Err(Error::MapAt {
            addr: 0,
            source: io::Error::other(format!(
                "{} RAM ranges handed over for {} here",
                host_addrs.len(),
                ram_ranges(size).len()
            )),
        });
    }
    map_ranges_at(
        size,
        Some((Arc::new(file), 0)),
        Mapping::Shared,
        Some(host_addrs),
    )
}

/// How a range of guest RAM is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Anonymous,
    Shared,
    PrivateFile,
}

/// Maps the RAM ranges for `size` bytes; with a file, the ranges are
/// consecutive in it from `offset` (the second starts where the first
/// ends).
fn map_ranges(
    size: u64,
    file: Option<(Arc<File>, u64)>,
    mapping: Mapping,
) -> Result<GuestMemoryMmap, Error> {
    map_ranges_at(size, file, mapping, None)
}

/// [`map_ranges`], each range at the host address given for it, if any.
fn map_ranges_at(
    size: u64,
    file: Option<(Arc<File>, u64)>,
    mapping: Mapping,
    host_addrs: Option<&[u64]>,
) -> Result<GuestMemoryMmap, Error> {
    let mut offset = file.as_ref().map_or(0, |(_, o)| *o);
    let mut regions = Vec::new();
    for (i, (addr, len)) in ram_ranges(size).into_iter().enumerate() {
        let file_offset = file
            .as_ref()
            .map(|(f, _)| FileOffset::from_arc(f.clone(), offset));
        offset += len as u64;
        let ptr = match host_addrs.and_then(|a| a.get(i)) {
            Some(&at) => map_at(at, len, file_offset.as_ref(), mapping)
                .map_err(|source| Error::MapAt { addr: at, source })?,
            None => map_aligned(len, file_offset.as_ref(), mapping)
                .map_err(|source| Error::Map { size, source })?,
        };
        let (prot, flags) = prot_flags(mapping);
        let mut builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags);
        if let Some(f) = file_offset {
            builder = builder.with_file_offset(f);
        }
        // SAFETY: map_aligned just mapped `len` bytes at `ptr`, and they stay
        // mapped for the rest of the process.
        let region = unsafe { builder.with_raw_mmap_pointer(ptr) }
            .build()
            .map_err(|e| Error::Allocate {
                size,
                source: e.into(),
            })?;
        let region = GuestRegionMmap::new(region, addr).ok_or(Error::Allocate {
            size,
            source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Allocate {
        size,
        source: e.into(),
    })
}

/// Huge page size on x86-64: what host and guest addresses must agree on.
const HUGE_PAGE: usize = 2 << 20;

/// Protection and flags of guest RAM mappings (those vm-memory would use).
fn prot_flags(mapping: Mapping) -> (i32, i32) {
    let kind = match mapping {
        Mapping::Anonymous => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        Mapping::Shared => libc::MAP_SHARED,
        Mapping::PrivateFile => libc::MAP_PRIVATE,
    };
    (
        libc::PROT_READ | libc::PROT_WRITE,
        kind | libc::MAP_NORESERVE,
    )
}

/// Maps `len` bytes of `file` at exactly `addr`, or fails (the address is
/// taken, or not page-aligned).
fn map_at(
    addr: u64,
    len: usize,
    file: Option<&FileOffset>,
    mapping: Mapping,
) -> io::Result<*mut u8> {
    if !addr.is_multiple_of(HUGE_PAGE as u64) {
        return Err(io::Error::other(format!("{addr:#x} is not 2 MiB-aligned")));
    }
    let (prot, flags) = prot_flags(mapping);
    let (fd, off) = file.map_or((-1, 0), |f| (f.file().as_raw_fd(), f.start()));
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped yet
    // (EEXIST otherwise): no memory of this process is affected.
    let ptr = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED_NOREPLACE,
            fd,
            off as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if ptr as u64 != addr {
        // A kernel that ignores the flag put it elsewhere.
        // SAFETY: unmapping the mapping just made, which nothing uses.
        unsafe { libc::munmap(ptr, len) };
        return Err(io::Error::other("the kernel placed it elsewhere"));
    }
    // SAFETY: madvise on the range just mapped (advice only).
    unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
    Ok(ptr as *mut u8)
}

/// Maps `len` bytes (anonymous, or of `file` from its offset, shared or
/// private as `mapping` says) read-write at
/// a 2 MiB-aligned address, and asks for transparent huge pages there
/// (they also need the host's THP setting to allow them; with
/// `always` they come without asking, with `never` not at all).
fn map_aligned(len: usize, file: Option<&FileOffset>, mapping: Mapping) -> io::Result<*mut u8> {
    let failed = |p| p == libc::MAP_FAILED;
    // Reserve room for an aligned start, then map over it.
    let reserve = len + HUGE_PAGE;
    // SAFETY: a fresh inaccessible anonymous mapping; no memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if failed(base) {
        return Err(io::Error::last_os_error());
    }
    let start = (base as usize).next_multiple_of(HUGE_PAGE);
    let (prot, flags) = prot_flags(mapping);
    let (fd, off) = file.map_or((-1, 0), |f| (f.file().as_raw_fd(), f.start()));
    // SAFETY: MAP_FIXED replaces pages of the reservation made above, which
    // nothing else uses: [start, start + len) lies inside it.
    let ptr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            off as libc::off_t,
        )
    };
    let result = if failed(ptr) {
        Err(io::Error::last_os_error())
    } else {
        // Advice only: a kernel without THP refuses it, and that is fine.
        // SAFETY: madvise on the range just mapped.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(ptr as *mut u8)
    };
    // Give back what is left of the reservation (all of it on failure).
    let end = base as usize + reserve;
    let keep = if result.is_ok() {
        start..start + len
    } else {
        start..start
    };
    for (from, to) in [(base as usize, keep.start), (keep.end, end)] {
        if to > from {
            // SAFETY: unmapping parts of our own reservation that hold no
            // guest memory.
            unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
        }
    }
    result
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

    /// A handed-over memfd is mapped where the source has it, showing the
    /// same bytes; an address taken here is refused, not moved.
    #[test]
    fn a_handed_over_memfd_maps_at_the_source_addresses_or_not_at_all() {
        let src = create(8 << 20, Backing::SharedMemfd).unwrap();
        src.write_obj(0x5eed_u64, GuestAddress(4096)).unwrap();
        let region = src.iter().next().unwrap();
        let file = || region.file_offset().unwrap().file().try_clone().unwrap();
        // Taken here (by the source itself).
        let taken = region.as_ptr() as u64;
        let e = map_memfd_shared_at(file(), 8 << 20, &[taken]).unwrap_err();
        assert!(matches!(e, Error::MapAt { .. }), "{e}");
        assert!(map_memfd_shared_at(file(), 8 << 20, &[]).is_err());
        // A free aligned address: found by mapping and unmapping.
        let probe = create(8 << 20, Backing::Anonymous).unwrap();
        let free = probe.iter().next().unwrap().as_ptr() as u64;
        // SAFETY: `probe` is forgotten, never used again; its range is freed.
        unsafe { libc::munmap(free as *mut libc::c_void, 8 << 20) };
        std::mem::forget(probe);
        let dst = map_memfd_shared_at(file(), 8 << 20, &[free]).unwrap();
        assert_eq!(dst.iter().next().unwrap().as_ptr() as u64, free);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(4096)).unwrap(), 0x5eed);
    }

    #[test]
    fn anonymous_memory_has_no_file() {
        let mem = create(64 << 20, Backing::Anonymous).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }

    /// Host addresses are 2 MiB-aligned like the guest addresses, so KVM
    /// can map guest RAM with huge pages; the memory is usable.
    #[test]
    fn ram_is_mapped_at_huge_page_boundaries() {
        for backing in [Backing::Anonymous, Backing::SharedMemfd] {
            let mem = create(MMIO_GAP_START + (6 << 20), backing).unwrap();
            for r in mem.iter() {
                assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0, "{backing:?}");
                assert_eq!(r.len() as usize % HUGE_PAGE, 0);
            }
            let last = GuestAddress(MMIO_GAP_END + (6 << 20) - 8);
            mem.write_obj(0xfeed_u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0xfeed);
        }
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
