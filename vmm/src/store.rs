//! Disks on kiln-store volumes (`--disk volume=NAME,store=SOCKET`).
//!
//! The store daemon attaches the volume (becoming its writer) and serves it
//! as a vhost-user-blk backend on a socket next to its control socket;
//! kiln-vmm then connects to that socket like to any vhost-user backend.
//! The request goes through the `kiln-store` command, so that the VMM
//! carries none of the store's code or protocol. Attaching and exporting
//! are idempotent: a VM restarted on the same node gets the same socket.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {} to attach volume {name}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        name: String,
        source: std::io::Error,
    },
    #[error("kiln-store could not attach volume {name}: {reason}")]
    Attach { name: String, reason: String },
}

/// The `kiln-store` program: next to this executable if it is there (an
/// installation ships both), else from `PATH`.
fn program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kiln-store")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("kiln-store"))
}

/// Where the store serves volume `name` over vhost-user: beside its
/// control socket `store`.
pub fn vhost_socket(name: &str, store: &Path) -> PathBuf {
    store
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("kiln-vhost-{name}.sock"))
}

/// Has the store daemon at `store` attach volume `name` and export it over
/// vhost-user; returns the socket to connect to.
pub fn export_volume(name: &str, store: &Path) -> Result<PathBuf, Error> {
    let socket = vhost_socket(name, store);
    let program = program();
    let out = Command::new(&program)
        .args(["volume", "attach", name, "--vhost-user"])
        .arg(&socket)
        .arg("--socket")
        .arg(store)
        .output()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            name: name.to_string(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no reason given")
            .trim()
            .trim_start_matches("kiln-store: ")
            .to_string();
        return Err(Error::Attach {
            name: name.to_string(),
            reason,
        });
    }
    tracing::info!(volume = name, socket = %socket.display(), "kiln-store serves the volume");
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_socket_sits_beside_the_store_socket() {
        assert_eq!(
            vhost_socket("vm1", Path::new("/run/kiln/store.sock")),
            Path::new("/run/kiln/kiln-vhost-vm1.sock")
        );
    }
}
