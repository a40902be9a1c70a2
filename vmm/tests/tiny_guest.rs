//! kiln-vmm end to end on this machine's own /dev/kvm with hand-made
//! payloads: ELF loading, long-mode entry, the port-I/O bus, COM1 output,
//! and power-off/reset through the ACPI registers.

mod common;
use common::*;

const ACPI_SLEEP_CONTROL: u16 = 0x600;
const ACPI_RESET: u16 = 0x602;
const S5_SLP_EN: u8 = (5 << 2) | (1 << 5);

#[test]
fn tiny_guest_prints_and_powers_off() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("tiny-off");
    let kernel = dir.file(
        "tiny.elf",
        &tiny_elf(&serial_then_out(
            b"KILN-TINY-OK\n",
            ACPI_SLEEP_CONTROL,
            S5_SLP_EN,
        )),
    );
    prints_ok_and_powers_off(&kernel);
}

/// Boots the tiny `kernel` and checks that all it printed was KILN-TINY-OK
/// and that kiln-vmm ended with status 0.
fn prints_ok_and_powers_off(kernel: &std::path::Path) {
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "64M", "--serial", "stdio"])
        .stdin(std::process::Stdio::null()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "KILN-TINY-OK\n",
        "stderr: {}",
        stderr(&out)
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
}

/// After the power-off write the vCPU does not enter the guest again: what
/// the guest would do next (here, print a line) never happens.
#[test]
fn nothing_runs_after_the_guest_powers_off() {
    if !local_kvm() {
        return;
    }
    let mut code = serial_then_out(b"KILN-TINY-OK\n", ACPI_SLEEP_CONTROL, S5_SLP_EN);
    code.truncate(code.len() - 3); // drop the final hlt; jmp
    code.extend_from_slice(&serial_then_out(b"RAN-AFTER-POWER-OFF\n", 0x80, 0));
    let dir = Scratch::new("tiny-after-off");
    let kernel = dir.file("tiny.elf", &tiny_elf(&code));
    for _ in 0..3 {
        prints_ok_and_powers_off(&kernel);
    }
}

/// With a vhost-user disk, guest RAM is a shared memfd that KVM runs the
/// guest in, the backend is connected and negotiated with before the guest
/// starts, and the device's worker runs under its own seccomp filter.
#[test]
fn tiny_guest_runs_with_a_vhost_user_disk() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("tiny-vhost-user");
    let kernel = dir.file(
        "tiny.elf",
        &tiny_elf(&serial_then_out(
            b"KILN-TINY-OK\n",
            ACPI_SLEEP_CONTROL,
            S5_SLP_EN,
        )),
    );
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let socket = dir.path().join("vhost.sock");
    let _daemon = StorageDaemon::start(&image, &socket);
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--serial", "stdio", "--disk"])
        .arg(format!("vhost-user={},id=vol0", socket.display()))
        .env("KILN_LOG", "debug")
        .stdin(std::process::Stdio::null()));
    let err = stderr(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "KILN-TINY-OK\n",
        "stderr: {err}"
    );
    assert!(out.status.success(), "stderr: {err}");
    assert!(
        err.contains("vhost-user-blk backend connected"),
        "stderr: {err}"
    );
    assert!(err.contains("sectors=16384"), "stderr: {err}");
}

#[test]
fn tiny_guest_reset_exits_zero_and_says_so() {
    if !local_kvm() {
        return;
    }
    let dir = Scratch::new("tiny-reset");
    let kernel = dir.file("tiny.elf", &tiny_elf(&serial_then_out(b"R", ACPI_RESET, 1)));
    let log = dir.path().join("serial.log");
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--cpus", "2"])
        .arg("--serial")
        .arg(format!("file:{}", log.display())));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("rebooted"),
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&log).unwrap(), b"R");
}

#[test]
fn a_vcpu_thread_breaking_its_seccomp_filter_kills_kiln_vmm() {
    if !local_kvm() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let dir = Scratch::new("tiny-seccomp");
    let code = serial_then_out(b"X", ACPI_SLEEP_CONTROL, S5_SLP_EN);
    let kernel = dir.file("tiny.elf", &tiny_elf(&code));
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--debug-seccomp-violation"])
        .stdin(std::process::Stdio::null()));
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "status {:?}, stderr: {}",
        out.status,
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "the guest must not have run");

    // The same guest with the filters on and no violation runs normally.
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M"])
        .stdin(std::process::Stdio::null()));
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(out.stdout, b"X");
}

#[test]
fn the_terminal_is_raw_while_the_guest_runs_and_restored_after() {
    if !local_kvm() {
        return;
    }
    // `script` gives kiln-vmm a real pty as stdin/stdout. `stty -g` before
    // and after must match; the guest itself sees raw input meanwhile.
    let dir = Scratch::new("tiny-tty");
    let kernel = dir.file(
        "tiny.elf",
        &tiny_elf(&serial_then_out(
            b"TTY-OK\r\n",
            ACPI_SLEEP_CONTROL,
            S5_SLP_EN,
        )),
    );
    let inner = format!(
        "stty -g; {} --kernel {} --memory 64M; stty -g",
        env!("CARGO_BIN_EXE_kiln-vmm"),
        kernel.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (bsdutils) runs");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(lines.contains(&"TTY-OK"), "{lines:?}");
    let stty: Vec<&&str> = lines.iter().filter(|l| l.contains(':')).collect();
    assert_eq!(stty.len(), 2, "{lines:?}");
    assert_eq!(stty[0], stty[1], "terminal settings changed");
}

/// A guest that triple-faults (an empty IDT, then an invalid opcode) is
/// reset, which ends kiln-vmm cleanly by default; the log says where it was
/// (this machine's KVM keeps the registers).
#[test]
fn a_triple_fault_resets_the_guest_and_names_where_it_was() {
    if !local_kvm() {
        return;
    }
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'T', 0xee]; // mov dx, 0x3f8; mov al, 'T'; out dx, al
    code.extend_from_slice(&[0x0f, 0x01, 0x1d, 0x02, 0, 0, 0]); // lidt [rip + 2]
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2
    code.extend_from_slice(&[0; 10]); // the IDT descriptor: limit 0, base 0
    let dir = Scratch::new("tiny-triple-fault");
    let kernel = dir.file("tiny.elf", &tiny_elf(&code));
    let out = run(kiln_vmm()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64M", "--serial", "stdio"])
        .stdin(std::process::Stdio::null()));
    let err = stderr(&out);
    assert!(out.status.success(), "stderr: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "T", "stderr: {err}");
    // The ud2: entry (0x100078, after the ELF headers) + 7 + 7.
    assert!(
        err.contains("vCPU 0: triple fault (rip=0x100086 "),
        "stderr: {err}"
    );
    assert!(err.contains("rebooted"), "stderr: {err}");
}
