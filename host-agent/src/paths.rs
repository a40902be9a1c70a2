//! Where a node keeps things: one default each, defined here and nowhere
//! else (see shared/ARCHITECTURE.md). Every path can be moved by a flag or
//! an environment variable, so tests never touch the real defaults.

use std::path::{Path, PathBuf};

/// Persistent state: the agent's database, images, the store's data.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kiln";
/// Runtime state: sockets and per-VM directories (gone at reboot).
pub const DEFAULT_RUN_DIR: &str = "/run/kiln";
/// The node's key, certificate and CA bundle.
pub const DEFAULT_PKI_DIR: &str = "/etc/kiln/pki";
/// The agent's TCP (TLS) listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";

#[derive(Clone, Debug)]
pub struct Paths {
    pub data: PathBuf,
    pub run: PathBuf,
    pub pki: PathBuf,
}

impl Paths {
    pub fn new(data: impl Into<PathBuf>, run: impl Into<PathBuf>, pki: impl Into<PathBuf>) -> Self {
        Paths {
            data: data.into(),
            run: run.into(),
            pki: pki.into(),
        }
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.data.join("agent")
    }
    pub fn database(&self) -> PathBuf {
        self.agent_dir().join("state.redb")
    }
    /// Content-addressed image blobs: `images/sha256/<digest>`.
    pub fn image_blobs(&self) -> PathBuf {
        self.data.join("images").join("sha256")
    }
    pub fn image_blob(&self, digest: &str) -> PathBuf {
        self.image_blobs().join(digest)
    }
    /// Imports in progress (same file system as the blobs, for rename).
    pub fn image_tmp(&self) -> PathBuf {
        self.data.join("images").join("tmp")
    }
    pub fn store_data(&self) -> PathBuf {
        self.data.join("store")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run.join("agent.sock")
    }
    pub fn store_socket(&self) -> PathBuf {
        self.run.join("store.sock")
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.run.join("vms")
    }
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }
    pub fn node_cert(&self) -> PathBuf {
        self.pki.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.pki.join("node.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.pki.join("ca.crt")
    }
}

/// A VM's runtime files, all inside its runtime directory.
pub struct VmRunDir<'a>(pub &'a Path);

impl VmRunDir<'_> {
    pub fn api_socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("pid")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
}
