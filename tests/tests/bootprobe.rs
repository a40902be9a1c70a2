//! kiln-bootprobe, the boot benchmark's stopwatch, on an ordinary process
//! that prints the markers (no test host needed).

use std::process::Command;

fn probe(args: &[&str]) -> (String, String, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-bootprobe"))
        .args(args)
        .output()
        .expect("kiln-bootprobe runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

#[test]
fn times_both_markers_in_order_and_reports_the_exit_status() {
    let script = "echo boot; echo INIT-HERE; sleep 0.3; echo READY-HERE; exit 3";
    let (out, err, rc) = probe(&[
        "--init-marker",
        "INIT-HERE",
        "READY-HERE",
        "1",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(rc, Some(0), "stderr: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("BOOTPROBE "))
        .expect(&out);
    let ms = |k| {
        field(line, k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    assert!(ms("init_ms") + 250 <= ms("marker_ms"), "{line}");
    assert!(ms("marker_ms") <= ms("total_ms"), "{line}");
    assert_eq!(field(line, "rc").as_deref(), Some("3"), "{line}");
    // The VMM's console is passed through, stamped.
    assert!(err.contains("ms | INIT-HERE"), "{err}");
}

#[test]
fn a_marker_that_never_comes_reads_none() {
    let (out, _, _) = probe(&[
        "--init-marker",
        "NEVER",
        "READY",
        "1",
        "--",
        "echo",
        "READY",
    ]);
    assert!(out.contains("init_ms=none marker_ms="), "{out}");
    let (out, _, _) = probe(&["READY", "1", "--", "true"]);
    assert!(out.starts_with("BOOTPROBE marker_ms=none "), "{out}");
}

#[test]
fn a_vmm_that_never_ends_is_killed_at_the_timeout() {
    let started = std::time::Instant::now();
    let (out, err, rc) = probe(&[
        "--timeout",
        "1",
        "READY",
        "1",
        "--",
        "sh",
        "-c",
        "echo READY; exec sleep 60",
    ]);
    assert_eq!(rc, Some(0), "stderr: {err}");
    assert!(out.contains(" rc=timeout"), "{out}");
    assert!(!out.contains("marker_ms=none"), "{out}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn bad_usage_is_refused() {
    let (_, err, rc) = probe(&["--init-marker"]);
    assert_eq!(rc, Some(2));
    assert!(err.starts_with("usage: kiln-bootprobe"), "{err}");
    let (_, err, rc) = probe(&["--timeout", "soon", "READY", "1", "--", "true"]);
    assert_eq!(rc, Some(2));
    assert!(err.contains("--timeout needs"), "{err}");
}
