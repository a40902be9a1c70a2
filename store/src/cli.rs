//! Command line: `kiln-store serve` and `kiln-store volume ...`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_store::meta::ReplicaAddr;
use kiln_store::proto::{Request, Response, ScrubReport, VolumeStatus};
use kiln_store::{Client, VolumeClient, VolumeIo, MAX_IO};

#[derive(Parser)]
#[command(
    name = "kiln-store",
    version,
    about = "Kiln's replicated local block store: volumes mirrored synchronously to 1-3 nodes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the daemon: serve this node's replicas (TCP) and the local CLI (unix socket)
    Serve(ServeArgs),
    /// Manage volumes through the local daemon
    Volume(VolumeArgs),
    /// Certificates for daemons run without the host agent
    #[command(subcommand)]
    Tls(TlsCmd),
}

#[derive(Subcommand)]
pub enum TlsCmd {
    /// Make a new CA and a certificate for each node id (DIR/ca.crt,
    /// DIR/NODE.crt, DIR/NODE.key; keys 0600), for `serve --tls-cert
    /// DIR/NODE.crt --tls-key DIR/NODE.key --tls-ca DIR/ca.crt`. Copy each
    /// node's pair (and ca.crt, never ca.key) to that node. Under the host
    /// agent, use the agent's node certificate instead.
    Init {
        /// Where to write them (created if missing; nothing is overwritten)
        #[arg(long)]
        dir: PathBuf,
        /// Node ids, as given to `serve --node-id`
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("security")
        .required(true)
        .args(["tls_cert", "insecure"])
))]
pub struct ServeArgs {
    /// This node's id (as named in replica sets)
    #[arg(long)]
    pub node_id: String,
    /// A data directory (one per disk); repeat for several. The first holds the metadata database
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Address for node-to-node traffic, e.g. 0.0.0.0:7001
    #[arg(long)]
    pub listen: String,
    /// This node's certificate (PEM), for mutual TLS with the other nodes;
    /// it must name the node id as a DNS name (the host agent's node
    /// certificate does: /etc/kiln/pki/node.crt)
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): only peers with a certificate of this CA
    /// are served, and only they are dialled
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Plain, unauthenticated TCP for experiments: then --listen must be a
    /// loopback address
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
    /// Unix socket for the local CLI and block I/O (its directory is created
    /// if missing)
    #[arg(long, default_value = kiln_store::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Background scrub rate (bytes per second, K/M/G suffixes; 0 turns it off)
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    pub scrub_rate: u64,
    /// Seconds to pause before each background scrub pass
    #[arg(long, default_value_t = 3600)]
    pub scrub_interval: u64,
    /// Seconds after which a peer's connection that sent nothing is closed
    /// (writers open a new one after 300 s idle, so keep it above that)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub peer_idle_timeout: u64,
    /// Microseconds a small write polls for its replicas' answers before
    /// its thread sleeps, when it is the only replicated request in flight
    /// on this node (waking a sleeping thread costs about as long as the
    /// answer takes on a virtual machine); 0 never polls. Busier nodes
    /// never poll, whatever this says
    #[arg(long, default_value_t = kiln_store::transport::poll::DEFAULT_REPLY_POLL.as_micros() as u64, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub reply_poll_us: u64,
}

