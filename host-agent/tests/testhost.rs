//! The agent end to end with the stock Debian guest, in one test-host boot
//! (real KVM): `kiln-agent init` and `serve`; kilnctl imports the kernel and
//! initramfs and a disk image, makes a network and a volume, and a VM with
//! that disk and a NIC; the guest reaches init, pings the bridge, and keeps
//! a ping loop and a console heartbeat going while the agent is killed
//! with SIGKILL and replaced by another binary; the VM is re-adopted with
//! no gap in its console and no lost ping; a graceful shutdown ends it
//! through its power button; with restart policy `always` a killed
//! kiln-vmm comes back by itself.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_tests::{
    field, profile_binary, require_testhost, target_dir, write_script_disk, HostRun, TestHost,
};

/// How many pings the guest sends (one a second) while the agent is
/// killed and replaced.
const PINGS: u32 = 40;

fn guest_script() -> String {
    format!(
        r#"ip link set eth0 up
ip addr add 10.91.0.2/24 dev eth0
if ping -c 3 -W 3 10.91.0.1 >/dev/null; then echo E2E-PING-OK; else echo E2E-PING-FAILED; fi
(ping -c {PINGS} 10.91.0.1 >/run/ping.log 2>&1; awk '/packets transmitted/ {{print "E2E-PING-DONE tx=" $1 " rx=" $4}}' /run/ping.log) &
echo E2E-PING-STARTED
# The data disk: a known pattern, its checksum now and every 10 ticks
# (read past the page cache), across the online rekey.
yes KILN-GUEST-PLAINTEXT-MARKER | head -c 4194304 >/run/pattern
dd if=/run/pattern of=/dev/vdb bs=1M oflag=direct 2>/dev/null && sync
echo "E2E-DATASUM n=0 sum=$(md5sum </run/pattern | cut -c1-32)"
n=0
while true; do
    n=$((n + 1)); echo "E2E-TICK n=$n"
    if [ $((n % 10)) -eq 0 ]; then
        echo 3 >/proc/sys/vm/drop_caches
        echo "E2E-DATASUM n=$n sum=$(head -c 4194304 /dev/vdb | md5sum | cut -c1-32)"
    fi
    sleep 1
done
"#
    )
}

const HOST_SCRIPT: &str = r#"#!/bin/sh
D="--data-dir /tmp/kiln/data --run-dir /run/kiln --pki-dir /tmp/kiln/pki"
K="kilnctl --host unix:/run/kiln/agent.sock"
waitfor() { # FILE PATTERN TENTHS
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt $3 ]; do sleep 0.1; i=$((i + 1)); done
    grep -q "$2" "$1" 2>/dev/null
}
serve() { # BINARY
    "$1" $D serve --listen 127.0.0.1:7443 >>/tmp/agent.log 2>&1 &
    echo $! >/tmp/agent.pid
    i=0
    while ! $K node >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
}
show() { # VM FIELD
    $K --json vm show "$1" | sed -n "s/.*\"$2\": \"\{0,1\}\([a-z0-9]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -1
}

mount -t securityfs securityfs /sys/kernel/security
# The test host's TPM (swtpm as a tpm-tis device) and IMA: the real paths.
kiln-agent $D init --name testhost >/tmp/init.txt && echo E2E-INIT-OK
sed -n '/^recovery key/{n;p}' /tmp/init.txt >/tmp/recovery.key
serve kiln-agent
trust() { # MARKER
    $K --json trust status >/tmp/trust.json
    echo "$1 locked=$(sed -n 's/.*"locked": \([a-z]*\).*/\1/p' /tmp/trust.json) mode=$(sed -n 's/.*"measurement_mode": "\([a-z-]*\).*/\1/p' /tmp/trust.json)"
    sed -n 's/.*"reason": "\(.*\)".*/\1/p' /tmp/trust.json | sed "s/^/$1-REASON /"
}
trust E2E-TRUST
# The kernel and initramfs go over the API (an upload), the disk by path.
$K --json image import debian --upload --kernel /images/vmlinux --initrd /images/guest.cpio.gz \
    --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vda" >/tmp/image.json && echo E2E-IMPORTED
