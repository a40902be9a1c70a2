//! A real kiln-agent process for a test: its own data, run and PKI
//! directories, a loopback TLS port, and its first admin token.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use kiln_agent::client::{call, Endpoint};
use serde_json::Value;

pub mod swtpm;

pub const AGENT: &str = env!("CARGO_BIN_EXE_kiln-agent");
pub const KILNCTL: &str = env!("CARGO_BIN_EXE_kilnctl");

pub struct Agent {
    pub dir: PathBuf,
    pub token: String,
    pub port: u16,
    pub store_port: u16,
    pub child: Option<Child>,
    pub rt: tokio::runtime::Runtime,
    /// The node's TPM (a real swtpm), `None` for `--insecure-no-tpm`.
    pub tpm: Option<swtpm::Swtpm>,
    /// The recovery key `init` printed.
    pub recovery_key: String,
}

impl Agent {
    /// `kiln-agent init` and `serve` in a fresh directory, with a real
    /// software TPM of its own.
    pub fn start(tag: &str) -> Agent {
        let tpm =
            swtpm::Swtpm::start().expect("swtpm (apt-get install swtpm swtpm-tools tpm2-tools)");
        Self::start_with(tag, Some(tpm), Path::new(AGENT))
    }

    /// `kiln-agent init --insecure-no-tpm` and `serve`.
    pub fn start_insecure(tag: &str) -> Agent {
        Self::start_with(tag, None, Path::new(AGENT))
    }

    /// Like [`Agent::start`], with the agent binary `exe` for both `init`
    /// and `serve` (it is measured: a test may change it).
    pub fn start_program(tag: &str, exe: &Path) -> Agent {
        let tpm =
            swtpm::Swtpm::start().expect("swtpm (apt-get install swtpm swtpm-tools tpm2-tools)");
        Self::start_with(tag, Some(tpm), exe)
    }

