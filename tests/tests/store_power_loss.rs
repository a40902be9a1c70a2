//! kiln-store under power loss, in the test host. Two store daemons keep
//! their data on an ext4 disk of the test host (a virtio disk backed by an
//! image on this machine, which outlives the test host). A probe writes
//! rounds of checkable data to a 2-replica volume, flushing after each and
//! printing an ack; at a random moment the script cuts the test host's
//! power (`sysrq b`: an immediate reset, nothing synced, so everything only
//! in the test host's page cache is lost, as in a power failure). The next
//! boot mounts the disk, restarts both daemons and checks, through each
//! node in turn, that every acknowledged round is there. Two cuts, three
//! boots.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_tests::{field, profile_binary, require_testhost, target_dir, HostRun, TestHost};

const VOLUME_MIB: u64 = 64;

/// The test-host script of one boot: verify `check` = (volume, acked
/// rounds) if given, then, if `write` names a volume, create it and write
/// rounds to it until the power is cut after `cut_after` seconds.
fn script(check: Option<(&str, u64)>, write: Option<(&str, u32)>) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
modprobe virtio_pci && modprobe virtio_blk && modprobe ext4 || echo PL-MODPROBE-FAILED
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /mnt/pl
mount -t ext4 /dev/vda /mnt/pl || { echo PL-MOUNT-FAILED; exit 1; }
[ -f /mnt/pl/pki/ca.crt ] || kiln-store tls init --dir /mnt/pl/pki n1 n2 >/dev/null \
    || echo PL-TLS-INIT-FAILED
for n in 1 2; do
    mkdir -p /mnt/pl/n$n
    kiln-store serve --node-id n$n --data /mnt/pl/n$n --listen 127.0.0.1:720$n \
        --tls-cert /mnt/pl/pki/n$n.crt --tls-key /mnt/pl/pki/n$n.key --tls-ca /mnt/pl/pki/ca.crt \
        --socket /run/pl-n$n.sock >/tmp/pl-n$n.log 2>&1 &
done
i=0
while { [ ! -S /run/pl-n1.sock ] || [ ! -S /run/pl-n2.sock ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo PL-DAEMONS-UP
probe() { node=$1; shift; kiln-store-crashprobe --socket /run/pl-$node.sock "$@"; }
"#,
    );
    if let Some((vol, acked)) = check {
        // n1 attaches the volume (reconciling the replicas) and reads its
        // own copy; then n2 takes it over (a higher epoch) and reads its.
        s.push_str(&format!(
            r#"kiln-store volume attach {vol} --socket /run/pl-n1.sock >/dev/null || echo PL-ATTACH-FAILED
probe n1 --volume {vol} verify --acked {acked} 2>&1 | sed 's/^/[pl-n1] /'
kiln-store volume detach {vol} --socket /run/pl-n1.sock
kiln-store volume attach {vol} --socket /run/pl-n2.sock >/dev/null || echo PL-ATTACH-FAILED
probe n2 --volume {vol} verify --acked {acked} 2>&1 | sed 's/^/[pl-n2] /'
kiln-store volume show {vol} --socket /run/pl-n2.sock | sed 's/^/[pl-show] /'
kiln-store volume detach {vol} --socket /run/pl-n2.sock
"#
        ));
    }
    match write {
        Some((vol, cut_after)) => s.push_str(&format!(
            r#"# A rerun of this boot (after the test host failed on its own) starts over.
kiln-store volume delete {vol} --socket /run/pl-n1.sock >/dev/null 2>&1
kiln-store volume create {vol} --size {VOLUME_MIB}M --replica n1=127.0.0.1:7201 \
    --replica n2=127.0.0.1:7202 --socket /run/pl-n1.sock >/dev/null || echo PL-CREATE-FAILED
# Said before the writes start: a line printed just before the reset can
# die in the serial port's buffer.
echo "{cut} in={cut_after}s"
probe n1 --volume {vol} write 2>&1 | sed 's/^/[pl-write] /' &
sleep {cut_after}
echo b >/proc/sysrq-trigger
sleep 60
echo PL-STILL-RUNNING
"#,
            cut = kiln_tests::POWER_CUT
        )),
        None => s.push_str(
            "kill $(pidof kiln-store)\nsleep 1\numount /mnt/pl || echo PL-UMOUNT-FAILED\n",
        ),
    }
    s
}

fn boot(disk: &Path, script: &str) -> HostRun {
    let run = TestHost::run_with_qemu_args(
        script,
        &[
            profile_binary("kiln-store"),
            profile_binary("kiln-store-crashprobe"),
        ],
        &[],
        &[
            "-drive".into(),
            format!(
                "file={},if=none,id=pl,format=raw,cache=unsafe",
                disk.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=pl".into(),
        ],
        Duration::from_secs(600),
    )
    .expect("test host runs");
    eprintln!("{}", run.output);
    for bad in [
        "PL-MODPROBE-FAILED",
        "PL-MOUNT-FAILED",
        "PL-TLS-INIT-FAILED",
        "PL-CREATE-FAILED",
        "PL-ATTACH-FAILED",
    ] {
        assert!(run.line_with(bad).is_none(), "{bad}:\n{}", run.output);
    }
    assert!(run.line_with("PL-DAEMONS-UP").is_some(), "{}", run.output);
    run
}

/// The last round acknowledged before the cut, as the console saw it (the
/// probe may have acknowledged more whose lines the cut swallowed: the
/// check then allows their data too, as unacknowledged).
fn acked(run: &HostRun) -> u64 {
    assert!(run.power_cut(), "the power was not cut:\n{}", run.output);
    assert!(
        run.line_with("PL-STILL-RUNNING").is_none(),
        "{}",
        run.output
    );
    let n = run
        .lines_with("KILN-ACK")
        .last()
        .and_then(|l| field(l, "round"))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(n >= 2, "too few rounds before the cut:\n{}", run.output);
    n
}

fn assert_verified(run: &HostRun, acked: u64) {
    for node in ["n1", "n2"] {
        let line = run
            .line_with(&format!("[pl-{node}] KILN-VERIFY"))
            .unwrap_or_else(|| panic!("{node} did not verify:\n{}", run.output));
        assert_eq!(field(line, "acked"), Some(acked.to_string().as_str()));
        assert_eq!(field(line, "bad"), Some("0"), "{node}: {}", run.output);
        let current: u64 = field(line, "current").unwrap().parse().unwrap();
        assert!(current > 0, "{line}");
    }
    let in_sync = run
        .lines_with("[pl-show]")
        .iter()
        .filter(|l| l.contains("in-sync"))
        .count();
    assert_eq!(in_sync, 2, "both replicas in sync:\n{}", run.output);
}

#[test]
fn every_acknowledged_write_survives_power_cuts() {
    if !require_testhost() {
        return;
    }
    let dir = target_dir().join("kiln-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join(format!("power-loss-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .expect("mkfs.ext4 runs (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 failed");

    // Cut at a different point of the write stream each time.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let cut = |i: u32| 4 + (nanos / 7u32.pow(i)) % 7;
    let first = boot(&disk, &script(None, Some(("v1", cut(1)))));
    let a1 = acked(&first);
    let second = boot(&disk, &script(Some(("v1", a1)), Some(("v2", cut(2)))));
    assert_verified(&second, a1);
    let a2 = acked(&second);
    let third = boot(&disk, &script(Some(("v2", a2)), None));
    assert_verified(&third, a2);
    third.assert_success();
    let _ = std::fs::remove_file(&disk);
}
