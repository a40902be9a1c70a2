//! Snapshots and restore (`PUT /vm/snapshot`, `--restore`) against a tiny
//! guest on this machine's own /dev/kvm, with kiln-vmm's real seccomp
//! filters: the guest counts in guest memory and prints the count's low
//! bits as letters (ABC...P, again and again), so the first letter a
//! restored guest prints shows where it resumed. Restored twice from one
//! snapshot; broken snapshots are refused before the guest runs.
//! (The test host's tests do the same with Debian's kernel, disks and a
//! network: tests/tests/snapshot.rs.)

mod common;
use common::*;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::tiny::{count_forever, next_count_letter};

fn restore(dir: &Scratch, snap: &Path, log: &Path, sock: &Path) -> Vmm {
    restore_with(dir, snap, log, sock, &[])
}

fn restore_with(dir: &Scratch, snap: &Path, log: &Path, sock: &Path, args: &[&str]) -> Vmm {
    let disk = dir.path().join("disk.img");
    let mut vmm = Vmm(kiln_vmm()
        .args(args)
        .arg("--restore")
        .arg(snap)
        .arg("--disk")
        .arg(format!("path={},id=scratch", disk.display()))
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--api-socket")
        .arg(sock)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    wait_for_path(sock, &mut vmm.0);
    vmm
}

fn power_off(sock: &Path, mut vmm: Vmm) {
    assert_eq!(http(sock, "PUT", "/vm/power-off", "").0, 204);
    let status = vmm.wait_within(120);
    let err = vmm.stderr();
    assert!(status.success(), "{status:?}, stderr: {err}");
}

#[test]
fn a_snapshot_restores_twice_into_new_processes_that_continue_the_guest() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("snapshot");
    let kernel = dir.file("count.elf", &tiny_elf(&count_forever(20000)));
    let disk = dir.file("disk.img", &[0u8; 8192]);
    let log = dir.path().join("serial.log");
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("snap");
    let mut vmm = tiny_vm(&kernel, "64M", 2, &disk, &log, &sock);
    wait_bytes(&log, 20, &mut vmm);

    // Only a paused VM is saved.
    let (status, body) = http(
        &sock,
        "PUT",
        "/vm/snapshot",
        &format!("{{\"destination_dir\":\"{}\"}}", snap.display()),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("pause"), "{body}");
    assert!(!snap.exists());

    assert_eq!(http(&sock, "PUT", "/vm/pause", "").0, 204);
    // Let the last letter reach the file.
    std::thread::sleep(Duration::from_millis(100));
    let before = log_bytes(&log);
    let last = *before.last().unwrap();
    let (status, body) = http(
        &sock,
        "PUT",
        "/vm/snapshot",
        &format!("{{\"destination_dir\":\"{}\"}}", snap.display()),
    );
    assert_eq!(status, 204, "{body}");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for f in ["state", "memory"] {
        let m = std::fs::metadata(snap.join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let mem = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(mem.len(), 4096 + (64 << 20));
    // Sparse: the guest touched a few pages of its 64 MiB.
    assert!(
        mem.blocks() * 512 < 8 << 20,
        "{} bytes allocated",
        mem.blocks() * 512
    );

    // The source goes on after a snapshot when resumed.
    assert_eq!(http(&sock, "PUT", "/vm/resume", "").0, 204);
    wait_bytes(&log, before.len(), &mut vmm);
    power_off(&sock, vmm);

    for round in 0..2 {
        let rlog = dir.path().join(format!("restored-{round}.log"));
        let rsock = dir.path().join(format!("restored-{round}.sock"));
        let mut r = restore(&dir, &snap, &rlog, &rsock);
        let out = wait_bytes(&rlog, 16, &mut r);
        assert_eq!(
            out[0],
            next_count_letter(last),
            "round {round}: resumed at {:?} after {:?}",
            out[0] as char,
            last as char
        );
        // It keeps counting in order.
        assert!(
            out.windows(2).all(|w| w[1] == next_count_letter(w[0])),
            "round {round}: {:?}",
            String::from_utf8_lossy(&out)
        );
        let (status, body) = http(&rsock, "GET", "/vm", "");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"state\":\"running\""), "{body}");
        assert!(body.contains("\"vcpus\":2"), "{body}");
        assert!(body.contains("\"id\":\"scratch\""), "{body}");
        power_off(&rsock, r);
    }

    // Restored ahead of time with --paused: nothing runs until resumed,
    // then the guest goes on from the same place.
    let rlog = dir.path().join("restored-paused.log");
    let rsock = dir.path().join("restored-paused.sock");
    let mut r = restore_with(&dir, &snap, &rlog, &rsock, &["--paused"]);
    let (status, body) = http(&rsock, "GET", "/vm", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"paused\""), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(log_bytes(&rlog).is_empty(), "the paused VM ran");
    assert_eq!(http(&rsock, "PUT", "/vm/resume", "").0, 204);
    let out = wait_bytes(&rlog, 16, &mut r);
    assert_eq!(out[0], next_count_letter(last), "{:?}", out[0] as char);
    power_off(&rsock, r);
}

