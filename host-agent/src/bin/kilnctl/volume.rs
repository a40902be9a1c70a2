//! `kilnctl volume`: create, resize, snapshot, delete.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::json;

use crate::ctl::Ctl;

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: blank, from a disk image (--image) or as a clone of
    /// a snapshot (--from VOLUME@SNAPSHOT); waits until ready unless --no-wait.
    Create {
        name: String,
        /// Size with a K, M, G or T suffix (binary), e.g. 10G.
        #[arg(long)]
        size: String,
        #[arg(long, conflicts_with = "from")]
        image: Option<String>,
        #[arg(long, value_name = "VOLUME@SNAPSHOT")]
        from: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Grow or shrink a volume no running VM uses.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Re-encrypt a volume with a new key, online (its VM keeps running),
    /// showing progress; refused while it has snapshots.
    Rekey {
        name: String,
        /// Return at once; `volume show` reports progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a snapshot, or delete one with --delete.
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        delete: bool,
    },
}

pub const VOLUME_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("SIZE", "spec.size_bytes"),
    ("SOURCE", "spec.source.kind"),
    ("SNAPSHOTS", "status.snapshots"),
    ("ENCRYPTED", "status.encrypted"),
    ("GEN", "generation"),
    ("REASON", "status.reason"),
];

/// `10G`, `512M`, `4096` (bytes): binary multiples (`kiln_units`).
fn parse_size(s: &str) -> Result<u64> {
    kiln_units::parse_size(s, kiln_units::Bare::Bytes).map_err(|e| anyhow!("--size: {e}"))
}

pub async fn run(ctl: &Ctl, c: VolumeCmd) -> Result<()> {
    let p = |n: &str| format!("/v1/volumes/{n}");
    match c {
        VolumeCmd::Create {
            name,
            size,
            image,
            from,
            no_wait,
        } => {
            let source = match (image, from) {
                (Some(i), _) => json!({"kind": "image", "image": i}),
                (None, Some(f)) => {
                    let (v, s) = f
                        .split_once('@')
                        .ok_or_else(|| anyhow!("--from wants VOLUME@SNAPSHOT"))?;
                    json!({"kind": "snapshot", "volume": v, "snapshot": s})
                }
                (None, None) => json!({"kind": "blank"}),
            };
            let body =
                json!({"name": name, "spec": {"size_bytes": parse_size(&size)?, "source": source}});
            let mut v = ctl.req(Method::POST, "/v1/volumes", Some(body)).await?;
            if !no_wait {
                v = ctl
                    .wait(&p(&name), &["ready"], Duration::from_secs(3600))
                    .await?;
            }
            ctl.print(&v, VOLUME_COLS);
        }
        VolumeCmd::List => ctl.print(
            &ctl.req(Method::GET, "/v1/volumes", None).await?,
            VOLUME_COLS,
        ),
        VolumeCmd::Show { name } => {
            let v = ctl.req(Method::GET, &p(&name), None).await?;
            if ctl.json {
                ctl.print(&v, &[])
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?)
            }
        }
        VolumeCmd::Delete { name } => ctl.print(
            &ctl.req(Method::DELETE, &p(&name), None).await?,
            VOLUME_COLS,
        ),
        VolumeCmd::Resize { name, size } => {
            let cur = ctl.req(Method::GET, &p(&name), None).await?;
            let body = json!({"generation": cur["generation"], "size_bytes": parse_size(&size)?});
            ctl.print(
                &ctl.req(Method::POST, &format!("{}/resize", p(&name)), Some(body))
                    .await?,
                VOLUME_COLS,
            );
        }
        VolumeCmd::Rekey { name, no_wait } => {
            let mut v = ctl
                .req(Method::POST, &format!("{}/rekey", p(&name)), None)
                .await?;
            if !no_wait {
                v = wait_rekey(ctl, &p(&name)).await?;
            }
            ctl.print(&v, VOLUME_COLS);
        }
        VolumeCmd::Snapshot {
            name,
            snapshot,
            delete,
        } => {
            let v = if delete {
                ctl.req(
                    Method::DELETE,
                    &format!("{}/snapshots/{snapshot}", p(&name)),
                    None,
                )
                .await?
            } else {
                ctl.req(
                    Method::POST,
                    &format!("{}/snapshots", p(&name)),
                    Some(json!({"name": snapshot})),
                )
                .await?
            };
            ctl.print(&v, VOLUME_COLS);
        }
    }
    Ok(())
}

/// Follows a rekey with a progress bar until the volume has no rekey
/// running; says how it ended (the last event's words).
async fn wait_rekey(ctl: &Ctl, path: &str) -> Result<serde_json::Value> {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "re-encrypting {bar:40} {bytes}/{total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let v = ctl.req(Method::GET, path, None).await?;
        match v["status"]["rekey"].as_object() {
            Some(r) => {
                bar.set_length(r["total"].as_u64().unwrap_or(0));
                bar.set_position(r["done"].as_u64().unwrap_or(0));
            }
            None => {
                bar.finish_and_clear();
                if let Some(reason) = v["status"]["reason"].as_str() {
                    bail!("{reason}");
                }
                eprintln!("re-encrypted with a new key");
                return Ok(v);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
