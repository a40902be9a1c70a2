//! `kilnctl trust` (the node's TPM, sealed key and measurements) and
//! `kilnctl policy` (which images VMs may start from).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::ctl::Ctl;

#[derive(Subcommand)]
pub enum TrustCmd {
    /// The node's TPM, measurement mode, and whether its encrypted volumes
    /// are locked (and which PCR and file changed).
    Status,
    /// Unlock encrypted volumes with the recovery key shown at init, after
    /// the node's measurements changed (the key is read from the file, or
    /// from stdin; never give it on the command line).
    Unlock {
        #[arg(long, value_name = "FILE")]
        recovery_key_file: Option<PathBuf>,
    },
    /// Seal the key-encryption key to the measurements as they are now:
    /// after an approved update, so the next start unlocks by itself.
    Reseal,
    /// Make a new key-encryption key: every volume key is wrapped again
    /// (no data is touched) and a new recovery key is shown once.
    RotateKek,
}

const TRUST_COLS: &[(&str, &str)] = &[
    ("TPM", "tpm"),
    ("MEASUREMENT", "measurement_mode"),
    ("LOCKED", "locked"),
    ("KEK", "kek_id"),
    ("REASON", "reason"),
];

pub async fn run(ctl: &Ctl, c: TrustCmd) -> Result<()> {
    match c {
        TrustCmd::Status => {
            let v = ctl.req(Method::GET, "/v1/node/trust", None).await?;
            if v["insecure_no_tpm"] == true && !ctl.json {
                eprintln!("WARNING: this node runs with --insecure-no-tpm: it cannot attest and its key-encryption key is on its disk");
            }
            ctl.print(&v, TRUST_COLS);
        }
        TrustCmd::Unlock { recovery_key_file } => {
            let key = match recovery_key_file {
                Some(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                None => {
                    eprint!("recovery key: ");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line
                }
            };
            let key = key.trim().to_string();
            if key.is_empty() {
                bail!("no recovery key given");
            }
            let v = ctl
                .req(
                    Method::POST,
                    "/v1/node/unlock",
                    Some(json!({ "recovery_key": key })),
                )
                .await?;
            ctl.print(&v, TRUST_COLS);
        }
        TrustCmd::Reseal => {
            let v = ctl.req(Method::POST, "/v1/node/reseal", None).await?;
            ctl.print(&v, TRUST_COLS);
        }
        TrustCmd::RotateKek => {
            let v = ctl.req(Method::POST, "/v1/node/rotate-kek", None).await?;
            if ctl.json {
                ctl.print(&v, &[]);
            } else {
                println!(
                    "new key-encryption key {} wraps {} volume keys",
                    v["kek_id"].as_str().unwrap_or_default(),
                    v["volume_keys"]
                );
                println!("new recovery key (shown once; the old one no longer works):");
                println!("{}", v["recovery_key"].as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// The image policy: its mode and approved digests.
    Show,
    /// VMs whose kernel, initrd or base disk image is not approved do not
    /// start.
    Enforce,
    /// VMs start anyway; an event records each unapproved image.
    Audit,
    /// Approve the files of images (by name or id) or SHA-256 digests.
    Approve {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Withdraw approval of the files of images or digests.
    Revoke {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

const POLICY_PATH: &str = "/v1/policies/images";

/// The digests an argument stands for: itself if it is one, else the
/// files of the image it names.
async fn digests(ctl: &Ctl, arg: &str) -> Result<Vec<(String, String)>> {
    if arg.len() == 64 && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(vec![(arg.to_ascii_lowercase(), String::new())]);
    }
    let img = ctl
        .req(Method::GET, &format!("/v1/images/{arg}"), None)
        .await?;
    let files = img["status"]["files"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if files.is_empty() {
        bail!("image {arg} has no files yet (is it still importing?)");
    }
    let name = img["name"].as_str().unwrap_or(arg);
    Ok(files
        .iter()
        .filter_map(|f| {
            Some((
                f["sha256"].as_str()?.to_string(),
                format!("{} of image {name}", f["role"].as_str().unwrap_or("file")),
            ))
        })
        .collect())
}

fn print_policy(ctl: &Ctl, v: &Value) {
    if ctl.json {
        ctl.print(v, &[]);
        return;
    }
    println!(
        "mode: {} (generation {})",
        v["spec"]["mode"].as_str().unwrap_or("?"),
        v["generation"]
    );
    let approved = v["spec"]["approved"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if approved.is_empty() {
        println!("no image is approved");
    }
    for a in approved {
        println!(
            "  {}  {}",
            a["sha256"].as_str().unwrap_or_default(),
            a["note"].as_str().unwrap_or_default()
        );
    }
}

pub async fn run_policy(ctl: &Ctl, c: PolicyCmd) -> Result<()> {
    let cur = ctl.req(Method::GET, POLICY_PATH, None).await?;
    let mut spec = cur["spec"].clone();
    match c {
        PolicyCmd::Show => {
            print_policy(ctl, &cur);
            return Ok(());
        }
        PolicyCmd::Enforce => spec["mode"] = json!("enforce"),
        PolicyCmd::Audit => spec["mode"] = json!("audit"),
        PolicyCmd::Approve { images } => {
            let list = spec["approved"].as_array_mut().context("bad policy")?;
            for i in images {
                for (d, note) in digests(ctl, &i).await? {
                    if !list.iter().any(|a| a["sha256"] == d.as_str()) {
                        list.push(json!({"sha256": d, "note": (!note.is_empty()).then_some(note)}));
                    }
                }
            }
        }
        PolicyCmd::Revoke { images } => {
            let mut gone = Vec::new();
            for i in images {
                gone.extend(digests(ctl, &i).await?.into_iter().map(|(d, _)| d));
            }
            let list = spec["approved"].as_array_mut().context("bad policy")?;
            list.retain(|a| !gone.iter().any(|d| a["sha256"] == d.as_str()));
        }
    }
    let v = ctl
        .req(
            Method::PUT,
            POLICY_PATH,
            Some(json!({"generation": cur["generation"], "spec": spec})),
        )
        .await?;
    print_policy(ctl, &v);
    Ok(())
}
