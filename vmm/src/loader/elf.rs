//! Loading an x86-64 ELF vmlinux: program headers validated against guest
//! memory, segments copied in. What is zero by definition is not copied,
//! since fresh guest RAM is already zero: holes of a sparse file, and the
//! file bytes that lie under zero-initialised (SHT_NOBITS) sections such as
//! `.bss` — 17 MiB of a Debian kernel's file, written out as zeros because
//! a section with contents follows it in the same segment.
//!
//! The copy (39 of a Debian kernel's 56 MiB of segments) is the largest
//! part of building a VM: every 2 MiB of guest RAM it reaches is a huge page
//! the host zeroes before the data lands. It is split in 2 MiB pieces of
//! guest RAM that a few threads read in parallel with `pread`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const MAX_PHDRS: u16 = 64;
const PT_LOAD: u32 = 1;
const SHDR_SIZE: usize = 64;
const MAX_SHDRS: u16 = 4096;
const SHT_NOBITS: u32 = 8;
const SHF_ALLOC: u64 = 0x2;
const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the ELF file: {0}")]
    Read(io::Error),
    #[error("not a 64-bit little-endian x86-64 ELF executable")]
    NotX86_64Elf,
    #[error("the ELF program headers are malformed")]
    BadProgramHeaders,
    #[error("segment {paddr:#x}+{memsz:#x} lies outside guest RAM or below {min:#x}")]
    SegmentOutsideMemory { paddr: u64, memsz: u64, min: u64 },
    #[error("the entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("cannot copy the kernel into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

/// Where the kernel went.
pub struct Loaded {
    pub entry: GuestAddress,
    pub end: u64,
    /// Bytes actually copied (holes skipped).
    pub copied: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

struct Segment {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Parses and checks the headers; loads nothing.
fn segments(f: &mut File, file_len: u64) -> Result<(u64, Vec<Segment>), Error> {
    let mut ehdr = [0u8; EHDR_SIZE];
    f.seek(SeekFrom::Start(0)).map_err(Error::Read)?;
    f.read_exact(&mut ehdr).map_err(|_| Error::NotX86_64Elf)?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(Error::NotX86_64Elf);
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(Error::BadProgramHeaders);
    }
    let table_len = u64::from(phnum) * PHDR_SIZE as u64;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(Error::BadProgramHeaders);
    }
    let mut table = vec![0u8; table_len as usize];
    f.seek(SeekFrom::Start(phoff)).map_err(Error::Read)?;
    f.read_exact(&mut table).map_err(Error::Read)?;
    let mut segs = Vec::new();
    for ph in table.chunks_exact(PHDR_SIZE) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(ph, 8),
            vaddr: u64_at(ph, 16),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        if seg.filesz > seg.memsz
            || seg
                .offset
                .checked_add(seg.filesz)
                .is_none_or(|e| e > file_len)
        {
            return Err(Error::BadProgramHeaders);
        }
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err(Error::BadProgramHeaders);
    }
    Ok((entry, segs))
}

/// The (virtual address, size) of each zero-initialised section that
/// occupies memory (SHT_NOBITS with SHF_ALLOC), from the section headers.
/// They are optional: a file without them, or with a table that does not
/// fit in it, gives none, and everything is copied.
fn zero_sections(f: &mut File, file_len: u64) -> Vec<(u64, u64)> {
    let mut ehdr = [0u8; EHDR_SIZE];
    if f.seek(SeekFrom::Start(0)).is_err() || f.read_exact(&mut ehdr).is_err() {
        return Vec::new();
    }
    let shoff = u64_at(&ehdr, 40);
    let shentsize = u16_at(&ehdr, 58);
    let shnum = u16_at(&ehdr, 60);
    if shoff == 0 || usize::from(shentsize) != SHDR_SIZE || shnum > MAX_SHDRS {
        return Vec::new();
    }
    let table_len = u64::from(shnum) * SHDR_SIZE as u64;
    if shoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Vec::new();
    }
    let mut table = vec![0u8; table_len as usize];
    if f.seek(SeekFrom::Start(shoff)).is_err() || f.read_exact(&mut table).is_err() {
        return Vec::new();
    }
    table
        .chunks_exact(SHDR_SIZE)
        .filter(|sh| u32_at(sh, 4) == SHT_NOBITS && u64_at(sh, 8) & SHF_ALLOC != 0)
        .map(|sh| (u64_at(sh, 16), u64_at(sh, 32)))
        .filter(|&(_, size)| size > 0)
        .collect()
}