fn refs(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(|s| s.as_os_str()).collect()
}

/// `kiln-vmm ARGS` must fail before the guest runs, saying `says`.
fn refused(dir: &Scratch, args: &[&std::ffi::OsStr], says: &str) {
    let log = dir.path().join("refused.log");
    let _ = std::fs::remove_file(&log);
    let out = run(kiln_vmm()
        .args(args)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null()));
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} was accepted");
    // The reason is on the first line (a usage error adds clap's usage).
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.to_lowercase().contains(&says.to_lowercase()),
        "{args:?}: expected {says:?} in: {err}"
    );
    assert_eq!(log_bytes(&log).len(), 0, "{args:?}: the guest ran");
}

#[test]
fn broken_snapshots_and_other_devices_are_refused_before_the_guest_runs() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("snapshot-refused");
    let kernel = dir.file("count.elf", &tiny_elf(&count_forever(20000)));
    let disk = dir.file("disk.img", &[0u8; 8192]);
    let log = dir.path().join("serial.log");
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("snap");
    let mut vmm = tiny_vm(&kernel, "32M", 1, &disk, &log, &sock);
    wait_bytes(&log, 4, &mut vmm);
    assert_eq!(http(&sock, "PUT", "/vm/pause", "").0, 204);
    let body = format!("{{\"destination_dir\":\"{}\"}}", snap.display());
    assert_eq!(http(&sock, "PUT", "/vm/snapshot", &body).0, 204);
    power_off(&sock, vmm);

    let state = std::fs::read(snap.join("state")).unwrap();
    let copy = |name: &str, state: &[u8], memory: Option<&[u8]>| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), state).unwrap();
        match memory {
            Some(m) => std::fs::write(d.join("memory"), m).unwrap(),
            None => {
                std::fs::copy(snap.join("memory"), d.join("memory")).unwrap();
            }
        }
        d
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let disk_arg = os(&format!("path={},id=scratch", disk.display()));
    let with = |d: &Path| {
        vec![
            os("--restore"),
            d.as_os_str().to_owned(),
            os("--disk"),
            disk_arg.clone(),
        ]
    };

    let truncated = copy("truncated", &state[..state.len() / 2], None);
    refused(&dir, &refs(&with(&truncated)), "truncated");
    let mut edited_state = state.clone();
    let mid = edited_state.len() / 2;
    edited_state[mid] ^= 0x01;
    let edited = copy("edited", &edited_state, None);
    refused(&dir, &refs(&with(&edited)), "checksum");
    let mut foreign_state = state.clone();
    foreign_state[..8].copy_from_slice(b"NOTASNAP");
    let foreign = copy("foreign", &foreign_state, None);
    refused(&dir, &refs(&with(&foreign)), "not a kiln-vmm snapshot");
    let short = copy("short", &state, Some(&[0u8; 4096]));
    refused(&dir, &refs(&with(&short)), "memory");
    // Another snapshot's memory file.
    let other_mem = {
        let mut m = std::fs::read(snap.join("memory")).unwrap();
        m[8] ^= 0xff; // the id
        m
    };
    let other = copy("other", &state, Some(&other_mem));
    refused(&dir, &refs(&with(&other)), "memory");
    // Other devices than the snapshot's.
    refused(
        &dir,
        &refs(&[os("--restore"), snap.as_os_str().to_owned()]),
        "disk",
    );
    let renamed = os(&format!("path={},id=other", disk.display()));
    refused(
        &dir,
        &refs(&[
            os("--restore"),
            snap.as_os_str().to_owned(),
            os("--disk"),
            renamed,
        ]),
        "id=scratch",
    );
    // What the snapshot decides is not for the command line to say.
    refused(
        &dir,
        &refs(&[
            os("--restore"),
            snap.as_os_str().to_owned(),
            os("--memory"),
            os("64M"),
            os("--disk"),
            disk_arg.clone(),
        ]),
        "--memory",
    );
    refused(
        &dir,
        &refs(&[os("--restore"), dir.path().join("nowhere").into_os_string()]),
        "nowhere",
    );
    // A paused VM that nobody could resume (clap names the missing
    // --api-socket on the next line).
    let mut paused = with(&snap);
    paused.push(os("--paused"));
    refused(&dir, &refs(&paused), "required arguments were not provided");
}
