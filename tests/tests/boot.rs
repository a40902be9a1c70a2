//! kiln-vmm boots Debian's kernel inside the test host (real nested KVM).
//!
//! All cases share one test-host boot (they run one after another inside
//! it); each #[test] checks its own case's output.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_tests::{
    field, profile_binary, require_testhost, CaseOutput, HostRun, TestHost, GUEST_INIT, GUEST_READY,
};

/// Runs each case with its console and stderr captured and tagged:
/// `[name] line` ... then `CASE-END name rc=N`.
const SCRIPT: &str = r#"#!/bin/sh
case_run() {
    name=$1; shift
    "$@" </dev/null >/tmp/$name.out 2>/tmp/$name.err
    rc=$?
    sed "s/^/[$name] /" /tmp/$name.out
    sed "s/^/[$name:err] /" /tmp/$name.err
    echo "CASE-END $name rc=$rc"
}
RD=/images/guest.cpio.gz
Q="console=ttyS0 panic=-1 quiet"

# A disk that remembers whether the guest has booted before: the first boot
# marks it and reboots, the second sees the mark and powers off.
dd if=/dev/zero of=/tmp/state.img bs=4096 count=1 2>/dev/null
cat >/tmp/restart.txt <<'S'
if [ "$(dd if=/dev/vda bs=4 count=1 2>/dev/null)" = BOOT ]; then
    echo SECOND-BOOT
else
    echo FIRST-BOOT; printf BOOT >/dev/vda; sync; reboot -f
fi
S
dd if=/tmp/restart.txt of=/tmp/restart.img bs=4096 conv=sync 2>/dev/null

case_run elf-1cpu kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M --cmdline "$Q"
case_run bzimage-2cpu kiln-vmm --kernel /images/vmlinuz --initrd $RD --memory 256M --cpus 2 --cmdline "$Q"
case_run reboot kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M --cmdline "$Q kiln.action=reboot"
case_run restart kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M --on-reboot restart \
    --disk path=/tmp/state.img --disk path=/tmp/restart.img,ro=on --cmdline "$Q kiln.script=/dev/vdb"
case_run native kiln-vmm --kernel /images/vmlinuz --bzimage native --initrd $RD --memory 256M --cmdline "$Q"
case_run serial-file kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M --serial file:/tmp/console.log --cmdline "$Q"
grep -q KILN-GUEST-READY /tmp/console.log && echo "SERIAL-FILE-HAS-READY"

# What the guest learns about its machine.
cat >/tmp/facts.txt <<'S'
grep -q tsc_deadline_timer /proc/cpuinfo && echo GUEST-HAS-TSC-DEADLINE
grep -qw pci=off /proc/cmdline && echo GUEST-TOLD-NO-PCI
dmesg | grep -q 'found SMP MP-table' && echo GUEST-FOUND-MP-TABLE
S
dd if=/tmp/facts.txt of=/tmp/facts.img bs=4096 conv=sync 2>/dev/null
case_run facts kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M \
    --disk path=/tmp/facts.img,ro=on --cmdline "$Q kiln.script=/dev/vda"

# The control API: GET /vm, pause and resume, then PUT /vm/shutdown presses
# the guest's ACPI power button and the guest (kept up by kiln.hold) powers
# off by itself. The button is pressed every 2 s until it does: the guest
# loads its button driver only after READY.
api_shutdown() {
    kiln-vmm --kernel /images/vmlinux --initrd $RD --memory 256M --api-socket /tmp/api.sock \
        --cmdline "$Q kiln.hold=600" &
    vmm=$!
    i=0
    until grep -q KILN-GUEST-READY /tmp/api-shutdown.out 2>/dev/null; do
        i=$((i + 1)); [ $i -le 300 ] || { kill $vmm; return 1; }
        sleep 1
    done
    kiln-api-call /tmp/api.sock GET /vm
    kiln-api-call /tmp/api.sock PUT /vm/pause
    kiln-api-call /tmp/api.sock GET /vm
    kiln-api-call /tmp/api.sock PUT /vm/resume '{}'
    presses=0
    while kill -0 $vmm 2>/dev/null; do
        presses=$((presses + 1))
        [ $presses -le 60 ] || { kill $vmm; break; }
        kiln-api-call /tmp/api.sock PUT /vm/shutdown >/dev/null 2>&1
        sleep 2
    done
    wait $vmm
    rc=$?
    echo "API-SHUTDOWN-PRESSES $presses"
    return $rc
}
case_run api-shutdown api_shutdown
"#;

fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Option<HostRun>> = OnceLock::new();
    RUN.get_or_init(|| {
        if !require_testhost() {
            return None;
        }
        let vmm = profile_binary("kiln-vmm");
        let api_call = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kiln-api-call"));
        let run = TestHost::run(SCRIPT, &[vmm, api_call], &[], Duration::from_secs(900))
            .expect("test host runs");
        eprintln!("{}", run.output);
        run.assert_success();
        Some(run)
    })
    .as_ref()
}

/// The case's console lines, stderr lines and exit status.
type Case = CaseOutput;

