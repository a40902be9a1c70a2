//! Sealing and unsealing the KEK in short-lived child processes
//! (`kiln-agent tpm-seal`, `tpm-unseal`), so that what the TPM stack leaves
//! behind (libtss2's command and response buffers and stack frames, which
//! it does not wipe) dies with that process instead of lingering in the
//! agent's memory and core dumps. The key goes over pipes, to and from
//! locked memory.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::secret::Secret;
use crate::tpm::{PcrValues, SealedBlob, Tpm, TpmError};

/// The exit status of the child for a policy that does not match.
pub const POLICY_MISMATCH: i32 = 3;

/// How the unseal went.
pub enum Unsealed {
    Key(Secret<32>),
    /// The PCRs match no branch of the KEK's policy.
    PolicyMismatch,
    Failed(String),
}

/// Runs `exe tpm-unseal --tpm TCTI` with the blob on stdin. The caller
/// must not hold the TPM open (a swtpm serves one connection at a time).
pub fn in_child(exe: &Path, tcti: &str, blob: &SealedBlob) -> Unsealed {
    let child = Command::new(exe)
        .args(["tpm-unseal", "--tpm", tcti])
        .env("KILN_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Unsealed::Failed(format!("cannot run {}: {e}", exe.display())),
    };
    let json = serde_json::to_vec(blob).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    let mut key = Secret::<32>::zeroed();
    let read = child
        .stdout
        .take()
        .map(|mut out| out.read_exact(key.expose_mut()))
        .unwrap_or_else(|| Err(std::io::ErrorKind::BrokenPipe.into()));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => return Unsealed::Failed(format!("tpm-unseal: {e}")),
    };
    match (status.code(), read) {
        (Some(0), Ok(())) => Unsealed::Key(key),
        (Some(POLICY_MISMATCH), _) => Unsealed::PolicyMismatch,
        _ => Unsealed::Failed(format!("tpm-unseal ({status}): {}", err.trim())),
    }
}

/// The child's side: the blob from stdin, the key to stdout. Exit status
/// 0, [`POLICY_MISMATCH`], or 1 with the error on stderr.
pub fn child_main(tcti: Option<&str>) -> i32 {
    let mut json = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut json) {
        eprintln!("cannot read the sealed blob: {e}");
        return 1;
    }
    let blob: SealedBlob = match serde_json::from_slice(&json) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bad sealed blob: {e}");
            return 1;
        }
    };
    let r = Tpm::open(tcti).and_then(|t| t.unseal(&blob));
    match r {
        Ok(key) => {
            let mut out = std::io::stdout().lock();
            if out.write_all(&key).and_then(|_| out.flush()).is_err() {
                return 1;
            }
            0
        }
        Err(TpmError::PolicyMismatch { .. }) => POLICY_MISMATCH,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// What `tpm-seal` reads after the key.
#[derive(serde::Serialize, serde::Deserialize)]
struct SealSpec {
    pcrs: Vec<u8>,
    branches: Vec<PcrValues>,
}

/// Runs `exe tpm-seal --tpm TCTI`: the key, then the policy as JSON, on
/// stdin; the sealed blob (JSON) on stdout. The caller must not hold the
/// TPM open.
pub fn seal_in_child(
    exe: &Path,
    tcti: &str,
    key: &Secret<32>,
    pcrs: &[u8],
    branches: &[PcrValues],
) -> Result<SealedBlob, String> {
    let mut child = Command::new(exe)
        .args(["tpm-seal", "--tpm", tcti])
        .env("KILN_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let spec = serde_json::to_vec(&SealSpec {
        pcrs: pcrs.to_vec(),
        branches: branches.to_vec(),
    })
    .unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(key.expose());
        let _ = stdin.write_all(&spec);
    }
    let mut out = Vec::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| format!("tpm-seal: {e}"))?;
    if !status.success() {
        return Err(format!("tpm-seal ({status}): {}", err.trim()));
    }
    serde_json::from_slice(&out).map_err(|e| format!("tpm-seal answered badly: {e}"))
}

/// The child's side of [`seal_in_child`].
pub fn seal_child_main(tcti: Option<&str>) -> i32 {
    let mut key = Secret::<32>::zeroed();
    let mut stdin = std::io::stdin().lock();
    if let Err(e) = stdin.read_exact(key.expose_mut()) {
        eprintln!("cannot read the key: {e}");
        return 1;
    }
    let mut json = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut json) {
        eprintln!("cannot read the policy: {e}");
        return 1;
    }
    let spec: SealSpec = match serde_json::from_slice(&json) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bad policy: {e}");
            return 1;
        }
    };
    let r = Tpm::open(tcti).and_then(|t| t.seal(key.expose(), &spec.pcrs, &spec.branches));
    match r.map(|blob| serde_json::to_vec(&blob)) {
        Ok(Ok(json)) => {
            let mut out = std::io::stdout().lock();
            if out.write_all(&json).and_then(|_| out.flush()).is_err() {
                return 1;
            }
            0
        }
        Ok(Err(e)) => {
            eprintln!("{e}");
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
