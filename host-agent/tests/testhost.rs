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
n=0
while true; do n=$((n + 1)); echo "E2E-TICK n=$n"; sleep 1; done
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

kiln-agent $D init --name testhost >/tmp/init.txt && echo E2E-INIT-OK
serve kiln-agent
$K --json image import debian --kernel /images/vmlinux --initrd /images/guest.cpio.gz \
    --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vda" >/dev/null && echo E2E-IMPORTED
$K --json image import script --disk /images/agent-script.img >/dev/null
$K network create lan --address 10.91.0.1/24 >/dev/null && echo E2E-NETWORK
$K volume create script --size 1M --image script >/dev/null && echo E2E-VOLUME
$K vm create e2e --image debian --memory 256 --disk script --nic lan >/dev/null && echo E2E-VM-CREATED
$K vm start e2e >/dev/null && echo E2E-STARTED
$K vm console e2e --follow >/tmp/console1.log 2>&1 &
waitfor /tmp/console1.log E2E-PING-STARTED 6000 || echo E2E-NO-PING-START
pid1=$(show e2e pid)
echo "E2E-VMM pid=$pid1"

# SIGKILL the agent under the running VM, then start a different binary.
kill -9 "$(cat /tmp/agent.pid)" && echo E2E-AGENT-KILLED
sleep 2
kill -0 "$pid1" && echo E2E-VMM-ALIVE-AFTER-KILL
cp /kiln/bin/kiln-agent /tmp/kiln-agent-v2
printf 'a different kiln-agent binary' >>/tmp/kiln-agent-v2
cmp -s /kiln/bin/kiln-agent /tmp/kiln-agent-v2 || echo E2E-AGENT-BINARY-DIFFERS
serve /tmp/kiln-agent-v2
echo "E2E-READOPTED state=$(show e2e state) pid=$(show e2e pid)"
$K vm console e2e --follow >/tmp/console2.log 2>&1 &
waitfor /tmp/console2.log E2E-PING-DONE 900 || echo E2E-NO-PING-DONE
# The console's ring buffer replays the guest's early output too.
cat /tmp/console1.log /tmp/console2.log | grep -o 'KILN-GUEST-READY.*\|E2E-PING-OK\|E2E-PING-FAILED' | sort -u
grep -o 'E2E-PING-DONE.*' /tmp/console2.log | head -1
grep -o 'E2E-TICK n=[0-9]*' /tmp/console2.log | sed 's/.*=//' |
    awk 'NR > 1 && $1 != prev + 1 {gaps++} {prev = $1} END {print "E2E-TICKS count=" NR " gaps=" gaps + 0}'

# Graceful shutdown: the guest's power button.
$K vm shutdown e2e --timeout 120 >/dev/null && echo E2E-SHUTDOWN-OK
sleep 1
grep -q KILN-GUEST-POWER-BUTTON /tmp/console2.log && echo E2E-POWER-BUTTON
echo "E2E-AFTER-SHUTDOWN state=$(show e2e state)"

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
$K vm start e2e >/dev/null
pid3=$(show e2e pid)
kill -9 "$pid3" && echo "E2E-KILLED-VMM pid=$pid3"
i=0
while [ $i -lt 600 ]; do
    # One snapshot for both fields: the pid and the state must agree.
    snap=$($K --json vm show e2e)
    p=$(echo "$snap" | sed -n 's/.*"pid": \([0-9][0-9]*\),\{0,1\}$/\1/p' | head -1)
    st=$(echo "$snap" | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p' | head -1)
    [ "$st" = running ] && [ -n "$p" ] && [ "$p" != "$pid3" ] && { echo "E2E-RESTARTED-BY-POLICY pid=$p"; break; }
    sleep 0.1; i=$((i + 1))
done
$K vm power-off e2e >/dev/null && echo E2E-POWERED-OFF
$K event list | sed 's/^/[events] /'
sed 's/^/[console1] /' /tmp/console1.log | grep -v E2E-TICK
sed 's/^/[agent] /' /tmp/agent.log
"#;

fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Option<HostRun>> = OnceLock::new();
    RUN.get_or_init(|| {
        if !require_testhost() {
            return None;
        }
        let disk = target_dir().join("kiln-tests/agent-script.img");
        std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
        write_script_disk(&disk, &guest_script(), 4096).unwrap();
        let run = TestHost::run(
            HOST_SCRIPT,
            &[
                env!("CARGO_BIN_EXE_kiln-agent").into(),
                env!("CARGO_BIN_EXE_kilnctl").into(),
                profile_binary("kiln-vmm"),
                profile_binary("kiln-store"),
            ],
            &[(disk, "/images/agent-script.img".into())],
            Duration::from_secs(900),
        )
        .expect("test host runs");
        eprintln!("{}", run.output);
        run.assert_success();
        Some(run)
    })
    .as_ref()
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
    let pid = value(run, "E2E-VMM", "pid");
    assert!(!pid.is_empty());
    assert_eq!(
        value(run, "E2E-READOPTED", "state"),
        "running",
        "{}",
        run.output
    );
    assert_eq!(value(run, "E2E-READOPTED", "pid"), pid, "the same kiln-vmm");
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