grep -q '"kind": "upload"' /tmp/image.json && grep -q '"state": "ready"' /tmp/image.json && echo E2E-UPLOADED
$K --json image import script --disk /images/agent-script.img >/dev/null
$K network create lan --address 10.91.0.1/24 >/dev/null && echo E2E-NETWORK
# A network on VLAN 42 of an uplink (a veth here): the VLAN sub-interface
# is on the bridge, and goes with the network.
modprobe 8021q || echo E2E-NO-8021Q
/usr/sbin/ip link add e2eup0 type veth peer name e2eup1
$K network create vlan42 --uplink e2eup0 --vlan 42 >/dev/null && echo E2E-VLAN-CREATED
vid=$(awk '{for (i = 1; i < NF; i++) if ($i == "VID:") print $(i + 1)}' /proc/net/vlan/e2eup0.42 | head -1)
echo "E2E-VLAN-IF vid=$vid master=$(basename "$(readlink /sys/class/net/e2eup0.42/master)")"
$K network delete vlan42 >/dev/null && [ ! -e /sys/class/net/e2eup0.42 ] && [ -e /sys/class/net/e2eup0 ] && echo E2E-VLAN-REMOVED
$K volume create script --size 1M --image script >/dev/null && echo E2E-VOLUME
$K volume create data --size 8M >/dev/null && echo E2E-DATA-VOLUME
$K vm create e2e --image debian --memory 256 --disk script --disk data --nic lan >/dev/null && echo E2E-VM-CREATED
$K vm start e2e >/dev/null && echo E2E-STARTED
$K vm console e2e --follow >/tmp/console1.log 2>&1 &
waitfor /tmp/console1.log E2E-PING-STARTED 6000 || echo E2E-NO-PING-START
pid1=$(show e2e pid)
echo "E2E-VMM pid=$pid1"
# Attestation with IMA's log and the VM launch: a reference policy from
# this known-good node, then a fresh quote checked against it.
$K attest policy --out /tmp/policy.json >/tmp/attest1.txt 2>&1 && echo E2E-ATTEST-POLICY
$K attest verify --policy /tmp/policy.json >>/tmp/attest1.txt 2>&1 && echo E2E-ATTEST-OK
# The guest's pattern is nowhere in the store's files, in any form seen.
waitfor /tmp/console1.log 'E2E-DATASUM n=0' 600
# NULs are dropped on the way: a slab is a sparse file of 1 GiB, which
# busybox grep would read as one line, holding all of it in memory (a test
# host of 2 GiB may then thrash: the likely end of a run killed at its
# timeout right after E2E-ATTEST-OK).
found=
for f in $(find /tmp/kiln/data/store -type f); do
    tr -d '\000' <"$f" | grep -qa KILN-GUEST-PLAINTEXT-MARKER && found=1
done
if [ -n "$found" ]; then echo E2E-PLAINTEXT-FOUND; else echo E2E-NO-PLAINTEXT; fi
# Online rekey under the running guest.
$K volume rekey data >/tmp/rekey.txt 2>&1 && echo E2E-REKEYED
$K --json volume show data | grep -q '"encrypted": true' && echo E2E-DATA-ENCRYPTED
# The VM's cgroup: its limits, and kiln-vmm in it.
cg=$(dirname "$(grep -lx "$pid1" /sys/fs/cgroup/kiln/vm-*/cgroup.procs)")
echo "E2E-CGROUP memory=$(cat "$cg/memory.max") cpu=$(cut -d' ' -f1 "$cg/cpu.max")"
build() { $K --json node | sed -n 's/.*"build": "\([^"]*\)".*/\1/p' | tr -d ',' | tr ' ' '_'; }
build1=$(build)