/// `[start, end)` without the parts in `cut` (a list of ranges).
fn subtract(start: u64, end: u64, cut: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut cut: Vec<_> = cut
        .iter()
        .map(|&(a, b)| (a.max(start), b.min(end)))
        .filter(|(a, b)| a < b)
        .collect();
    cut.sort_unstable();
    let mut out = Vec::new();
    let mut pos = start;
    for (a, b) in cut {
        if a > pos {
            out.push((pos, a));
        }
        pos = pos.max(b);
    }
    if pos < end {
        out.push((pos, end));
    }
    out
}

/// The data (non-hole) ranges of `[start, end)` in `f`.
fn data_ranges(f: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on our own open descriptor; the result is checked.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: only a hole remains. Anything else (no SEEK_DATA
            // support): treat the rest as data.
            if io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((pos, end));
            }
            break;
        }
        let data = (data as u64).max(pos);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Guest RAM is cut at this alignment between copy threads, so that no two
/// threads fault in the same (transparent huge) page.
const PIECE: u64 = 2 << 20;
/// At most this many threads copy; more gain nothing against memory bandwidth.
const MAX_COPY_THREADS: usize = 4;

/// `len` bytes of the file at `offset` that go to guest address `dest`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    dest: u64,
    offset: u64,
    len: u64,
}

/// Cuts a copy of `len` bytes from file `offset` to guest `dest` at the
/// guest's 2 MiB boundaries.
fn split(dest: u64, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let at = dest + done;
        let n = (PIECE - at % PIECE).min(len - done);
        out.push(Piece {
            dest: at,
            offset: offset + done,
            len: n,
        });
        done += n;
    }
    out
}

/// Reads a file at a position of its own (`pread`), so that threads can
/// share one open file.
struct FileAt<'a> {
    file: &'a File,
    pos: u64,
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        // SAFETY: the guard keeps `buf`'s memory mapped and writable for
        // `buf.len()` bytes while pread fills it; pread writes no more.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                self.pos as libc::off_t,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Copies `pieces` of `f` into guest memory, on up to MAX_COPY_THREADS
/// threads taking pieces in turn.
fn copy_pieces(mem: &GuestMemoryMmap, f: &File, pieces: &[Piece]) -> Result<(), Error> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_COPY_THREADS)
        .min(pieces.len());
    let next = AtomicUsize::new(0);
    let work = || -> Result<(), Error> {
        while let Some(p) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
            let mut src = FileAt {
                file: f,
                pos: p.offset,
            };
            mem.read_exact_volatile_from(GuestAddress(p.dest), &mut src, p.len as usize)
                .map_err(Error::GuestMemory)?;
        }
        Ok(())
    };
    if threads <= 1 {
        return work();
    }
    std::thread::scope(|s| {
        let mut helpers = Vec::new();
        for _ in 1..threads {
            let spawned = std::thread::Builder::new()
                .name("kiln-load".into())
                .stack_size(kiln_devices::THREAD_STACK_SIZE)
                .spawn_scoped(s, work);
            // Without a helper thread the copy still completes on this one.
            if let Ok(h) = spawned {
                helpers.push(h);
            }
        }
        let mut result = work();
        for h in helpers {
            let r = h.join().unwrap_or_else(|_| {
                Err(Error::Read(io::Error::other(
                    "a kernel copy thread panicked",
                )))
            });
            result = result.and(r);
        }
        result
    })
}

