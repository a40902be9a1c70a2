//! kiln-vmm snapshots and restore with Debian's kernel inside the test host
//! (real nested KVM), issue 15.
//!
//! A guest fills 16 MiB of tmpfs with random bytes (its "memory pattern")
//! and then loops: a heartbeat line with a counter and its clocks every
//! 0.2 s, and every tenth beat a check: the pattern's md5, a write and
//! O_DIRECT read-back on its data disk, a ping to the test host over its
//! TAP. It is paused and snapshotted through the control API, the original
//! is powered off, and the snapshot is restored three times, one after
//! another, each in a new kiln-vmm process. Then broken snapshots are
//! refused.
//!
//! All cases share one test-host boot; each #[test] checks its part.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_tests::{field, profile_binary, require_testhost, CaseOutput, HostRun, TestHost};

/// How many restores the script runs from the one snapshot.
const RESTORES: usize = 3;

const SCRIPT: &str = r#"#!/bin/sh
# shellcheck disable=SC3040 # busybox ash has pipefail
set -o pipefail
up() { cut -d' ' -f1 /proc/uptime; }
Q="console=ttyS0 panic=-1 quiet"
K="--kernel /images/vmlinux --initrd /images/guest.cpio.gz"
# wait_for FILE PATTERN COUNT SECS: until FILE has COUNT lines matching
# PATTERN; 1 on timeout.
wait_for() {
    i=0
    while [ "$(grep -c "$2" "$1" 2>/dev/null)" -lt "$3" ]; do
        i=$((i + 1)); [ $i -le $(($4 * 2)) ] || return 1
        sleep 0.5
    done
}
# tagged NAME FILE: FILE's lines as [NAME] lines.
tagged() { sed "s/^/[$1] /" "$2"; }
api() { kiln-api-call "$@" | sed "s/^/[$CASE] /"; }
say() { echo "[$CASE] $*"; }

/usr/sbin/ip tuntap add kt5 mode tap
/usr/sbin/ip addr add 10.205.0.1/24 dev kt5
/usr/sbin/ip link set kt5 up
dd if=/dev/zero of=/tmp/snapdata.img bs=1M count=0 seek=16 2>/dev/null

cat >/tmp/snap.sh <<'S'
up() { cut -d' ' -f1 /proc/uptime; }
ip link set eth0 up
ip addr add 10.205.0.2/24 dev eth0
mkdir -p /pat
mount -t tmpfs -o size=24m tmpfs /pat
dd if=/dev/urandom of=/pat/pattern bs=1M count=16 iflag=fullblock 2>/dev/null
echo "SNAP-PATTERN md5=$(md5sum </pat/pattern | cut -d' ' -f1)"
i=0
while :; do
    i=$((i + 1))
    echo "SNAP-HB n=$i up=$(up) wall=$(date +%s)"
    if [ $((i % 10)) = 0 ]; then
        md5=$(md5sum </pat/pattern | cut -d' ' -f1)
        printf 'beat-%08d\n' $i | dd of=/dev/vda bs=4096 conv=sync,fsync oflag=direct 2>/dev/null
        back=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -n 1)
        [ "$back" = "$(printf 'beat-%08d' $i)" ] && disk=ok || disk="bad:$back"
        ping -c 1 -W 5 10.205.0.1 >/dev/null 2>&1 && ping=ok || ping=failed
        echo "SNAP-CHECK n=$i md5=$md5 disk=$disk ping=$ping"
    fi
    sleep 0.2
done
S
dd if=/tmp/snap.sh of=/tmp/snap.img bs=4096 conv=sync 2>/dev/null
DEVS="--disk path=/tmp/snapdata.img,id=data --disk path=/tmp/snap.img,ro=on,id=script --net tap=kt5,mac=52:54:00:12:34:57,id=eth"

# ---- snap-src: boot, run until two checks passed, pause, snapshot, power off.
CASE=snap-src
echo "CASE-START $CASE t=$(up)"
kiln-vmm $K --memory 256M --serial file:/tmp/src.log --api-socket /tmp/src.sock $DEVS \
    --cmdline "$Q kiln.script=/dev/vdb" 2>/tmp/src.err &
vmm=$!
if wait_for /tmp/src.log SNAP-CHECK 2 400; then
    api /tmp/src.sock PUT /vm/pause
    # The last beat the guest printed before the pause.
    say "SNAP-LAST-BEFORE $(grep SNAP-HB /tmp/src.log | tail -n 1)"
    t0=$(up)
    api /tmp/src.sock PUT /vm/snapshot '{"destination_dir":"/tmp/snapdir"}'
    say "SNAP-TAKEN seconds=$(echo "$(up) $t0" | awk '{printf "%.3f", $1 - $2}')"
    for f in /tmp/snapdir/state /tmp/snapdir/memory; do
        say "SNAP-FILE $f mode=$(stat -c %a "$f") bytes=$(stat -c %s "$f") blocks_kib=$(du -k "$f" | cut -f1)"
    done
    # A snapshot cannot be taken of a running VM.
    api /tmp/src.sock PUT /vm/resume
    api /tmp/src.sock PUT /vm/snapshot '{"destination_dir":"/tmp/snapdir-running"}'
    api /tmp/src.sock PUT /vm/power-off
