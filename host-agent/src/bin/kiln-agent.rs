//! kiln-agent: the host agent of a Kiln node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_agent::api::{self, AppState};
use kiln_agent::db::Db;
use kiln_agent::model::{now, NodeInfo};
use kiln_agent::paths::{self, Paths};
use kiln_agent::store::Store;
use kiln_agent::supervisor::Supervisor;
use kiln_agent::trust::{Software, Trust};
use kiln_agent::{node, pki, server};

/// The host agent of a Kiln node: its images, networks and VMs behind an
/// authenticated HTTP/JSON API (see `kilnctl`).
///
/// First `kiln-agent init` (once per node: identity, TLS key and
/// certificate, the first admin token), then `kiln-agent serve`. VMs keep
/// running when the agent stops, is killed or is replaced; a new agent
/// re-adopts them.
#[derive(Parser)]
#[command(name = "kiln-agent", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    dirs: Dirs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Dirs {
    /// Persistent state (database, images, store data).
    #[arg(long, env = "KILN_DATA_DIR", default_value = paths::DEFAULT_DATA_DIR, global = true)]
    data_dir: PathBuf,
    /// Runtime state (sockets, per-VM directories).
    #[arg(long, env = "KILN_RUN_DIR", default_value = paths::DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    /// The node's TLS key, certificate and CA.
    #[arg(long, env = "KILN_PKI_DIR", default_value = paths::DEFAULT_PKI_DIR, global = true)]
    pki_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialize this node: its identity, a node CA and TLS certificate
    /// (or the ones given), the state database, and the first admin token,
    /// which is printed once and stored only as a hash.
    Init {
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Another DNS name or IP address for the node certificate
        /// (repeatable; localhost, 127.0.0.1 and ::1 are always in it).
        #[arg(long = "san", value_name = "NAME")]
        san: Vec<String>,
        /// Use this certificate (PEM) instead of making a node CA.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The private key (PEM) of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// The CA that issued --cert (default: --cert itself).
        #[arg(long, requires = "cert")]
        ca: Option<PathBuf>,
        #[command(flatten)]
        tpm: TpmArgs,
        /// Run without a TPM: no attestation, and the key that wraps every
        /// volume key is stored on this disk unprotected. For machines
        /// that have none; every report of this node says so.
        #[arg(long)]
        insecure_no_tpm: bool,
        #[command(flatten)]
        programs: Programs,
    },
    /// Serve the API and supervise the VMs.
    Serve {
        /// TCP address of the TLS listener ("none" for the unix socket only).
        #[arg(long, default_value = paths::DEFAULT_LISTEN)]
        listen: String,
        #[command(flatten)]
        programs: Programs,
        #[command(flatten)]
        tpm: TpmArgs,
        /// Replication address of a store daemon the agent starts (mutual
        /// TLS with the node's certificate; peers need one of its CA)
        #[arg(long, default_value = "127.0.0.1:7001")]
        store_listen: String,
    },
    /// Seal the node's key-encryption key to the measurements as they are
    /// now, after an approved update (agent stopped; while it runs use
    /// `kilnctl node reseal`). If the KEK no longer unseals, give the
    /// recovery key shown at init.
    Reseal {
        /// A file holding the recovery key (else it is read from stdin
        /// when the KEK does not unseal).
        #[arg(long, value_name = "FILE")]
        recovery_key_file: Option<PathBuf>,
        #[command(flatten)]
        programs: Programs,
        #[command(flatten)]
        tpm: TpmArgs,
    },
    /// Print the OpenAPI document of the API.
    Openapi,
    /// (internal) Unseal the KEK: the sealed blob on stdin, the key on
    /// stdout. `serve` runs it, so that the TPM stack's leftovers die with
    /// this process.
    #[command(hide = true)]
    TpmUnseal {
        #[command(flatten)]
        tpm: TpmArgs,
    },
    /// (internal) Seal the KEK: the key and the policy on stdin, the sealed
    /// blob on stdout.
    #[command(hide = true)]
    TpmSeal {
        #[command(flatten)]
        tpm: TpmArgs,
    },
}

