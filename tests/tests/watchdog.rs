//! The test host's watchdog: a script still running when it fires gets a
//! report of every process and thread on the console (what a hang killed
//! at its timeout leaves in CI's log), and the script goes on undisturbed.

use std::time::Duration;

use kiln_tests::{require_testhost, TestHost, TESTHOST_WATCHDOG};

/// Sleeps past the watchdog (3 s) in a process that is easy to find.
const SCRIPT: &str = r#"#!/bin/sh
echo "WD-LOG-LINE kept for the report" >/tmp/wd-check.log
sleep 20
echo WD-SCRIPT-DONE
"#;

#[test]
fn a_script_running_past_the_watchdog_gets_every_thread_reported_and_goes_on() {
    if !require_testhost() {
        return;
    }
    let args = ["--watchdog".to_string(), "3".to_string()];
    let run = TestHost::run_with_args(SCRIPT, &[], &[], &args, Duration::from_secs(170))
        .expect("test host runs");
    run.assert_success();
    let out = &run.output;
    let start = out
        .find(TESTHOST_WATCHDOG)
        .unwrap_or_else(|| panic!("no watchdog report:\n{out}"));
    let end = out
        .find("KILN-TESTHOST-WATCHDOG: end of the report")
        .unwrap_or_else(|| panic!("the report did not end:\n{out}"));
    let done = out
        .find("WD-SCRIPT-DONE")
        .unwrap_or_else(|| panic!("the script did not go on:\n{out}"));
    assert!(
        start < end && end < done,
        "report then script's end:\n{out}"
    );
    let report = &out[start..end];
    assert!(
        report.contains("still runs after 3 s"),
        "the report says when:\n{report}"
    );
    // The sleeping process, and its one thread asleep in the kernel.
    assert!(
        report
            .lines()
            .any(|l| l.contains("pid=") && l.contains("sleep 20")),
        "the script's sleep is listed:\n{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.contains("1x sleep state=S wchan=") && l.contains("syscall=")),
        "its thread's state and wait are listed:\n{report}"
    );
    assert!(
        report.contains("/tmp/wd-check.log: WD-LOG-LINE kept for the report"),
        "the end of /tmp's logs is in the report:\n{report}"
    );
}
