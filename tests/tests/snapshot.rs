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
//! All cases share one test-host boot; each #[test] checks its part. The
//! test host runs without nested paging (`--no-npt`), and if a guest still
//! dies of a triple fault (the nested environment's known death) the whole
//! script runs once more in a fresh test host, counted as a retry.

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
    while :; do
        c=$(grep -c "$2" "$1" 2>/dev/null)
        [ "${c:-0}" -ge "$3" ] && return 0
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

# ---- live migration. The guest: the pattern and checks as above, a loop
# that rewrites 16 MiB of tmpfs again and again (dirty memory), a TCP
# stream of numbered lines to the test host, and a heartbeat every 0.1 s.
# Consoles go through stamp, which prefixes each heartbeat with the test
# host's uptime: the pause as the outside world sees it. A migration may
# pause the guest mid-line, so that a line starts on the source's console
# and ends on the destination's: the source's unfinished last line is
# printed as "MIG-TAIL text", and with "stamp incoming" a first line that
# is not a whole heartbeat as "MIG-HEAD text" (the test joins the two).
stamp() {
    head=${1:-} partial=''
    while IFS= read -r l || { [ -n "$l" ] && partial=1; }; do
        if [ -n "$partial" ]; then echo "MIG-TAIL $l"; break; fi
        if [ -n "$head" ]; then
            head=''
            case $l in MIG-HB*) ;; *) echo "MIG-HEAD $l"; continue ;; esac
        fi
        case $l in *MIG-HB*) echo "$(up) $l" ;; *) echo "$l" ;; esac
    done
}
/usr/sbin/ip link add br7 type bridge
/usr/sbin/ip addr add 10.207.0.1/24 dev br7
/usr/sbin/ip link set br7 up
for t in kt7a kt7b; do
    /usr/sbin/ip tuntap add $t mode tap
    /usr/sbin/ip link set $t master br7
    /usr/sbin/ip link set $t up
done
cat >/tmp/mig.sh <<'S'
up() { cut -d' ' -f1 /proc/uptime; }
ip link set eth0 up
ip addr add 10.207.0.2/24 dev eth0
mkdir -p /pat
mount -t tmpfs -o size=48m tmpfs /pat
dd if=/dev/urandom of=/pat/pattern bs=1M count=16 iflag=fullblock 2>/dev/null
echo "MIG-PATTERN md5=$(md5sum </pat/pattern | cut -d' ' -f1)"
( while :; do dd if=/dev/urandom of=/pat/scratch bs=1M count=16 2>/dev/null; done ) &
( n=0; while :; do n=$((n + 1)); echo "line $n"; sleep 0.02; done | nc 10.207.0.1 5010 ) &
i=0
while :; do
    i=$((i + 1))
    echo "MIG-HB n=$i up=$(up)"
    if [ $((i % 20)) = 0 ]; then
        md5=$(md5sum </pat/pattern | cut -d' ' -f1)
        ping -c 1 -W 5 10.207.0.1 >/dev/null 2>&1 && ping=ok || ping=failed
        echo "MIG-CHECK n=$i md5=$md5 ping=$ping"
    fi
    sleep 0.1
done
S
dd if=/tmp/mig.sh of=/tmp/mig.img bs=4096 conv=sync 2>/dev/null
dd if=/dev/zero of=/tmp/migdata.img bs=1M count=0 seek=16 2>/dev/null
mdevs() { echo "--disk path=/tmp/migdata.img,id=data --disk path=/tmp/mig.img,ro=on,id=script --net tap=$1,mac=52:54:00:12:34:58,id=eth"; }
mkdir -m 700 /run/kmig
# mstatus SOCK: the source's migration status, one line.
mstatus() { kiln-api-call "$1" GET /vm | grep -o '"migration":.*' ; }
# in_precopy SOCK: waits (30 s at most) until the migration copies RAM.
in_precopy() {
    i=0
    until mstatus "$1" | grep -q '"phase":"precopy"'; do
        i=$((i + 1)); [ $i -le 600 ] || break
        sleep 0.05
    done
}
# wait_migration SOCK PID: until the source process ends or its
# migration failed (at most 600 s); prints the last status.
wait_migration() {
    i=0
    while kill -0 "$2" 2>/dev/null; do
        st=$(mstatus "$1")
        case $st in *'"state":"failed"'* | *'"state":"in-doubt"'*) break ;; esac
        i=$((i + 1)); [ $i -le 3000 ] || break
        sleep 0.2
    done
    say "MIG-STATUS $st"
}