#[derive(clap::Args)]
struct TpmArgs {
    /// The TPM, as a TCTI: device:/dev/tpmrm0 (the kernel's, default) or
    /// swtpm:host=127.0.0.1,port=2321 (a software TPM, for tests).
    #[arg(long = "tpm", env = "KILN_TPM", value_name = "TCTI")]
    tcti: Option<String>,
}

/// Kiln's programs: run by the agent, and measured (with the agent itself)
/// into the PCR its key-encryption key is sealed to.
#[derive(clap::Args)]
struct Programs {
    /// The kiln-vmm program (default: beside kiln-agent, else on PATH).
    #[arg(long, env = "KILN_VMM")]
    vmm: Option<PathBuf>,
    /// The kiln-store program, for the store daemon the agent starts
    /// when none answers on <run-dir>/store.sock (default: beside
    /// kiln-agent, else on PATH).
    #[arg(long, env = "KILN_STORE")]
    store: Option<PathBuf>,
}

impl Programs {
    fn vmm(&self) -> PathBuf {
        self.vmm.clone().unwrap_or_else(|| beside_me("kiln-vmm"))
    }
    fn store(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| beside_me("kiln-store"))
    }
    fn software(&self, paths: &Paths) -> Software {
        Software::of(paths, &on_path(&self.vmm()), &on_path(&self.store()))
    }
}

/// A bare program name as the file PATH finds, to measure it.
fn on_path(p: &std::path::Path) -> PathBuf {
    if p.components().count() > 1 {
        return p.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(p))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| p.to_path_buf())
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

async fn serve(
    paths: Paths,
    listen: String,
    vmm: PathBuf,
    store: Store,
    trust: Arc<Trust>,
) -> Result<()> {
    let record = node::load(&paths)?;
    let tls = pki::server_config(&paths.pki)?;
    let db = Arc::new(Db::open(&paths.database()).with_context(|| {
        format!(
            "cannot open the state database {} (is another kiln-agent running?)",
            paths.database().display()
        )
    })?);
    let store = Arc::new(Store {
        node: record.name.clone(),
        ..store
    });
    {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.ensure_running()).await? {
            Ok(()) => {}
            Err(e) => tracing::warn!("volumes are unavailable: {e:#}"),
        }
    }
    let sup = Supervisor::new(db.clone(), store.clone(), trust.clone(), paths.clone(), vmm);
    let info = NodeInfo {
        id: record.id,
        name: record.name,
        version: env!("CARGO_PKG_VERSION").to_string(),
        build: build_id(),
        started_at: now(),
        cert_sha256: pki::cert_sha256(&paths.pki)?,
        cgroup_v2: sup.cgroup_v2(),
        insecure_no_tpm: trust.insecure(),
    };
    if !info.cgroup_v2 {
        tracing::warn!("cgroup v2 is not available: VMs run without cpu and memory limits");
    }
    let node = Arc::new(info);
    tokio::spawn(
        store
            .clone()
            .supervise(db.clone(), node.clone(), Duration::from_secs(2)),
    );
    let state = AppState {
        db: db.clone(),
        paths: paths.clone(),
        node,
        sup: sup.clone(),
        store,
        trust,
    };
    let unix = server::bind_unix(&paths.agent_socket())?;
    let tcp = if listen == "none" {
        None
    } else {
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("bad --listen {listen:?}"))?;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        )
    };
    sup.reconcile().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Imports that an earlier agent left unfinished start over.
    for image in db.list::<kiln_agent::model::Image>()? {
        if image.status.state == kiln_agent::model::ImageState::Importing {
            let (db, paths) = (db.clone(), paths.clone());
            tokio::task::spawn_blocking(move || {
                kiln_agent::images::run_import(db, paths, image.meta.id)
            });
        }
    }
    tracing::info!(
        "kiln-agent serving on {}{}",
        paths.agent_socket().display(),
        tcp.as_ref()
            .and_then(|t| t.local_addr().ok())
            .map(|a| format!(" and https://{a}"))
            .unwrap_or_default()
    );
    let unix_task = tokio::spawn(server::serve_unix(unix, api::router(state.clone(), false)));
    if let Some(tcp) = tcp {
        tokio::spawn(server::serve_tls(tcp, tls, api::router(state, true)));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = unix_task => {}
    }
    tracing::info!("kiln-agent stopping; VMs keep running");
    Ok(())
}