# SIGKILL the agent under the running VM, then start a different build of
# it (another binary: `other_build` in this file).
kill -9 "$(cat /tmp/agent.pid)" && echo E2E-AGENT-KILLED
sleep 2
kill -0 "$pid1" && echo E2E-VMM-ALIVE-AFTER-KILL
cmp -s /kiln/bin/kiln-agent /kiln/bin/kiln-agent-v2 || echo E2E-AGENT-BINARY-DIFFERS
serve /kiln/bin/kiln-agent-v2
echo "E2E-READOPTED state=$(show e2e state) pid=$(show e2e pid)"
# Followed through the new agent from now on: what the guest says while
# the rest runs (a panic among it) is kept.
$K vm console e2e --follow >/tmp/console2.log 2>&1 &
# Another binary: the KEK does not unseal, and attestation names it.
trust E2E-TRUST-V2
if $K attest verify --policy /tmp/policy.json >/tmp/attest2.txt 2>&1; then echo E2E-ATTEST-V2-PASSED; else echo E2E-ATTEST-V2-REFUSED; fi
grep -q kiln-agent-v2 /tmp/attest2.txt && echo E2E-ATTEST-V2-NAMED
echo "E2E-BUILDS before=$build1 after=$(build)"
waitfor /tmp/console2.log E2E-PING-DONE 900 || echo E2E-NO-PING-DONE
# kiln-vmm's log so far (its supervisor's and the VM process's stderr; the
# VM's next start truncates it): a guest reset, and a triple fault's site,
# show here.
sed 's/^/[vmm:err] /' /run/kiln/vms/*/vmm.log
echo "E2E-GUEST-RESETS n=$(cat /run/kiln/vms/*/vmm.log | grep -c 'the guest rebooted')"
# The console's ring buffer replays the guest's early output too.
cat /tmp/console1.log /tmp/console2.log | grep -o 'KILN-GUEST-READY.*\|E2E-PING-OK\|E2E-PING-FAILED' | sort -u
grep -o 'E2E-PING-DONE.*' /tmp/console2.log | head -1
grep -o 'E2E-TICK n=[0-9]*' /tmp/console2.log | sed 's/.*=//' |
    awk 'NR > 1 && $1 != prev + 1 {gaps++} {prev = $1} END {print "E2E-TICKS count=" NR " gaps=" gaps + 0}'
# Killed again, and started again from the first binary.
kill -9 "$(cat /tmp/agent.pid)" && sleep 1
serve kiln-agent
echo "E2E-READOPTED2 state=$(show e2e state) pid=$(show e2e pid) build=$(build)"
# The earlier console followers ended with the agent they talked to.
$K vm console e2e --follow >/tmp/console3.log 2>&1 &

# Graceful shutdown: the guest's power button.
$K vm shutdown e2e --timeout 120 >/dev/null && echo E2E-SHUTDOWN-OK
sleep 1
grep -q KILN-GUEST-POWER-BUTTON /tmp/console3.log && echo E2E-POWER-BUTTON
echo "E2E-AFTER-SHUTDOWN state=$(show e2e state)"
grep -o 'E2E-DATASUM.*' /tmp/console3.log /tmp/console2.log | sed 's/^[^:]*://' | tail -1 | sed 's/E2E-DATASUM/E2E-DATASUM-LAST/'
# Locked: the VM does not start, and says why.
$K vm start e2e >/tmp/start-locked.txt 2>&1 || echo E2E-START-REFUSED
echo "E2E-START-LOCKED state=$(show e2e state)"
grep -q 'locked' /tmp/start-locked.txt && echo E2E-START-REFUSED-LOCKED
# The recovery key unlocks; reseal seals to what runs now.
$K trust unlock --recovery-key-file /tmp/recovery.key >/dev/null && echo E2E-UNLOCKED
$K trust reseal >/dev/null && echo E2E-RESEALED
trust E2E-TRUST-RESEALED

