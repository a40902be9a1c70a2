//! `kilnctl attest`: check what a node booted and runs, from anywhere.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use hyper::Method;
use kiln_agent::attest::{verify, CheckStatus, Evidence, ReferencePolicy, Report};
use rand::RngCore;

use crate::ctl::{Ctl, Failure};

#[derive(Subcommand)]
pub enum AttestCmd {
    /// Check a node's TPM quote and event logs.
    ///
    /// Asks the node for evidence over a fresh random 32-byte nonce (GET
    /// /v1/node/attestation?nonce=HEX), then checks, with no TPM needed
    /// here: the quote's signature by the node's attestation key (AK); that
    /// the quote answers our nonce (a replayed old quote fails as Stale, an
    /// edited nonce field as NonceEdited); that the reported PCR values are
    /// the quoted ones; that the firmware, IMA and Kiln event logs replay to
    /// them (an edited log fails as LogReplayMismatch). With --policy it
    /// also checks the AK is the node's, the firmware PCRs, and every
    /// measured file's digest (a replaced binary fails as FileChanged,
    /// naming the PCR, the path, the expected and the found digest).
    /// Without --policy only freshness and self-consistency are proven:
    /// anyone's TPM could have made the quote.
    ///
    /// Offline, on any machine: --evidence FILE --nonce HEX checks evidence
    /// saved with --out-evidence against the nonce it was asked for.
    ///
    /// Prints one line per check and one per failure; exits 1 when any
    /// check fails.
    Verify(VerifyArgs),
    /// Write a reference policy from a known-good node.
    ///
    /// Fetches evidence over a fresh nonce, verifies it, and writes (mode
    /// 0644) the node's AK, its firmware PCR values (0-7) and the digest of
    /// every file its logs measured, for later `attest verify --policy`.
    /// Refuses when the evidence itself does not verify or the node has no
    /// TPM. Run it only on a node you trust as it is now.
    Policy {
        /// Where to write the policy (JSON).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also save the evidence the policy was made from.
        #[arg(long, value_name = "FILE")]
        out_evidence: Option<PathBuf>,
    },
}

impl AttestCmd {
    /// Verifies saved evidence: needs no node, so no token.
    pub fn is_offline(&self) -> bool {
        matches!(self, AttestCmd::Verify(a) if a.evidence.is_some())
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Reference policy (from `kilnctl attest policy`) to judge the AK,
    /// PCR values and measured files against.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Save the evidence fetched from the node (JSON), to verify again
    /// elsewhere with --evidence and --nonce.
    #[arg(long, value_name = "FILE", conflicts_with = "evidence")]
    out_evidence: Option<PathBuf>,
    /// Verify saved evidence instead of asking the node (offline).
    #[arg(long, value_name = "FILE", requires = "nonce")]
    evidence: Option<PathBuf>,
    /// The nonce (hex) the saved evidence was asked for: our challenge.
    #[arg(long, value_name = "HEX", requires = "evidence")]
    nonce: Option<String>,
}

pub async fn run(ctl: &Ctl, cmd: AttestCmd) -> Result<()> {
    match cmd {
        AttestCmd::Verify(a) => {
            let policy = a.policy.as_deref().map(read_policy).transpose()?;
            let (evidence, nonce) = match (&a.evidence, &a.nonce) {
                (Some(path), Some(nonce)) => {
                    let nonce = hex::decode(nonce.trim()).context("--nonce is not hex")?;
                    (read_json::<Evidence>(path, "evidence")?, nonce)
                }
                _ => {
                    let nonce = fresh_nonce();
                    (fetch(ctl, &nonce).await?, nonce)
                }
            };
            if let Some(path) = &a.out_evidence {
                write_file(path, &serde_json::to_vec_pretty(&evidence)?, 0o644)?;
            }
            let report = verify(&evidence, &nonce, policy.as_ref());
            print_report(ctl, &report, policy.is_some());
            if !report.ok() {
                return Err(Failure {
                    code: 1,
                    message: format!(
                        "attestation of {} failed: {}",
                        report.node.name,
                        summary(&report)
                    ),
                }
                .into());
            }
        }
        AttestCmd::Policy { out, out_evidence } => {
            let nonce = fresh_nonce();
            let evidence = fetch(ctl, &nonce).await?;
            if let Some(path) = &out_evidence {
                write_file(path, &serde_json::to_vec_pretty(&evidence)?, 0o644)?;
            }
            let report = verify(&evidence, &nonce, None);
            if !report.ok() {
                print_report(ctl, &report, false);
                bail!(
                    "not writing a policy: the evidence does not verify ({})",
                    summary(&report)
                );
            }
            let policy = ReferencePolicy::from_evidence(&evidence)
                .map_err(|r| anyhow::anyhow!("not writing a policy: {}", summary(&r)))?;
            let mut json = serde_json::to_vec_pretty(&policy)?;
            json.push(b'\n');
            write_file(&out, &json, 0o644)?;
            if ctl.json {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                println!(
                    "wrote {}: AK sha256:{}, PCRs {:?}, {} files",
                    out.display(),
                    report.ak_sha256.as_deref().unwrap_or("?"),
                    policy.pcrs.keys().collect::<Vec<_>>(),
                    policy.files.len()
                );
            }
        }
    }
    Ok(())
}

fn fresh_nonce() -> Vec<u8> {
    let mut n = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn fetch(ctl: &Ctl, nonce: &[u8]) -> Result<Evidence> {
    let path = format!("/v1/node/attestation?nonce={}", hex::encode(nonce));
    let v = ctl.req(Method::GET, &path, None).await?;
    serde_json::from_value(v).context("the agent's evidence is not in the expected format")
}

fn summary(r: &Report) -> String {
    let mut kinds: Vec<&str> = r.failures.iter().map(|f| f.kind()).collect();
    kinds.dedup();
    format!("{} failure(s): {}", r.failures.len(), kinds.join(", "))
}

fn print_report(ctl: &Ctl, r: &Report, with_policy: bool) {
    if ctl.json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    println!(
        "node {} ({}), measurement mode: {}",
        r.node.name, r.node.id, r.measurement_mode
    );
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(["CHECK", "RESULT", "DETAIL"]);
    for c in &r.checks {
        let status = match c.status {
            CheckStatus::Pass => "pass",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skipped => "skipped",
        };
        t.add_row([c.name.as_str(), status, c.detail.as_str()]);
    }
    println!("{t}");
    for f in &r.failures {
        println!("FAIL {f}");
    }
    if r.ok() {
        if with_policy {
            println!("OK: the node's evidence verifies and matches the policy");
        } else {
            println!(
                "OK: fresh and self-consistent; without --policy the AK and files are not judged"
            );
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not {what} JSON", path.display()))
}

fn read_policy(path: &Path) -> Result<ReferencePolicy> {
    read_json(path, "a reference policy")
}

/// Writes through a temporary file and a rename, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp-kilnctl");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
