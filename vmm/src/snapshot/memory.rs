//! The memory file: one 4 KiB header page (magic `KILNMEM1`, the
//! snapshot's 128-bit id, the RAM size), then guest RAM, its ranges in
//! guest-address order. Pages that read as zero are not written: the file
//! stays sparse, as big as RAM but holding only what the guest used.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::write_atomically;
use crate::vstate::memory::{self as guest_memory, Backing};

pub const MAGIC: &[u8; 8] = b"KILNMEM1";
/// Guest RAM starts at this offset in the file.
pub const HEADER_SIZE: u64 = 4096;
const PAGE: usize = 4096;
/// The most one pwrite/pread moves.
const MAX_RUN: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a kiln-vmm memory file (no KILNMEM1 magic)")]
    NotMemoryFile { path: PathBuf },
    #[error("{path}: belongs to snapshot {found:032x}, not to this state's {expected:032x}")]
    WrongId {
        path: PathBuf,
        found: u128,
        expected: u128,
    },
    #[error("{path}: holds {found} bytes of RAM, the state says {expected}")]
    WrongSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: truncated ({len} bytes, header and RAM take {expected})")]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{path}: cannot map guest memory: {source}")]
    Map {
        path: PathBuf,
        source: guest_memory::Error,
    },
}

/// What [`write`] did.
#[derive(Debug, Clone, Copy)]
pub struct WriteStats {
    /// Guest RAM, in bytes.
    pub ram_bytes: u64,
    /// RAM bytes actually written (the rest read as zero).
    pub written_bytes: u64,
    pub elapsed: Duration,
}

impl WriteStats {
    /// RAM scanned per second, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        self.ram_bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

fn header(id: u128, ram_size: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&ram_size.to_le_bytes());
    h
}

fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes guest RAM to `path` (0600, through a temporary name and a
/// rename, synced). Call with the vCPUs paused and the devices quiesced:
/// nothing may write guest memory meanwhile.
pub fn write(path: &Path, mem: &GuestMemoryMmap, id: u128) -> Result<WriteStats, Error> {
    let started = Instant::now();
    let size = ram_size(mem);
    let mut written = 0u64;
    write_atomically(path, |f| {
        f.write_all_at(&header(id, size), 0)?;
        // Holes where nothing is written, RAM's tail included.
        f.set_len(HEADER_SIZE + size)?;
        let mut offset = HEADER_SIZE;
        for r in mem.iter() {
            written += write_region(f, offset, r)?;
            offset += r.len();
        }
        Ok(())
    })
    .map_err(|e| match e {
        super::format::Error::Io { path, source } => Error::Io { path, source },
        other => Error::Io {
            path: path.to_owned(),
            source: io::Error::other(other.to_string()),
        },
    })?;
    Ok(WriteStats {
        ram_bytes: size,
        written_bytes: written,
        elapsed: started.elapsed(),
    })
}

/// Writes the non-zero pages of one RAM region at `file_offset`; returns
/// the bytes written.
fn write_region(f: &File, file_offset: u64, r: &vm_memory::GuestRegionMmap) -> io::Result<u64> {
    let len = r.len() as usize;
    // SAFETY: the region maps `len` bytes for the life of the process, and
    // the caller guarantees nothing writes guest RAM while it is saved.
    let ram = unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, len) };
    let mut written = 0u64;
    let mut flush = |s: usize, e: usize| -> io::Result<()> {
        f.write_all_at(&ram[s..e], file_offset + s as u64)?;
        written += (e - s) as u64;
        Ok(())
    };
    for (start, end) in data_ranges(r, len) {
        let mut run: Option<usize> = None;
        let mut page = start;
        while page < end {
            let next = (page + PAGE).min(end);
            let zero = is_zero(&ram[page..next]);
            match (run, zero) {
                (Some(s), true) => {
                    flush(s, page)?;
                    run = None;
                }
                (Some(s), false) if page - s >= MAX_RUN => {
                    flush(s, page)?;
                    run = Some(page);
                }
                (None, false) => run = Some(page),
                _ => {}
            }
            page = next;
        }
        if let Some(s) = run {
            flush(s, end)?;
        }
    }
    Ok(written)
}

/// Whether a page reads as zero: compared with a zero page, which is a
/// `memcmp` (vectorized in libc, fast even in a debug build).
fn is_zero(page: &[u8]) -> bool {
    static ZERO: [u8; PAGE] = [0; PAGE];
    page == &ZERO[..page.len()]
}