# Restart policy always: a killed kiln-vmm comes back by itself.
cat >/tmp/vm.toml <<TOML
[spec]
vcpus = 1
memory_mib = 256
restart_policy = "always"
boot = { image = "debian" }
disks = [{ volume = "script" }]
nics = [{ network = "lan" }]
TOML
$K vm update e2e -f /tmp/vm.toml >/dev/null && echo E2E-UPDATED
$K vm start e2e >/dev/null || echo E2E-START-FAILED
pid3=$(show e2e pid)
kill -9 "$pid3" && echo "E2E-KILLED-VMM pid=$pid3"
# A deadline in seconds, not in rounds: each kilnctl call takes a while
# under emulation.
end=$(($(date +%s) + 180))
restarted=
while [ "$(date +%s)" -lt $end ]; do
    # One snapshot for both fields: the pid and the state must agree.
    snap=$($K --json vm show e2e)
    p=$(echo "$snap" | sed -n 's/.*"pid": \([0-9][0-9]*\),\{0,1\}$/\1/p' | head -1)
    st=$(echo "$snap" | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p' | head -1)
    [ "$st" = running ] && [ -n "$p" ] && [ "$p" != "$pid3" ] && { echo "E2E-RESTARTED-BY-POLICY pid=$p"; restarted=1; break; }
    sleep 0.2
done
[ -n "$restarted" ] || echo "E2E-NOT-RESTARTED state=$st pid=$p (killed $pid3)"
$K vm power-off e2e >/dev/null && echo E2E-POWERED-OFF
$K event list | sed 's/^/[events] /'
sed 's/^/[console1] /' /tmp/console1.log | grep -v E2E-TICK
sed 's/^/[console2] /' /tmp/console2.log | grep -v E2E-TICK
sed 's/^/[agent] /' /tmp/agent.log
"#;

/// Another build of the agent to upgrade to under a running VM, returned
/// as `kiln-agent-v2`: this build's binary with one section added
/// (`objcopy`), so that its file, its hash (what IMA measures and the
/// attestation names) and its build id (`<profile>, <size>`) all differ, as
/// a new release's would. A second cargo build (an unoptimised profile) did
/// the same for 2 min 20 s of the suite's 2-core time; the agent's code
/// path under test, re-adopting a running VM from its state on disk, is
/// the same either way.
fn other_build() -> std::path::PathBuf {
    let dir = target_dir().join("kiln-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let note = dir.join("kiln-agent-v2.note");
    std::fs::write(&note, "kiln-agent, another build for the upgrade test\n").unwrap();
    let v2 = dir.join("kiln-agent-v2");
    let status = std::process::Command::new("objcopy")
        .arg(format!(
            "--add-section=.kiln-upgrade-test={}",
            note.display()
        ))
        .arg(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg(&v2)
        .status()
        .expect("objcopy runs (binutils)");
    assert!(status.success(), "objcopy {}", v2.display());
    v2
}

/// A copy of `bin` without debug information, beside the other test-host
/// files: the test host unpacks its binaries into RAM, and the kernel's IMA
/// and the agent hash each one they run, all under emulation (kiln-agent
/// and kilnctl are over 200 MB each with it, about 30 without).
fn stripped(bin: &std::path::Path) -> std::path::PathBuf {
    let dir = target_dir().join("kiln-tests/stripped");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(bin.file_name().unwrap());
    let status = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .expect("strip runs (binutils)");
    assert!(status.success(), "strip {}", bin.display());
    out
}

/// The one test-host run all cases read. A failure is kept too, so that
/// the other cases report it instead of booting the test host again.
fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Result<Option<HostRun>, String>> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        std::panic::catch_unwind(|| {
            if !require_testhost() {
                return None;
            }
            let disk = target_dir().join("kiln-tests/agent-script.img");
            std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
            write_script_disk(&disk, &guest_script(), 4096).unwrap();
            let v2 = other_build();
            let bins = [
                stripped(env!("CARGO_BIN_EXE_kiln-agent").as_ref()),
                stripped(&v2),
                stripped(env!("CARGO_BIN_EXE_kilnctl").as_ref()),
                stripped(&profile_binary("kiln-vmm")),
                stripped(&profile_binary("kiln-store")),
            ];
            let boot = || {
                // A fresh TPM each time: the script starts from `init`.
                let tpm = tempfile::tempdir().unwrap();
                let run = TestHost::run_with_args(
                    HOST_SCRIPT,
                    &bins,
                    &[(disk.clone(), "/images/agent-script.img".into())],
                    &[
                        "--tpm".to_string(),
                        tpm.path().display().to_string(),
                        "--ima".to_string(),
                    ],
                    Duration::from_secs(900),
                )
                .expect("test host runs");
                eprintln!("{}", run.output);
                run
            };
            let mut run = boot();
            // A guest that died of a triple fault (the nested environment's
            // known death: CI saw one reset the guest as the agent was
            // replaced): the whole script runs once more, counted and
            // printed. Any other reset fails the heartbeat's case.
            if let Some(died) = run.guest_triple_fault() {
                let kept = kiln_tests::report::keep_retried(&run.output);
                kiln_tests::retry(format!(
                    "the guest died of a triple fault in the nested test host ({died}); booting the test host once more (its console: {})",
                    kept.display()
                ));
                run = boot();
            }
            Some(run)
        })
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the test-host session panicked".into())
        })
    });
    match run {
        Ok(Some(run)) => {
            run.assert_success();
            Some(run)
        }
        Ok(None) => None,
        Err(e) => panic!("the shared test-host session failed: {e}"),
    }
}

