//! A software TPM 2.0 (swtpm) for tests: the one shared starter.
//!
//! Two ways to use it:
//!
//! - On the plain machine, over TCP loopback: [`Swtpm::tcp`] starts
//!   `swtpm socket --server type=tcp,port=P --ctrl type=tcp,port=P+1 --flags
//!   not-need-init,startup-clear`, so the TPM is ready for commands at once.
//!   [`Swtpm::tcti`] is the tss2 TCTI string (`swtpm:host=127.0.0.1,port=P`,
//!   for tss-esapi or `TPM2TOOLS_TCTI`); [`Swtpm::reboot`] restarts it on the
//!   same state (PCRs and other volatile state reset; keys, NV indices and
//!   hierarchies kept), as a power cycle of the machine would.
//! - For a test host: [`Swtpm::for_testhost`] starts swtpm on a unix control
//!   socket in the state directory and [`Swtpm::qemu_args`] gives the test
//!   host's QEMU the `tpm-tis` device for it (`/dev/tpm0`, `/dev/tpmrm0`
//!   inside); pass them to [`crate::TestHost::run_with_qemu_args`]. The test
//!   host's firmware starts the TPM and measures the boot into PCRs 0-7. Use
//!   one `Swtpm` per boot; a second `Swtpm` on the same state directory is the
//!   same machine rebooted. (`scripts/testhost --tpm DIR` does the same
//!   without Rust.)
//!
//! A new state directory is first manufactured ([`Manufacture`]): by default
//! with `swtpm_setup` like a real TPM: RSA and ECC endorsement keys
//! (persistent handles 0x81010001 and 0x81010016) with certificates from
//! swtpm's local CA in NV (0x01c00002, 0x01c00016; root only, otherwise
//! without certificates) and the SHA-256 PCR bank active (no SHA-1).
//! [`Manufacture::Bare`] leaves that to swtpm: no persistent keys, banks
//! SHA-1, SHA-256, SHA-384 and SHA-512.
//!
//! swtpm serves one client connection at a time: close every TPM context
//! opened on it before [`Swtpm::reboot`] or before running tpm2-tools
//! against it. swtpm is stopped when the `Swtpm` is dropped; the state
//! directory stays (the caller owns it).

use crate::{Error, Result};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long swtpm may take to open its sockets.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How [`Swtpm`] prepares a state directory that holds no TPM yet (an
/// existing state is used as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Manufacture {
    /// `swtpm_setup`: EKs with certificates (where swtpm's local CA is
    /// usable), SHA-256 bank only.
    #[default]
    EkCerts,
    /// swtpm's own first start: no persistent objects, all four banks.
    Bare,
}

/// A running swtpm; stopped on drop.
pub struct Swtpm {
    state_dir: PathBuf,
    mode: Mode,
    child: Option<Child>,
}

#[derive(Debug, Clone)]
enum Mode {
    /// Command port P, control port P + 1, on 127.0.0.1.
    Tcp { port: u16 },
    /// Control socket for QEMU's tpm-emulator backend.
    Unix { socket: PathBuf },
}

impl Swtpm {
    /// Whether swtpm (and swtpm_setup) are installed. If not, it
    /// [`crate::skip`]s (which panics with `CI=true`) and returns false.
    pub fn available() -> bool {
        let missing: Vec<&str> = ["swtpm", "swtpm_setup"]
            .into_iter()
            .filter(|p| !crate::on_path(p))
            .collect();
        if missing.is_empty() {
            return true;
        }
        crate::skip(format!(
            "no software TPM: {} not found (apt-get install swtpm swtpm-tools)",
            missing.join(", ")
        ));
        false
    }

    /// Starts swtpm on TCP loopback with its state in `state_dir` (created
    /// and manufactured if new), started up and ready for commands.
    pub fn tcp(state_dir: &Path) -> Result<Swtpm> {
        Self::tcp_with(state_dir, Manufacture::default())
    }

    /// [`Swtpm::tcp`], manufacturing a new state as `how` says.
    pub fn tcp_with(state_dir: &Path, how: Manufacture) -> Result<Swtpm> {
        let state_dir = prepare(state_dir, how)?;
        // The ports are free when picked, but another process may take them
        // before swtpm binds: then pick again.
        let mut last_err = None;
        for _ in 0..5 {
            let port = crate::ports::loopback_ports(2);
            let mut tpm = Swtpm {
                state_dir: state_dir.clone(),
                mode: Mode::Tcp { port },
                child: None,
            };
            match tpm.start() {
                Ok(()) => return Ok(tpm),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error("swtpm did not start".into())))
    }

    /// Starts swtpm for a test host: control socket `state_dir/swtpm.sock`
    /// (created and manufactured if new). QEMU starts the TPM; the firmware
    /// sends TPM2_Startup. Give [`Swtpm::qemu_args`] to the test host.
    pub fn for_testhost(state_dir: &Path) -> Result<Swtpm> {
        Self::for_testhost_with(state_dir, Manufacture::default())
    }

