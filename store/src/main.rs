//! `kiln-store`: daemon and CLI of Kiln's replicated block store.

mod cli;

use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    kiln_crash::abort_on_panic();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let detail = e.to_string();
            let line = detail
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect::<Vec<_>>()
                .join(" ");
            let line = line.trim_start_matches("error: ");
            eprintln!("kiln-store: error: {line} (see --help)");
            std::process::exit(2);
        }
    };
    let result = match cli.cmd {
        cli::Cmd::Serve(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            kiln_store::server::serve(kiln_store::server::Config {
                node_id: a.node_id,
                data: a.data,
                listen: a.listen,
                security: match (a.tls_cert, a.tls_key, a.tls_ca) {
                    (Some(cert), Some(key), Some(ca)) => {
                        kiln_store::server::Security::Tls(kiln_store::transport::TlsFiles {
                            cert,
                            key,
                            ca,
                        })
                    }
                    _ => kiln_store::server::Security::InsecureLoopback,
                },
                socket: a.socket,
                scrub_rate: a.scrub_rate,
                scrub_interval: std::time::Duration::from_secs(a.scrub_interval),
                peer_idle_timeout: std::time::Duration::from_secs(a.peer_idle_timeout),
                reply_poll: std::time::Duration::from_micros(a.reply_poll_us),
            })
            .map_err(anyhow::Error::from)
        }
        cli::Cmd::Tls(cli::TlsCmd::Init { dir, nodes }) => kiln_store::pki::init(&dir, &nodes)
            .map(|files| {
                for f in files {
                    println!("{}", f.display());
                }
            })
            .map_err(anyhow::Error::from),
        cli::Cmd::Volume(a) => {
            let json = a.json;
            cli::volume(a).inspect_err(|e| {
                if json {
                    // Programs (kiln-vmm) read the reason here, not on stderr.
                    println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
                }
            })
        }
    };
    if let Err(e) = result {
        eprintln!("kiln-store: error: {e:#}");
        std::process::exit(1);
    }
}