else
    say "SNAP-SRC-NO-CHECKS"
    kill $vmm
fi
wait $vmm
rc=$?
tagged $CASE /tmp/src.log
tagged $CASE:err /tmp/src.err
echo "CASE-END $CASE rc=$rc t=$(up)"

# ---- restore-K: a new kiln-vmm from the one snapshot, K times.
for k in 1 2 3; do
    CASE=restore-$k
    echo "CASE-START $CASE t=$(up)"
    rm -f /tmp/r.log
    kiln-vmm --restore /tmp/snapdir --serial file:/tmp/r.log --api-socket /tmp/r.sock $DEVS \
        2>/tmp/r.err &
    vmm=$!
    if wait_for /tmp/r.log SNAP-CHECK 2 300; then
        api /tmp/r.sock GET /vm
        api /tmp/r.sock PUT /vm/power-off
    else
        echo "[$CASE] RESTORE-NO-CHECKS"
        kill $vmm
    fi
    wait $vmm
    rc=$?
    tagged $CASE /tmp/r.log
    tagged $CASE:err /tmp/r.err
    echo "CASE-END $CASE rc=$rc t=$(up)"
done

# ---- refusals: broken snapshots and mismatched devices; each must fail
# before the guest runs.
refuse() {
    CASE=$1; shift
    echo "CASE-START $CASE t=$(up)"
    timeout 60 kiln-vmm "$@" --serial file:/tmp/x.log </dev/null 2>/tmp/x.err
    rc=$?
    tagged $CASE:err /tmp/x.err
    echo "[$CASE] CONSOLE-BYTES $(stat -c %s /tmp/x.log 2>/dev/null || echo 0)"
    echo "CASE-END $CASE rc=$rc t=$(up)"
}
mkdir -p /tmp/trunc /tmp/edit /tmp/other
cp /tmp/snapdir/memory /tmp/trunc/memory
head -c 1000 /tmp/snapdir/state >/tmp/trunc/state
refuse refuse-truncated --restore /tmp/trunc $DEVS
cp /tmp/snapdir/memory /tmp/edit/memory
cp /tmp/snapdir/state /tmp/edit/state
# One byte of the body changed ("1" <-> "2" wherever the first digit is).
size=$(stat -c %s /tmp/edit/state)
off=$((size / 2))
b=$(dd if=/tmp/edit/state bs=1 skip=$off count=1 2>/dev/null)
if [ "$b" = 1 ]; then n=2; else n=1; fi
printf %s "$n" | dd of=/tmp/edit/state bs=1 seek=$off conv=notrunc 2>/dev/null
refuse refuse-edited --restore /tmp/edit $DEVS
cp /tmp/snapdir/state /tmp/other/state
head -c 8192 /tmp/snapdir/memory >/tmp/other/memory
refuse refuse-short-memory --restore /tmp/other $DEVS
refuse refuse-devices --restore /tmp/snapdir --disk path=/tmp/snapdata.img,id=data \
    --net tap=kt5,id=eth
refuse refuse-kernel-arg --restore /tmp/snapdir $K $DEVS
exit 0
"#;

fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Option<Result<HostRun, String>>> = OnceLock::new();
    RUN.get_or_init(|| {
        if !require_testhost() {
            return None;
        }
        let vmm = profile_binary("kiln-vmm");
        let api_call = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kiln-api-call"));
        let run = TestHost::run(SCRIPT, &[vmm, api_call], &[], Duration::from_secs(1800));
        if let Ok(run) = &run {
            eprintln!("{}", run.output);
            eprintln!("test host: {:.1} s wall", run.elapsed.as_secs_f64());
        }
        Some(run.map_err(|e| e.to_string()))
    })
    .as_ref()
    .map(|r| {
        let run = r.as_ref().unwrap_or_else(|e| panic!("test host: {e}"));
        run.assert_success();
        run
    })
}

fn case(name: &str) -> Option<CaseOutput> {
    let run = session()?;
    Some(
        run.case(name)
            .unwrap_or_else(|| panic!("case {name} did not finish:\n{}", run.output)),
    )
}

/// A heartbeat: counter, uptime (s), wall clock (s).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Beat {
    n: u64,
    up: f64,
    wall: u64,
}

fn beats(c: &CaseOutput) -> Vec<Beat> {
    c.out
        .iter()
        .filter_map(|l| l.find("SNAP-HB ").map(|i| &l[i..]))
        .filter_map(|l| {
            Some(Beat {
                n: field(l, "n")?.parse().ok()?,
                up: field(l, "up")?.parse().ok()?,
                wall: field(l, "wall")?.parse().ok()?,
            })
        })
        .collect()
}

/// The checks: (n, md5, disk, ping).
fn checks(c: &CaseOutput) -> Vec<(u64, String, String, String)> {
    c.out
        .iter()
        .filter_map(|l| l.find("SNAP-CHECK ").map(|i| &l[i..]))
        .filter_map(|l| {
            Some((
                field(l, "n")?.parse().ok()?,
                field(l, "md5")?.to_string(),
                field(l, "disk")?.to_string(),
                field(l, "ping")?.to_string(),
            ))
        })
        .collect()
}

