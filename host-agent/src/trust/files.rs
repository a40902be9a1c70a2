//! What the trust module keeps on disk, in `<data>/agent/trust/`. None of
//! it is secret in the clear, except the KEK of a node initialized with
//! `--insecure-no-tpm`, which every report then flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::measure::Measured;
use super::wrap::Wrapped;
use crate::tpm::{AkBlobs, SealedBlob};

/// `identity.json`: the TPM's keys, or the fact that there is no TPM.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct IdentityFile {
    /// False: initialized with `--insecure-no-tpm`.
    pub tpm: bool,
    pub ek_public_pem: Option<String>,
    /// DER of the EK certificate (hex), where the TPM has one.
    pub ek_cert: Option<String>,
    pub ak: Option<AkBlobs>,
    pub ak_public_pem: Option<String>,
    pub created_at: String,
}

/// `kek.json`: the KEK sealed, and wrapped by the recovery key.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct KekFile {
    /// The KEK's fingerprint.
    pub id: String,
    pub sealed: Option<SealedBlob>,
    /// Kiln's files as they were measured when the KEK was sealed, to name
    /// what changed when it does not unseal.
    #[serde(default)]
    pub sealed_files: Vec<Measured>,
    pub recovery: Wrapped,
    /// Only with `--insecure-no-tpm`: the KEK itself (hex).
    #[serde(default)]
    pub insecure_plain: Option<String>,
    pub updated_at: String,
}

pub fn dir(agent_dir: &Path) -> PathBuf {
    agent_dir.join("trust")
}

pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("bad {}", path.display()))
}

/// Writes `value` to `path` atomically (temporary file, fsync, rename),
/// mode 0600.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(value)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
