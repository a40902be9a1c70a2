//! The state file: magic `KILNSNAP`, the format version (u32 LE), the
//! body's length (u64 LE), the body (JSON), and SHA-256 of everything
//! before it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"KILNSNAP";
/// The format this kiln-vmm writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this kiln-vmm reads.
pub const MIN_FORMAT: u32 = 1;

const HEADER_LEN: usize = 8 + 4 + 8;
const DIGEST_LEN: usize = 32;
/// A sanity bound on the body: a state file is kilobytes per vCPU and
/// device, never this.
const MAX_BODY: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: not a kiln-vmm snapshot (no KILNSNAP magic)")]
    NotASnapshot { path: PathBuf },
    #[error(
        "{path}: written by format {found}, this kiln-vmm reads {MIN_FORMAT}..={FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated ({len} bytes, the header says {expected})")]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{path}: {extra} bytes after the checksum: edited or corrupt")]
    Trailing { path: PathBuf, extra: u64 },
    #[error("{path}: checksum mismatch: edited or corrupt")]
    Checksum { path: PathBuf },
    #[error(
        "{path}: body of {len} bytes is larger than any snapshot's ({MAX_BODY}): edited or corrupt"
    )]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path}: the state does not fit this kiln-vmm at `{at}`: {source}")]
    Json {
        path: PathBuf,
        at: String,
        source: serde_json::Error,
    },
    #[error("cannot encode the state: {0}")]
    Encode(serde_json::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The whole file's bytes for `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(value).map_err(Error::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + DIGEST_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Checks and decodes a state file's bytes; `path` names it in errors.
/// Returns the format version it was written in and the value.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<(u32, T), Error> {
    let path_buf = || path.to_owned();
    let len = bytes.len() as u64;
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::NotASnapshot { path: path_buf() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated {
            path: path_buf(),
            len,
            expected: HEADER_LEN as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(MIN_FORMAT..=FORMAT_VERSION).contains(&version) {
        return Err(Error::Version {
            path: path_buf(),
            found: version,
        });
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if body_len > MAX_BODY {
        return Err(Error::TooLarge {
            path: path_buf(),
            len: body_len,
        });
    }
    let expected = HEADER_LEN as u64 + body_len + DIGEST_LEN as u64;
    if len < expected {
        return Err(Error::Truncated {
            path: path_buf(),
            len,
            expected,
        });
    }
    if len > expected {
        return Err(Error::Trailing {
            path: path_buf(),
            extra: len - expected,
        });
    }
    let end = HEADER_LEN + body_len as usize;
    if Sha256::digest(&bytes[..end]).as_slice() != &bytes[end..] {
        return Err(Error::Checksum { path: path_buf() });
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes[HEADER_LEN..end]);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| Error::Json {
        path: path_buf(),
        at: e.path().to_string(),
        source: e.into_inner(),
    })?;
    Ok((version, value))
}

/// Writes `value` to `path` (mode 0600): to a temporary name in the same
/// directory first, synced, then renamed over `path` and the directory
/// synced, so that `path` is either the old file or the whole new one.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let bytes = encode(value)?;
    write_atomically(path, |f| f.write_all(&bytes))
}

/// Reads and checks the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<(u32, T), Error> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(path, &bytes)
}

/// The temporary name `path` is written under before its rename.
pub(super) fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ))
}

/// Creates `path`'s temporary twin (0600, replacing a stale one), lets
/// `fill` write it, syncs it and renames it into place. On failure the
/// temporary file is removed and `path` is untouched.
pub(super) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), Error> {
    let tmp = temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Syncs the directory holding `path` (making a rename durable).
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Body {
        name: String,
        vcpus: Vec<u32>,
        #[serde(default)]
        added_later: u32,
    }

    fn body() -> Body {
        Body {
            name: "vm".into(),
            vcpus: vec![1, 2],
            added_later: 7,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("kiln-snap-format-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_state_file_round_trips_and_is_private() {
        let dir = scratch("roundtrip");
        let p = dir.join("state");
        write(&p, &body()).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read::<Body>(&p).unwrap(), (FORMAT_VERSION, body()));
        // Overwriting leaves no temporary file behind.
        write(&p, &body()).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let p = Path::new("/snap/state");
        let good = encode(&body()).unwrap();
        let msg = |bytes: &[u8]| decode::<Body>(p, bytes).unwrap_err().to_string();

        assert!(msg(b"#!/bin/sh\necho hi\n").contains("not a kiln-vmm snapshot"));
        assert!(msg(b"").contains("truncated"));
        assert!(msg(&good[..5]).contains("truncated"));
        for cut in [HEADER_LEN - 1, HEADER_LEN + 3, good.len() - 1] {
            assert!(msg(&good[..cut]).contains("truncated"), "{cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(msg(&longer).contains("edited or corrupt"));
        // Any one byte of the body or the digest flipped.
        for at in [HEADER_LEN, HEADER_LEN + 10, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            assert!(
                msg(&bad).contains("checksum mismatch: edited or corrupt"),
                "{at}"
            );
        }
        let mut future = good.clone();
        future[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            msg(&future),
            format!(
                "/snap/state: written by format {}, this kiln-vmm reads {MIN_FORMAT}..={FORMAT_VERSION}",
                FORMAT_VERSION + 1
            )
        );
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(msg(&huge).contains("larger than any snapshot"));
    }

    /// A body that checks out but does not fit the type names where.
    #[test]
    fn a_body_of_another_shape_says_where() {
        #[derive(Serialize)]
        struct Other {
            name: String,
            vcpus: Vec<&'static str>,
        }
        let bytes = encode(&Other {
            name: "vm".into(),
            vcpus: vec!["one"],
        })
        .unwrap();
        let e = decode::<Body>(Path::new("s"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`vcpus[0]`"), "{e}");
        // A field added since (with its serde default) is not needed.
        #[derive(Serialize)]
        struct Older {
            name: String,
            vcpus: Vec<u32>,
        }
        let old = encode(&Older {
            name: "a".into(),
            vcpus: vec![],
        })
        .unwrap();
        assert_eq!(
            decode::<Body>(Path::new("s"), &old).unwrap().1.added_later,
            0
        );
    }
}