fn pattern_md5(c: &CaseOutput) -> String {
    c.out
        .iter()
        .find_map(|l| l.find("SNAP-PATTERN ").map(|i| &l[i..]))
        .and_then(|l| field(l, "md5"))
        .unwrap_or_else(|| panic!("no pattern line: {c:?}"))
        .to_string()
}

/// The source's last beat before the pause.
fn last_before(c: &CaseOutput) -> Beat {
    let line = c
        .out
        .iter()
        .find_map(|l| l.find("SNAP-LAST-BEFORE ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no last beat: {c:?}"));
    let b = beats(&CaseOutput {
        out: vec![line.to_string()],
        err: vec![],
        rc: 0,
    });
    *b.first()
        .unwrap_or_else(|| panic!("bad last beat line {line}"))
}

#[test]
fn a_paused_vm_is_snapshotted_to_two_private_files_and_a_running_one_is_refused() {
    let Some(c) = case("snap-src") else { return };
    assert_eq!(c.rc, 0, "{c:?}");
    let statuses: Vec<&String> = c
        .out
        .iter()
        .filter(|l| l.starts_with("API-STATUS"))
        .collect();
    // pause, snapshot, resume, snapshot of a running VM, power-off.
    assert_eq!(
        statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        [
            "API-STATUS 204",
            "API-STATUS 204",
            "API-STATUS 204",
            "API-STATUS 409",
            "API-STATUS 204"
        ],
        "{c:?}"
    );
    let files: Vec<&String> = c
        .out
        .iter()
        .filter(|l| l.starts_with("SNAP-FILE"))
        .collect();
    assert_eq!(files.len(), 2, "{c:?}");
    for f in &files {
        assert_eq!(field(f, "mode"), Some("600"), "{f}");
    }
    let mem = files.iter().find(|f| f.contains("/memory")).unwrap();
    let bytes: u64 = field(mem, "bytes").unwrap().parse().unwrap();
    let kib: u64 = field(mem, "blocks_kib").unwrap().parse().unwrap();
    assert_eq!(bytes, 4096 + (256 << 20), "{mem}");
    // Sparse: a 256 MiB guest that used well under half of it.
    assert!(kib * 1024 < bytes / 2, "memory file not sparse: {mem}");
    assert!(c.out.iter().any(|l| l.starts_with("SNAP-TAKEN")), "{c:?}");
}

#[test]
fn each_restore_continues_the_guest_where_it_stopped() {
    let Some(src) = case("snap-src") else { return };
    let before = last_before(&src);
    let pattern = pattern_md5(&src);
    for k in 1..=RESTORES {
        let c = case(&format!("restore-{k}")).unwrap();
        assert_eq!(c.rc, 0, "restore {k}: {c:?}");
        let b = beats(&c);
        assert!(!b.is_empty(), "restore {k} printed no beat: {c:?}");
        // The counter goes on from the snapshot: the first beat after the
        // restore is the next one (or the one the pause interrupted).
        assert!(
            b[0].n == before.n || b[0].n == before.n + 1,
            "restore {k}: first beat {:?} after {:?}",
            b[0],
            before
        );
        assert!(
            b.windows(2).all(|w| w[1].n == w[0].n + 1),
            "restore {k}: {b:?}"
        );
        // The guest's clocks never go backwards.
        assert!(
            b[0].up >= before.up,
            "restore {k}: uptime {:?} < {:?}",
            b[0],
            before
        );
        assert!(
            b[0].wall >= before.wall,
            "restore {k}: wall {:?} < {:?}",
            b[0],
            before
        );
        assert!(
            b.windows(2).all(|w| w[1].up >= w[0].up),
            "restore {k}: {b:?}"
        );
        let ch = checks(&c);
        assert!(ch.len() >= 2, "restore {k}: {c:?}");
        for (n, md5, disk, ping) in &ch {
            assert_eq!(md5, &pattern, "restore {k}: pattern changed at beat {n}");
            assert_eq!(disk, "ok", "restore {k}: disk at beat {n}");
            assert_eq!(ping, "ok", "restore {k}: network at beat {n}");
        }
    }
}

#[test]
fn broken_snapshots_and_mismatched_devices_are_refused_before_the_guest_runs() {
    for (name, says) in [
        ("refuse-truncated", "truncated"),
        ("refuse-edited", "checksum"),
        ("refuse-short-memory", "memory"),
        ("refuse-devices", "disk"),
        ("refuse-kernel-arg", "--kernel"),
    ] {
        let Some(c) = case(name) else { return };
        assert_ne!(c.rc, 0, "{name}: {c:?}");
        assert_ne!(c.rc, 124, "{name} hung: {c:?}");
        let err = c.err.join("\n");
        assert!(
            err.to_lowercase().contains(says),
            "{name}: error should mention {says:?}: {err}"
        );
        assert!(
            c.out.iter().any(|l| l == "CONSOLE-BYTES 0"),
            "{name}: the guest ran: {c:?}"
        );
    }
}
