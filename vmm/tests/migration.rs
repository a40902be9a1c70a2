//! Live migration (`PUT /vm/migrate`, `--incoming`) between two kiln-vmm
//! processes on this machine's own /dev/kvm, with the real seccomp
//! filters, over a real unix socket: a tiny guest counting in memory moves
//! and goes on counting where it was; a destination that refuses leaves
//! the source running. (The test host's tests move Debian guests with
//! disks and a network, locally and over TCP: tests/tests/snapshot.rs.)

mod common;
use common::*;

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_tests::tiny::{count_forever, next_count_letter};

fn wait_socket(path: &Path, vmm: &mut Vmm) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(st)) = vmm.0.try_wait() {
            panic!("kiln-vmm exited ({st}): {}", vmm.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shared secret of a TCP migration: 32 random bytes, 0600.
fn secret(s: &Setup) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = s.sockets.join("secret");
    if !path.exists() {
        let mut bytes = [0u8; 32];
        let mut f = std::fs::File::open("/dev/urandom").unwrap();
        std::io::Read::read_exact(&mut f, &mut bytes).unwrap();
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut out, &bytes).unwrap();
    }
    path
}

struct Setup {
    dir: Scratch,
    kernel: std::path::PathBuf,
    disk: std::path::PathBuf,
    /// 0700, as the migration socket's directory must be.
    sockets: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = Scratch::new(tag);
    let kernel = dir.file("count.elf", &tiny_elf(&count_forever(20000)));
    let disk = dir.file("disk.img", &[0u8; 8192]);
    let sockets = dir.path().join("mig");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sockets)
        .unwrap();
    Setup {
        dir,
        kernel,
        disk,
        sockets,
    }
}

fn source(s: &Setup, log: &Path, api: &Path) -> Vmm {
    tiny_vm(&s.kernel, "64M", 2, &s.disk, log, api)
}

fn destination(s: &Setup, memory: &str, log: &Path, api: &Path, listen: &Path) -> Vmm {
    let mut vmm = destination_at(s, memory, log, api, &format!("unix:{}", listen.display()));
    wait_socket(listen, &mut vmm);
    vmm
}

fn destination_at(s: &Setup, memory: &str, log: &Path, api: &Path, address: &str) -> Vmm {
    let mut cmd = kiln_vmm();
    if address.starts_with("tcp:") {
        cmd.arg("--migration-secret").arg(secret(s));
    }
    Vmm(cmd
        .arg("--incoming")
        .arg(address)
        .args(["--memory", memory, "--cpus", "2", "--disk"])
        .arg(format!("path={},id=scratch", s.disk.display()))
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--api-socket")
        .arg(api)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap())
}

/// The arguments of a 64 MiB, 2-vCPU VM whose disk `vol0` is served by
/// the vhost-user backend at `backend`.
fn vhost_user_vm(cmd: &mut std::process::Command, backend: &Path, log: &Path, api: &Path) {
    cmd.args(["--memory", "64M", "--cpus", "2", "--disk"])
        .arg(format!("vhost-user={},id=vol0", backend.display()))
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--api-socket")
        .arg(api)
        .env("KILN_LOG", "info");
}

/// A loopback port nobody listens on, and its `tcp:` address.
fn free_tcp_address() -> (u16, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (port, format!("tcp:127.0.0.1:{port}"))
}

/// Once a destination listens on `port`, has the source at `api` migrate
/// to it with the shared secret.
fn migrate_over_tcp(s: &Setup, api: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = format!(
        "{{\"destination\":\"tcp:127.0.0.1:{port}\",\"secret_file\":\"{}\"}}",
        secret(s).display()
    );
    assert_eq!(http(api, "PUT", "/vm/migrate", &body).0, 202);
}

/// Polls the source's `GET /vm` until its migration is no longer running
/// (or the process ends); returns the last body.
fn wait_migration(api: &Path, vmm: &mut Vmm) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        if let Ok(Some(_)) = vmm.0.try_wait() {
            return last;
        }
        let (status, body) = http(api, "GET", "/vm", "");
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let state = v["migration"]["state"].as_str().unwrap_or("none");
            if state != "running" {
                return v["migration"].to_string();
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never ended: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_vm_moves_to_another_process_and_goes_on_counting() {
    if !local_kvm() {
        return;
    }
    let s = setup("migrate");
    let (src_log, src_api) = (s.dir.path().join("src.log"), s.dir.path().join("src.sock"));
    let (dst_log, dst_api) = (s.dir.path().join("dst.log"), s.dir.path().join("dst.sock"));
    let listen = s.sockets.join("m.sock");
    let mut src = source(&s, &src_log, &src_api);
    wait_bytes(&src_log, 20, &mut src);
    let mut dst = destination(&s, "64M", &dst_log, &dst_api, &listen);

    let (status, body) = http(
        &src_api,
        "PUT",
        "/vm/migrate",
        &format!("{{\"destination\":\"unix:{}\"}}", listen.display()),
    );
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"migration\""), "{body}");
    // The source hands over and exits 0.
    let st = src.wait_within(120);
    let err = src.stderr();
    assert!(st.success(), "{st:?}: {err}");
    assert!(err.contains("migrated"), "{err}");
    let before = log_bytes(&src_log);
    let last = *before.last().unwrap();

    let out = wait_bytes(&dst_log, 16, &mut dst);
    assert_eq!(
        out[0],
        next_count_letter(last),
        "resumed at {:?} after {:?}",
        out[0] as char,
        last as char
    );
    assert!(
        out.windows(2).all(|w| w[1] == next_count_letter(w[0])),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    wait_socket(&dst_api, &mut dst);
    let (status, body) = http(&dst_api, "GET", "/vm", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"running\""), "{body}");
    assert_eq!(http(&dst_api, "PUT", "/vm/power-off", "").0, 204);
    let st = dst.wait_within(120);
    assert!(st.success(), "{st:?}: {}", dst.stderr());
}

