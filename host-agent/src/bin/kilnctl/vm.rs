//! `kilnctl vm`: define, start, stop and watch VMs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::ctl::Ctl;

#[derive(Clone, Copy, ValueEnum)]
pub enum Policy {
    Never,
    OnFailure,
    Always,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define a VM from a spec file (-f, TOML or JSON: name and [spec]) or
    /// from flags.
    Create {
        /// The VM's name (with flags).
        name: Option<String>,
        /// A spec file: `name = "web"` and a `[spec]` table.
        #[arg(short = 'f', long, conflicts_with_all = ["image", "cpus", "memory", "nic", "disk", "restart"])]
        file: Option<PathBuf>,
        /// Kernel image to boot.
        #[arg(long)]
        image: Option<String>,
        /// Kernel command line (default: the image's).
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u64,
        /// A NIC on this network (repeatable).
        #[arg(long)]
        nic: Vec<String>,
        /// A disk on this volume (repeatable; /dev/vda, /dev/vdb, ... in order).
        #[arg(long)]
        disk: Vec<String>,
        #[arg(long, value_enum, default_value_t = Policy::Never)]
        restart: Policy,
    },
    /// Change a stopped VM's spec from a file (its generation is checked).
    Update {
        name: String,
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Start; waits until running unless --no-wait.
    Start {
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Graceful shutdown (power button), power-off after --timeout seconds;
    /// waits until stopped unless --no-wait.
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long)]
        no_wait: bool,
    },
    /// Power off at once.
    PowerOff {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Reboot the guest.
    Restart {
        name: String,
    },
    /// The serial console: attach from a terminal, otherwise print it.
    ///
    /// On a terminal (stdin and stdout), attach: what you type goes to the
    /// guest, Ctrl-] detaches and the VM keeps running (needs an admin
    /// token). Otherwise, or with --follow, print the recent output;
    /// --follow keeps printing. --attach attaches with any stdin.
    Console {
        name: String,
        /// Keep printing new output (read-only: no input).
        #[arg(long, conflicts_with = "attach")]
        follow: bool,
        /// Attach even when stdin is not a terminal: its bytes go to the
        /// guest; a 0x1d byte (Ctrl-]) or the end of stdin detaches.
        #[arg(long)]
        attach: bool,
    },
}

pub const VM_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("CPUS", "spec.vcpus"),
    ("MEMORY_MIB", "spec.memory_mib"),
    ("PID", "status.pid"),
    ("GEN", "generation"),
    ("REASON", "status.reason"),
];

fn read_spec(file: &std::path::Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("bad JSON in {}", file.display()))
    } else {
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("bad TOML in {}", file.display()))?;
        Ok(serde_json::to_value(v)?)
    }
}

pub async fn run(ctl: &Ctl, c: VmCmd) -> Result<()> {
    let p = |n: &str| format!("/v1/vms/{n}");
    match c {
        VmCmd::Create {
            name,
            file,
            image,
            cmdline,
            cpus,
            memory,
            nic,
            disk,
            restart,
        } => {
            let body = match file {
                Some(f) => read_spec(&f)?,
                None => {
                    let name =
                        name.ok_or_else(|| anyhow!("give a name and --image, or -f FILE"))?;
                    let image = image.ok_or_else(|| anyhow!("--image is required (or -f FILE)"))?;
                    let policy = match restart {
                        Policy::Never => "never",
                        Policy::OnFailure => "on_failure",
                        Policy::Always => "always",
                    };
                    json!({"name": name, "spec": {"vcpus": cpus, "memory_mib": memory,
                        "boot": {"image": image, "cmdline": cmdline},
                        "nics": nic.iter().map(|n| json!({"network": n})).collect::<Vec<_>>(),
                        "disks": disk.iter().map(|d| json!({"volume": d})).collect::<Vec<_>>(),
                        "restart_policy": policy}})
                }
            };
            ctl.print(
                &ctl.req(Method::POST, "/v1/vms", Some(body)).await?,
                VM_COLS,
            );
        }
        VmCmd::Update { name, file } => {
            let cur = ctl.req(Method::GET, &p(&name), None).await?;
            let mut body = read_spec(&file)?;
            if let Some(o) = body.as_object_mut() {
                o.remove("name");
                o.insert("generation".into(), cur["generation"].clone());
            }
            ctl.print(&ctl.req(Method::PUT, &p(&name), Some(body)).await?, VM_COLS);
        }
        VmCmd::List => ctl.print(&ctl.req(Method::GET, "/v1/vms", None).await?, VM_COLS),
        VmCmd::Show { name } => {
            let v = ctl.req(Method::GET, &p(&name), None).await?;
            if ctl.json {
                ctl.print(&v, &[])
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?)
            }
        }
        VmCmd::Delete { name } => {
            ctl.print(&ctl.req(Method::DELETE, &p(&name), None).await?, VM_COLS)
        }
        VmCmd::Start { name, no_wait } => {
            let mut v = ctl
                .req(Method::POST, &format!("{}/start", p(&name)), None)
                .await?;
            if !no_wait {
                v = ctl
                    .wait(&p(&name), &["running", "paused"], Duration::from_secs(120))
                    .await?;
            }
            ctl.print(&v, VM_COLS);
        }
        VmCmd::Shutdown {
            name,
            timeout,
            no_wait,
        } => {
            let mut v = ctl
                .req(
                    Method::POST,
                    &format!("{}/shutdown", p(&name)),
                    Some(json!({"timeout_secs": timeout})),
                )
                .await?;
            if !no_wait {
                v = ctl
                    .wait(&p(&name), &["stopped"], Duration::from_secs(timeout + 30))
                    .await?;
            }
            ctl.print(&v, VM_COLS);
        }
        VmCmd::PowerOff { name } => {
            ctl.req(Method::POST, &format!("{}/power-off", p(&name)), None)
                .await?;
            let v = ctl
                .wait(&p(&name), &["stopped"], Duration::from_secs(30))
                .await?;
            ctl.print(&v, VM_COLS);
        }
        VmCmd::Pause { name } => ctl.print(
            &ctl.req(Method::POST, &format!("{}/pause", p(&name)), None)
                .await?,
            VM_COLS,
        ),
        VmCmd::Resume { name } => ctl.print(
            &ctl.req(Method::POST, &format!("{}/resume", p(&name)), None)
                .await?,
            VM_COLS,
        ),
        VmCmd::Restart { name } => ctl.print(
            &ctl.req(Method::POST, &format!("{}/restart", p(&name)), None)
                .await?,
            VM_COLS,
        ),
        VmCmd::Console {
            name,
            follow,
            attach,
        } => crate::console::run(ctl, &name, follow, attach).await?,
    }
    Ok(())
}