/// Loads the ELF kernel in `f`; segments must lie in guest RAM at or above
/// `min_addr`.
pub fn load(mem: &GuestMemoryMmap, f: &mut File, min_addr: u64) -> Result<Loaded, Error> {
    let file_len = f.metadata().map_err(Error::Read)?.len();
    let (entry, segs) = segments(f, file_len)?;
    let zero = zero_sections(f, file_len);
    let mut end = 0;
    let mut copied = 0;
    let mut entry_ok = false;
    let mut pieces = Vec::new();
    for s in &segs {
        let seg_end = s.paddr.checked_add(s.memsz);
        let fits = s.paddr >= min_addr
            && mem.check_range(GuestAddress(s.paddr), s.memsz as usize, Permissions::Write);
        let Some(seg_end) = seg_end.filter(|_| fits) else {
            return Err(Error::SegmentOutsideMemory {
                paddr: s.paddr,
                memsz: s.memsz,
                min: min_addr,
            });
        };
        entry_ok |= (s.paddr..seg_end).contains(&entry);
        end = end.max(seg_end);
        // Zero sections inside this segment, as ranges of the file.
        let zero_in_file: Vec<_> = zero
            .iter()
            .filter_map(|&(addr, size)| {
                let from = addr.checked_sub(s.vaddr)?;
                let to = from.checked_add(size)?.min(s.filesz);
                (from < to).then(|| (s.offset + from, s.offset + to))
            })
            .collect();
        for (from, to) in data_ranges(f, s.offset, s.offset + s.filesz) {
            for (from, to) in subtract(from, to, &zero_in_file) {
                pieces.extend(split(s.paddr + (from - s.offset), from, to - from));
                copied += to - from;
            }
        }
    }
    if !entry_ok {
        return Err(Error::BadEntry(entry));
    }
    copy_pieces(mem, f, &pieces)?;
    Ok(Loaded {
        entry: GuestAddress(entry),
        end,
        copied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An ELF with one PT_LOAD at `paddr`: `data`, then a hole, then `tail`.
    fn elf_file(
        name: &str,
        paddr: u64,
        data: &[u8],
        hole: u64,
        tail: &[u8],
    ) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("kiln-elf-{name}-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let off = 0x1000u64;
        let filesz = data.len() as u64 + hole + tail.len() as u64;
        let mut h = vec![0u8; EHDR_SIZE];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h[24..32].copy_from_slice(&paddr.to_le_bytes());
        h[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; PHDR_SIZE];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&off.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&(filesz + 0x1000).to_le_bytes());
        f.write_all(&h).unwrap();
        f.write_all(&ph).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(data).unwrap();
        f.seek(SeekFrom::Current(hole as i64)).unwrap();
        f.write_all(tail).unwrap();
        f.sync_all().unwrap();
        (File::open(&path).unwrap(), path)
    }

    #[test]
    fn loads_data_and_skips_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let data = vec![0xabu8; 0x3000];
        let tail = vec![0xcdu8; 0x1000];
        let (mut f, path) = elf_file("sparse", 0x10_0000, &data, 1 << 20, &tail);
        let l = load(&mem, &mut f, 0x10_0000).unwrap();
        assert_eq!(l.entry, GuestAddress(0x10_0000));
        assert_eq!(l.end, 0x10_0000 + 0x3000 + (1 << 20) + 0x1000 + 0x1000);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x10_2fff)).unwrap();
        assert_eq!(b, [0xab, 0]);
        mem.read_slice(&mut b, GuestAddress(0x10_3000 + (1 << 20)))
            .unwrap();
        assert_eq!(b, [0xcd, 0xcd]);
        // On a file system with holes (tmpfs, ext4), the hole is not copied.
        assert!(
            l.copied < 0x3000 + 0x1000 + (1 << 20),
            "copied {}",
            l.copied
        );
        std::fs::remove_file(path).unwrap();
    }

    /// Appends a section header table to the ELF at `path`: one entry per
    /// (type, flags, address, size), after the mandatory null entry.
    fn add_sections(path: &std::path::Path, sections: &[(u32, u64, u64, u64)]) {
        let mut bytes = std::fs::read(path).unwrap();
        let shoff = bytes.len().next_multiple_of(8) as u64;
        bytes.resize(shoff as usize + SHDR_SIZE, 0);
        for &(kind, flags, addr, size) in sections {
            let mut sh = vec![0u8; SHDR_SIZE];
            sh[4..8].copy_from_slice(&kind.to_le_bytes());
            sh[8..16].copy_from_slice(&flags.to_le_bytes());
            sh[16..24].copy_from_slice(&addr.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&sh);
        }
        bytes[40..48].copy_from_slice(&shoff.to_le_bytes());
        bytes[58..60].copy_from_slice(&(SHDR_SIZE as u16).to_le_bytes());
        bytes[60..62].copy_from_slice(&(sections.len() as u16 + 1).to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn zero_initialised_sections_are_not_copied() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // 0x1000 of code, then 0x2000 the file fills (with 0xee here, so a
        // copy would show) but a NOBITS section covers, then 0x1000 of data.
        let mut data = vec![0x11u8; 0x1000];
        data.extend(vec![0xeeu8; 0x2000]);
        data.extend(vec![0x22u8; 0x1000]);
        let (_, path) = elf_file("nobits", 0x10_0000, &data, 0, &[]);
        // Segment vaddr is 0 in elf_file: section addresses are offsets.
        // A NOBITS section that takes no memory (no SHF_ALLOC) is not one
        // to skip, even where its address falls in the segment.
        add_sections(
            &path,
            &[
                (1, SHF_ALLOC, 0, 0x1000),
                (SHT_NOBITS, SHF_ALLOC, 0x1000, 0x2000),
                (SHT_NOBITS, 0, 0, 0x1000),
            ],
        );
        let mut f = File::open(&path).unwrap();
        let l = load(&mem, &mut f, 0x10_0000).unwrap();
        assert_eq!(l.copied, 0x2000);
        let mut b = [0u8; 4];
        for (addr, want) in [
            (0x10_0ffe, [0x11, 0x11, 0, 0]),
            (0x10_2ffe, [0, 0, 0x22, 0x22]),
        ] {
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert_eq!(b, want, "at {addr:#x}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_section_table_that_does_not_fit_is_ignored() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let data = vec![0x33u8; 0x3000];
        let (_, path) = elf_file("badsh", 0x10_0000, &data, 0, &[]);
        add_sections(&path, &[(SHT_NOBITS, SHF_ALLOC, 0, 0x3000)]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[60..62].copy_from_slice(&4000u16.to_le_bytes()); // runs past the end
        std::fs::write(&path, bytes).unwrap();
        let mut f = File::open(&path).unwrap();
        let l = load(&mem, &mut f, 0x10_0000).unwrap();
        assert_eq!(l.copied, 0x3000);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x10_2fff)).unwrap();
        assert_eq!(b, [0x33]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn subtract_leaves_what_no_cut_covers() {
        assert_eq!(subtract(0, 100, &[]), [(0, 100)]);
        assert_eq!(
            subtract(0, 100, &[(60, 70), (10, 20), (15, 30), (90, 200)]),
            [(0, 10), (30, 60), (70, 90)]
        );
        assert!(subtract(10, 20, &[(0, 50)]).is_empty());
        assert_eq!(subtract(10, 20, &[(0, 5), (25, 30)]), [(10, 20)]);
    }

    #[test]
    fn copies_are_cut_at_2mib_guest_boundaries() {
        assert_eq!(
            split(0x1f_f000, 0x40, 0x20_2000),
            [
                Piece {
                    dest: 0x1f_f000,
                    offset: 0x40,
                    len: 0x1000
                },
                Piece {
                    dest: 0x20_0000,
                    offset: 0x1040,
                    len: 0x20_0000
                },
                Piece {
                    dest: 0x40_0000,
                    offset: 0x20_1040,
                    len: 0x1000
                },
            ]
        );
        assert!(split(0x1000, 0, 0).is_empty());
    }

    #[test]
    fn a_segment_of_many_pieces_lands_whole() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        // 7 MiB of data not aligned to 2 MiB, each 4-byte word its own index.
        let data: Vec<u8> = (0..(7u32 << 18) + 3)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let (mut f, path) = elf_file("pieces", 0x10_3000, &data, 0, &[]);
        let l = load(&mem, &mut f, 0x10_0000).unwrap();
        assert_eq!(l.copied, data.len() as u64);
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x10_3000)).unwrap();
        assert!(back == data, "guest memory differs from the segment");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn refuses_segments_outside_memory_or_below_the_minimum() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (mut f, path) = elf_file("outside", 0x1f_f000, &[1u8; 0x2000], 0, &[]);
        assert!(matches!(
            load(&mem, &mut f, 0x10_0000),
            Err(Error::SegmentOutsideMemory { .. })
        ));
        let (mut g, path2) = elf_file("low", 0x1000, &[1u8; 0x100], 0, &[]);
        assert!(matches!(
            load(&mem, &mut g, 0x10_0000),
            Err(Error::SegmentOutsideMemory { .. })
        ));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(path2).unwrap();
    }

    #[test]
    fn refuses_malformed_headers() {
        let path = std::env::temp_dir().join(format!("kiln-elf-bad-{}", std::process::id()));
        let mut h = vec![0u8; EHDR_SIZE];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        std::fs::write(&path, &h).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(
            load(&mem, &mut f, 0),
            Err(Error::BadProgramHeaders)
        ));
        std::fs::write(&path, b"\x7fELF\x01\x01 32-bit").unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(load(&mem, &mut f, 0), Err(Error::NotX86_64Elf)));
        std::fs::remove_file(path).unwrap();
    }
}
