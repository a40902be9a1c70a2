//! Listening Unix sockets (`--api-socket`, `--serial socket:`): private to
//! the owner, and replacing only a stale socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{option} {}: {what}: {source}", path.display())]
    Io {
        option: &'static str,
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{option} {}: another process is listening there", path.display())]
    InUse { option: &'static str, path: PathBuf },
    #[error("{option} {}: exists and is not a socket", path.display())]
    NotASocket { option: &'static str, path: PathBuf },
}

/// Binds a Unix socket at `path` (given by `option`), mode 0600. A stale
/// socket (nobody listening) is removed first; a live one or any other
/// file is left alone.
pub fn bind(option: &'static str, path: &Path) -> Result<UnixListener, Error> {
    let io_err = |what| {
        move |source| Error::Io {
            option,
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse {
                    option,
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(io_err("cannot remove the stale socket"))?;
        }
        Ok(_) => {
            return Err(Error::NotASocket {
                option,
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect it")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("cannot listen"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot make it private (0600)"))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = std::env::temp_dir().join(format!("kiln-socket-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let live = bind("--x", &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind("--x", &path), Err(Error::InUse { .. })));
        drop(live);
        let again = bind("--x", &path).unwrap();
        drop(again);
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = bind("--x", &file).unwrap_err();
        assert!(matches!(e, Error::NotASocket { .. }));
        assert!(e.to_string().starts_with("--x "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
