//! Kernel, initrd and command-line loading, and the zero page.
//!
//! Two kernel formats are accepted: an ELF `vmlinux` and a `bzImage` (what
//! distributions ship as /boot/vmlinuz-*). A bzImage is by default not
//! decompressed in the guest, where nesting makes it take seconds, but on
//! the host, once, into a cache keyed by the image's content hash
//! ([`extract`]); the guest then enters the ELF at its 64-bit entry point.

pub mod bzimage;
pub mod elf;
pub mod extract;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a Linux kernel (neither an ELF vmlinux nor a bzImage)", .0.display())]
    NotAKernel(PathBuf),
    #[error("cannot load kernel {}: {source}", path.display())]
    Elf { path: PathBuf, source: elf::Error },
    #[error("cannot load kernel {}: {source}", path.display())]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel; give the VM more memory", path.display())]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initrd {}: {source}", path.display())]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("cannot write the zero page: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
}

/// How to treat a bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BzImageMode {
    /// Decompress its vmlinux on the host once (cached) and boot that.
    Extract,
    /// Let the kernel decompress itself inside the guest.
    Native,
}

/// What the kernel file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// Identifies the kernel format from the file's magic numbers.
pub fn detect_format(path: &Path) -> Result<KernelFormat, Error> {
    let mut f = open(path)?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if bzimage::is_bzimage(head) {
        Ok(KernelFormat::BzImage)
    } else {
        Err(Error::NotAKernel(path.to_owned()))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where the kernel was placed and how to enter it.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First byte after the kernel image; the initrd must start above it.
    pub end: u64,
    /// The setup header for the zero page.
    pub header: setup_header,
    /// Which path was taken, for logs and benchmarks.
    pub description: String,
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mode: BzImageMode,
) -> Result<LoadedKernel, Error> {
    match detect_format(path)? {
        KernelFormat::Elf => {
            let mut f = open(path)?;
            load_elf(mem, path, &mut f, minimal_header(), "ELF vmlinux".into())
        }
        KernelFormat::BzImage => {
            if mode == BzImageMode::Extract {
                match extract::cached_vmlinux(path) {
                    Ok(extracted) => {
                        let mut f = open(&extracted.path)?;
                        let desc = format!(
                            "bzImage, vmlinux extracted on the host ({})",
                            if extracted.from_cache {
                                "cached"
                            } else {
                                "new"
                            }
                        );
                        return load_elf(mem, path, &mut f, extracted.header, desc);
                    }
                    Err(e) => tracing::warn!(
                        "cannot extract vmlinux from {} ({e}); the guest will decompress it",
                        path.display()
                    ),
                }
            }
            load_bzimage(mem, path)
        }
    }
}

fn load_elf(
    mem: &GuestMemoryMmap,
    path: &Path,
    f: &mut File,
    header: setup_header,
    description: String,
) -> Result<LoadedKernel, Error> {
    let r = elf::load(mem, f, HIMEM_START).map_err(|source| Error::Elf {
        path: path.to_owned(),
        source,
    })?;
    tracing::debug!("kernel: copied {} MiB", r.copied >> 20);
    Ok(LoadedKernel {
        entry: r.entry,
        end: r.end,
        header,
        description,
    })
}

fn load_bzimage(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let mut f = open(path)?;
    let r =
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            Error::Load {
                path: path.to_owned(),
                source,
            }
        })?;
    let header = r
        .setup_header
        .ok_or_else(|| Error::NotAKernel(path.to_owned()))?;
    // The decompressor needs room up to init_size past its load address.
    let init_size = u64::from(header.init_size);
    let end = r.kernel_load.0 + init_size.max(r.kernel_end - r.kernel_load.0);
    Ok(LoadedKernel {
        entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        end,
        header,
        description: "bzImage, decompressed in the guest".into(),
    })
}

/// A setup header for an ELF kernel that came without one.
fn minimal_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT,
        ..Default::default()
    }
}

/// Copies the initrd to the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    header: &setup_header,
) -> Result<(GuestAddress, u64), Error> {
    let mut f = open(path)?;
    let size = f
        .seek(SeekFrom::End(0))
        .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let low_ram_end = mem.last_addr().0.min(MMIO_GAP_START - 1) + 1;
    let max = match header.initrd_addr_max {
        0 => low_ram_end,
        m => low_ram_end.min(u64::from(m) + 1),
    };
    let too_large = || Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit: max,
    };
    let addr = max.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| Error::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

/// Writes the command line at CMDLINE_START; returns its length.
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, Error> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    cl.insert_str(cmdline).map_err(Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(Error::CmdlineLoad)?;
    Ok(cmdline.len())
}

/// The guest's physical memory map as the kernel reads it from the zero page.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.last_addr().0 + 1;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Everything that goes into the zero page.
pub struct BootInfo<'a> {
    pub header: setup_header,
    pub cmdline_len: usize,
    pub initrd: Option<(GuestAddress, u64)>,
    pub rsdp: GuestAddress,
    pub e820: &'a [boot_e820_entry],
}

/// Writes `struct boot_params` at ZERO_PAGE_START.
pub fn write_zero_page(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), Error> {
    let mut params = boot_params {
        hdr: info.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.0;
    for (slot, e) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = *e;
    }
    params.e820_entries = info.e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_bios_area_and_the_mmio_gap() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), 1 << 30),
        ])
        .unwrap();
        let map = e820_map(&mem);
        let ram: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| (e.addr, e.addr + e.size))
            .collect();
        assert_eq!(
            ram,
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START),
                (MMIO_GAP_END, MMIO_GAP_END + (1 << 30))
            ]
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_and_refuses_to_overlap_the_kernel() {
        let dir = std::env::temp_dir().join(format!("kiln-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (addr, size) = load_initrd(&mem, &path, 1 << 20, &minimal_header()).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.0 & 0xfff, 0);
        assert!(addr.0 + size <= 16 << 20);
        assert!(matches!(
            load_initrd(&mem, &path, (16 << 20) - 4096, &minimal_header()),
            Err(Error::InitrdTooLarge { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("kiln-notkernel-{}", std::process::id()));
        std::fs::write(&path, b"hello, I am not a kernel").unwrap();
        assert!(matches!(detect_format(&path), Err(Error::NotAKernel(_))));
        std::fs::remove_file(path).unwrap();
    }
}