    /// [`Swtpm::for_testhost`], manufacturing a new state as `how` says.
    pub fn for_testhost_with(state_dir: &Path, how: Manufacture) -> Result<Swtpm> {
        let state_dir = prepare(state_dir, how)?;
        let socket = state_dir.join("swtpm.sock");
        // sun_path holds 108 bytes, NUL included.
        if socket.as_os_str().len() >= 108 {
            return Err(Error(format!(
                "{}: path too long for a unix socket",
                socket.display()
            )));
        }
        let mut tpm = Swtpm {
            state_dir,
            mode: Mode::Unix { socket },
            child: None,
        };
        tpm.start()?;
        Ok(tpm)
    }

    /// The tss2 TCTI configuration string for this TPM
    /// (`swtpm:host=127.0.0.1,port=P`; for [`Swtpm::for_testhost`] the
    /// test host's own is `device:/dev/tpmrm0`).
    pub fn tcti(&self) -> String {
        match &self.mode {
            Mode::Tcp { port } => format!("swtpm:host=127.0.0.1,port={port}"),
            Mode::Unix { .. } => "device:/dev/tpmrm0".to_string(),
        }
    }

    /// The TCP command port (control port is one above); `None` for a test
    /// host's TPM.
    pub fn port(&self) -> Option<u16> {
        match self.mode {
            Mode::Tcp { port } => Some(port),
            Mode::Unix { .. } => None,
        }
    }

    /// The state directory (`tpm2-00.permall` and swtpm's log `swtpm.log`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Arguments for the test host's QEMU: a `tpm-tis` device backed by this
    /// swtpm. Empty for a TCP swtpm (QEMU wants the unix control socket).
    pub fn qemu_args(&self) -> Vec<String> {
        match &self.mode {
            Mode::Unix { socket } => vec![
                "-chardev".into(),
                format!("socket,id=chrtpm,path={}", socket.display()),
                "-tpmdev".into(),
                "emulator,id=tpm0,chardev=chrtpm".into(),
                "-device".into(),
                "tpm-tis,tpmdev=tpm0".into(),
            ],
            Mode::Tcp { .. } => Vec::new(),
        }
    }

    /// Power-cycles the TPM: stops swtpm and starts it again on the same
    /// state (and ports). PCRs, sessions and transient objects are gone;
    /// persistent keys, NV indices and hierarchy seeds stay.
    pub fn reboot(&mut self) -> Result<()> {
        self.stop();
        self.start()
    }

    fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state_dir.display()))
            .arg("--log")
            .arg(format!(
                "file={}",
                self.state_dir.join("swtpm.log").display()
            ));
        match &self.mode {
            Mode::Tcp { port } => {
                cmd.arg("--server")
                    .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                    .arg("--ctrl")
                    .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                    .arg("--flags")
                    .arg("not-need-init,startup-clear");
            }
            Mode::Unix { socket } => {
                let _ = std::fs::remove_file(socket);
                cmd.arg("--ctrl")
                    .arg(format!("type=unixio,path={}", socket.display()));
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error(format!("cannot start swtpm: {e}")))?;
        let until = Instant::now() + START_LIMIT;
        loop {
            if let Some(st) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(Error(format!(
                    "swtpm exited at start ({st}): {}{}",
                    err.trim(),
                    self.log_tail()
                )));
            }
            let up = match &self.mode {
                Mode::Tcp { port } => {
                    TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).is_ok()
                        && TcpStream::connect((Ipv4Addr::LOCALHOST, port + 1)).is_ok()
                }
                Mode::Unix { socket } => socket.exists(),
            };
            if up {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error(format!(
                    "swtpm did not open its sockets within {START_LIMIT:?}{}",
                    self.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: swtpm shuts the TPM down cleanly (state written).
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.state_dir.join("swtpm.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        if tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = tail.into_iter().rev().collect();
            format!("\nswtpm.log: {}", lines.join("\n"))
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `dir` and, if it holds no TPM state yet, manufactures one as
/// `how` says (with swtpm_setup: EK certificates where the local CA is
/// usable, i.e. as root). Returns the absolute path.
fn prepare(dir: &Path, how: Manufacture) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    if how == Manufacture::Bare || dir.join("tpm2-00.permall").exists() {
        return Ok(dir);
    }
    let setup = |certs: bool| -> Result<std::process::Output> {
        let mut cmd = Command::new("swtpm_setup");
        cmd.arg("--tpm2")
            .arg("--tpmstate")
            .arg(&dir)
            .arg("--overwrite");
        if certs {
            cmd.arg("--create-ek-cert").arg("--create-platform-cert");
        }
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|e| Error(format!("cannot run swtpm_setup: {e}")))
    };
    let out = setup(true)?;
    if out.status.success() {
        return Ok(dir);
    }
    let retry = setup(false)?;
    if retry.status.success() {
        return Ok(dir);
    }
    Err(Error(format!(
        "swtpm_setup failed in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&retry.stderr)
    )))
}