fn case(name: &str) -> Option<Case> {
    let run = session()?;
    Some(
        run.case(name)
            .unwrap_or_else(|| panic!("case {name} did not finish:\n{}", run.output)),
    )
}

fn ready_cpus(c: &Case) -> Vec<String> {
    c.out
        .iter()
        .filter(|l| l.contains(GUEST_READY))
        .map(|l| field(l, "cpus").unwrap_or("?").to_string())
        .collect()
}

#[test]
fn debian_vmlinux_boots_with_one_vcpu_and_powers_off() {
    let Some(c) = case("elf-1cpu") else { return };
    assert_eq!(
        ready_cpus(&c),
        ["1"],
        "console: {:?}\nstderr: {:?}",
        c.out,
        c.err
    );
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
    assert!(
        c.out.iter().any(|l| l.contains("Power down")),
        "{:?}",
        c.out
    );
    // The init marker (what the boot benchmark's "start → init" times) comes
    // once, before the drivers are loaded and READY is printed.
    let at = |m: &str| c.out.iter().position(|l| l.contains(m));
    assert_eq!(
        c.out.iter().filter(|l| l.contains(GUEST_INIT)).count(),
        1,
        "{:?}",
        c.out
    );
    assert!(at(GUEST_INIT) < at(GUEST_READY), "{:?}", c.out);
}

#[test]
fn debian_bzimage_boots_with_two_vcpus() {
    let Some(c) = case("bzimage-2cpu") else {
        return;
    };
    assert_eq!(
        ready_cpus(&c),
        ["2"],
        "console: {:?}\nstderr: {:?}",
        c.out,
        c.err
    );
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
}

#[test]
fn guest_reboot_ends_kiln_vmm_with_status_zero_and_says_so() {
    let Some(c) = case("reboot") else { return };
    assert_eq!(ready_cpus(&c), ["1"], "{:?}", c.out);
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
    assert!(
        c.err
            .iter()
            .any(|l| l.contains("the guest rebooted; exiting")),
        "stderr: {:?}",
        c.err
    );
}

#[test]
fn on_reboot_restart_boots_the_guest_again() {
    let Some(c) = case("restart") else { return };
    assert_eq!(
        ready_cpus(&c),
        ["1", "1"],
        "two boots: {:?}\n{:?}",
        c.out,
        c.err
    );
    let first = c.out.iter().position(|l| l.contains("FIRST-BOOT"));
    let second = c.out.iter().position(|l| l.contains("SECOND-BOOT"));
    assert!(first.is_some() && second > first, "{:?}", c.out);
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
    assert!(
        c.err.iter().any(|l| l.contains("restarting")),
        "{:?}",
        c.err
    );
}

#[test]
fn bzimage_native_decompression_boots_too() {
    let Some(c) = case("native") else { return };
    assert_eq!(ready_cpus(&c), ["1"], "{:?}\n{:?}", c.out, c.err);
    assert_eq!(c.rc, 0);
}

#[test]
fn serial_console_can_go_to_a_file() {
    let Some(c) = case("serial-file") else { return };
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
    assert!(ready_cpus(&c).is_empty(), "nothing on stdout: {:?}", c.out);
    assert!(session()
        .unwrap()
        .line_with("SERIAL-FILE-HAS-READY")
        .is_some());
}

#[test]
fn the_guest_has_the_tsc_deadline_timer_an_mp_table_and_is_told_there_is_no_pci() {
    let Some(c) = case("facts") else { return };
    assert_eq!(c.rc, 0, "stderr: {:?}", c.err);
    for fact in [
        "GUEST-HAS-TSC-DEADLINE",
        "GUEST-TOLD-NO-PCI",
        "GUEST-FOUND-MP-TABLE",
    ] {
        assert!(
            c.out.iter().any(|l| l.contains(fact)),
            "{fact}: {:?}",
            c.out
        );
    }
}

#[test]
fn the_api_pauses_resumes_and_shuts_the_guest_down_with_its_power_button() {
    let Some(c) = case("api-shutdown") else {
        return;
    };
    let has = |s: &str| c.out.iter().any(|l| l.contains(s));
    assert_eq!(c.rc, 0, "console: {:?}\nstderr: {:?}", c.out, c.err);
    let states: Vec<&String> = c.out.iter().filter(|l| l.contains("\"state\":")).collect();
    assert_eq!(states.len(), 2, "{:?}", c.out);
    assert!(states[0].contains("\"state\":\"running\""), "{states:?}");
    assert!(states[1].contains("\"state\":\"paused\""), "{states:?}");
    assert_eq!(
        c.out
            .iter()
            .filter(|l| l.contains("API-STATUS 204"))
            .count(),
        2,
        "pause and resume: {:?}",
        c.out
    );
    assert!(has("KILN-GUEST-POWER-BUTTON"), "{:?}", c.out);
    assert!(has("API-SHUTDOWN-PRESSES"), "{:?}", c.out);
    assert!(
        c.out.iter().any(|l| l.contains("Power down")),
        "the guest powered off: {:?}",
        c.out
    );
}
