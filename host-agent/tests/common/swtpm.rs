//! A real software TPM (swtpm) for a test: its own state directory and a
//! pair of free loopback ports, killed on drop. [`Swtpm::reboot`] restarts
//! it on the same state (PCRs reset, keys and NV kept), as a power cycle.
//!
//! swtpm serves one client connection at a time: drop every `Tpm` opened on
//! it before [`Swtpm::reboot`] or before running tpm2-tools against it.

use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Swtpm {
    _tmp: tempfile::TempDir,
    /// The TPM's state (NVRAM, seeds, persistent objects).
    pub state: PathBuf,
    /// The TPM command port; the control port is the next one.
    pub port: u16,
    child: Option<Child>,
}

/// Whether `program` runs at all.
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Two consecutive free loopback ports (swtpm's command and control).
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    /// A freshly manufactured TPM (no EK certificate). `None` when swtpm is
    /// missing and this is not CI (the test was skipped); under CI=true a
    /// missing swtpm fails the test.
    pub fn start() -> Option<Swtpm> {
        Self::make(false)
    }

    /// A TPM manufactured by `swtpm_setup` with an EK certificate (signed
    /// by a throwaway local CA) in NV index 0x01c00002.
    pub fn start_with_ek_cert() -> Option<Swtpm> {
        Self::make(true)
    }

    fn make(ek_cert: bool) -> Option<Swtpm> {
        for program in ["swtpm", "swtpm_setup", "tpm2_checkquote"] {
            if !have(program) {
                kiln_tests::skip(format!(
                    "{program} is not installed (apt-get install swtpm swtpm-tools tpm2-tools)"
                ));
                return None;
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix("kiln-swtpm-")
            .tempdir()
            .unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        if ek_cert {
            manufacture(tmp.path(), &state);
        }
        let mut t = Swtpm {
            _tmp: tmp,
            state,
            port: 0,
            child: None,
        };
        t.run();
        Some(t)
    }

    /// The TCTI string for `Tpm::open` and tpm2-tools (`-T`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Starts swtpm on the state directory, on free ports (a new pair if
    /// another process took the ports first).
    fn run(&mut self) {
        let log = self.state.parent().unwrap().join("swtpm.log");
        for _ in 0..10 {
            let port = free_port_pair();
            // swtpm writes its errors to the log file, after what earlier
            // runs on this state wrote.
            let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=1", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start swtpm");
            let deadline = Instant::now() + Duration::from_secs(10);
            let addr = SocketAddr::from(([127, 0, 0, 1], port + 1));
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    if let Ok(mut f) = std::fs::File::open(&log) {
                        let _ = f.seek(SeekFrom::Start(log_start));
                        let _ = f.read_to_string(&mut err);
                    }
                    if err.contains("Address already in use") {
                        break; // another pair of ports
                    }
                    panic!("swtpm exited at start ({status}): {err}");
                }
                // The control port answers once the TPM is up; probing it
                // leaves the one-client command port free for the test.
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    self.port = port;
                    self.child = Some(child);
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "swtpm did not listen on port {} in 10 s",
                    port + 1
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no free loopback ports for swtpm after 10 tries");
    }

    /// Stops swtpm: an orderly TPM2_Shutdown(CLEAR) first where it
    /// answers, as an OS does at reboot, then the process.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut sd) = Command::new("tpm2_shutdown")
            .args(["-T", &self.tcti()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            // Bounded: a Tpm left open would hold swtpm's only connection.
            let deadline = Instant::now() + Duration::from_secs(5);
            while sd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = sd.kill();
            let _ = sd.wait();
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A power cycle: stop, start again on the same state. PCRs return to
    /// their reset values; keys from the seeds, NV and sealed blobs stay
    /// usable. The port may change: take [`Swtpm::tcti`] afterwards.
    pub fn reboot(&mut self) {
        self.stop();
        self.run();
    }

    /// Runs a tpm2-tools command against this TPM; its stdout, or a panic
    /// with its stderr.
    pub fn tool(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(program)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `swtpm_setup` with an EK certificate from a local CA in `dir` (config
/// files written here, so the machine's /var/lib/swtpm-localca is not
/// touched).
fn manufacture(dir: &Path, state: &Path) {
    let ca = dir.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    let localca = dir.join("swtpm-localca.conf");
    std::fs::write(
        &localca,
        format!(
            "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n\
             certserial = {ca}/certserial\n",
            ca = ca.display()
        ),
    )
    .unwrap();
    let options = dir.join("swtpm-localca.options");
    std::fs::write(&options, "").unwrap();
    let setup = dir.join("swtpm_setup.conf");
    std::fs::write(
        &setup,
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\n\
             create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
            localca.display(),
            options.display()
        ),
    )
    .unwrap();
    let out = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(state)
        .arg("--create-ek-cert")
        .arg("--config")
        .arg(&setup)
        .arg("--overwrite")
        .output()
        .expect("run swtpm_setup");
    assert!(
        out.status.success(),
        "swtpm_setup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
