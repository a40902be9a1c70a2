//! Bad input gets one clear error line and a non-zero exit, never a panic.
//! These run on any machine: each fails before a guest would start.

mod common;
use common::*;

/// Runs kiln-vmm and returns its stderr, asserting a clean failure.
fn fails_with(args: &[&std::ffi::OsStr], expect: &str) -> String {
    let out = run(kiln_vmm().args(args));
    let err = stderr(&out);
    assert!(!out.status.success(), "should fail: {args:?}");
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn missing_kernel_file() {
    let err = fails_with(
        &[os("--kernel"), os("/nonexistent/vmlinuz")],
        "kernel /nonexistent/vmlinuz",
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("kiln-vmm: error:"));
}

#[test]
fn kernel_that_is_a_directory() {
    fails_with(&[os("--kernel"), os("/tmp")], "not a regular file");
}

#[test]
fn file_that_is_no_kernel() {
    let dir = Scratch::new("nokernel");
    let k = dir.file("notes.txt", b"just some text, certainly not a kernel\n");
    let err = fails_with(&[os("--kernel"), k.as_os_str()], "not a Linux kernel");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_bad_kernel_is_reported_before_other_build_errors() {
    // The kernel loads while the devices are set up; when both fail, the
    // kernel's error is the one the user sees.
    let dir = Scratch::new("nokernel-badserial");
    // ELF magic passes the early format check; the loader refuses the rest.
    let k = dir.file("vmlinux", b"\x7fELF and then nothing an ELF loader wants\n");
    let serial = format!("file:{}/missing/dir/console.log", dir.path().display());
    let err = fails_with(
        &[os("--kernel"), k.as_os_str(), os("--serial"), os(&serial)],
        "x86-64 ELF",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn unreadable_kernel_when_not_root() {
    // Root reads anything; drop to "nobody" with setpriv to see EACCES.
    let dir = Scratch::new("unreadable");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_kiln-vmm"))
        .arg("--kernel")
        .arg(&k)
        .output()
        .expect("setpriv (util-linux) runs");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn initrd_too_large_for_memory() {
    let dir = Scratch::new("bigrd");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let rd = dir.path().join("initrd");
    std::fs::File::create(&rd)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    fails_with(
        &[
            os("--kernel"),
            k.as_os_str(),
            os("--initrd"),
            rd.as_os_str(),
            os("--memory"),
            os("64M"),
        ],
        "does not fit in guest memory",
    );
}

#[test]
fn memory_too_small_too_large_or_malformed() {
    let dir = Scratch::new("mem");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let k = k.as_os_str();
    fails_with(&[os("--kernel"), k, os("--memory"), os("8M")], "too small");
    fails_with(
        &[os("--kernel"), k, os("--memory"), os("100000G")],
        "more than this host's",
    );
    fails_with(
        &[os("--kernel"), k, os("--memory"), os("lots")],
        "expected a size",
    );
}

#[test]
fn cpu_counts_out_of_range() {
    let dir = Scratch::new("cpus");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let k = k.as_os_str();
    fails_with(
        &[os("--kernel"), k, os("--cpus"), os("0")],
        "--cpus must be at least 1",
    );
    fails_with(
        &[os("--kernel"), k, os("--cpus"), os("4096")],
        "more than kiln-vmm supports",
    );
}

#[test]
fn bad_serial_mode() {
    let dir = Scratch::new("serial");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    fails_with(
        &[
            os("--kernel"),
            k.as_os_str(),
            os("--serial"),
            os("tcp:4444"),
        ],
        "expected stdio, file:PATH, socket:PATH or none",
    );
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace with an empty /dev: /dev/kvm is absent.
    let dir = Scratch::new("nokvm");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} --kernel {} --memory 64M",
            env!("CARGO_BIN_EXE_kiln-vmm"),
            k.display()
        ))
        .output()
        .expect("unshare (util-linux) runs");
    let err = stderr(&out);
    if err.contains("unshare failed") || err.contains("mount:") {
        kiln_tests::skip(format!("cannot make a mount namespace here: {err}"));
        return;
    }
    assert!(!out.status.success());
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
}

#[test]
fn no_permission_on_dev_kvm() {
    let dir = Scratch::new("kvmperm");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    if std::fs::metadata("/dev/kvm").is_err() {
        kiln_tests::skip("no /dev/kvm on this machine");
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_kiln-vmm"))
        .args(["--memory", "64M", "--kernel"])
        .arg(&k)
        .output()
        .expect("setpriv runs");
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("permission denied on /dev/kvm"), "{err}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run(kiln_vmm().args(["--kernel", "x", "--frobnicate"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--frobnicate"));
}

#[test]
fn vhost_user_disk_without_a_usable_backend() {
    let dir = Scratch::new("vhostuser");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let img = dir.file("disk.img", &[0u8; 512]);
    let arg = |d: &str| {
        [
            os("--kernel").to_owned(),
            k.as_os_str().to_owned(),
            os("--disk").to_owned(),
            d.into(),
        ]
    };
    let check = |d: String, expect: &str| {
        let a = arg(&d);
        let a: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
        let err = fails_with(&a, expect);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("kiln-vmm: error:"), "{err}");
    };
    let missing = dir.path().join("missing.sock");
    check(format!("vhost-user={}", missing.display()), "No such file");
    check(format!("vhost-user={}", img.display()), "not a Unix socket");
    // A socket nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    check(
        format!("vhost-user={}", stale.display()),
        "is the vhost-user backend running?",
    );
    // A kiln-store volume whose store daemon is not there.
    check(
        format!("volume=v,store={}", stale.display()),
        "attach volume v",
    );
    let sock = dir.path().join("listening.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    check(
        format!("vhost-user={},ro=on", sock.display()),
        "ro= does not apply to a vhost-user disk",
    );
    check(
        format!("vhost-user={},path={}", sock.display(), img.display()),
        "exactly one of",
    );
}

#[test]
fn more_disk_queues_than_cpus() {
    let dir = Scratch::new("queues");
    let k = dir.file("vmlinux", &tiny_elf(&[0xf4]));
    let img = dir.file("disk.img", &[0u8; 4096]);
    let disk = format!("path={},queues=3", img.display());
    fails_with(
        &[
            os("--kernel"),
            k.as_os_str(),
            os("--cpus"),
            os("2"),
            os("--disk"),
            os(&disk),
        ],
        "queues=3 is more than the VM's 2 vCPUs",
    );
    let disk = format!("path={},queues=0", img.display());
    fails_with(
        &[os("--kernel"), k.as_os_str(), os("--disk"), os(&disk)],
        "not a queue count from 1 to 64",
    );
}
