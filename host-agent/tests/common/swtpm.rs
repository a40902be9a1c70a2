//! A real software TPM (swtpm) for the agent's tests, on the shared
//! starter (`kiln_tests::Swtpm`): its own state directory, free loopback
//! ports, stopped on drop. [`Swtpm::reboot`] is a power cycle on the same
//! state (PCRs reset; keys and NV kept).
//!
//! swtpm serves one client connection at a time: drop every `Tpm` opened on
//! it before [`Swtpm::reboot`] or before running tpm2-tools against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{Manufacture, Swtpm as Shared};

pub struct Swtpm {
    _tmp: tempfile::TempDir,
    /// The TPM's state (NVRAM, seeds, persistent objects).
    pub state: PathBuf,
    tpm: Shared,
}

impl Swtpm {
    /// A freshly manufactured TPM (no EK certificate). `None` when swtpm or
    /// tpm2-tools are missing and this is not CI (the test was skipped);
    /// under CI=true that fails the test.
    pub fn start() -> Option<Swtpm> {
        Self::make(false)
    }

    /// A TPM manufactured by `swtpm_setup` with an EK certificate (signed
    /// by a throwaway local CA) in NV index 0x01c00002.
    pub fn start_with_ek_cert() -> Option<Swtpm> {
        Self::make(true)
    }

    fn make(ek_cert: bool) -> Option<Swtpm> {
        if !Shared::available() {
            return None;
        }
        if Command::new("tpm2_checkquote")
            .arg("--version")
            .output()
            .is_err()
        {
            kiln_tests::skip("tpm2-tools are not installed (apt-get install tpm2-tools)");
            return None;
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
        // A state manufactured above is used as it is; otherwise swtpm's own.
        let tpm = Shared::tcp_with(&state, Manufacture::Bare).expect("start swtpm");
        Some(Swtpm {
            _tmp: tmp,
            state,
            tpm,
        })
    }

    /// The TCTI string for `Tpm::open` and tpm2-tools (`-T`).
    pub fn tcti(&self) -> String {
        self.tpm.tcti()
    }

    /// The TPM command port (the control port is the next one).
    pub fn port(&self) -> u16 {
        self.tpm.port().expect("a TCP swtpm")
    }

    /// An orderly TPM2_Shutdown(CLEAR), as an OS does before a reboot
    /// (bounded: a `Tpm` left open would hold swtpm's only connection).
    fn shutdown(&self) {
        if let Ok(mut sd) = Command::new("tpm2_shutdown")
            .args(["-T", &self.tcti()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            while sd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = sd.kill();
            let _ = sd.wait();
        }
    }

    /// A power cycle: shut down, start again on the same state. The port
    /// may change: take [`Swtpm::tcti`] afterwards.
    pub fn reboot(&mut self) {
        self.shutdown();
        self.tpm.reboot().expect("restart swtpm");
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
