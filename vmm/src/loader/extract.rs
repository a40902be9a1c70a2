//! The host-side vmlinux cache: each bzImage is decompressed once, and its
//! ELF kept under a name derived from the image's SHA-256, so a changed
//! image can never be served a stale kernel.
//!
//! Hashing an 8 MiB image costs more than a boot should pay each time, so a
//! second index maps the file's identity (device, inode, size, mtime and
//! ctime in nanoseconds) to that content-hashed entry. Any write to the file
//! changes its ctime, so a stale identity cannot match; a miss falls back to
//! hashing.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use sha2::{Digest, Sha256};

use super::bzimage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    BzImage(#[from] bzimage::Error),
    #[error("no usable cache directory (set KILN_CACHE_DIR)")]
    NoCacheDir,
    #[error("cannot write the vmlinux cache {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An extracted vmlinux on disk and the setup header of its bzImage.
pub struct Extracted {
    pub path: PathBuf,
    pub header: setup_header,
    pub from_cache: bool,
}

/// The cache directory: $KILN_CACHE_DIR, else /var/cache/kiln when running
/// as root, else $XDG_CACHE_HOME/kiln or ~/.cache/kiln.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/cache/kiln"));
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("kiln"))
}

/// The identity of a file's current contents, short of hashing them.
fn identity(meta: &fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}-{}.{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// The first page of the image: enough for its setup header.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(4096);
    fs::File::open(path)?.take(4096).read_to_end(&mut head)?;
    Ok(head)
}

/// Returns the vmlinux inside the bzImage at `path`, extracting it into the
/// cache on first use.
pub fn cached_vmlinux(path: &Path) -> Result<Extracted, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let dir = cache_dir().ok_or(Error::NoCacheDir)?.join("vmlinux");
    let meta = fs::metadata(path).map_err(read_err)?;
    let by_identity = dir.join("by-identity").join(identity(&meta));
    if let Ok(target) = fs::read_link(&by_identity) {
        let target = dir.join(target);
        if target.is_file() {
            let header = bzimage::setup_header_of(&read_head(path).map_err(read_err)?)?;
            return Ok(Extracted {
                path: target,
                header,
                from_cache: true,
            });
        }
    }

    let image = fs::read(path).map_err(read_err)?;
    let header = bzimage::setup_header_of(&image)?;
    let digest = Sha256::digest(&image);
    let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let file_name = format!("{name}.elf");
    let target = dir.join(&file_name);
    if target.is_file() {
        remember_identity(&by_identity, &file_name);
        return Ok(Extracted {
            path: target,
            header,
            from_cache: true,
        });
    }

    let vmlinux = bzimage::decompress(bzimage::payload(&image)?)?;
    let write_err = |source| Error::Write {
        path: target.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(write_err)?;
    // Write under a unique name, then rename: concurrent VMs never see a
    // half-written kernel.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = fs::File::create(&tmp)
        .and_then(|mut f| write_sparse(&mut f, &vmlinux).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, &target));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    remember_identity(&by_identity, &file_name);
    Ok(Extracted {
        path: target,
        header,
        from_cache: false,
    })
}

/// Writes `data`, leaving all-zero 64 KiB blocks as holes: a vmlinux is
/// largely zeroes (its .bss), and the loader skips holes.
fn write_sparse(f: &mut fs::File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    const BLOCK: usize = 64 << 10;
    for chunk in data.chunks(BLOCK) {
        if chunk.iter().all(|&b| b == 0) {
            f.seek(SeekFrom::Current(chunk.len() as i64))?;
        } else {
            f.write_all(chunk)?;
        }
    }
    f.set_len(data.len() as u64)
}

/// Links the file identity to its content-hashed entry; failing to is only
/// a missed shortcut for next time.
fn remember_identity(link: &Path, file_name: &str) {
    let Some(parent) = link.parent() else { return };
    let tmp = parent.join(format!(".link.{}", std::process::id()));
    let result = fs::create_dir_all(parent)
        .and_then(|_| {
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(Path::new("..").join(file_name), &tmp)
        })
        .and_then(|_| fs::rename(&tmp, link));
    if let Err(e) = result {
        tracing::debug!("vmlinux cache: cannot record {}: {e}", link.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file whose payload is gzip(ELF-ish bytes).
    fn fake_bzimage(elf: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(elf).unwrap();
        let payload = gz.finish().unwrap();
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&payload);
        img
    }

    #[test]
    fn extracts_once_then_serves_from_the_cache_and_notices_changes() {
        let root = std::env::temp_dir().join(format!("kiln-extract-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        std::env::set_var("KILN_CACHE_DIR", root.join("cache"));
        let image = root.join("bzImage");

        fs::write(&image, fake_bzimage(b"\x7fELF first")).unwrap();
        let a = cached_vmlinux(&image).unwrap();
        assert!(!a.from_cache);
        assert_eq!(fs::read(&a.path).unwrap(), b"\x7fELF first");
        let b = cached_vmlinux(&image).unwrap();
        assert!(b.from_cache);
        assert_eq!(a.path, b.path);

        // Rewriting the image (same size) must not serve the old kernel.
        fs::write(&image, fake_bzimage(b"\x7fELF other")).unwrap();
        let c = cached_vmlinux(&image).unwrap();
        assert_eq!(fs::read(&c.path).unwrap(), b"\x7fELF other");
        assert_ne!(a.path, c.path);
        fs::remove_dir_all(&root).unwrap();
    }
}