# ---- mig-src: the source boots; three migrations fail (the destination
# refuses, is killed mid-copy, is not there) and the guest runs on after
# each; the fourth, to a different build of kiln-vmm on a unix socket,
# succeeds (an upgrade under a running VM).
CASE=mig-src
echo "CASE-START $CASE t=$(up)"
printf '#!/bin/sh\ncat >/tmp/stream.txt\n' >/tmp/stream-recv.sh
chmod +x /tmp/stream-recv.sh
nc -l -p 5010 -e /tmp/stream-recv.sh &
nc_pid=$!
( KILN_LOG=info kiln-vmm $K --memory 256M --api-socket /tmp/ms.sock $(mdevs kt7a) \
    --cmdline "$Q kiln.script=/dev/vdb" </dev/null 2>/tmp/ms.err; echo "rc=$?" >/tmp/ms.rc ) \
    | stamp >/tmp/ms.log &
i=0; while [ ! -S /tmp/ms.sock ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
src=$(for p in /proc/[0-9]*; do read -r c <"$p/comm" 2>/dev/null && [ "$c" = kiln-vmm ] && echo "${p#/proc/}"; done | head -n 1)
if wait_for /tmp/ms.log MIG-CHECK 2 400; then
    # The destination refuses: another memory size.
    rm -f /run/kmig/m.sock
    kiln-vmm-v2 --incoming unix:/run/kmig/m.sock --memory 128M --serial none $(mdevs kt7b) \
        2>/tmp/md0.err &
    dst=$!
    i=0; while [ ! -S /run/kmig/m.sock ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    api /tmp/ms.sock PUT /vm/migrate '{"destination":"unix:/run/kmig/m.sock"}'
    wait_migration /tmp/ms.sock "$src"
    wait $dst
    say "MIG-REFUSED-DST rc=$?"
    tagged $CASE-dst0:err /tmp/md0.err
    n0=$(grep -c MIG-HB /tmp/ms.log)
    wait_for /tmp/ms.log MIG-HB $((n0 + 5)) 120 && say "MIG-RUNS-ON after-refusal"

    # The destination dies while RAM is being copied.
    rm -f /run/kmig/m.sock
    kiln-vmm-v2 --incoming unix:/run/kmig/m.sock --memory 256M --serial none $(mdevs kt7b) \
        2>/tmp/md1.err &
    dst=$!
    i=0; while [ ! -S /run/kmig/m.sock ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    api /tmp/ms.sock PUT /vm/migrate '{"destination":"unix:/run/kmig/m.sock"}'
    in_precopy /tmp/ms.sock
    kill -KILL $dst
    wait $dst
    wait_migration /tmp/ms.sock "$src"
    n0=$(grep -c MIG-HB /tmp/ms.log)
    wait_for /tmp/ms.log MIG-HB $((n0 + 5)) 120 && say "MIG-RUNS-ON after-kill"

    # Nobody listens.
    api /tmp/ms.sock PUT /vm/migrate '{"destination":"unix:/run/kmig/nobody.sock"}'
    wait_migration /tmp/ms.sock "$src"
    n0=$(grep -c MIG-HB /tmp/ms.log)
    wait_for /tmp/ms.log MIG-HB $((n0 + 5)) 120 && say "MIG-RUNS-ON after-no-listener"

    # The upgrade: to kiln-vmm-v2, another build, over a unix socket.
    rm -f /tmp/md.sock /run/kmig/m.sock
    ( KILN_LOG=info kiln-vmm-v2 --incoming unix:/run/kmig/m.sock --memory 256M \
        --api-socket /tmp/md.sock $(mdevs kt7b) </dev/null 2>/tmp/md.err; echo "rc=$?" >/tmp/md.rc ) \
        | stamp incoming >/tmp/md.log &
    i=0; while [ ! -S /run/kmig/m.sock ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    say "MIG-SWITCH-BEFORE $(grep MIG-HB /tmp/ms.log | tail -n 1)"
    say "MIG-STREAM-AT-SWITCH lines=$(wc -l </tmp/stream.txt)"
    api /tmp/ms.sock PUT /vm/migrate '{"destination":"unix:/run/kmig/m.sock","downtime_ms":300}'
    wait_migration /tmp/ms.sock "$src"
else
    say "MIG-SRC-NO-CHECKS"
    kill $src
fi
i=0; while [ ! -f /tmp/ms.rc ] && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
tagged $CASE /tmp/ms.log
tagged $CASE:err /tmp/ms.err
echo "CASE-END $CASE $(cat /tmp/ms.rc 2>/dev/null || echo rc=124) t=$(up)"

# ---- mig-dst: the upgraded VM runs on; then it moves once more, over TCP
# with a shared secret, to a kiln-vmm in another network namespace.
CASE=mig-dst
echo "CASE-START $CASE t=$(up)"
# Only if the upgrade moved the guest: a destination that never received
# it would wait for it for ever.
if [ -S /tmp/md.sock ] && wait_for /tmp/md.log MIG-HB 1 30; then
    n0=$(grep -c MIG-CHECK /tmp/md.log)
    wait_for /tmp/md.log MIG-CHECK $((n0 + 2)) 300 || say "MIG-DST-NO-CHECKS"
    api /tmp/md.sock GET /vm
    /usr/sbin/ip netns add kmig
    /usr/sbin/ip link add kv0 type veth peer name kv1
    /usr/sbin/ip link set kv1 netns kmig
    /usr/sbin/ip addr add 10.208.0.1/24 dev kv0
    /usr/sbin/ip link set kv0 up
    /usr/sbin/ip netns exec kmig /usr/sbin/ip addr add 10.208.0.2/24 dev kv1
    /usr/sbin/ip netns exec kmig /usr/sbin/ip link set kv1 up
    /usr/sbin/ip netns exec kmig /usr/sbin/ip link set lo up
    /usr/sbin/ip netns exec kmig /usr/sbin/ip tuntap add kt8 mode tap
    /usr/sbin/ip netns exec kmig /usr/sbin/ip link set kt8 up
    head -c 32 /dev/urandom >/tmp/mig.secret
    chmod 600 /tmp/mig.secret
    dpid=$(for p in /proc/[0-9]*; do read -r c <"$p/comm" 2>/dev/null && [ "$c" = kiln-vmm-v2 ] && echo "${p#/proc/}"; done | head -n 1)
    # The connection is cut while RAM is copied (the destination's end of
    # the link goes down, so nothing answers, not even a reset): the
    # source gives up when a write has waited its I/O timeout (30 s) and
    # the guest runs on.
    /usr/sbin/ip netns exec kmig kiln-vmm --incoming tcp:10.208.0.2:7001 \
        --migration-secret /tmp/mig.secret --memory 256M --serial none $(mdevs kt8) \
        </dev/null 2>/tmp/mc.err &
    cut_dst=$!
    sleep 2
    api /tmp/md.sock PUT /vm/migrate '{"destination":"tcp:10.208.0.2:7001","secret_file":"/tmp/mig.secret"}'
    in_precopy /tmp/md.sock
    /usr/sbin/ip netns exec kmig /usr/sbin/ip link set kv1 down
    say "MIG-CUT t=$(up)"
    wait_migration /tmp/md.sock "$dpid"
    say "MIG-CUT-GAVE-UP t=$(up)"
    /usr/sbin/ip netns exec kmig /usr/sbin/ip link set kv1 up
    # The cut-off destination times out too, and exits (releasing kt8).
    wait $cut_dst
    say "MIG-CUT-DST rc=$?"
    tagged $CASE-cut:err /tmp/mc.err
    n0=$(grep -c MIG-HB /tmp/md.log)
    wait_for /tmp/md.log MIG-HB $((n0 + 5)) 120 && say "MIG-RUNS-ON after-cut"
    ( KILN_LOG=info /usr/sbin/ip netns exec kmig kiln-vmm --incoming tcp:10.208.0.2:7000 \
        --migration-secret /tmp/mig.secret --memory 256M --api-socket /tmp/mt.sock $(mdevs kt8) \
        </dev/null 2>/tmp/mt.err; echo "rc=$?" >/tmp/mt.rc ) | stamp incoming >/tmp/mt.log &
    sleep 2
    say "MIG-SWITCH-BEFORE $(grep MIG-HB /tmp/md.log | tail -n 1)"
    say "MIG-STREAM-AT-TCP lines=$(wc -l </tmp/stream.txt)"
    api /tmp/md.sock PUT /vm/migrate '{"destination":"tcp:10.208.0.2:7000","secret_file":"/tmp/mig.secret"}'
    wait_migration /tmp/md.sock "$dpid"
else
    say "MIG-DST-NOT-RUNNING"
    for p in /proc/[0-9]*; do
        read -r c <"$p/comm" 2>/dev/null && [ "$c" = kiln-vmm-v2 ] && kill "${p#/proc/}"
    done
fi
i=0; while [ ! -f /tmp/md.rc ] && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
kill $nc_pid 2>/dev/null
tagged $CASE /tmp/md.log
tagged $CASE:err /tmp/md.err
echo "CASE-END $CASE $(cat /tmp/md.rc 2>/dev/null || echo rc=124) t=$(up)"

# ---- mig-tcp: the VM that came over TCP runs on; then it is powered off.
CASE=mig-tcp
echo "CASE-START $CASE t=$(up)"
if [ -S /tmp/mt.sock ]; then
    n0=$(grep -c MIG-HB /tmp/mt.log)
    wait_for /tmp/mt.log MIG-HB $((n0 + 30)) 300 || say "MIG-TCP-NO-BEATS"
    api /tmp/mt.sock PUT /vm/power-off
else
    say "MIG-TCP-NO-SOCKET"
fi
i=0; while [ ! -f /tmp/mt.rc ] && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
awk '{ n = $2 + 0; if (NR > 1 && n != last + 1) gaps++; last = n } END { printf "MIG-STREAM lines=%d last=%d gaps=%d\n", NR, last, gaps + 0 }' /tmp/stream.txt | sed "s/^/[$CASE] /"
tagged $CASE /tmp/mt.log
tagged $CASE:err /tmp/mt.err
echo "CASE-END $CASE $(cat /tmp/mt.rc 2>/dev/null || echo rc=124) t=$(up)"
exit 0
"#;

fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Option<Result<HostRun, String>>> = OnceLock::new();
    RUN.get_or_init(|| {
        if !require_testhost() {
            return None;
        }
        let vmm = profile_binary("kiln-vmm");
        let v2 = match other_build() {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let api_call = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kiln-api-call"));
        let bins = [vmm, v2, api_call];
        // Without nested paging: with it, CI saw a source guest die of a
        // triple fault as its migration began (`scripts/testhost --help`,
        // --no-npt).
        let args = ["--no-npt".to_string()];
        let boot = || {
            let run = TestHost::run_with_args(SCRIPT, &bins, &[], &args, Duration::from_secs(2400));
            if let Ok(run) = &run {
                eprintln!("{}", run.output);
                eprintln!("test host: {:.1} s wall", run.elapsed.as_secs_f64());
            }
            run
        };
        let mut run = boot();
        // A guest that died of a triple fault anyway: the whole script runs
        // once more in a fresh test host, counted and printed.
        if let Some(died) = run.as_ref().ok().and_then(HostRun::guest_triple_fault) {
            let console = run.as_ref().map(|r| r.output.as_str()).unwrap_or_default();
            let kept = kiln_tests::report::keep_retried(console);
            kiln_tests::retry(format!(
                "a guest died of a triple fault in the nested test host ({died}); booting the test host once more (its console: {})",
                kept.display()
            ));
            run = boot();
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

/// kiln-vmm built again with the `upgrade-test` profile (unoptimised, no
/// debug information): a different build for the migration to move the
/// VM to. Returned as `kiln-vmm-v2`.
fn other_build() -> Result<std::path::PathBuf, String> {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--profile",
            "upgrade-test",
            "-p",
            "kiln-vmm",
            "--bin",
            "kiln-vmm",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err("building the upgrade-test kiln-vmm failed".into());
    }
    let v2 = kiln_tests::target_dir().join("kiln-tests/kiln-vmm-v2");
    std::fs::create_dir_all(v2.parent().unwrap()).map_err(|e| e.to_string())?;
    std::fs::copy(kiln_tests::target_dir().join("upgrade-test/kiln-vmm"), &v2)
        .map_err(|e| format!("{}: {e}", v2.display()))?;
    Ok(v2)
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

/// A heartbeat of the migration guest, with the test host's uptime when
/// its line came out of kiln-vmm.
#[derive(Debug, Clone, Copy)]
struct HostBeat {
    host: f64,
    n: u64,
}

fn host_beats(c: &CaseOutput) -> Vec<HostBeat> {
    c.out
        .iter()
        .filter(|l| l.contains("MIG-HB "))
        .filter_map(|l| {
            Some(HostBeat {
                host: l.split_whitespace().next()?.parse().ok()?,
                n: field(l, "n")?.parse().ok()?,
            })
        })
        .collect()
}

fn said<'a>(c: &'a CaseOutput, marker: &str) -> Vec<&'a str> {
    c.out
        .iter()
        .filter_map(|l| l.find(marker).map(|i| &l[i..]))
        .collect()
}

fn mig_checks(c: &CaseOutput) -> Vec<(String, String)> {
    said(c, "MIG-CHECK ")
        .iter()
        .filter_map(|l| Some((field(l, "md5")?.to_string(), field(l, "ping")?.to_string())))
        .collect()
}

/// The longest gap between consecutive heartbeats across a switch from
/// `from` to `to`, as the test host saw them, and whether the count went
/// on without a hole.
fn switch_gap(from: &CaseOutput, to: &CaseOutput) -> (f64, bool) {
    let a = host_beats(from);
    let b = host_beats(to);
    let (Some(last), Some(first)) = (a.last(), b.first()) else {
        panic!("no heartbeats around the switch:\n{from:?}\n{to:?}");
    };
    // A heartbeat the guest was printing when it paused: begun on the
    // source's console, finished on the destination's.
    let last_n = match split_beat(from, to) {
        Some(n) if n == last.n + 1 => n,
        _ => last.n,
    };
    (
        first.host - last.host,
        first.n == last_n + 1 || first.n == last_n,
    )
}

/// The number of the heartbeat split across a switch: the source's
/// unfinished last line (`MIG-TAIL`) joined to the destination's first
/// (`MIG-HEAD`, if it has one), when that reads as a whole heartbeat.
fn split_beat(from: &CaseOutput, to: &CaseOutput) -> Option<u64> {
    let tail = said(from, "MIG-TAIL ").last()?.strip_prefix("MIG-TAIL ")?;
    let head = said(to, "MIG-HEAD ")
        .first()
        .and_then(|l| l.strip_prefix("MIG-HEAD "))
        .unwrap_or("");
    let joined = format!("{tail}{head}");
    let beat = joined.strip_prefix("MIG-HB ")?;
    // Whole up to its `up=` field, so the number is not cut short.
    field(beat, "up")?;
    field(beat, "n")?.parse().ok()
}

#[test]
fn failed_migrations_leave_the_source_running() {
    let Some(c) = case("mig-src") else { return };
    let statuses = said(&c, "MIG-STATUS ");
    assert!(statuses.len() >= 4, "{c:?}");
    // Refused by the destination, with its reason.
    assert!(
        statuses[0].contains("\"state\":\"failed\""),
        "{}",
        statuses[0]
    );
    assert!(statuses[0].contains("RAM size differs"), "{}", statuses[0]);
    // The destination died mid-copy; nobody listened.
    assert!(
        statuses[1].contains("\"state\":\"failed\""),
        "{}",
        statuses[1]
    );
    assert!(
        statuses[2].contains("\"state\":\"failed\""),
        "{}",
        statuses[2]
    );
    for after in ["after-refusal", "after-kill", "after-no-listener"] {
        assert!(
            said(&c, "MIG-RUNS-ON ").iter().any(|l| l.contains(after)),
            "the guest stopped {after}: {c:?}"
        );
    }
    assert!(
        said(&c, "MIG-REFUSED-DST ")
            .iter()
            .any(|l| !l.ends_with("rc=0")),
        "a refusing destination exits with an error: {c:?}"
    );
    // The heartbeat never skipped a number on the source.
    let b = host_beats(&c);
    assert!(b.windows(2).all(|w| w[1].n == w[0].n + 1), "{b:?}");
}

#[test]
fn a_running_vm_moves_to_another_kiln_vmm_build_and_its_tcp_stream_survives() {
    let Some(src) = case("mig-src") else { return };
    let dst = case("mig-dst").unwrap();
    assert_eq!(src.rc, 0, "the source exits 0 after handing over: {src:?}");
    assert!(
        src.err.iter().any(|l| l.contains("migrated")),
        "the source says it migrated: {src:?}"
    );
    let (gap, continuous) = switch_gap(&src, &dst);
    eprintln!("unix-socket migration: the guest's heartbeat paused {gap:.3} s (test host clock)");
    assert!(continuous, "the heartbeat skipped across the switch");
    let pattern = said(&src, "MIG-PATTERN ")
        .first()
        .and_then(|l| field(l, "md5"))
        .unwrap_or_else(|| panic!("{src:?}"))
        .to_string();
    let checks = mig_checks(&dst);
    assert!(checks.len() >= 2, "{dst:?}");
    for (md5, ping) in &checks[..2] {
        assert_eq!(md5, &pattern, "memory pattern after migration");
        assert_eq!(ping, "ok", "network after migration");
    }
    let at = |c: &CaseOutput, m: &str| -> u64 {
        said(c, m)
            .first()
            .and_then(|l| field(l, "lines"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {m}: {c:?}"))
    };
    let at_switch = at(&src, "MIG-STREAM-AT-SWITCH ");
    let at_tcp = at(&dst, "MIG-STREAM-AT-TCP ");
    assert!(
        at_tcp > at_switch,
        "the TCP stream stopped at the switch ({at_switch} lines, then {at_tcp})"
    );
    let tcp = case("mig-tcp").unwrap();
    let stream = said(&tcp, "MIG-STREAM ");
    assert!(
        stream
            .first()
            .is_some_and(|l| field(l, "gaps") == Some("0")),
        "the stream lost or repeated lines: {stream:?}"
    );
}

/// The connection cut while RAM is copied (no reset, nothing answers):
/// the source gives up after its I/O timeout and the guest runs on; then
/// the same VM moves over TCP (the test below).
#[test]
fn a_migration_whose_connection_is_cut_leaves_the_source_running() {
    let Some(dst) = case("mig-dst") else { return };
    assert!(!said(&dst, "MIG-CUT ").is_empty(), "{dst:?}");
    let status = said(&dst, "MIG-STATUS ");
    let status = status.first().unwrap_or_else(|| panic!("{dst:?}"));
    assert!(status.contains("\"state\":\"failed\""), "{status}");
    assert!(
        said(&dst, "MIG-RUNS-ON ")
            .iter()
            .any(|l| l.contains("after-cut")),
        "the guest stopped after the cut: {dst:?}"
    );
    let t = |m: &str| -> f64 {
        said(&dst, m)
            .first()
            .and_then(|l| field(l, "t"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {m}: {dst:?}"))
    };
    let waited = t("MIG-CUT-GAVE-UP ") - t("MIG-CUT ");
    eprintln!("cut connection: the source gave up after {waited:.1} s");
    assert!(
        waited < 200.0,
        "the source waited {waited:.0} s on a dead connection"
    );
}

#[test]
fn a_vm_moves_over_tcp_with_a_shared_secret_into_another_network_namespace() {
    let Some(dst) = case("mig-dst") else { return };
    let tcp = case("mig-tcp").unwrap();
    assert_eq!(dst.rc, 0, "{dst:?}");
    assert_eq!(tcp.rc, 0, "powered off through the API: {tcp:?}");
    let (gap, continuous) = switch_gap(&dst, &tcp);
    eprintln!("TCP migration: the guest's heartbeat paused {gap:.3} s (test host clock)");
    assert!(continuous, "the heartbeat skipped across the switch");
    assert!(host_beats(&tcp).len() >= 30, "{tcp:?}");
}

/// A heartbeat the guest was printing when a migration paused it, begun on
/// the source's console and finished on the destination's, counts as
/// printed (no test host needed); a beat missing outright does not.
#[test]
fn a_heartbeat_split_across_the_switch_is_joined() {
    let console = |lines: &[&str]| CaseOutput {
        out: lines.iter().map(|l| l.to_string()).collect(),
        err: Vec::new(),
        rc: 0,
    };
    let src = console(&[
        "10.00 MIG-HB n=41 up=5.00",
        "10.10 MIG-HB n=42 up=5.10",
        "MIG-TAIL MIG-HB n=4",
    ]);
    let dst = console(&["MIG-HEAD 3 up=5.20", "10.90 MIG-HB n=44 up=5.30"]);
    let (gap, continuous) = switch_gap(&src, &dst);
    assert!(continuous);
    assert!((gap - 0.8).abs() < 1e-9, "{gap}");
    // The whole line on the source, nothing left for the destination.
    let src = console(&["10.10 MIG-HB n=42 up=5.10", "MIG-TAIL MIG-HB n=43 up=5.20"]);
    let dst = console(&["10.90 MIG-HB n=44 up=5.30"]);
    assert!(switch_gap(&src, &dst).1);
    // Without the tail, n=43 is missing.
    let src = console(&["10.10 MIG-HB n=42 up=5.10"]);
    assert!(!switch_gap(&src, &dst).1);
    // A tail that does not read as the next heartbeat does not fill the gap.
    let src = console(&["10.10 MIG-HB n=42 up=5.10", "MIG-TAIL MIG-HB n=4"]);
    assert!(!switch_gap(&src, &dst).1);
}
