//! Reference runs: boot the test guest with QEMU (microvm) inside the test
//! host. They validate the whole pipeline (images, test host, nested KVM, guest
//! init) independently of Kiln's own VMM, and give the baseline timings.

use kiln_tests::{
    field, require_testhost, target_dir, write_script_disk, TestHost, GUEST_READY,
    GUEST_SCRIPT_EXIT,
};
use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

/// Host-side timing wrapper: runs QEMU and prefixes each console line with the
/// test host's uptime, so the test can tell how long the nested boot took.
/// Prints `REF-START t=...` and `REF-QEMU-EXIT rc=N t=...`.
const PRELUDE: &str = r#"#!/bin/sh
set -o pipefail
now() { read -r t _ </proc/uptime; echo "$t"; }
stamp() { while IFS= read -r l; do read -r t _ </proc/uptime; echo "[$t] $l"; done; }
ref_qemu() {
    echo "REF-START t=$(now)"
    qemu-system-x86_64 -L /usr/share/kiln-bios -M microvm,acpi=on -enable-kvm -cpu host \
        -m 256 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
        -kernel /images/vmlinuz -initrd /images/guest.cpio.gz "$@" </dev/null | stamp
    rc=$?
    echo "REF-QEMU-EXIT rc=$rc t=$(now)"
    return $rc
}
"#;

fn uptime_of(line: &str) -> f64 {
    // "[12.34] ..." (stamp) or "... t=12.34"
    let v = line
        .strip_prefix('[')
        .and_then(|l| l.split(']').next())
        .or_else(|| field(line, "t"))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"))
}

#[test]
fn qemu_microvm_boots_guest() {
    if !require_testhost() {
        return;
    }
    let script = format!("{PRELUDE}ref_qemu -append 'console=ttyS0 panic=-1 quiet'\n");
    let run = TestHost::run(&script, &[], &[], Duration::from_secs(600)).expect("test host");
    run.assert_success();

    let ready = run
        .line_with(GUEST_READY)
        .expect("guest printed KILN-GUEST-READY");
    assert_eq!(field(ready, "cpus"), Some("1"), "{ready}");
    assert_eq!(
        run.lines_with(GUEST_READY).len(),
        1,
        "exactly one READY line"
    );
    let exit = run.line_with("REF-QEMU-EXIT").expect("QEMU exit line");
    assert_eq!(field(exit, "rc"), Some("0"), "QEMU exit status: {exit}");

    // Timings (host uptime): QEMU start -> guest READY, and -> QEMU exit.
    let start = uptime_of(run.line_with("REF-START").unwrap());
    let ready_line = run
        .output
        .lines()
        .find(|l| l.contains(GUEST_READY))
        .unwrap();
    let ready_at = uptime_of(ready_line);
    let end = uptime_of(exit);
    println!(
        "timing: test host READY at uptime {start:.2} s; nested guest: READY {:.2} s after QEMU start \
         (guest uptime {} s), QEMU exit after {:.2} s; whole run {:.1} s wall",
        ready_at - start,
        field(ready, "uptime").unwrap_or("?"),
        end - start,
        run.elapsed.as_secs_f64()
    );
}

/// The guest runs a script from a raw virtio-blk disk (`kiln.script=`): checks
/// the script protocol and the virtio-mmio drivers against QEMU, and the
/// harness's `files`.
#[test]
fn qemu_microvm_runs_guest_script_from_disk() {
    if !require_testhost() {
        return;
    }
    // Script disk: text padded with NUL bytes, then garbage that must be ignored.
    let disk = target_dir().join(format!("kiln-tests/script-disk-{}.img", std::process::id()));
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    write_script_disk(
        &disk,
        "echo \"script sees $(cat /sys/block/vda/size) sectors\"\nls /sys/class/net\nexit 7\n",
        4096,
    )
    .unwrap();
    let mut f = OpenOptions::new().append(true).open(&disk).unwrap();
    f.write_all(b"echo SHOULD-NOT-RUN\n").unwrap();
    f.set_len(8192).unwrap();
    drop(f);

    let script = format!(
        r#"{PRELUDE}
ref_qemu -drive file=/images/script.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 \
    -netdev user,id=n0 -device virtio-net-device,netdev=n0 \
    -append 'console=ttyS0 panic=-1 quiet kiln.script=/dev/vda kiln.action=reboot'
"#
    );
    let files = [(disk.clone(), "/images/script.img".to_string())];
    let run = TestHost::run(&script, &[], &files, Duration::from_secs(600)).expect("test host");
    let _ = std::fs::remove_file(&disk);
    run.assert_success();
    assert!(run.line_with(GUEST_READY).is_some(), "{}", run.output);
    assert!(
        run.line_with("script sees 16 sectors").is_some(),
        "virtio-blk disk visible: {}",
        run.output
    );
    assert!(
        run.line_with("eth0").is_some(),
        "virtio-net visible: {}",
        run.output
    );
    assert!(run.line_with("SHOULD-NOT-RUN").is_none(), "{}", run.output);
    let done = run.line_with(GUEST_SCRIPT_EXIT).expect("script exit line");
    assert_eq!(field(done, "rc"), Some("7"), "{done}");
    // kiln.action=reboot with -no-reboot: QEMU exits 0 as well.
    let exit = run.line_with("REF-QEMU-EXIT").expect("QEMU exit line");
    assert_eq!(field(exit, "rc"), Some("0"), "{exit}");
}
