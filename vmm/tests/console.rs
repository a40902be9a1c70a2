//! `--serial socket:PATH` with a tiny guest that echoes its serial input:
//! clients attach and detach while the guest runs, a new client first gets
//! the output kept so far, every attached client gets live output, and what
//! any client writes reaches the guest.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

/// Machine code: echo every byte received on COM1, forever.
fn echo_forever() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xfd, 0x03, // loop: mov dx, 0x3fd (line status)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xf7, // jz loop
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0xeb, 0xef, // jmp loop
    ]
}

fn attach(sock: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn expect(s: &mut UnixStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("waiting for {:?}: {e}", String::from_utf8_lossy(want)));
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

#[test]
fn console_clients_attach_detach_and_share_the_guest_console() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("console");
    let kernel = dir.file("echo.elf", &tiny_elf(&echo_forever()));
    let console = dir.path().join("console.sock");
    let api = dir.path().join("api.sock");
    let mut vmm = kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--serial"])
        .arg(format!("socket:{}", console.display()))
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_path(&api, &mut vmm);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&console).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A first client types; the guest echoes to it.
    let mut a = attach(&console);
    a.write_all(b"hello ").unwrap();
    expect(&mut a, b"hello ");

    // Clients that leave at once, before the kept output reaches them,
    // disturb nothing.
    for _ in 0..3 {
        drop(attach(&console));
    }
    std::thread::sleep(Duration::from_millis(100));

    // A second client first gets what was printed so far, then both get
    // live output, whoever typed.
    let mut b = attach(&console);
    expect(&mut b, b"hello ");
    a.write_all(b"from a ").unwrap();
    expect(&mut a, b"from a ");
    expect(&mut b, b"from a ");
    b.write_all(b"from b ").unwrap();
    expect(&mut a, b"from b ");
    expect(&mut b, b"from b ");

    // The first one leaves; the guest and the other client go on.
    drop(a);
    b.write_all(b"alone ").unwrap();
    expect(&mut b, b"alone ");
    drop(b);

    // Coming back replays the kept output.
    let mut c = attach(&console);
    expect(&mut c, b"hello from a from b alone ");
    c.write_all(b"again").unwrap();
    expect(&mut c, b"again");

    assert_eq!(http(&api, "PUT", "/vm/power-off", "").0, 204);
    let status = vmm.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