#[test]
fn a_refused_or_unreachable_destination_leaves_the_source_running() {
    if !local_kvm() {
        return;
    }
    let s = setup("migrate-refused");
    let (src_log, src_api) = (s.dir.path().join("src.log"), s.dir.path().join("src.sock"));
    let (dst_log, dst_api) = (s.dir.path().join("dst.log"), s.dir.path().join("dst.sock"));
    let listen = s.sockets.join("m.sock");
    let mut src = source(&s, &src_log, &src_api);
    wait_bytes(&src_log, 4, &mut src);

    // Another memory size: the destination refuses and exits with an error.
    let mut dst = destination(&s, "32M", &dst_log, &dst_api, &listen);
    let body = format!("{{\"destination\":\"unix:{}\"}}", listen.display());
    assert_eq!(http(&src_api, "PUT", "/vm/migrate", &body).0, 202);
    let status = wait_migration(&src_api, &mut src);
    assert!(status.contains("\"state\":\"failed\""), "{status}");
    assert!(status.contains("RAM size differs"), "{status}");
    let st = dst.wait_within(120);
    assert!(
        !st.success(),
        "the refusing destination exits with an error"
    );
    assert_eq!(log_bytes(&dst_log).len(), 0, "the destination's guest ran");
    // The source's guest goes on.
    let n = log_bytes(&src_log).len();
    wait_bytes(&src_log, n, &mut src);

    // Nobody there.
    let nobody = format!(
        "{{\"destination\":\"unix:{}\"}}",
        s.sockets.join("nobody.sock").display()
    );
    assert_eq!(http(&src_api, "PUT", "/vm/migrate", &nobody).0, 202);
    let status = wait_migration(&src_api, &mut src);
    assert!(status.contains("\"state\":\"failed\""), "{status}");
    let n = log_bytes(&src_log).len();
    wait_bytes(&src_log, n, &mut src);

    // Bad requests are refused at once.
    let (code, body) = http(
        &src_api,
        "PUT",
        "/vm/migrate",
        "{\"destination\":\"ftp:x\"}",
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(http(&src_api, "PUT", "/vm/power-off", "").0, 204);
    let st = src.wait_within(120);
    assert!(st.success(), "{st:?}: {}", src.stderr());
}

#[test]
fn a_vm_moves_over_tcp_after_both_ends_prove_the_shared_secret() {
    if !local_kvm() {
        return;
    }
    let s = setup("migrate-tcp");
    let (src_log, src_api) = (s.dir.path().join("src.log"), s.dir.path().join("src.sock"));
    let (dst_log, dst_api) = (s.dir.path().join("dst.log"), s.dir.path().join("dst.sock"));
    let (port, address) = free_tcp_address();
    let mut src = source(&s, &src_log, &src_api);
    wait_bytes(&src_log, 4, &mut src);
    let mut dst = destination_at(&s, "64M", &dst_log, &dst_api, &address);
    // The secret both ends prove (HMAC challenges) before anything else.
    migrate_over_tcp(&s, &src_api, port);
    let st = src.wait_within(120);
    let err = src.stderr();
    assert!(st.success(), "{st:?}: {err}");
    let last = *log_bytes(&src_log).last().unwrap();
    let out = wait_bytes(&dst_log, 4, &mut dst);
    assert_eq!(out[0], next_count_letter(last));
    wait_socket(&dst_api, &mut dst);
    assert_eq!(http(&dst_api, "PUT", "/vm/power-off", "").0, 204);
    let st = dst.wait_within(120);
    assert!(st.success(), "{st:?}: {}", dst.stderr());
}

/// A local migration of a VM with a vhost-user disk: guest RAM (a shared
/// memfd) and the backend's connection are handed over instead of copied
/// or connected to anew: qemu-storage-daemon serves one frontend at a
/// time, so a destination that connected would wait for a source that
/// waits for it. The guest counts on where it was.
#[test]
fn a_local_migration_hands_over_guest_ram_and_the_vhost_user_connection() {
    if !local_kvm() {
        return;
    }
    let s = setup("migrate-handover");
    let image = s.dir.path().join("vu.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let backend = s.dir.path().join("vu.sock");
    let _daemon = StorageDaemon::start(&image, &backend);
    let (src_log, src_api) = (s.dir.path().join("src.log"), s.dir.path().join("src.sock"));
    let (dst_log, dst_api) = (s.dir.path().join("dst.log"), s.dir.path().join("dst.sock"));
    let listen = s.sockets.join("m.sock");
    let vm = |cmd: &mut std::process::Command, log: &Path, api: &Path| {
        vhost_user_vm(cmd, &backend, log, api)
    };
    let mut cmd = kiln_vmm();
    cmd.arg("--kernel").arg(&s.kernel);
    vm(&mut cmd, &src_log, &src_api);
    let mut src = Vmm::spawn(&mut cmd);
    wait_for_path(&src_api, &mut src.0);
    wait_bytes(&src_log, 20, &mut src);
    let mut cmd = kiln_vmm();
    cmd.arg("--incoming")
        .arg(format!("unix:{}", listen.display()));
    vm(&mut cmd, &dst_log, &dst_api);
    let mut dst = Vmm::spawn(&mut cmd);
    wait_socket(&listen, &mut dst);

    let (status, body) = http(
        &src_api,
        "PUT",
        "/vm/migrate",
        &format!("{{\"destination\":\"unix:{}\"}}", listen.display()),
    );
    assert_eq!(status, 202, "{body}");
    let st = src.wait_within(120);
    let err = src.stderr();
    assert!(st.success(), "{st:?}: {err}");
    assert!(
        err.contains("handed over guest RAM, disk vol0's vhost-user connection"),
        "{err}"
    );
    assert!(err.contains("MemoryHandedOver"), "{err}");
    let last = *log_bytes(&src_log).last().unwrap();
    let out = wait_bytes(&dst_log, 16, &mut dst);
    assert_eq!(out[0], next_count_letter(last), "{out:?} after {last:?}");
    assert!(
        out.windows(2).all(|w| w[1] == next_count_letter(w[0])),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(http(&dst_api, "PUT", "/vm/power-off", "").0, 204);
    let st = dst.wait_within(120);
    let err = dst.stderr();
    assert!(st.success(), "{st:?}: {err}");
    assert!(err.contains("guest RAM handed over (not copied)"), "{err}");
    assert!(
        err.contains("disk vol0: taking over the source's connection"),
        "{err}"
    );
    assert!(err.contains(": 0 data pages, 0 zero pages"), "{err}");
}

/// A VM with a vhost-user disk moved over TCP (as to another host: each
/// end has its own backend). The backend writes guest RAM out of KVM's
/// sight; it is handed a dirty log for the migration instead of all guest
/// RAM going again while the VM is paused.
#[test]
fn a_tcp_migration_has_the_vhost_user_backend_log_its_writes() {
    if !local_kvm() {
        return;
    }
    let s = setup("migrate-vu-log");
    let daemon = |name: &str| {
        let image = s.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let socket = s.dir.path().join(format!("{name}.sock"));
        (StorageDaemon::start(&image, &socket), socket)
    };
    let (_src_daemon, src_backend) = daemon("vu-src");
    let (_dst_daemon, dst_backend) = daemon("vu-dst");
    let (src_log, src_api) = (s.dir.path().join("src.log"), s.dir.path().join("src.sock"));
    let (dst_log, dst_api) = (s.dir.path().join("dst.log"), s.dir.path().join("dst.sock"));
    let (port, address) = free_tcp_address();
    let vm = vhost_user_vm;
    let mut cmd = kiln_vmm();
    cmd.arg("--kernel").arg(&s.kernel);
    vm(&mut cmd, &src_backend, &src_log, &src_api);
    let mut src = Vmm::spawn(&mut cmd);
    wait_for_path(&src_api, &mut src.0);
    wait_bytes(&src_log, 8, &mut src);
    let mut cmd = kiln_vmm();
    cmd.arg("--incoming")
        .arg(&address)
        .arg("--migration-secret")
        .arg(secret(&s));
    vm(&mut cmd, &dst_backend, &dst_log, &dst_api);
    let mut dst = Vmm::spawn(&mut cmd);
    migrate_over_tcp(&s, &src_api, port);
    let st = src.wait_within(120);
    let err = src.stderr();
    assert!(st.success(), "{st:?}: {err}");
    assert!(
        err.contains("the vhost-user backends log their writes to guest RAM"),
        "{err}"
    );
    assert!(!err.contains("resending all guest RAM"), "{err}");
    let last = *log_bytes(&src_log).last().unwrap();
    let out = wait_bytes(&dst_log, 8, &mut dst);
    assert_eq!(out[0], next_count_letter(last), "{out:?} after {last:?}");
    assert_eq!(http(&dst_api, "PUT", "/vm/power-off", "").0, 204);
    let st = dst.wait_within(120);
    assert!(st.success(), "{st:?}: {}", dst.stderr());
}
