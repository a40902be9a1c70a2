//! A raw disk image (regular file or host block device) as a [`BlockBackend`].

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, warn};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::backend::{AsyncIo, BlockBackend};

/// Buffer, offset and length alignment used for `O_DIRECT` I/O; covers both
/// 512-byte and 4 KiB logical-block devices.
pub const DIRECT_ALIGN: u64 = 4096;

/// Largest buffer used when writing zeroes by hand.
const ZERO_CHUNK: u64 = 1 << 20;

/// Errors opening a raw disk image.
#[derive(Debug, thiserror::Error)]
pub enum RawFileError {
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    #[error("permission denied opening disk image {path} {mode}")]
    PermissionDenied { path: PathBuf, mode: &'static str },
    #[error("disk image {0} is on a read-only filesystem (open it read-only)")]
    ReadOnlyFilesystem(PathBuf),
    #[error("disk image {0} is a directory")]
    IsADirectory(PathBuf),
    #[error("the filesystem holding {0} does not support direct I/O")]
    DirectUnsupported(PathBuf),
    #[error("disk image {path} is {size} bytes; direct I/O needs a multiple of {DIRECT_ALIGN}")]
    UnalignedDirect { path: PathBuf, size: u64 },
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A raw image accessed with positional reads and writes, optionally with
/// `O_DIRECT` (bypassing the host page cache).
#[derive(Debug)]
pub struct RawFile {
    file: File,
    capacity: u64,
    direct: bool,
    /// Aligned bounce buffer for `O_DIRECT` (one worker uses it at a time).
    bounce: Mutex<Vec<u8>>,
}

impl RawFile {
    /// Opens the image at `path`. With `read_only` the file is opened
    /// `O_RDONLY`; with `direct`, `O_DIRECT`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, RawFileError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let p = || path.to_path_buf();
        let file = opts.open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RawFileError::NotFound(p()),
            io::ErrorKind::PermissionDenied => RawFileError::PermissionDenied {
                path: p(),
                mode: if read_only {
                    "for reading"
                } else {
                    "for reading and writing"
                },
            },
            io::ErrorKind::IsADirectory => RawFileError::IsADirectory(p()),
            _ => match source.raw_os_error() {
                Some(libc::EROFS) => RawFileError::ReadOnlyFilesystem(p()),
                Some(libc::EINVAL) if direct => RawFileError::DirectUnsupported(p()),
                _ => RawFileError::Open { path: p(), source },
            },
        })?;
        let meta = file
            .metadata()
            .map_err(|source| RawFileError::Size { path: p(), source })?;
        if meta.is_dir() {
            return Err(RawFileError::IsADirectory(p()));
        }
        // Seeking to the end also sizes host block devices.
        let capacity = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| RawFileError::Size { path: p(), source })?;
        if capacity == 0 {
            return Err(RawFileError::Empty(p()));
        }
        if direct && capacity % DIRECT_ALIGN != 0 {
            return Err(RawFileError::UnalignedDirect {
                path: p(),
                size: capacity,
            });
        }
        if capacity % 512 != 0 {
            warn!(
                path = %path.display(),
                "disk image size {capacity} is not a multiple of 512; the tail is not visible"
            );
        }
        debug!(path = %path.display(), capacity, read_only, direct, "opened raw disk image");
        Ok(Self {
            file,
            capacity,
            direct,
            bounce: Mutex::new(Vec::new()),
        })
    }

    fn bounce(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bounce.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn direct_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, end) = aligned_span(offset, buf.len())?;
        let mut bounce = self.bounce();
        let aligned = aligned_slice(&mut bounce, end - start)?;
        self.file.read_exact_at(aligned, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&aligned[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes through an aligned buffer, reading back the partial blocks at
    /// either end first.
    fn direct_write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let (start, end) = aligned_span(offset, buf.len())?;
        let mut bounce = self.bounce();
        let aligned = aligned_slice(&mut bounce, end - start)?;
        let block = DIRECT_ALIGN as usize;
        let total = aligned.len();
        if offset != start {
            self.file.read_exact_at(&mut aligned[..block], start)?;
        }
        if offset + buf.len() as u64 != end && (total > block || offset == start) {
            self.file
                .read_exact_at(&mut aligned[total - block..], end - DIRECT_ALIGN)?;
        }
        let skip = (offset - start) as usize;
        aligned[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(aligned, start)
    }

    fn write_zeroes_by_hand(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            self.write_at(offset, &zeroes[..n])?;
            offset += n as u64;
        }
        Ok(())
    }

    fn try_fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<bool> {
        match fallocate(&self.file, mode, true, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.errno(), libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                Ok(false)
            }
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

/// The `DIRECT_ALIGN`-aligned byte span covering `len` bytes at `offset`.
fn aligned_span(offset: u64, len: usize) -> io::Result<(u64, u64)> {
    let end = offset
        .checked_add(len as u64)
        .and_then(|e| e.checked_next_multiple_of(DIRECT_ALIGN))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((offset - offset % DIRECT_ALIGN, end))
}

/// A `len`-byte slice of `buf` starting at a `DIRECT_ALIGN`-aligned address.
fn aligned_slice(buf: &mut Vec<u8>, len: u64) -> io::Result<&mut [u8]> {
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let align = DIRECT_ALIGN as usize;
    if buf.len() < len + align {
        buf.resize(len + align, 0);
    }
    let skip = buf.as_ptr().align_offset(align);
    if skip >= align {
        return Err(io::Error::other("cannot align the direct I/O buffer"));
    }
    Ok(&mut buf[skip..skip + len])
}

impl BlockBackend for RawFile {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.direct {
            self.direct_read(offset, buf)
        } else {
            self.file.read_exact_at(buf, offset)
        }
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.direct {
            self.direct_write(offset, buf)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Discard is a hint: if the filesystem cannot punch holes, do nothing.
        self.try_fallocate(FallocateMode::PunchHole, offset, len)
            .map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap && self.try_fallocate(FallocateMode::PunchHole, offset, len)? {
            return Ok(());
        }
        if self.try_fallocate(FallocateMode::ZeroRange, offset, len)? {
            return Ok(());
        }
        self.write_zeroes_by_hand(offset, len)
    }

    fn async_io(&self) -> Option<AsyncIo> {
        Some(AsyncIo {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.file),
            align: if self.direct { DIRECT_ALIGN } else { 1 },
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn image(len: usize) -> TempFile {
        image_in(&std::env::temp_dir(), len)
    }

    fn expected(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn reads_and_writes_at_offsets() {
        let img = image(8192);
        let raw = RawFile::open(img.as_path(), false, false).unwrap();
        assert_eq!(raw.capacity(), 8192);
        let mut buf = vec![0u8; 1000];
        raw.read_at(100, &mut buf).unwrap();
        assert_eq!(buf, expected(100, 1000));
        raw.write_at(4000, &[7u8; 300]).unwrap();
        raw.read_at(3999, &mut buf[..302]).unwrap();
        assert_eq!(buf[0], expected(3999, 1)[0]);
        assert!(buf[1..301].iter().all(|&b| b == 7));
        assert_eq!(buf[301], expected(4300, 1)[0]);
        raw.flush().unwrap();
        // Past the end is an error, not a short read.
        assert!(raw.read_at(8000, &mut buf[..512]).is_err());
    }

    #[test]
    fn read_only_images_refuse_writes() {
        let img = image(4096);
        let raw = RawFile::open(img.as_path(), true, false).unwrap();
        assert!(raw.write_at(0, &[1]).is_err());
        raw.flush().unwrap();
    }

    #[test]
    fn open_errors_are_specific() {
        let dir = std::env::temp_dir();
        let missing = dir.join("kiln-no-such-image-3b1f");
        assert!(matches!(
            RawFile::open(&missing, false, false),
            Err(RawFileError::NotFound(_))
        ));
        assert!(matches!(
            RawFile::open(&dir, true, false),
            Err(RawFileError::IsADirectory(_))
        ));
        assert!(matches!(
            RawFile::open(&dir, false, false),
            Err(RawFileError::IsADirectory(_))
        ));
        let empty = TempFile::new().unwrap();
        assert!(matches!(
            RawFile::open(empty.as_path(), false, false),
            Err(RawFileError::Empty(_))
        ));
        let msg = RawFile::open(&missing, false, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }

    /// A directory whose filesystem takes O_DIRECT: the temporary
    /// directory, else (a tmpfs has no O_DIRECT) the cargo target directory;
    /// if neither does, the test is skipped (`kiln_tests::skip`: a panic
    /// under CI=true).
    pub(crate) fn direct_dir() -> Option<PathBuf> {
        let scratch = kiln_tests::target_dir().join("kiln-tests");
        std::fs::create_dir_all(&scratch).unwrap();
        let mut refused = Vec::new();
        for dir in [std::env::temp_dir(), scratch] {
            let probe = TempFile::new_in(&dir).unwrap();
            probe.as_file().set_len(4096).unwrap();
            match RawFile::open(probe.as_path(), false, true) {
                Ok(_) => return Some(dir),
                Err(RawFileError::DirectUnsupported(_)) => refused.push(dir),
                Err(e) => panic!("{e}"),
            }
        }
        kiln_tests::skip(format!("no O_DIRECT on the filesystems of {refused:?}"));
        None
    }

    /// `image(len)` in `dir`.
    fn image_in(dir: &Path, len: usize) -> TempFile {
        let f = TempFile::new_in(dir).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.as_file().write_all(&data).unwrap();
        f
    }

    #[test]
    fn direct_io_handles_unaligned_requests() {
        let Some(dir) = direct_dir() else { return };
        let img = image_in(&dir, 4 * 4096);
        let raw = RawFile::open(img.as_path(), false, true).unwrap();
        let mut buf = vec![0u8; 5000];
        raw.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, expected(512, 5000));
        // Inside one block, across blocks, aligned.
        for (off, len) in [
            (1024usize, 512usize),
            (3584, 1024),
            (4096, 4096),
            (512, 12288),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + off) as u8).collect();
            raw.write_at(off as u64, &data).unwrap();
            let mut whole = vec![0u8; 4 * 4096];
            raw.read_at(0, &mut whole).unwrap();
            assert_eq!(&whole[off..off + len], &data[..]);
        }
        let mut first = vec![0u8; 512];
        raw.read_at(0, &mut first).unwrap();
        assert_eq!(first, expected(0, 512));
        let mut last = vec![0u8; 3584];
        raw.read_at(12800, &mut last).unwrap();
        assert_eq!(last, expected(12800, 3584));
    }

    #[test]
    fn direct_io_needs_an_aligned_image_size() {
        let Some(dir) = direct_dir() else { return };
        let img = image_in(&dir, 4096 + 512);
        match RawFile::open(img.as_path(), false, true) {
            Err(RawFileError::UnalignedDirect { size: 4608, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_zeroes_and_discard() {
        let img = image(64 * 1024);
        let raw = RawFile::open(img.as_path(), false, false).unwrap();
        raw.write_zeroes(1000, 5000, false).unwrap();
        raw.write_zeroes(16384, 8192, true).unwrap();
        let mut buf = vec![0xffu8; 64 * 1024];
        raw.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..1000], &expected(0, 1000)[..]);
        assert!(buf[1000..6000].iter().all(|&b| b == 0));
        assert_eq!(buf[6000], expected(6000, 1)[0]);
        assert!(buf[16384..24576].iter().all(|&b| b == 0));
        raw.discard(32768, 4096).unwrap();
        assert_eq!(raw.capacity(), 64 * 1024);
        raw.write_zeroes_by_hand(40000, 3000).unwrap();
        raw.read_at(0, &mut buf).unwrap();
        assert!(buf[40000..43000].iter().all(|&b| b == 0));
        assert_eq!(buf[43000], expected(43000, 1)[0]);
    }

    #[test]
    fn aligned_span_rounds_outwards() {
        assert_eq!(aligned_span(0, 4096).unwrap(), (0, 4096));
        assert_eq!(aligned_span(512, 512).unwrap(), (0, 4096));
        assert_eq!(aligned_span(4000, 200).unwrap(), (0, 8192));
        assert!(aligned_span(u64::MAX - 10, 100).is_err());
    }
}
