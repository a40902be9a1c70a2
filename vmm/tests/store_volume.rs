//! `--disk volume=` against a real kiln-store daemon on this machine, with
//! a tiny guest: kiln-vmm learns the vhost-user socket from the command's
//! JSON answer, and reports the store's own reason when it cannot attach.
//! Needs the kiln-store binary beside kiln-vmm (`cargo test --workspace`
//! builds it); skipped otherwise (a failure under CI=true).

mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const ACPI_SLEEP_CONTROL: u16 = 0x600;
const S5_SLP_EN: u8 = (5 << 2) | (1 << 5);

fn kiln_store() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_kiln-vmm")).with_file_name("kiln-store");
    if p.is_file() {
        Some(p)
    } else {
        let msg = format!(
            "{} is not built (run `cargo test --workspace`)",
            p.display()
        );
        kiln_tests::skip(msg);
        None
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_volume_disk_is_attached_through_kiln_store_json_answers() {
    let Some(store) = kiln_store() else { return };
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("store-volume");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let sock = dir.path().join("run/store.sock");
    let addr = format!("127.0.0.1:{}", 20000 + std::process::id() % 20000);
    let mut daemon = Daemon(
        Command::new(&store)
            // One node on loopback: plain TCP is allowed there.
            .args(["serve", "--node-id", "n1", "--insecure", "--listen", &addr])
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock, &mut daemon.0);
    let out = Command::new(&store)
        .args(["volume", "create", "v1", "--size", "8M", "--replica"])
        .arg(format!("n1={addr}"))
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let kernel = dir.file(
        "tiny.elf",
        &tiny_elf(&serial_then_out(
            b"KILN-TINY-OK\n",
            ACPI_SLEEP_CONTROL,
            S5_SLP_EN,
        )),
    );
    let boot = |disk: &str| {
        run(kiln_vmm()
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "64M", "--disk", disk])
            .env("KILN_STORE_SOCKET", &sock)
            .stdin(Stdio::null()))
    };
    let out = boot(&format!("volume=v1,store={}", sock.display()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"KILN-TINY-OK\n");
    // Without store=, kiln-store's own default (here its environment) applies.
    let out = boot("volume=v1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("run/kiln-vhost-v1.sock").exists());

    let out = boot(&format!("volume=nope,store={}", sock.display()));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("could not attach volume nope: volume \"nope\" not found"),
        "{}",
        stderr(&out)
    );
}
