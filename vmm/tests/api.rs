//! The control API (`--api-socket`) against a tiny guest on this machine's
//! own /dev/kvm, over real HTTP on the real Unix socket: a guest that
//! prints forever is paused (its output stops), resumed (it goes on) and
//! powered off (kiln-vmm exits 0).

mod common;
use common::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

fn serial_len(log: &std::path::Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// Waits until the console log grows past `than`, or panics.
fn grows(log: &std::path::Path, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = serial_len(log);
        if n > than {
            return n;
        }
        assert!(Instant::now() < deadline, "the guest printed nothing new");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json_field<'a>(body: &'a str, key: &str) -> &'a str {
    let at = body
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {body}"));
    let rest = &body[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim_matches('"')
}

#[test]
fn a_guest_is_paused_resumed_and_powered_off_through_the_api() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("api");
    let kernel = dir.file("tiny.elf", &tiny_elf(&print_forever(b'.', 5000)));
    let disk = dir.file("disk.img", &[0u8; 4096]);
    let log = dir.path().join("serial.log");
    let sock = dir.path().join("api.sock");
    // A stale socket from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut vmm = Vmm(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--cpus", "2", "--disk"])
        .arg(format!("path={},id=scratch", disk.display()))
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    wait_for_path(&sock, &mut vmm.0);
    let n = grows(&log, 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (status, body) = http(&sock, "GET", "/vm", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_field(&body, "state"), "running", "{body}");
    assert_eq!(json_field(&body, "pid"), vmm.0.id().to_string(), "{body}");
    assert_eq!(json_field(&body, "vcpus"), "2", "{body}");
    assert_eq!(json_field(&body, "memory_mib"), "64", "{body}");
    assert!(body.contains("\"id\":\"scratch\""), "{body}");
    assert!(body.contains("\"kind\":\"block\""), "{body}");
    assert!(
        json_field(&body, "uptime_ms").parse::<u64>().is_ok(),
        "{body}"
    );
    let cpu: u64 = json_field(&body, "vcpu_time_ns").parse().unwrap();
    assert!(cpu > 0, "{body}");

    // Pause: the output stops, a second pause is a conflict.
    assert_eq!(http(&sock, "PUT", "/vm/pause", "").0, 204);
    let (status, body) = http(&sock, "GET", "/vm", "");
    assert_eq!(
        (status, json_field(&body, "state")),
        (200, "paused"),
        "{body}"
    );
    let stopped = serial_len(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(serial_len(&log), stopped, "the guest ran while paused");
    assert_eq!(http(&sock, "PUT", "/vm/pause", "{}").0, 409);
    assert_eq!(http(&sock, "PUT", "/vm/shutdown", "").0, 409);

    // Resume: the output goes on, a second resume is a conflict.
    assert_eq!(http(&sock, "PUT", "/vm/resume", "{}").0, 204);
    grows(&log, stopped.max(n));
    let (status, body) = http(&sock, "PUT", "/vm/resume", "");
    assert_eq!(status, 409);
    assert!(body.starts_with("{\"error\":"), "{body}");

    // Errors the agent relies on.
    assert_eq!(http(&sock, "GET", "/nowhere", "").0, 404);
    assert_eq!(http(&sock, "POST", "/vm/pause", "").0, 405);
    assert_eq!(http(&sock, "PUT", "/vm/pause", "{\"now\":1}").0, 400);
    let big = "x".repeat(65 * 1024);
    assert_eq!(http(&sock, "PUT", "/vm/pause", &big).0, 413);

    // Power-off ends kiln-vmm with status 0, after the 204 arrived.
    assert_eq!(http(&sock, "PUT", "/vm/power-off", "").0, 204);
    let status = vmm.wait_within(120);
    let mut err = String::new();
    use std::io::Read;
    vmm.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}, stderr: {err}");
}

#[test]
fn a_bad_api_socket_is_refused_before_the_guest_runs() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("api-bad");
    let kernel = dir.file("tiny.elf", &tiny_elf(&print_forever(b'.', 1000)));
    let not_a_socket = dir.file("plain", b"keep me");
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--serial", "none", "--api-socket"])
        .arg(&not_a_socket)
        .stdin(Stdio::null()));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");
}
