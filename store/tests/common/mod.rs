//! Helpers for the store's integration tests: real `kiln-store serve`
//! processes on loopback, each with its own temp dirs, ports and socket,
//! replicating over mutual TLS with certificates from `kiln-store tls
//! init` (one CA per test's base directory).
#![allow(dead_code)]

pub mod vhost_guest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_store::engine::ReadOut;
use kiln_store::proto::{Request, Response, VolumeStatus};
use kiln_store::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_kiln-store");

/// Node ids the test CA has certificates for.
pub const PKI_NODES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];

/// The test CA and node certificates under `base` (made on first use).
pub fn pki(base: &Path) -> PathBuf {
    let dir = base.join("pki");
    if !dir.join("ca.crt").exists() {
        let nodes: Vec<String> = PKI_NODES.iter().map(|n| n.to_string()).collect();
        kiln_store::pki::init(&dir, &nodes).unwrap();
    }
    dir
}

/// Node `id`'s TLS identity from the test CA under `base`.
pub fn tls_files(base: &Path, id: &str) -> kiln_store::transport::TlsFiles {
    let dir = pki(base);
    let (cert, key) = kiln_store::pki::node_files(&dir, id);
    kiln_store::transport::TlsFiles {
        cert,
        key,
        ca: kiln_store::pki::ca_file(&dir),
    }
}

/// A connector holding node `id`'s certificate (as that node would dial).
pub fn connector_as(base: &Path, id: &str) -> kiln_store::transport::TlsConnector {
    tls_files(base, id)
        .load(kiln_store::transport::TcpConnector::default())
        .unwrap()
        .0
}

pub struct Node {
    pub id: String,
    pub port: u16,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    pub disks: usize,
    pub extra_args: Vec<String>,
}

impl Node {
    pub fn new(base: &Path, id: &str, disks: usize) -> Node {
        Node::with_args(base, id, disks, &["--scrub-rate", "0"])
    }

    pub fn with_args(base: &Path, id: &str, disks: usize, args: &[&str]) -> Node {
        let dir = base.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls_files(base, id);
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !args.iter().any(|a| a == "--insecure") {
            args.extend(
                tls.serve_args()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned()),
            );
        }
        let mut n = Node {
            id: id.to_string(),
            port: kiln_tests::ports::loopback_port(),
            socket: dir.join("sock"),
            dir,
            child: None,
            disks,
            extra_args: args,
        };
        n.start();
        n
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn replica_arg(&self) -> String {
        format!("{}={}", self.id, self.addr())
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("disk{i}"))
    }

    pub fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--node-id")
            .arg(&self.id)
            .arg("--listen")
            .arg(self.addr())
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args);
        for i in 0..self.disks {
            cmd.arg("--data").arg(self.data_dir(i));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        std::fs::create_dir_all(self.faults()).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env(kiln_store::faults::ENV, self.faults())
            .env("RUST_LOG", "info");
        self.child = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        loop {
            if Client::connect(&self.socket).is_ok()
                && std::net::TcpStream::connect(self.addr()).is_ok()
            {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("{} exited at start: {st}\n{}", self.id, self.log());
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} did not start",
                self.id
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// This node's own replica of `vol`, as it reports it.
    pub fn info(&self, vol: &str) -> kiln_store::types::VolumeInfo {
        match self
            .call(Request::ReplicaInfo { name: vol.into() })
            .unwrap()
        {
            Response::Info(i) => i,
            r => panic!("{r:?}"),
        }
    }

    /// Where files that inject faults go (see `kiln_store::faults`).
    pub fn faults(&self) -> PathBuf {
        self.dir.join("faults")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: sending a signal to our own child process by pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    pub fn call(&self, req: Request) -> kiln_store::Result<Response> {
        self.client().call(&req)
    }

    /// Reads this node's own replica directly (no writer involved).
    pub fn replica_read(&self, vol: &str, offset: u64, len: u64) -> ReadOut {
        match self
            .call(Request::Read {
                name: vol.into(),
                offset,
                len,
            })
            .unwrap()
        {
            Response::Read(r) => r,
            r => panic!("unexpected {r:?}"),
        }
    }

    pub fn replica_read_all(&self, vol: &str, size: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(4 << 20);
            let r = self.replica_read(vol, off, n);
            assert!(
                r.bad_blocks.is_empty(),
                "{}: bad blocks {:?}",
                self.id,
                r.bad_blocks
            );
            out.extend_from_slice(&r.data);
            off += n;
        }
        out
    }

    pub fn status(&self, vol: &str) -> VolumeStatus {
        match self.call(Request::VolShow { name: vol.into() }).unwrap() {
            Response::Status(s) => s,
            r => panic!("unexpected {r:?}"),
        }
    }

    /// Runs the CLI against this node's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("volume")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// `volume create VOL --size SIZE --replica ...` on this node (the writer).
    pub fn create_volume(&self, vol: &str, size: &str, replicas: &[&Node]) -> String {
        let reps: Vec<String> = replicas.iter().map(|n| n.replica_arg()).collect();
        let mut args = vec!["create", vol, "--size", size];
        for r in &reps {
            args.push("--replica");
            args.push(r);
        }
        self.cli_ok(&args)
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "kiln-store volume {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process must be continued to die promptly.
            self.signal(libc::SIGCONT);
        }
        self.kill9();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Small deterministic RNG for test decisions.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a replica at the other end of `link` says of volume `vol`.
pub fn replica_info(
    link: &mut kiln_store::transport::Link,
    vol: &str,
) -> kiln_store::types::VolumeInfo {
    match link
        .call(&Request::ReplicaInfo { name: vol.into() })
        .unwrap()
    {
        Response::Info(i) => i,
        r => panic!("{r:?}"),
    }
}
