//! Helpers shared by kiln-vmm's black-box tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kiln_vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln-vmm"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("kiln-vmm runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tiny-payload builders are shared with the agent's tests.
#[allow(unused_imports)] // not every test file uses both
pub use kiln_tests::tiny::{print_forever, serial_then_out, tiny_elf};

/// Whether this machine's /dev/kvm can be opened (tiny payloads only); if
/// not, the test is skipped (`kiln_tests::skip`: a panic under CI=true).
pub fn local_kvm() -> bool {
    match kiln_tests::tiny::local_kvm() {
        Ok(()) => true,
        Err(e) => {
            kiln_tests::skip(format!("{e}; tiny-payload tests need it"));
            false
        }
    }
}

/// A qemu-storage-daemon exporting `image` as a vhost-user-blk backend on
/// `socket`; killed on drop.
pub struct StorageDaemon(std::process::Child);

impl StorageDaemon {
    pub fn start(image: &Path, socket: &Path) -> Self {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon runs (scripts/install-deps: qemu-system-common)");
        let mut d = Self(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                d.0.try_wait().unwrap().is_none(),
                "qemu-storage-daemon exited"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-storage-daemon never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request over the Unix socket at `socket`, written by hand;
/// returns the status and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    // A server that refuses the request may stop reading it: a write error
    // is fine as long as a response comes back.
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Waits until `path` exists (a socket being bound), or panics.
pub fn wait_for_path(path: &Path, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "kiln-vmm exited before {} appeared",
            path.display()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A kiln-vmm process, killed on drop.
pub struct Vmm(pub std::process::Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Vmm {
    /// Spawns `cmd` (stdin closed, stderr piped).
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(
            cmd.stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kiln-vmm starts"),
        )
    }

    /// What it wrote on stderr (once it has exited, all of it).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Waits for it to exit, at most `secs` seconds: then it is killed
    /// and the test fails with its stderr (a test never hangs on it).
    pub fn wait_within(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                panic!(
                    "kiln-vmm still ran after {secs} s; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits for it to exit 0, or panics with its stderr.
    pub fn exits_ok(mut self) {
        let status = self.wait_within(120);
        let err = self.stderr();
        assert!(status.success(), "{status:?}, stderr: {err}");
    }
}

/// A console log file's bytes (none yet: empty).
pub fn log_bytes(log: &Path) -> Vec<u8> {
    std::fs::read(log).unwrap_or_default()
}

/// Waits until the console log has more than `n` bytes, or panics (also
/// when kiln-vmm exits first).
pub fn wait_bytes(log: &Path, n: usize, vmm: &mut Vmm) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let b = log_bytes(log);
        if b.len() > n {
            return b;
        }
        if let Ok(Some(st)) = vmm.0.try_wait() {
            panic!("kiln-vmm exited ({st}) before printing: {}", vmm.stderr());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest printed nothing new"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// kiln-vmm booting `kernel` (a tiny guest) with a raw disk `id=scratch`,
/// its console in the file `log` and its API on `api`; returns once the API
/// socket exists.
pub fn tiny_vm(kernel: &Path, memory: &str, cpus: u8, disk: &Path, log: &Path, api: &Path) -> Vmm {
    let mut vmm = Vmm::spawn(
        kiln_vmm()
            .arg("--kernel")
            .arg(kernel)
            .args(["--memory", memory, "--cpus", &cpus.to_string(), "--disk"])
            .arg(format!("path={},id=scratch", disk.display()))
            .arg("--serial")
            .arg(format!("file:{}", log.display()))
            .arg("--api-socket")
            .arg(api),
    );
    wait_for_path(api, &mut vmm.0);
    vmm
}