fn has(run: &HostRun, marker: &str) {
    assert!(
        run.line_with(marker).is_some(),
        "no {marker} in:\n{}",
        run.output
    );
}

fn value<'a>(run: &'a HostRun, marker: &str, key: &str) -> &'a str {
    let line = run
        .line_with(marker)
        .unwrap_or_else(|| panic!("no {marker} line in:\n{}", run.output));
    field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn kilnctl_sets_up_a_vm_whose_stock_guest_boots_and_pings_the_bridge() {
    let Some(run) = session() else { return };
    for m in [
        "E2E-INIT-OK",
        "E2E-IMPORTED",
        "E2E-UPLOADED",
        "E2E-NETWORK",
        "E2E-VOLUME",
        "E2E-VM-CREATED",
        "E2E-STARTED",
        "KILN-GUEST-READY",
        "E2E-PING-OK",
    ] {
        has(run, m);
    }
}

#[test]
fn the_vm_outlives_a_killed_agent_and_a_new_binary_re_adopts_it() {
    let Some(run) = session() else { return };
    for m in [
        "E2E-AGENT-KILLED",
        "E2E-VMM-ALIVE-AFTER-KILL",
        "E2E-AGENT-BINARY-DIFFERS",
    ] {
        has(run, m);
    }
    // Another build served after the kill: its size says so.
    let (before, after) = (
        value(run, "E2E-BUILDS", "before"),
        value(run, "E2E-BUILDS", "after"),
    );
    assert!(after.ends_with("_bytes"), "{after}");
    assert_ne!(before, after);
    let pid = value(run, "E2E-VMM", "pid");
    assert!(!pid.is_empty());
    // Killed once more and started from the first binary: the same again.
    assert_eq!(value(run, "E2E-READOPTED2", "state"), "running");
    assert_eq!(value(run, "E2E-READOPTED2", "pid"), pid);
    assert_eq!(value(run, "E2E-READOPTED2", "build"), before);
    assert_eq!(
        value(run, "E2E-READOPTED", "state"),
        "running",
        "{}",
        run.output
    );
    assert_eq!(value(run, "E2E-READOPTED", "pid"), pid, "the same kiln-vmm");
    // The same guest, too: it was never reset (kiln-vmm's log, the
    // `[vmm:err]` lines, says why if it was).
    assert_eq!(
        value(run, "E2E-GUEST-RESETS", "n"),
        "0",
        "the guest was reset: {}",
        run.output
    );
    // The guest noticed nothing: every ping answered, every tick printed.
    assert_eq!(
        value(run, "E2E-PING-DONE", "tx"),
        PINGS.to_string(),
        "{}",
        run.output
    );
    assert_eq!(
        value(run, "E2E-PING-DONE", "rx"),
        PINGS.to_string(),
        "{}",
        run.output
    );
    assert_eq!(value(run, "E2E-TICKS", "gaps"), "0", "{}", run.output);
    let ticks: u32 = value(run, "E2E-TICKS", "count").parse().unwrap();
    // The heartbeat spans the agent's absence (a tick takes a little over
    // a second under emulation, so fewer ticks than pings).
    assert!(ticks >= PINGS / 2, "{ticks} ticks");
}