fn reseal(
    paths: &Paths,
    tcti: Option<&str>,
    software: Software,
    recovery_key_file: Option<PathBuf>,
) -> Result<()> {
    let trust = Trust::open(paths, tcti, software)?;
    if trust.status().locked {
        let text = match recovery_key_file {
            Some(f) => std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?,
            None => {
                eprintln!(
                    "{}\nrecovery key: ",
                    trust.status().reason.unwrap_or_default()
                );
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line
            }
        };
        trust.unlock(&text)?;
    }
    trust.reseal()?;
    println!(
        "the key-encryption key {} is sealed to this node's measurements as they are now",
        trust.status().kek_id
    );
    Ok(())
}

fn main() -> ExitCode {
    kiln_crash::abort_on_panic();
    // libtss2 prints its own WARNING/ERROR lines on stderr for failures the
    // agent expects and reports itself (a policy that no longer matches);
    // its error codes still reach the agent.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                // tss-esapi logs every context it opens and closes at info.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let paths = Paths::new(cli.dirs.data_dir, cli.dirs.run_dir, cli.dirs.pki_dir);
    let r = match cli.cmd {
        Cmd::Init {
            name,
            san,
            cert,
            key,
            ca,
            tpm,
            insecure_no_tpm,
            programs,
        } => node::init(
            &paths,
            &node::InitOptions {
                name,
                san,
                cert,
                key,
                ca,
                tcti: tpm.tcti,
                insecure_no_tpm,
                software: programs.software(&paths),
            },
        )
        .map(|done| {
            println!("node {} ({}) initialized", done.node.name, done.node.id);
            println!(
                "CA certificate for clients: {}",
                paths.pki.join(pki::CA_CERT).display()
            );
            if done.trust.insecure_no_tpm {
                println!("WARNING: no TPM (--insecure-no-tpm): this node cannot attest, and the key that wraps its volume keys is stored unprotected on this disk");
            }
            println!("admin token (shown once, stored only as a hash):");
            println!("{}", done.admin_token);
            println!("recovery key (shown once: keep it away from this node; it unlocks the encrypted volumes when the measurements change):");
            println!("{}", done.trust.recovery_key);
        }),
        Cmd::Reseal {
            recovery_key_file,
            programs,
            tpm,
        } => reseal(&paths, tpm.tcti.as_deref(), programs.software(&paths), recovery_key_file),
        Cmd::Serve {
            listen,
            programs,
            tpm,
            store_listen,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| {
                let trust = Arc::new(Trust::open(&paths, tpm.tcti.as_deref(), programs.software(&paths))?);
                let store = Store {
                    socket: paths.store_socket(),
                    program: programs.store(),
                    data: paths.store_data(),
                    listen: store_listen,
                    tls: kiln_store::transport::TlsFiles {
                        cert: paths.node_cert(),
                        key: paths.node_key(),
                        ca: paths.ca_cert(),
                    },
                    node: String::new(),
                    log: paths.run.join("store.log"),
                    restarts: Default::default(),
                };
                rt.block_on(serve(paths, listen, programs.vmm(), store, trust))
            }),
        Cmd::TpmUnseal { tpm } => {
            let code = kiln_agent::trust::sealing::child_main(tpm.tcti.as_deref());
            return ExitCode::from(code as u8);
        }
        Cmd::TpmSeal { tpm } => {
            let code = kiln_agent::trust::sealing::seal_child_main(tpm.tcti.as_deref());
            return ExitCode::from(code as u8);
        }
        Cmd::Openapi => {
            print!("{}", api::openapi::document());
            Ok(())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `<profile>, <size of this binary> bytes`: cheap to learn at start (a
/// hash of the binary takes seconds under emulation) and different for
/// another build of the same version.
fn build_id() -> String {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    match std::env::current_exe().and_then(std::fs::metadata) {
        Ok(m) => format!("{profile}, {} bytes", m.len()),
        Err(_) => profile.to_string(),
    }
}
