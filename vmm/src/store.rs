//! Disks on kiln-store volumes (`--disk volume=NAME[,store=SOCKET]`).
//!
//! The store daemon attaches the volume (becoming its writer) and serves it
//! as a vhost-user-blk backend on a socket of its choosing (beside its
//! control socket); kiln-vmm then connects to that socket like to any
//! vhost-user backend. The request goes through the `kiln-store` command,
//! so that the VMM carries none of the store's code or protocol: kiln-vmm
//! reads the command's `--json` answer (the socket, or the error), never
//! its messages. Without `store=` the command's own default socket
//! applies. Attaching and exporting are idempotent: a VM restarted on the
//! same node gets the same socket.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long the store may take to attach and export a volume before the
/// VM's start fails: an attach is a few round trips to the replicas, so a
/// daemon that has not answered in this time is hung or unreachable, and
/// a VM that waits on it forever helps nobody.
pub const ATTACH_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {} to attach volume {name}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        name: String,
        source: std::io::Error,
    },
    #[error("kiln-store could not attach volume {name}: {reason}")]
    Attach { name: String, reason: String },
    #[error("kiln-store did not attach volume {name} within {} s (is its daemon hung?); gave up", .after.as_secs())]
    Timeout { name: String, after: Duration },
}

/// The `kiln-store` program: next to this executable if it is there (an
/// installation ships both), else from `PATH`.
fn program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kiln-store")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("kiln-store"))
}

/// Has the store daemon at `store` (None: kiln-store's default) attach
/// volume `name` and export it over vhost-user with at least `queues`
/// queues; returns the socket to connect to.
pub fn export_volume(name: &str, store: Option<&Path>, queues: u16) -> Result<PathBuf, Error> {
    let program = program();
    let mut cmd = Command::new(&program);
    cmd.args(["volume", "attach", name, "--vhost-user", "--json"]);
    if queues > 1 {
        cmd.arg("--queues").arg(queues.to_string());
    }
    if let Some(store) = store {
        cmd.arg("--socket").arg(store);
    }
    let out = match output_within(&mut cmd, ATTACH_DEADLINE) {
        Ok(Some(out)) => out,
        Ok(None) => {
            return Err(Error::Timeout {
                name: name.to_string(),
                after: ATTACH_DEADLINE,
            })
        }
        Err(source) => {
            return Err(Error::Spawn {
                program: program.clone(),
                name: name.to_string(),
                source,
            })
        }
    };
    tracing::debug!(
        volume = name,
        "kiln-store said: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let socket = answer(out.status.success(), &out.stdout).map_err(|reason| Error::Attach {
        name: name.to_string(),
        reason,
    })?;
    tracing::info!(volume = name, socket = %socket.display(), "kiln-store serves the volume");
    Ok(socket)
}

/// Runs `cmd` (stdin empty) and collects its output, like
/// [`Command::output`], unless it runs longer than `deadline`: then it is
/// killed and reaped, and the answer is `None`.
fn output_within(cmd: &mut Command, deadline: Duration) -> std::io::Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained while it runs, so that a chatty child never blocks on a
    // full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let Some(status) = wait_until(&mut child, Instant::now() + deadline)? else {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(None);
    };
    Ok(Some(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }))
}

/// The child's exit status, or `None` if it still runs at `until`.
fn wait_until(
    child: &mut Child,
    until: Instant,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The socket from `kiln-store volume attach --vhost-user --json`'s answer,
/// or why there is none.
fn answer(success: bool, stdout: &[u8]) -> Result<PathBuf, String> {
    let json: Option<serde_json::Value> = serde_json::from_slice(stdout).ok();
    let field = |key: &str| {
        json.as_ref()
            .and_then(|v| v.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    match (success, field("vhost_user"), field("error")) {
        (true, Some(socket), _) => Ok(PathBuf::from(socket)),
        (true, None, _) => Err("its answer names no vhost-user socket".into()),
        (false, _, Some(reason)) => Err(reason),
        (false, _, None) => Err("it failed without saying why (run it by hand to see)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_past_its_deadline_is_killed_and_one_within_it_answers() {
        let start = Instant::now();
        let out =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap();
        assert!(out.is_none(), "a sleeping command answered");
        assert!(start.elapsed() < Duration::from_secs(10), "not killed");
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap()
        .expect("answered within the deadline");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(output_within(
            &mut Command::new("/nonexistent/kiln-store"),
            Duration::from_secs(1)
        )
        .is_err());
    }

    #[test]
    fn the_socket_or_the_reason_comes_from_the_json_answer() {
        let ok = br#"{ "name": "vm1", "epoch": 3, "vhost_user": "/run/kiln/kiln-vhost-vm1.sock" }"#;
        assert_eq!(
            answer(true, ok),
            Ok(PathBuf::from("/run/kiln/kiln-vhost-vm1.sock"))
        );
        assert_eq!(
            answer(false, br#"{"error": "no such volume vm2"}"#),
            Err("no such volume vm2".into())
        );
        assert!(answer(true, br#"{"ok": true}"#).is_err());
        assert!(answer(false, b"kiln-store: error: text")
            .unwrap_err()
            .contains("without saying"));
        assert!(answer(true, b"").is_err());
    }
}
