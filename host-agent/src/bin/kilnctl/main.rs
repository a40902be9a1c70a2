//! kilnctl: the command line of a Kiln node's agent.

mod attest;
mod console;
mod ctl;
mod event;
mod image;
mod network;
mod token;
mod trust;
mod upload;
mod vm;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use hyper::Method;
use kiln_agent::client::Endpoint;

use ctl::{Ctl, Failure};

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
    Image(image::ImageCmd),
    /// Networks (Linux bridges).
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Volumes (replicated block devices in the node's kiln-store).
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// VMs.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// The event log.
    #[command(subcommand)]
    Event(event::EventCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// The node's TPM, sealed key-encryption key and measurements.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// The image policy: which kernels and disk images VMs may start from.
    #[command(subcommand)]
    Policy(trust::PolicyCmd),
    /// Remote attestation: verify a node's TPM quote and event logs.
    #[command(subcommand)]
    Attest(attest::AttestCmd),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

async fn run(cli: Cli) -> Result<()> {
    let ep = Endpoint::parse(&cli.host, cli.ca.as_deref())?;
    // Verifying saved evidence asks no node.
    let offline = matches!(&cli.cmd, Cmd::Attest(c) if c.is_offline());
    if matches!(ep, Endpoint::Tls { .. }) && cli.token.is_none() && !offline {
        bail!("https needs a token: --token or KILN_TOKEN");
    }
    let ctl = Ctl {
        ep,
        token: cli.token,
        json: cli.json,
    };
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
                    ("INSECURE_NO_TPM", "insecure_no_tpm"),
                    ("CERT_SHA256", "cert_sha256"),
                ],
            );
        }
        Cmd::Image(c) => image::run(&ctl, c).await?,
        Cmd::Network(c) => network::run(&ctl, c).await?,
        Cmd::Volume(c) => volume::run(&ctl, c).await?,
        Cmd::Vm(c) => vm::run(&ctl, c).await?,
        Cmd::Event(c) => event::run(&ctl, c).await?,
        Cmd::Token(c) => token::run(&ctl, c).await?,
        Cmd::Attest(c) => attest::run(&ctl, c).await?,
        Cmd::Trust(c) => trust::run(&ctl, c).await?,
        Cmd::Policy(c) => trust::run_policy(&ctl, c).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    kiln_crash::abort_on_panic();
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
