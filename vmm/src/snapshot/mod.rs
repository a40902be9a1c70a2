//! Snapshot directories (docs/snapshots.md): `DIR/state`, the machine and
//! device state in a versioned, checksummed file ([`format`]), and
//! `DIR/memory`, guest RAM, sparse, mapped back `MAP_PRIVATE` on restore
//! ([`memory`]).

pub mod format;
pub mod memory;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::vstate::memory::Backing;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot state: {0}")]
    State(#[from] format::Error),
    #[error("snapshot memory: {0}")]
    Memory(#[from] memory::Error),
    #[error("cannot create the snapshot directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a snapshot id: {0}")]
    Id(getrandom::Error),
}

/// What `DIR/state` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// A random id, also in the memory file's header: a memory file from
    /// another snapshot is refused.
    #[serde(with = "hex_id")]
    pub id: u128,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// The vCPUs, in index order.
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// The devices' state (their serde types, owned by `devices/`).
    #[serde(default)]
    pub devices: serde_json::Value,
    /// The VM's configuration (vCPU count, memory, kernel, devices' ids).
    #[serde(default)]
    pub config: serde_json::Value,
}

/// A fresh random snapshot id.
pub fn new_id() -> Result<u128, Error> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(Error::Id)?;
    Ok(u128::from_le_bytes(b))
}

/// The id as 32 hex digits: JSON numbers do not hold 128 bits everywhere.
mod hex_id {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{id:032x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 32 {
            return Err(D::Error::custom("a snapshot id is 32 hex digits"));
        }
        u128::from_str_radix(&s, 16).map_err(D::Error::custom)
    }
}

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct SaveStats {
    pub memory: memory::WriteStats,
}

/// Writes a snapshot into `dir` (created 0700 if missing): RAM to
/// `dir/memory`, then `snap` to `dir/state`, each 0600, through a
/// temporary name and a rename. On failure neither new file is left (an
/// older snapshot in `dir` may then have lost its memory file: restoring
/// it fails with a clear error, not silently). Call with the VM paused and
/// the devices quiesced; `snap.id` must be fresh ([`new_id`]).
pub fn save(dir: &Path, snap: &VmSnapshot, mem: &GuestMemoryMmap) -> Result<SaveStats, Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Dir {
            path: dir.to_owned(),
            source,
        })?;
    let memory_path = dir.join(MEMORY_FILE);
    let stats = memory::write(&memory_path, mem, snap.id)?;
    if let Err(e) = format::write(&dir.join(STATE_FILE), snap) {
        let _ = std::fs::remove_file(&memory_path);
        return Err(e.into());
    }
    Ok(SaveStats { memory: stats })
}

/// Reads and checks `dir/state`.
pub fn load(dir: &Path) -> Result<VmSnapshot, Error> {
    Ok(format::read(&dir.join(STATE_FILE))?.1)
}

/// Guest RAM for restoring `snap` from `dir/memory`: mapped `MAP_PRIVATE`
/// from the file, or for [`Backing::SharedMemfd`] (a vhost-user backend
/// must map the same pages) copied into a new memfd.
pub fn restore_memory(
    dir: &Path,
    snap: &VmSnapshot,
    backing: Backing,
) -> Result<GuestMemoryMmap, Error> {
    let path = dir.join(MEMORY_FILE);
    Ok(match backing {
        Backing::Anonymous => memory::map_private(&path, snap.id, snap.memory_size)?,
        Backing::SharedMemfd => memory::copy_into_memfd(&path, snap.id, snap.memory_size)?,
    })
}

#[cfg(test)]
mod tests;