    fn start_with(tag: &str, tpm: Option<swtpm::Swtpm>, exe: &Path) -> Agent {
        let dir = std::env::temp_dir().join(format!("kiln-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(Self::dir_args(&dir))
            .args(["init", "--name", "test-node"])
            .arg("--vmm")
            .arg(vmm_binary())
            .arg("--store")
            .arg(store_binary());
        match &tpm {
            Some(t) => cmd.args(["--tpm", &t.tcti()]),
            None => cmd.arg("--insecure-no-tpm"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let after = |heading: &str| -> String {
            let mut lines = stdout.lines();
            let _ = lines.find(|l| l.starts_with(heading));
            lines.next().unwrap_or_default().trim().to_string()
        };
        let token = after("admin token");
        assert!(token.starts_with("kiln."), "init printed {stdout}");
        let recovery_key = after("recovery key");
        assert_eq!(recovery_key.len(), 71, "init printed {stdout}");
        let mut a = Agent {
            dir,
            token,
            port: kiln_tests::ports::loopback_port(),
            store_port: kiln_tests::ports::loopback_port(),
            child: None,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            tpm,
            recovery_key,
        };
        a.serve(exe);
        a
    }

    pub fn dir_args(dir: &Path) -> Vec<String> {
        vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--run-dir".into(),
            dir.join("run").display().to_string(),
            "--pki-dir".into(),
            dir.join("pki").display().to_string(),
        ]
    }

    /// Starts `serve` with the binary `exe` and waits until it answers.
    pub fn serve(&mut self, exe: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(exe)
            .args(Self::dir_args(&self.dir))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--vmm")
            .arg(vmm_binary())
            .arg("--store")
            .arg(store_binary())
            .args(["--store-listen", &format!("127.0.0.1:{}", self.store_port)])
            .args(
                self.tpm
                    .iter()
                    .flat_map(|t| ["--tpm".to_string(), t.tcti()]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while self.try_unix(Method::GET, "/v1/node", None).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/agent.sock")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn https(&self) -> Endpoint {
        Endpoint::parse(
            &format!("https://127.0.0.1:{}", self.port),
            Some(&self.ca()),
        )
        .unwrap()
    }

    fn try_unix(
        &self,
        m: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.raw(
            &Endpoint::Unix(self.socket()),
            m,
            path,
            &[],
            body.map(|b| serde_json::to_vec(b).unwrap()),
        )
    }

    pub fn raw(
        &self,
        ep: &Endpoint,
        m: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Value)> {
        let (status, bytes) =
            self.rt
                .block_on(call(ep, m, path, headers, body, Duration::from_secs(30)))?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status.as_u16(), v))
    }

    /// Over the unix socket (root: no token).
    pub fn call(&self, m: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_unix(m, path, body.as_ref()).unwrap()
    }

    /// Over TLS with `token`.
    pub fn tls(
        &self,
        token: Option<&str>,
        m: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let h: Vec<(&str, String)> = token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect();
        self.raw(
            &self.https(),
            m,
            path,
            &h,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .unwrap()
    }

    pub fn last_seq(&self) -> u64 {
        let (_, v) = self.call(Method::GET, "/v1/events?since=0&limit=1000", None);
        v.as_array()
            .and_then(|a| a.last())
            .map(|e| e["seq"].as_u64().unwrap())
            .unwrap_or(0)
    }

    /// Polls `path` until `pred` holds.
    pub fn wait_for(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let (_, v) = self.call(Method::GET, path, None);
            if pred(&v) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "{path}: still not {what} after {timeout:?}: {v}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/metrics` over the unix socket, as text.
    pub fn metrics(&self) -> String {
        let (_, v) = self
            .raw(
                &Endpoint::Unix(self.socket()),
                Method::GET,
                "/metrics",
                &[],
                None,
            )
            .unwrap();
        v.as_str().unwrap_or_default().to_string()
    }

    pub fn kilnctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(KILNCTL)
            .arg("--host")
            .arg(format!("unix:{}", self.socket().display()))
            .args(args)
            .output()
            .unwrap()
    }
}

/// Kills every process whose command line names `dir` (the store daemon
/// and kiln-vmm processes outlive the agent by design).
pub fn kill_all_under(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The interfaces this agent made, whatever state a failed test left.
        let mut links: Vec<String> = Vec::new();
        if self.child.is_some() {
            if let Ok((_, nets)) = self.try_unix(Method::GET, "/v1/networks", None) {
                links.extend(
                    nets.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|n| n["status"]["bridge"].as_str().map(str::to_string)),
                );
            }
            if let Ok((_, vms)) = self.try_unix(Method::GET, "/v1/vms", None) {
                for vm in vms.as_array().into_iter().flatten() {
                    links.extend(
                        vm["status"]["nics"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|n| n["tap"].as_str().map(str::to_string)),
                    );
                }
            }
        }
        self.kill();
        kill_all_under(&self.dir);
        for l in links {
            let _ = Command::new("ip").args(["link", "del", &l]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until volume `name` is `ready` (fails on `failed`).
pub fn volume_ready(a: &Agent, name: &str) -> Value {
    a.wait_for(
        &format!("/v1/volumes/{name}"),
        "ready",
        Duration::from_secs(60),
        |v| {
            assert_ne!(v["status"]["state"], "failed", "{v}");
            v["status"]["state"] == "ready"
        },
    )
}

/// The first `len` bytes of a volume, through kiln-store's own client.
pub fn read_volume(a: &Agent, name: &str, len: usize) -> Vec<u8> {
    use kiln_store::VolumeIo;
    let c = kiln_store::VolumeClient::open(&a.dir.join("run/store.sock"), name).unwrap();
    let mut buf = vec![0u8; len];
    c.read_at(&mut buf, 0).unwrap();
    buf
}

/// kiln-vmm of this test's cargo profile (built by `cargo test --workspace`;
/// the tests that need it check that it is there).
pub fn vmm_binary() -> PathBuf {
    kiln_tests::profile_dir().join("kiln-vmm")
}

/// kiln-store of this test's cargo profile.
pub fn store_binary() -> PathBuf {
    kiln_tests::profile_dir().join("kiln-store")
}

/// A short name unique to this test process and call (bridge names have
/// 15 characters: `kb-` and this).
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}