#[derive(Args)]
pub struct VolumeArgs {
    /// The local daemon's socket
    #[arg(
        long,
        global = true,
        env = "KILN_STORE_SOCKET",
        default_value = kiln_store::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// Print JSON instead of tables; a failure is then also reported on
    /// stdout, as {"error": "..."}
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: VolumeCmd,
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume on the given replicas and attach it here
    Create {
        name: String,
        /// Size, e.g. 10G (multiple of 4 KiB)
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// A replica as NODE=HOST:PORT; give 1 to 3
        #[arg(long = "replica", required = true, value_parser = parse_replica)]
        replicas: Vec<ReplicaAddr>,
        /// Encrypt the volume (XTS-AES-256) with the key in this file:
        /// exactly 64 bytes, mode 0600. Keys are never taken on the
        /// command line
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// List the volumes this node holds or writes
    List,
    /// Show a volume: replicas and their state, snapshots, counters
    Show { name: String },
    /// Delete a volume and its snapshots on every replica
    Delete { name: String },
    /// Grow or shrink a volume
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Take a point-in-time snapshot (or delete one with --delete)
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        delete: bool,
    },
    /// Create volume NEW from snapshot NAME@SNAPSHOT without copying
    Clone {
        name: String,
        snapshot: String,
        new: String,
    },
    /// Add a replica on another node (optionally replacing one), filled online
    Rebuild {
        name: String,
        /// The new replica, NODE=HOST:PORT
        #[arg(long, value_parser = parse_replica)]
        add: ReplicaAddr,
        /// A replica to drop from the set
        #[arg(long)]
        remove: Option<String>,
    },
    /// Verify every block of every replica now, repairing from healthy copies
    Scrub { name: String },
    /// Wait until every replica is in sync, showing the resync's progress
    WaitSync {
        name: String,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Fill a volume from a raw image
    Import {
        name: String,
        #[arg(long)]
        from: PathBuf,
    },
    /// Copy a volume's contents to a raw image
    Export {
        name: String,
        #[arg(long)]
        to: PathBuf,
    },
    /// Become this volume's writer (raises its epoch, fencing any other writer)
    Attach {
        name: String,
        /// Attach even if only a minority of the replicas answer. They may all
        /// have missed writes that only the unreachable ones know about
        #[arg(long)]
        force: bool,
        /// Also serve the volume to a VM as a vhost-user-blk backend on this
        /// unix socket (for `kiln-vmm --disk vhost-user=SOCK`); without a
        /// path, on kiln-vhost-NAME.sock beside the daemon's socket (what
        /// `kiln-vmm --disk volume=NAME` asks for). One VM at a time; it may
        /// disconnect and reconnect. `detach` stops it. With --json, the
        /// volume's status gains "vhost_user": "<socket>"
        #[arg(long, value_name = "SOCK")]
        #[allow(clippy::option_option)]
        vhost_user: Option<Option<PathBuf>>,
        /// With --vhost-user: queues offered to the VM (1-64; it uses as
        /// many as it likes up to this, typically one per vCPU)
        #[arg(long, value_name = "N", requires = "vhost_user", default_value_t = kiln_store::vhost_blk::config::DEFAULT_QUEUES)]
        queues: u16,
        /// With --vhost-user: export read-only (VIRTIO_BLK_F_RO; writes get
        /// an I/O error)
        #[arg(long, requires = "vhost_user")]
        read_only: bool,
        /// An encrypted volume's key file (64 bytes, mode 0600)
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The new key of an interrupted rekey (resumes it)
        #[arg(long, value_name = "FILE", requires = "key_file")]
        next_key_file: Option<PathBuf>,
    },
    /// Re-encrypt an attached encrypted volume with a new key, online,
    /// showing progress (refused while the volume has snapshots)
    Rekey {
        name: String,
        /// The new key file (64 bytes, mode 0600)
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// Stop being this volume's writer (and stop its vhost-user export)
    Detach { name: String },
}

/// Parses sizes like 4096, 64K, 512M, 1G, 2T (binary units; "iB"/"B"
/// allowed; a bare number is bytes): `kiln_units::parse_size`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_units::parse_size(s, kiln_units::Bare::Bytes).map_err(|e| e.to_string())
}

fn parse_replica(s: &str) -> Result<ReplicaAddr, String> {
    let (node, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("bad replica {s:?}: use NODE=HOST:PORT"))?;
    kiln_store::validate_name(node).map_err(|e| e.to_string())?;
    if addr.rsplit_once(':').is_none() {
        return Err(format!("bad replica address {addr:?}: use HOST:PORT"));
    }
    Ok(ReplicaAddr {
        node: node.to_string(),
        addr: addr.to_string(),
    })
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A progress bar on stderr (hidden when stderr is no terminal), redrawn
/// twice a second: enough to watch, and little for a serial console, where
/// every redraw is bytes the emulated UART sends one at a time.
fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(2));
    b.set_style(
        ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

fn read_key(path: &std::path::Path) -> Result<kiln_store::crypt::VolumeKey> {
    Ok(kiln_store::crypt::VolumeKey::from_file(path)?)
}

fn print_status(s: &VolumeStatus) {
    println!("name:       {}", s.name);
    println!("size:       {}", human(s.size));
    println!("epoch:      {}", s.epoch);
    println!(
        "writer:     {}",
        if s.fenced {
            "this node (FENCED)"
        } else if s.attached {
            "this node"
        } else {
            "elsewhere"
        }
    );
    println!("allocated:  {} (this node)", human(s.allocated_bytes));
    match (&s.key_check, &s.rekey) {
        (None, _) => println!("encrypted:  no"),
        (Some(k), None) => println!("encrypted:  XTS-AES-256, key check {k}"),
        (Some(k), Some(r)) => println!(
            "encrypted:  XTS-AES-256, key check {k}; rekey to {} at {} of {}",
            r.next_key_check,
            human(r.done),
            human(r.total)
        ),
    }
    println!(
        "snapshots:  {}",
        if s.snapshots.is_empty() {
            "-".to_string()
        } else {
            s.snapshots.join(", ")
        }
    );
    println!(
        "resynced:   {} in {} regions; repaired {} blocks; {} checksum errors",
        human(s.resync_bytes),
        s.resync_regions,
        s.repaired_blocks,
        s.checksum_errors
    );
    println!(
        "this node:  {} checksum errors, {} blocks repaired by scrub, {} scrubbed",
        s.node.checksum_errors,
        s.node.scrub_repaired_blocks,
        human(s.node.scrubbed_bytes)
    );
    println!();
    println!(
        "{:<16} {:<22} {:<10} {:>6}",
        "NODE", "ADDRESS", "STATE", "DIRTY"
    );
    for r in &s.replicas {
        println!(
            "{:<16} {:<22} {:<10} {:>6}",
            r.node, r.addr, r.state, r.dirty_regions
        );
    }
}

fn print_scrub(r: &ScrubReport) {
    println!(
        "scanned {}; {} bad blocks, {} repaired, {} unrepaired; {} regions compared across \
         replicas, {} differed (copied from the writer's)",
        human(r.scanned_bytes),
        r.bad_blocks.len(),
        r.repaired,
        r.unrepaired,
        r.compared_regions,
        r.diverged_regions
    );
}

pub fn volume(a: VolumeArgs) -> Result<()> {
    let connect = || Client::connect(&a.socket).map_err(anyhow::Error::from);
    let json = a.json;
    let show = |resp: Response| -> Result<()> {
        match resp {
            Response::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
            Response::Status(s) => print_status(&s),
            Response::Volumes(v) if json => println!("{}", serde_json::to_string_pretty(&v)?),
            Response::Volumes(v) => {
                println!(
                    "{:<24} {:>10} {:>6} {:<9} {:>10} REPLICAS",
                    "NAME", "SIZE", "EPOCH", "WRITER", "ALLOCATED"
                );
                for s in v {
                    let reps: Vec<String> = s
                        .replicas
                        .iter()
                        .map(|r| format!("{}({})", r.node, r.state))
                        .collect();
                    println!(
                        "{:<24} {:>10} {:>6} {:<9} {:>10} {}",
                        s.name,
                        human(s.size),
                        s.epoch,
                        if s.fenced {
                            "fenced"
                        } else if s.attached {
                            "here"
                        } else {
                            "-"
                        },
                        human(s.allocated_bytes),
                        reps.join(" ")
                    );
                }
            }
            Response::Scrub(r) if json => println!("{}", serde_json::to_string_pretty(&r)?),
            Response::Scrub(r) => print_scrub(&r),
            Response::Ok if json => println!("{{\"ok\": true}}"),
            Response::Ok => {}
            other => bail!("unexpected reply from the daemon: {other:?}"),
        }
        Ok(())
    };
    let simple = |req: Request| -> Result<()> { show(connect()?.call(&req)?) };
    match a.cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
            key_file,
        } => simple(Request::VolCreate {
            name,
            size,
            replicas,
            key: key_file.as_deref().map(read_key).transpose()?,
        }),
        VolumeCmd::List => simple(Request::VolList),
        VolumeCmd::Show { name } => simple(Request::VolShow { name }),
        VolumeCmd::Delete { name } => simple(Request::VolDelete { name }),
        VolumeCmd::Resize { name, size } => simple(Request::VolResize { name, size }),
        VolumeCmd::Snapshot {
            name,
            snapshot,
            delete,
        } => simple(if delete {
            Request::VolDeleteSnapshot {
                name,
                snap: snapshot,
            }
        } else {
            Request::VolSnapshot {
                name,
                snap: snapshot,
            }
        }),
        VolumeCmd::Clone {
            name,
            snapshot,
            new,
        } => simple(Request::VolClone {
            name,
            snap: snapshot,
            new,
        }),
        VolumeCmd::Attach {
            name,
            force,
            vhost_user,
            queues,
            read_only,
            key_file,
            next_key_file,
        } => {
            let attach = Request::VolAttach {
                name: name.clone(),
                force,
                key: key_file.as_deref().map(read_key).transpose()?,
                next_key: next_key_file.as_deref().map(read_key).transpose()?,
            };
            let Some(sock) = vhost_user else {
                return show(connect()?.call(&attach)?);
            };
            let sock = sock.unwrap_or_else(|| kiln_store::vhost_socket_beside(&a.socket, &name));
            let socket = std::path::absolute(&sock)
                .with_context(|| format!("bad socket path {}", sock.display()))?;
            // One request: the daemon checks the export first and undoes
            // its attach if the export fails.
            let r = connect()?.call(&attach.with_export(
                socket.display().to_string(),
                queues,
                read_only,
            ))?;
            if json {
                // The volume's status, plus where it is served.
                let mut v = match r {
                    Response::Status(s) => serde_json::to_value(&s)?,
                    Response::Ok => serde_json::json!({ "ok": true }),
                    other => return show(other),
                };
                v["vhost_user"] = serde_json::json!(socket);
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("vhost-user-blk: {}", socket.display());
            show(r)
        }
        VolumeCmd::Detach { name } => simple(Request::VolDetach { name }),
        VolumeCmd::Rebuild { name, add, remove } => {
            let b = bar(0, "rebuild");
            let r = connect()?.call_with_progress(
                &Request::VolRebuild { name, add, remove },
                &mut |p| {
                    b.set_length(p.total);
                    b.set_position(p.done);
                },
            )?;
            b.finish_and_clear();
            show(r)
        }
        VolumeCmd::Rekey { name, key_file } => {
            let key = read_key(&key_file)?;
            let b = bar(0, "rekey");
            let r = connect()?.call_with_progress(&Request::VolRekey { name, key }, &mut |p| {
                b.set_length(p.total);
                b.set_position(p.done);
            })?;
            b.finish_and_clear();
            show(r)
        }
        VolumeCmd::Scrub { name } => {
            let b = bar(0, "scrub");
            let r = connect()?.call_with_progress(&Request::VolScrub { name }, &mut |p| {
                b.set_length(p.total);
                b.set_position(p.done);
            })?;
            b.finish_and_clear();
            show(r)
        }
        VolumeCmd::WaitSync { name, timeout } => {
            let mut c = connect()?;
            let b = bar(0, "resync");
            let start = std::time::Instant::now();
            let mut most = 0u64;
            loop {
                let st = match c.call(&Request::VolShow { name: name.clone() })? {
                    Response::Status(s) => s,
                    other => bail!("unexpected reply from the daemon: {other:?}"),
                };
                if !st.attached {
                    bail!("{name} is not attached on this node; resync runs on its writer");
                }
                if st.fenced {
                    bail!("{name} was fenced by a newer writer");
                }
                if st.replicas.iter().all(|r| r.state == "in-sync") {
                    b.finish_and_clear();
                    return show(Response::Status(st));
                }
                let dirty: u64 = st.replicas.iter().map(|r| r.dirty_regions).sum();
                most = most.max(dirty);
                b.set_length(most);
                b.set_position(most - dirty);
                if start.elapsed().as_secs() >= timeout {
                    bail!("replicas of {name} still not in sync after {timeout} s");
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        VolumeCmd::Import { name, from } => {
            let f = File::open(&from).with_context(|| format!("cannot open {}", from.display()))?;
            let len = f.metadata()?.len();
            let v = VolumeClient::open(&a.socket, &name)?;
            let size = v.size()?;
            if len > size {
                bail!(
                    "{} is {} but volume {name} is only {}",
                    from.display(),
                    human(len),
                    human(size)
                );
            }
            let b = bar(len, "import");
            let mut buf = vec![0u8; MAX_IO as usize];
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(MAX_IO) as usize;
                f.read_exact_at(&mut buf[..n], off)?;
                if buf[..n].iter().all(|b| *b == 0) {
                    v.discard(off, n as u64)?;
                } else {
                    v.write_at(&buf[..n], off)?;
                }
                off += n as u64;
                b.set_position(off);
            }
            v.flush()?;
            b.finish_and_clear();
            if !json {
                println!("imported {} into {name}", human(len));
            } else {
                println!("{{\"ok\": true, \"bytes\": {len}}}");
            }
            Ok(())
        }
        VolumeCmd::Export { name, to } => {
            let v = VolumeClient::open(&a.socket, &name)?;
            let size = v.size()?;
            let f = File::create(&to).with_context(|| format!("cannot create {}", to.display()))?;
            let b = bar(size, "export");
            let mut buf = vec![0u8; MAX_IO as usize];
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(MAX_IO) as usize;
                v.read_at(&mut buf[..n], off)?;
                f.write_all_at(&buf[..n], off)?;
                off += n as u64;
                b.set_position(off);
            }
            f.sync_all()?;
            b.finish_and_clear();
            if json {
                println!("{{\"ok\": true, \"bytes\": {size}}}");
            }
            Ok(())
        }
    }
}
