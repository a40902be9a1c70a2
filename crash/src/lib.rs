//! Kiln's programs are crash-only: a panic on any thread ends the whole
//! process at once, and the next start puts things right (kiln-store's
//! write-ahead log and replica epochs, the agent's re-adoption of running
//! VMs, kiln-vmm's supervisor). Release builds get this from
//! `panic = "abort"`; the tests' `ci` profile unwinds, so that cargo builds
//! each dependency once for the test harness and the binaries alike.
//! [`abort_on_panic`] gives every build the release behaviour: the panic is
//! reported as usual, then the process aborts before any unwinding, so no
//! thread lives on beside a dead one and no lock is left poisoned for
//! another to trip on.

/// Makes every later panic, on any thread, abort the process once the
/// usual message (and backtrace, if asked for) has been printed. Call it
/// first thing in `main`. Hooks set later (say, one that restores the
/// terminal) run first if they chain to the hook they replace.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// SIGABRT: 6 on every Linux architecture.
    const SIGABRT: i32 = 6;

    /// The test binary itself, run again as a child that panics on a
    /// second thread after `abort_on_panic`: it must die of SIGABRT with
    /// the panic's message on stderr, not unwind, join and exit.
    #[test]
    fn a_panic_on_another_thread_aborts_the_whole_process() {
        if std::env::var_os("KILN_CRASH_CHILD").is_some() {
            super::abort_on_panic();
            let t = std::thread::spawn(|| panic!("kiln-crash test panic"));
            let _ = t.join();
            // Reached only if the panic unwound instead of aborting.
            std::process::exit(0);
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_panic_on_another_thread_aborts_the_whole_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KILN_CRASH_CHILD", "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "status {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("kiln-crash test panic"), "{stderr}");
    }
}
