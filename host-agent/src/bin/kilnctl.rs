//! kilnctl: the command line of a Kiln node's agent.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use kiln_agent::client::{call, send, Endpoint};
use serde_json::{json, Value};

/// Talk to a Kiln node's agent: images, networks, VMs, tokens, events.
///
/// As root on the node no flag is needed (the agent's unix socket). From
/// elsewhere: --host https://NODE:7443 --ca ca.crt --token TOKEN (or
/// KILN_HOST, KILN_CA, KILN_TOKEN).
///
/// Exit status: 0 done; 1 failed (one line on stderr says why); 2 bad
/// arguments; 3 not found; 4 conflict (name taken, stale generation, wrong
/// state); 5 not authenticated or not allowed.
#[derive(Parser)]
#[command(name = "kilnctl", version, about, long_about)]
struct Cli {
    /// The agent: unix:PATH or https://HOST:PORT.
    #[arg(
        long,
        env = "KILN_HOST",
        default_value = "unix:/run/kiln/agent.sock",
        global = true
    )]
    host: String,
    /// Bearer token (needed over https).
    #[arg(long, env = "KILN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// CA certificate to trust for https (the node's /etc/kiln/pki/ca.crt).
    #[arg(long, env = "KILN_CA", global = true)]
    ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This node.
    Node,
    /// Images: kernels (with initramfs) and disk images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Networks (Linux bridges).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Volumes (replicated block devices in the node's kiln-store).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The event log.
    #[command(subcommand)]
    Event(EventCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import a kernel (--kernel, optional --initrd) or a disk image (--disk)
    /// from paths on the node; waits with a progress bar unless --no-wait.
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
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network: a bridge (default name kb-NAME).
    Create {
        name: String,
        #[arg(long)]
        bridge: Option<String>,
        /// An interface to connect the bridge to.
        #[arg(long)]
        uplink: Option<String>,
        /// A VLAN id on the uplink.
        #[arg(long, requires = "uplink")]
        vlan: Option<u16>,
        /// The node's address on the network, e.g. 10.7.0.1/24.
        #[arg(long)]
        address: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
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
    /// Take a snapshot, or delete one with --delete.
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        delete: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    Never,
    OnFailure,
    Always,
}

#[derive(Subcommand)]
enum VmCmd {
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
    /// Print the console's recent output; --follow keeps printing.
    Console {
        name: String,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum EventCmd {
    /// Events after --since.
    List {
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Print events as they happen (after --since, if given).
    Watch {
        #[arg(long)]
        since: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token; its value is printed once.
    Create {
        name: String,
        #[arg(long, default_value = "admin", value_parser = ["admin", "reader"])]
        role: String,
    },
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        name: String,
    },
}

/// An error with the exit status it should give.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Failure {}

struct Ctl {
    ep: Endpoint,
    token: Option<String>,
    json: bool,
}

impl Ctl {
    fn headers(&self) -> Vec<(&'static str, String)> {
        self.token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect()
    }

    async fn req(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let (status, bytes) = call(
            &self.ep,
            method,
            path,
            &self.headers(),
            body,
            Duration::from_secs(60),
        )
        .await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).context("the agent's answer is not JSON");
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{status}"));
        let code = match status {
            StatusCode::NOT_FOUND => 3,
            StatusCode::CONFLICT | StatusCode::PRECONDITION_REQUIRED => 4,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => 5,
            _ => 1,
        };
        Err(Failure { code, message }.into())
    }

    fn print(&self, v: &Value, columns: &[(&str, &str)]) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        let rows: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header(columns.iter().map(|(h, _)| h.to_string()));
        for r in rows {
            t.add_row(columns.iter().map(|(_, p)| field(r, p)));
        }
        println!("{t}");
    }

    /// Polls a resource until its state is one of `want`; fails on `failed`.
    async fn wait(&self, path: &str, want: &[&str], timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.req(Method::GET, path, None).await?;
            let state = v["status"]["state"].as_str().unwrap_or("");
            if want.contains(&state) {
                return Ok(v);
            }
            if state == "failed" {
                let reason = v["status"]["reason"].as_str().unwrap_or("no reason given");
                bail!("{} failed: {reason}", v["name"].as_str().unwrap_or(path));
            }
            if start.elapsed() > timeout {
                bail!("still {state} after {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A dotted path into JSON, as text.
fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

const IMAGE_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("KIND", "spec.source.kind"),
    ("BYTES", "status.bytes_total"),
    ("ID", "id"),
];
const NET_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("BRIDGE", "status.bridge"),
    ("ADDRESS", "spec.address"),
    ("ID", "id"),
];
const VM_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("CPUS", "spec.vcpus"),
    ("MEMORY_MIB", "spec.memory_mib"),
    ("PID", "status.pid"),
    ("GEN", "generation"),
    ("REASON", "status.reason"),
];
const EVENT_COLS: &[(&str, &str)] = &[
    ("SEQ", "seq"),
    ("TIME", "time"),
    ("KIND", "kind"),
    ("NAME", "name"),
    ("ACTION", "action"),
    ("STATE", "state"),
    ("MESSAGE", "message"),
];
const VOLUME_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("SIZE", "spec.size_bytes"),
    ("SOURCE", "spec.source.kind"),
    ("SNAPSHOTS", "status.snapshots"),
    ("GEN", "generation"),
    ("REASON", "status.reason"),
];
const TOKEN_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("ROLE", "spec.role"),
    ("CREATED", "created_at"),
    ("ID", "id"),
];

fn abs(p: &std::path::Path) -> Result<String> {
    let p = std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?;
    Ok(p.display().to_string())
}

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

async fn stream_body(
    resp: hyper::Response<hyper::body::Incoming>,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            f(&data)?;
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let ep = Endpoint::parse(&cli.host, cli.ca.as_deref())?;
    if matches!(ep, Endpoint::Tls { .. }) && cli.token.is_none() {
        bail!("https needs a token: --token or KILN_TOKEN");
    }
    let ctl = Ctl {
        ep,
        token: cli.token,
        json: cli.json,
    };
    let j = ctl.json;
    match cli.cmd {
        Cmd::Completions { .. } => unreachable!("handled before"),
        Cmd::Node => {
            let v = ctl.req(Method::GET, "/v1/node", None).await?;
            ctl.print(
                &v,
                &[
                    ("NAME", "name"),
                    ("ID", "id"),
                    ("VERSION", "version"),
                    ("CGROUP_V2", "cgroup_v2"),
                    ("CERT_SHA256", "cert_sha256"),
                ],
            );
        }
        Cmd::Image(c) => match c {
            ImageCmd::Import {
                name,
                kernel,
                initrd,
                cmdline,
                disk,
                no_wait,
            } => {
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
                        image_progress(&ctl, &name).await?
                    };
                }
                ctl.print(&v, IMAGE_COLS);
            }
            ImageCmd::List => {
                ctl.print(&ctl.req(Method::GET, "/v1/images", None).await?, IMAGE_COLS)
            }
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
        },
        Cmd::Network(c) => match c {
            NetworkCmd::Create {
                name,
                bridge,
                uplink,
                vlan,
                address,
            } => {
                let v = ctl.req(Method::POST, "/v1/networks", Some(json!({"name": name, "spec": {"bridge": bridge, "uplink": uplink, "vlan": vlan, "address": address}}))).await?;
                ctl.print(&v, NET_COLS);
            }
            NetworkCmd::List => {
                ctl.print(&ctl.req(Method::GET, "/v1/networks", None).await?, NET_COLS)
            }
            NetworkCmd::Show { name } => ctl.print(
                &ctl.req(Method::GET, &format!("/v1/networks/{name}"), None)
                    .await?,
                NET_COLS,
            ),
            NetworkCmd::Delete { name } => ctl.print(
                &ctl.req(Method::DELETE, &format!("/v1/networks/{name}"), None)
                    .await?,
                NET_COLS,
            ),
        },
        Cmd::Volume(c) => volume(&ctl, c).await?,
        Cmd::Vm(c) => vm(&ctl, c).await?,
        Cmd::Event(c) => match c {
            EventCmd::List { since } => ctl.print(
                &ctl.req(Method::GET, &format!("/v1/events?since={since}"), None)
                    .await?,
                EVENT_COLS,
            ),
            EventCmd::Watch { since } => {
                let path = match since {
                    Some(s) => format!("/v1/events/stream?since={s}"),
                    None => "/v1/events/stream".into(),
                };
                let resp = send(
                    &ctl.ep,
                    Method::GET,
                    &path,
                    &ctl.headers(),
                    None,
                    Duration::from_secs(10),
                )
                .await?;
                if !resp.status().is_success() {
                    bail!("the agent refused the event stream: {}", resp.status());
                }
                let mut pending = String::new();
                stream_body(resp, |chunk| {
                    pending.push_str(&String::from_utf8_lossy(chunk));
                    while let Some(i) = pending.find('\n') {
                        let line: String = pending.drain(..=i).collect();
                        if let Some(data) = line.trim_end().strip_prefix("data:") {
                            let e: Value = serde_json::from_str(data.trim())?;
                            if j {
                                println!("{}", serde_json::to_string(&e)?);
                            } else {
                                println!(
                                    "{:>6} {} {} {} {} {} {}",
                                    field(&e, "seq"),
                                    field(&e, "time"),
                                    field(&e, "kind"),
                                    field(&e, "name"),
                                    field(&e, "action"),
                                    field(&e, "state"),
                                    field(&e, "message")
                                );
                            }
                            std::io::stdout().flush()?;
                        }
                    }
                    Ok(())
                })
                .await?;
            }
        },
        Cmd::Token(c) => match c {
            TokenCmd::Create { name, role } => {
                let v = ctl
                    .req(
                        Method::POST,
                        "/v1/tokens",
                        Some(json!({"name": name, "spec": {"role": role}})),
                    )
                    .await?;
                if j {
                    ctl.print(&v, &[])
                } else {
                    eprintln!("token {name} ({role}); its value is shown only now:");
                    println!("{}", v["token"].as_str().unwrap_or(""));
                }
            }
            TokenCmd::List => {
                ctl.print(&ctl.req(Method::GET, "/v1/tokens", None).await?, TOKEN_COLS)
            }
            TokenCmd::Revoke { name } => ctl.print(
                &ctl.req(Method::DELETE, &format!("/v1/tokens/{name}"), None)
                    .await?,
                TOKEN_COLS,
            ),
        },
    }
    Ok(())
}

/// `10G`, `512M`, `4096`: binary multiples.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("bad size {s:?}: use a number with K, M, G or T"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| anyhow!("bad size {s:?}: use a number with K, M, G or T"))
}

async fn volume(ctl: &Ctl, c: VolumeCmd) -> Result<()> {
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

async fn vm(ctl: &Ctl, c: VmCmd) -> Result<()> {
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
        VmCmd::Console { name, follow } => {
            let path = format!("{}/console?follow={follow}", p(&name));
            let resp = send(
                &ctl.ep,
                Method::GET,
                &path,
                &ctl.headers(),
                None,
                Duration::from_secs(10),
            )
            .await?;
            if !resp.status().is_success() {
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                let message = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| status.to_string());
                let code = if status == StatusCode::NOT_FOUND {
                    3
                } else if status == StatusCode::CONFLICT {
                    4
                } else {
                    1
                };
                return Err(Failure { code, message }.into());
            }
            let mut out = std::io::stdout();
            stream_body(resp, |chunk| {
                out.write_all(chunk)?;
                out.flush()?;
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "kilnctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnctl: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Failure>().map(|f| f.code).unwrap_or(1);
            eprintln!("kilnctl: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
