//! Skips and retries that cannot go unnoticed (issue 12, section 5).
//!
//! A test that returns early passes, and libtest hides what it printed
//! with `eprintln!`. So every skip and every retry in Kiln's tests goes
//! through here:
//!
//! - [`skip`]: with `CI=true` it panics ("CI=true, refusing to skip: ...");
//!   otherwise it writes `SKIPPED <test>: <reason>` to the process's real
//!   stderr, which libtest does not capture (it captures only the `print!`
//!   and `eprint!` macros), so the line shows in `cargo test`'s output next
//!   to the test's `ok`, and appends it to [`skip_log`].
//! - [`retry`]: writes `RETRY <test>: <what>` to the real stderr and
//!   appends it to [`retry_log`]; `.ci/run` clears that log before the
//!   tests, lists it after them, and fails the run when it holds two or
//!   more retries.
//!
//! Any crate's tests can use it: `kiln-tests` depends on nothing of Kiln's
//! (only libc), so it is a dev-dependency of kiln-devices, kiln-vmm and
//! kiln-agent without a cycle.

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether this is a CI run (`CI=true` or `CI=1`): then nothing may skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Where skips outside CI are recorded, one line each.
pub fn skip_log() -> PathBuf {
    crate::target_dir().join("kiln-skips.log")
}

/// Where retries are recorded, one line each; `.ci/run` summarises it.
pub fn retry_log() -> PathBuf {
    crate::target_dir().join("kiln-retries.log")
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string()
}

/// One line on `out` (the real stderr: fd 2, which libtest does not
/// capture) and in `log`.
fn announce(out: &mut dyn Write, log: &Path, line: &str) {
    let line = format!("{}\n", line.replace('\n', " | "));
    // Best effort: a report that cannot be written must not hide the test's
    // own result.
    let _ = out.write_all(line.as_bytes());
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // One write per line: O_APPEND keeps concurrent tests' lines whole.
        let _ = f.write_all(line.as_bytes());
    }
}

/// Skips the calling test because of `reason` (the caller then returns).
/// With `CI=true` this panics instead: CI must run every test.
pub fn skip(reason: impl Display) {
    let reason = reason.to_string();
    skip_to(in_ci(), &mut std::io::stderr().lock(), &skip_log(), &reason);
}

fn skip_to(ci: bool, out: &mut dyn Write, log: &Path, reason: &str) {
    if ci {
        panic!("CI=true, refusing to skip: {reason}");
    }
    announce(out, log, &format!("SKIPPED {}: {reason}", test_name()));
}

/// Records that the calling test is running something again (`what`: what
/// failed and why the test accepts a second run). Printed to the real
/// stderr and appended to [`retry_log`].
pub fn retry(what: impl Display) {
    announce(
        &mut std::io::stderr().lock(),
        &retry_log(),
        &format!("RETRY {}: {what}", test_name()),
    );
}

/// Where the runs that were retried keep what they printed, a file each;
/// `.ci/run` clears it before the tests and prints each file's end after
/// them, so that CI's log says what a retried run last did even when the
/// test then passed (libtest drops a passing test's output).
pub fn retried_dir() -> PathBuf {
    crate::target_dir().join("kiln-retried")
}

/// Keeps `text` (a retried run's console) in [`retried_dir`] under the
/// running test's name; the file's path, for the retry's line.
pub fn keep_retried(text: &str) -> PathBuf {
    let dir = retried_dir();
    let _ = std::fs::create_dir_all(&dir);
    let name = test_name().replace("::", "-");
    let mut n = 1;
    let mut path = dir.join(format!("{name}.log"));
    while path.exists() {
        n += 1;
        path = dir.join(format!("{name}-{n}.log"));
    }
    // Best effort, as for the retry log.
    let _ = std::fs::write(&path, text);
    path
}

/// The lines of a log ([`skip_log`] or [`retry_log`]); none if it is absent.
pub fn logged(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_under_ci_panics_with_the_reason() {
        let log = std::env::temp_dir().join(format!("kiln-skip-ci-{}.log", std::process::id()));
        let r = std::panic::catch_unwind(|| skip_to(true, &mut Vec::new(), &log, "no widget here"));
        let msg = r.expect_err("a skip under CI=true must panic");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(msg, "CI=true, refusing to skip: no widget here");
        assert!(!log.exists(), "a refused skip is no skip");
    }

    #[test]
    fn a_skip_outside_ci_is_logged_on_one_line_with_the_tests_name() {
        let log = std::env::temp_dir().join(format!("kiln-skip-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut out = Vec::new();
        skip_to(false, &mut out, &log, "two\nlines");
        skip_to(false, &mut out, &log, "again");
        let lines = logged(&log);
        let _ = std::fs::remove_file(&log);
        let me = "report::tests::a_skip_outside_ci_is_logged_on_one_line_with_the_tests_name";
        let want = [
            format!("SKIPPED {me}: two | lines"),
            format!("SKIPPED {me}: again"),
        ];
        assert_eq!(lines, want);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            want.map(|l| l + "\n").concat()
        );
    }

    #[test]
    fn a_retried_runs_output_is_kept_under_the_tests_name() {
        let a = keep_retried("first\n");
        let b = keep_retried("second\n");
        assert_eq!(a.parent().unwrap(), retried_dir());
        let me = "report-tests-a_retried_runs_output_is_kept_under_the_tests_name";
        assert_eq!(
            a.file_name().unwrap().to_str().unwrap(),
            format!("{me}.log")
        );
        assert_ne!(a, b, "a second retry does not overwrite the first");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "first\n");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "second\n");
        let _ = std::fs::remove_file(a);
        let _ = std::fs::remove_file(b);
    }

    #[test]
    fn the_logs_are_in_the_target_directory() {
        assert_eq!(retry_log(), crate::target_dir().join("kiln-retries.log"));
        assert_eq!(skip_log(), crate::target_dir().join("kiln-skips.log"));
    }
}
