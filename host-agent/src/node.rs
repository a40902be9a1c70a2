//! The node's identity and `kiln-agent init`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::db::{Db, Note};
use crate::model::{now, Role};
use crate::paths::Paths;
use crate::{auth, pki};

/// `agent/node.json`: who this node is.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

pub fn node_file(paths: &Paths) -> PathBuf {
    paths.agent_dir().join("node.json")
}

pub fn load(paths: &Paths) -> Result<NodeRecord> {
    let f = node_file(paths);
    let text = std::fs::read_to_string(&f).with_context(|| {
        format!(
            "this node is not initialized ({} is missing): run `kiln-agent init` first",
            f.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("bad {}", f.display()))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kiln-node".to_string())
}

pub struct InitOptions {
    pub name: Option<String>,
    /// Extra DNS names / IP addresses for the node certificate.
    pub san: Vec<String>,
    /// Take this certificate and key instead of making a CA.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// The TPM (default: the kernel's).
    pub tcti: Option<String>,
    /// No TPM: no attestation, the KEK on disk.
    pub insecure_no_tpm: bool,
    /// Kiln's files, measured before the KEK is sealed.
    pub software: crate::trust::Software,
}

/// What `init` made: the admin token, to show once.
pub struct Initialized {
    pub node: NodeRecord,
    pub admin_token: String,
    /// The recovery key, to show once.
    pub trust: crate::trust::InitTrust,
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .with_context(|| format!("cannot create {}", p.display()))
}

/// Initializes a node: its identity, TLS key and certificate, state
/// database and first admin token. Refuses an initialized node; on a
/// failure removes what it made.
pub fn init(paths: &Paths, opts: &InitOptions) -> Result<Initialized> {
    if node_file(paths).exists() || paths.database().exists() {
        bail!(
            "this node is already initialized (state in {}); nothing was changed",
            paths.agent_dir().display()
        );
    }
    let name = opts.name.clone().unwrap_or_else(hostname);
    crate::validate::name("node", &name).map_err(|e| anyhow::anyhow!(e.message))?;
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<Initialized> {
        let agent_dir = paths.agent_dir();
        let new_agent_dir = !agent_dir.exists();
        mkdir(&paths.data, 0o755)?;
        mkdir(&agent_dir, 0o700)?;
        if new_agent_dir {
            made.push(agent_dir.clone());
        }
        match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                mkdir(&paths.pki, 0o755)?;
                for (src, dst, mode) in [(cert, pki::NODE_CERT, 0o644), (key, pki::NODE_KEY, 0o600)]
                {
                    let data = std::fs::read(src)
                        .with_context(|| format!("cannot read {}", src.display()))?;
                    let to = paths.pki.join(dst);
                    pki::write_new(&to, mode, &data)?;
                    made.push(to);
                }
                let ca = opts.ca.as_ref().unwrap_or(cert);
                let data =
                    std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
                let to = paths.pki.join(pki::CA_CERT);
                pki::write_new(&to, 0o644, &data)?;
                made.push(to);
                pki::server_config(&paths.pki)?;
            }
            (None, None) => made.extend(pki::create(&paths.pki, &name, &opts.san)?),
            _ => bail!("--cert and --key go together"),
        }
        let trust_dir = crate::trust::files_dir(&agent_dir);
        if !trust_dir.exists() {
            made.push(trust_dir);
        }
        let trust = crate::trust::Trust::init(
            paths,
            opts.tcti.as_deref(),
            opts.insecure_no_tpm,
            &opts.software,
        )?;
        let node = NodeRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            created_at: now(),
        };
        let db = Db::open(&paths.database())?;
        made.push(paths.database());
        let (token, value) = auth::generate("admin", Role::Admin);
        db.create(
            &token,
            Note::with("created", "first admin token, made by init"),
        )?;
        drop(db);
        pki::write_new(&node_file(paths), 0o600, &serde_json::to_vec_pretty(&node)?)?;
        Ok(Initialized {
            node,
            admin_token: value,
            trust,
        })
    })();
    if result.is_err() {
        for p in made.iter().rev() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
    result
}
