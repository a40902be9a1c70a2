//! The local control socket: the daemon's whole API (create, delete,
//! attach, read and write any volume), so it is for root (or the daemon's
//! own user) only. At start the socket is made 0600 and its directory is
//! checked: one that others may write to (without the sticky bit) would
//! let them put their own socket in its place. Each connection's peer is
//! checked again (SO_PEERCRED).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::{Error, Result};

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `path`'s directory if missing (0755) and refuses one that
/// others may write to, unless it is sticky (as /tmp is).
fn check_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
    }
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", dir.display())))?;
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(Error::Invalid(format!(
            "{} is writable by other users (mode {:o}): they could replace the control \
             socket; use a directory only root can write",
            dir.display(),
            mode & 0o7777
        )));
    }
    if meta.uid() != 0 && meta.uid() != euid() && !sticky {
        return Err(Error::Invalid(format!(
            "{} belongs to uid {}, not to root or this daemon's user",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// Binds the control socket at `path`, 0600, after checking its directory.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_dir(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::Io(format!("cannot bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::Io(format!("cannot chmod {}: {e}", path.display())))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    if meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(Error::Invalid(format!(
            "{} is not this daemon's own 0600 socket (uid {}, mode {:o})",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(listener)
}

/// Is the peer of `s` root or this daemon's user?
pub fn peer_allowed(s: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given; both pointers
    // are to live locals of the right type and size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    rc == 0 && (cred.uid == 0 || cred.uid == euid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_0600_and_a_directory_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("run/store.sock");
        let l = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = UnixStream::connect(&sock).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(peer_allowed(&s));
        drop(c);

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&open.join("s.sock")).unwrap_err().to_string();
        assert!(err.contains("writable by other users"), "{err}");
        assert!(!open.join("s.sock").exists());
        // Sticky, like /tmp: others cannot replace what is ours there.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        bind(&open.join("s.sock")).unwrap();
    }
}