/// The parts of a region that can hold data, as page-aligned byte ranges
/// within it. For a shared file mapping (a memfd) only the file's data
/// ranges (SEEK_DATA/SEEK_HOLE): reading a hole of shared memory would
/// allocate it. Anything else is scanned whole (reading an untouched
/// anonymous page maps the zero page, and a private file mapping holds
/// the guest's writes in anonymous pages the file does not show).
fn data_ranges(r: &vm_memory::GuestRegionMmap, len: usize) -> Vec<(usize, usize)> {
    let whole = vec![(0, len)];
    let Some(fo) = r.file_offset() else {
        return whole;
    };
    if r.flags() & libc::MAP_SHARED == 0 {
        return whole;
    }
    file_data_ranges(fo.file(), fo.start(), len as u64).unwrap_or(whole)
}

/// The data ranges of `file` within `[base, base + len)`, relative to
/// `base`, rounded out to pages.
fn file_data_ranges(file: &File, base: u64, len: u64) -> io::Result<Vec<(usize, usize)>> {
    let fd = file.as_raw_fd();
    let end = base + len;
    let mut out = Vec::new();
    let mut at = base;
    while at < end {
        // SAFETY: lseek on a file we hold; it moves only the file position,
        // which nothing here relies on (all I/O is positioned).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // No data after `at`.
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        let page = PAGE as u64;
        let s = ((data - base) / page * page) as usize;
        let e = ((hole - base).div_ceil(page) * page).min(len) as usize;
        out.push((s, e));
        at = hole;
    }
    Ok(out)
}

/// Opens a memory file and checks its header, id, RAM size and length.
pub fn open_checked(path: &Path, expected_id: u128, size: u64) -> Result<File, Error> {
    let io_err = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut h = [0u8; 32];
    let got = read_up_to(&file, &mut h).map_err(io_err)?;
    if got < MAGIC.len() || &h[..8] != MAGIC {
        return Err(Error::NotMemoryFile {
            path: path.to_owned(),
        });
    }
    let expected_len = HEADER_SIZE + size;
    if got < h.len() {
        return Err(Error::Truncated {
            path: path.to_owned(),
            len,
            expected: expected_len,
        });
    }
    let found = u128::from_le_bytes(h[8..24].try_into().expect("16 bytes"));
    if found != expected_id {
        return Err(Error::WrongId {
            path: path.to_owned(),
            found,
            expected: expected_id,
        });
    }
    let found = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    if found != size {
        return Err(Error::WrongSize {
            path: path.to_owned(),
            found,
            expected: size,
        });
    }
    if len < expected_len {
        return Err(Error::Truncated {
            path: path.to_owned(),
            len,
            expected: expected_len,
        });
    }
    Ok(file)
}

fn read_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Guest RAM of `size` bytes mapped `MAP_PRIVATE` from the memory file at
/// `path` (from offset 4096), at 2 MiB-aligned host addresses: no copy,
/// pages fault in from the file as the guest touches them, and its writes
/// stay private. The file must stay unchanged while the VM runs.
pub fn map_private(path: &Path, expected_id: u128, size: u64) -> Result<GuestMemoryMmap, Error> {
    let file = open_checked(path, expected_id, size)?;
    guest_memory::map_file_private(Arc::new(file), HEADER_SIZE, size).map_err(|source| Error::Map {
        path: path.to_owned(),
        source,
    })
}

/// Guest RAM of `size` bytes in a new shared memfd (what a VM with a
/// vhost-user backend needs: the backend maps the same pages), filled with
/// the memory file's contents. Only the file's data ranges are read: its
/// holes stay holes in the memfd.
pub fn copy_into_memfd(
    path: &Path,
    expected_id: u128,
    size: u64,
) -> Result<GuestMemoryMmap, Error> {
    let file = open_checked(path, expected_id, size)?;
    let io_err = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mem = guest_memory::create(size, Backing::SharedMemfd).map_err(|source| Error::Map {
        path: path.to_owned(),
        source,
    })?;
    let mut offset = HEADER_SIZE;
    for r in mem.iter() {
        let len = r.len() as usize;
        // SAFETY: the region maps `len` bytes; the memory is new and no
        // vCPU or device uses it yet.
        let ram = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), len) };
        let ranges = file_data_ranges(&file, offset, len as u64).unwrap_or_else(|_| vec![(0, len)]);
        for (start, end) in ranges {
            for s in (start..end).step_by(MAX_RUN) {
                let e = (s + MAX_RUN).min(end);
                file.read_exact_at(&mut ram[s..e], offset + s as u64)
                    .map_err(io_err)?;
            }
        }
        offset += len as u64;
    }
    Ok(mem)
}
