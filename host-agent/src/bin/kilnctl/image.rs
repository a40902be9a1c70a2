//! `kilnctl image`: import, list, show, delete.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::ctl::Ctl;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Import a kernel (--kernel, optional --initrd) or a disk image
    /// (--disk). The agent reads the files from paths on the node; with
    /// --upload (the default over https) kilnctl sends them itself. Waits
    /// with a progress bar unless --no-wait.
    Import {
        name: String,
        #[arg(long, conflicts_with = "disk", required_unless_present = "disk")]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// The default kernel command line of VMs booting this image.
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Send the files over the API instead of naming paths on the node.
        #[arg(long)]
        upload: bool,
        #[arg(long, conflicts_with = "upload")]
        no_wait: bool,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

pub const IMAGE_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("KIND", "spec.source.kind"),
    ("BYTES", "status.bytes_total"),
    ("ID", "id"),
];

pub async fn run(ctl: &Ctl, c: ImageCmd) -> Result<()> {
    let j = ctl.json;
    match c {
        ImageCmd::Import {
            name,
            kernel,
            initrd,
            cmdline,
            disk,
            upload,
            no_wait,
        } => {
            if upload || matches!(ctl.ep, kiln_agent::client::Endpoint::Tls { .. }) {
                let files = match (kernel, initrd, disk) {
                    (Some(k), i, _) => {
                        let mut f = vec![("kernel", k)];
                        f.extend(i.map(|i| ("initrd", i)));
                        f
                    }
                    (None, _, Some(d)) => vec![("disk", d)],
                    (None, _, None) => bail!("give --kernel or --disk"),
                };
                let v = crate::upload::upload(ctl, &name, &files, cmdline).await?;
                ctl.print(&v, IMAGE_COLS);
                return Ok(());
            }
            let source = match (kernel, disk) {
                (Some(k), _) => {
                    json!({"kind": "kernel", "kernel": abs(&k)?, "initrd": initrd.as_deref().map(abs).transpose()?, "cmdline": cmdline})
                }
                (None, Some(d)) => json!({"kind": "disk", "path": abs(&d)?}),
                (None, None) => bail!("give --kernel or --disk"),
            };
            let mut v = ctl
                .req(
                    Method::POST,
                    "/v1/images",
                    Some(json!({"name": name, "spec": {"source": source}})),
                )
                .await?;
            if !no_wait {
                v = if j {
                    ctl.wait(
                        &format!("/v1/images/{name}"),
                        &["ready"],
                        Duration::from_secs(3600),
                    )
                    .await?
                } else {
                    image_progress(ctl, &name).await?
                };
            }
            ctl.print(&v, IMAGE_COLS);
        }
        ImageCmd::List => ctl.print(&ctl.req(Method::GET, "/v1/images", None).await?, IMAGE_COLS),
        ImageCmd::Show { name } => {
            let v = ctl
                .req(Method::GET, &format!("/v1/images/{name}"), None)
                .await?;
            if j {
                ctl.print(&v, &[])
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?)
            }
        }
        ImageCmd::Delete { name } => ctl.print(
            &ctl.req(Method::DELETE, &format!("/v1/images/{name}"), None)
                .await?,
            IMAGE_COLS,
        ),
    }
    Ok(())
}

pub fn abs(p: &std::path::Path) -> Result<String> {
    let p = std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?;
    Ok(p.display().to_string())
}

async fn image_progress(ctl: &Ctl, name: &str) -> Result<Value> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("importing {name}"));
    let path = format!("/v1/images/{name}");
    loop {
        let v = ctl.req(Method::GET, &path, None).await?;
        bar.set_length(v["status"]["bytes_total"].as_u64().unwrap_or(0));
        bar.set_position(v["status"]["bytes_done"].as_u64().unwrap_or(0));
        match v["status"]["state"].as_str() {
            Some("ready") => {
                bar.finish_and_clear();
                return Ok(v);
            }
            Some("failed") => {
                bar.abandon();
                bail!(
                    "import of {name} failed: {}",
                    v["status"]["reason"].as_str().unwrap_or("?")
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