#[test]
fn a_graceful_shutdown_goes_through_the_guests_power_button() {
    let Some(run) = session() else { return };
    has(run, "E2E-SHUTDOWN-OK");
    has(run, "E2E-POWER-BUTTON");
    assert_eq!(
        value(run, "E2E-AFTER-SHUTDOWN", "state"),
        "stopped",
        "{}",
        run.output
    );
}

#[test]
fn restart_policy_always_brings_a_killed_vmm_back() {
    let Some(run) = session() else { return };
    has(run, "E2E-UPDATED");
    let killed = value(run, "E2E-KILLED-VMM", "pid");
    let back = value(run, "E2E-RESTARTED-BY-POLICY", "pid");
    assert!(back.parse::<u32>().is_ok(), "{back}");
    assert_ne!(killed, back);
    has(run, "E2E-POWERED-OFF");
}

#[test]
fn a_vlan_network_bridges_a_sub_interface_of_its_uplink() {
    let Some(run) = session() else { return };
    has(run, "E2E-VLAN-CREATED");
    assert_eq!(value(run, "E2E-VLAN-IF", "vid"), "42", "{}", run.output);
    assert_eq!(value(run, "E2E-VLAN-IF", "master"), "kb-vlan42");
    has(run, "E2E-VLAN-REMOVED");
}

#[test]
fn kiln_vmm_runs_in_the_vms_cgroup_with_its_limits() {
    let Some(run) = session() else { return };
    // 256 MiB of guest RAM plus kiln-vmm's 128 MiB; one vCPU's worth of CPU.
    assert_eq!(
        value(run, "E2E-CGROUP", "memory"),
        ((256u64 + 128) << 20).to_string(),
        "{}",
        run.output
    );
    assert_eq!(value(run, "E2E-CGROUP", "cpu"), "100000");
}

#[test]
fn volumes_are_encrypted_sealed_to_the_tpm_and_locked_for_another_binary() {
    let Some(run) = session() else { return };
    // A real TPM in the test host, IMA measuring: unlocked at first.
    assert_eq!(value(run, "E2E-TRUST", "locked"), "false", "{}", run.output);
    assert_eq!(value(run, "E2E-TRUST", "mode"), "ima", "{}", run.output);
    // The guest's data: never in the clear on disk; the same after an
    // online rekey under the running guest.
    has(run, "E2E-DATA-ENCRYPTED");
    has(run, "E2E-NO-PLAINTEXT");
    has(run, "E2E-REKEYED");
    let first = value(run, "E2E-DATASUM n=0", "sum");
    assert_eq!(first.len(), 32, "{first}");
    let last = value(run, "E2E-DATASUM-LAST", "sum");
    let n: u32 = value(run, "E2E-DATASUM-LAST", "n").parse().unwrap();
    assert!(n > 0, "no checksum after the rekey:\n{}", run.output);
    assert_eq!(first, last, "the guest's data changed across the rekey");
    // Another agent binary: locked, with the reason naming it.
    assert_eq!(
        value(run, "E2E-TRUST-V2", "locked"),
        "true",
        "{}",
        run.output
    );
    let reason = run.line_with("E2E-TRUST-V2-REASON").unwrap_or_default();
    assert!(reason.contains("kiln-agent-v2"), "{reason}");
    // The VM does not start while locked, and says why.
    has(run, "E2E-START-REFUSED");
    has(run, "E2E-START-REFUSED-LOCKED");
    // The recovery key unlocks, reseal makes it stick, the VM starts again
    // (the restart-policy case below starts it).
    has(run, "E2E-UNLOCKED");
    has(run, "E2E-RESEALED");
    assert_eq!(value(run, "E2E-TRUST-RESEALED", "locked"), "false");
    has(run, "E2E-RESTARTED-BY-POLICY");
}

#[test]
fn a_quote_with_imas_log_verifies_and_another_binary_fails_by_name() {
    let Some(run) = session() else { return };
    has(run, "E2E-ATTEST-POLICY");
    has(run, "E2E-ATTEST-OK");
    has(run, "E2E-ATTEST-V2-REFUSED");
    has(run, "E2E-ATTEST-V2-NAMED");
}
