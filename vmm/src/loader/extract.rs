//! The host-side vmlinux cache: each bzImage is decompressed once, and its
//! ELF kept under a name derived from the image's SHA-256, so a changed
//! image can never be served a stale kernel.

use std::fs;
use std::io::Write;
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

/// Returns the vmlinux inside the bzImage at `path`, extracting it into the
/// cache on first use.
pub fn cached_vmlinux(path: &Path) -> Result<Extracted, Error> {
    let image = fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let header = bzimage::setup_header_of(&image)?;
    let dir = cache_dir().ok_or(Error::NoCacheDir)?.join("vmlinux");
    let digest = Sha256::digest(&image);
    let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let target = dir.join(format!("{name}.elf"));
    if target.is_file() {
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
        .and_then(|mut f| f.write_all(&vmlinux).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, &target));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(Extracted {
        path: target,
        header,
        from_cache: false,
    })
}
