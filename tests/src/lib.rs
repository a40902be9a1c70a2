//! Harness for Kiln's integration tests.
//!
//! Real Linux guests cannot boot on the development machine's own `/dev/kvm`,
//! so tests run inside a *test host*: a QEMU/TCG machine with nested SVM whose
//! kernel loads KVM (see `scripts/testhost` and `images/build`). A test hands
//! [`TestHost::run`] a shell script (it becomes `/kiln/run` in the test host),
//! binaries to copy in (`/kiln/bin`, on `PATH`) and files, and gets back the
//! console output and the script's exit status.
//!
//! Inside the test host: the guest images are in `/images` (`vmlinuz`,
//! `vmlinux`, `guest.cpio.gz`), QEMU is `qemu-system-x86_64` (firmware
//! directory `/usr/share/kiln-bios`), and the script runs as root in `/tmp`.
//! Its shell is busybox ash, where busybox applets take precedence over `PATH`
//! (iproute2 is `/usr/sbin/ip`).
//!
//! ```no_run
//! use kiln_tests::{require_testhost, TestHost};
//! use std::time::Duration;
//! if !require_testhost() { return; }
//! let run = TestHost::run("#!/bin/sh\necho hello\n", &[], &[], Duration::from_secs(300)).unwrap();
//! assert_eq!(run.status, 0, "{}", run.output);
//! assert_eq!(run.lines_with("hello").len(), 1);
//! ```

use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Console marker: the test host is up and `/kiln/run` starts.
pub const TESTHOST_READY: &str = "KILN-TESTHOST-READY";
/// Console marker: `KILN-TESTHOST-EXIT rc=N`, the script's exit status.
pub const TESTHOST_EXIT: &str = "KILN-TESTHOST-EXIT";
/// Console marker: a script still running when the test host's watchdog
/// fired (`scripts/testhost --watchdog`); every thread's state follows.
pub const TESTHOST_WATCHDOG: &str = "KILN-TESTHOST-WATCHDOG";
/// Console marker of the test guest: its /init has started (first line).
pub const GUEST_INIT: &str = "KILN-GUEST-INIT";
/// Console marker of the test guest: `KILN-GUEST-READY uptime=S cpus=N`.
pub const GUEST_READY: &str = "KILN-GUEST-READY";
/// Console marker of the test guest: `KILN-SCRIPT-EXIT rc=N` (after `kiln.script=`).
pub const GUEST_SCRIPT_EXIT: &str = "KILN-SCRIPT-EXIT";
/// Printed by a test-host script that is going to cut the test host's power
/// on purpose (`echo b > /proc/sysrq-trigger`: an immediate reset with
/// nothing synced; QEMU runs with `-no-reboot`, so it exits). Print it well
/// before the cut: what the serial port has not sent by then is lost.
pub const POWER_CUT: &str = "KILN-POWER-CUT";

/// Exit status of `scripts/testhost` when its `--timeout` expired.
pub const STATUS_TIMEOUT: i32 = 124;
/// Exit status of `scripts/testhost` when the test host never became ready.
pub const STATUS_NOT_READY: i32 = 125;
/// Exit status of `scripts/testhost` when the test host stopped without
/// reporting the script's status (e.g. a kernel panic).
pub const STATUS_NO_REPORT: i32 = 126;

/// Status of a run the harness stopped because the test host's kernel
/// reported a soft lockup of a VMM thread, or of any task for two minutes
/// (the nested environment wedged).
pub const STATUS_HOST_LOCKUP: i32 = 127;

/// Extra time allowed beyond a run's timeout (QEMU shutdown) before the
/// harness kills `scripts/testhost` itself.
const HARNESS_SLACK: Duration = Duration::from_secs(60);
/// How long `scripts/testhost` may take to start booting: building the images
/// and waiting for other test hosts on this machine (the lock).
const PRE_BOOT_LIMIT: Duration = Duration::from_secs(2 * 3600);
/// What `scripts/testhost` prints on stderr when it starts QEMU.
const BOOT_MESSAGE: &str = "booting the test host";

/// Errors of the harness itself (not of the code under test).
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

pub mod ports;
pub mod report;
pub mod stall;
pub mod swtpm;
pub mod tiny;

pub use report::{in_ci, retry, skip};
pub use swtpm::{Manufacture, Swtpm};

pub type Result<T> = std::result::Result<T, Error>;

/// The repository root (the directory holding `images/` and `scripts/`).
/// `KILN_ROOT` overrides it.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("KILN_ROOT") {
        return PathBuf::from(root);
    }
    // This crate lives in <root>/tests.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("images/build").is_file() && d.join("scripts/testhost").is_file())
        .unwrap_or_else(|| manifest.parent().expect("tests/ has a parent"))
        .to_path_buf()
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                repo_root().join(d)
            }
        }
        None => repo_root().join("target"),
    }
}

/// The directory `images/build` writes to (`KILN_IMAGES` or `<root>/target/images`).
pub fn images_dir() -> PathBuf {
    std::env::var_os("KILN_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/images"))
}

/// A workspace binary from the same cargo profile as this test
/// (`target/<profile>/NAME`, next to the directory this test runs from:
/// `cargo test --profile ci` uses target/ci). `cargo test --workspace`
/// builds every package's binaries before it runs any test, so it is
/// current.
pub fn profile_binary(name: &str) -> PathBuf {
    let dir = profile_dir();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the tests with the README's test command (`cargo test --workspace --profile ci`)",
        p.display(),
    );
    p
}

/// The cargo profile's output directory of the running test: its
/// executable is `target/<profile>/deps/NAME-HASH`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    match exe.parent().and_then(Path::parent) {
        Some(dir) if exe.parent().and_then(Path::file_name) == Some("deps".as_ref()) => {
            dir.to_path_buf()
        }
        _ => {
            // Not a cargo test executable: the profile its build settings say.
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            target_dir().join(profile)
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Whether test-host tests can run here. If the tools are missing, it
/// [`skip`]s (which panics with `CI=true`) and returns false.
pub fn require_testhost() -> bool {
    let missing: Vec<&str> = ["qemu-system-x86_64", "cpio", "depmod", "busybox"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "test host unavailable: {} not found (apt-get install qemu-system-x86 qemu-utils \
         busybox-static cpio kmod seabios)",
        missing.join(", ")
    );
    skip(msg);
    false
}

/// Runs `images/build` once per process (it is itself cached on disk).
pub fn ensure_images() -> Result<()> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(repo_root().join("images/build"))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run images/build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "images/build failed ({}):\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(Error)
}

/// The result of one test-host boot.
#[derive(Debug, Clone)]
pub struct HostRun {
    /// Exit status of `scripts/testhost`: the script's status, or
    /// [`STATUS_TIMEOUT`], [`STATUS_NOT_READY`], [`STATUS_NO_REPORT`].
    pub status: i32,
    /// The test host's console (CRs removed).
    pub output: String,
    /// `scripts/testhost`'s own messages and QEMU's warnings.
    pub stderr: String,
    /// Wall-clock time of the whole run (including the per-run archive).
    pub elapsed: Duration,
}

/// One case of a test-host script: see [`HostRun::case`].
#[derive(Debug, Clone)]
pub struct CaseOutput {
    /// Console lines (VMM stdout), without the tag.
    pub out: Vec<String>,
    /// VMM stderr lines, without the tag.
    pub err: Vec<String>,
    /// The VMM's exit status.
    pub rc: i32,
}

impl HostRun {
    /// Console lines containing `marker`, each returned from the marker on.
    /// (Lines can carry a prefix: terminal escapes, a timestamp, or the tail of
    /// an unterminated line that was printed before.)
    pub fn lines_with(&self, marker: &str) -> Vec<&str> {
        self.output
            .lines()
            .filter_map(|l| l.find(marker).map(|i| &l[i..]))
            .collect()
    }

    /// The first console line containing `marker` (from the marker on).
    pub fn line_with(&self, marker: &str) -> Option<&str> {
        self.lines_with(marker).into_iter().next()
    }

    /// The output of case `name` of a script that tags each case's lines
    /// `[name] ...` (console) and `[name:err] ...` (stderr) and ends it with
    /// `CASE-END name rc=N`; `None` if the case never ended.
    pub fn case(&self, name: &str) -> Option<CaseOutput> {
        let pick = |t: &str| {
            self.output
                .lines()
                .filter_map(|l| l.find(t).map(|i| l[i + t.len()..].to_string()))
                .collect::<Vec<_>>()
        };
        let end = self.line_with(&format!("CASE-END {name} "))?;
        let rc = field(end, "rc").and_then(|v| v.parse().ok())?;
        Some(CaseOutput {
            out: pick(&format!("[{name}] ")),
            err: pick(&format!("[{name}:err] ")),
            rc,
        })
    }

    /// Why this run says nothing about the code under test, if it does
    /// not: the test host wedged or died on its own.
    pub fn environment_failure(&self) -> Option<&'static str> {
        match self.status {
            STATUS_HOST_LOCKUP => Some(
                "its kernel reported a soft lockup (of a VMM thread, or of any task for 2 minutes)",
            ),
            STATUS_NO_REPORT if !self.power_cut() => {
                Some("it stopped without reporting the script's status")
            }
            // A test host that wedged (CI saw one whose scripts, ~3 minutes
            // otherwise, never ended) looks like this, and so does a hang in
            // the code under test: the second run tells them apart, as a
            // real hang times out again.
            STATUS_TIMEOUT => Some("it was killed at its timeout"),
            _ => None,
        }
    }

    /// What the run said last, for a retry's line: scripts/testhost's
    /// last message (how the test host stopped, a triple fault or a panic
    /// among them) and the console's last line.
    pub fn last_words(&self) -> String {
        let last = |text: &str| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(nothing)")
                .trim()
                .to_string()
        };
        // The script's own last line, not the end of the report a hang
        // printed (which the full console, printed with a retry, has).
        let (script, report) = match self.output.find(TESTHOST_WATCHDOG) {
            Some(at) => (
                &self.output[..at],
                "; the test host's watchdog reported every thread",
            ),
            None => (self.output.as_str(), ""),
        };
        format!(
            "scripts/testhost said: {}; the console's last line: {}{report}",
            last(&self.stderr),
            last(script)
        )
    }

    /// Whether the script cut the test host's power on purpose
    /// ([`POWER_CUT`]) and the test host then stopped without a report.
    pub fn power_cut(&self) -> bool {
        self.status == STATUS_NO_REPORT && !self.lines_with(POWER_CUT).is_empty()
    }

    /// A kiln-vmm's own report that its guest died of a triple fault (its
    /// stderr, which scripts print tagged `[NAME:err]`), if one did: the
    /// nested environment's known death (README, "Tests"). A guest's
    /// console saying the words is not one.
    pub fn guest_triple_fault(&self) -> Option<String> {
        self.output
            .lines()
            .find(|l| l.contains(":err] ") && l.contains("triple fault"))
            .map(str::to_string)
    }

    /// Whether the test host reached `KILN-TESTHOST-READY`.
    pub fn host_ready(&self) -> bool {
        !self.lines_with(TESTHOST_READY).is_empty()
    }

    /// The script's exit status as reported on the console, if it finished.
    pub fn script_status(&self) -> Option<i32> {
        self.lines_with(TESTHOST_EXIT)
            .last()
            .and_then(|l| field(l, "rc"))
            .and_then(|v| v.parse().ok())
    }

    /// Panics with the console and stderr unless the script exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status == 0,
            "test host run failed with status {}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.output,
            self.stderr
        );
    }
}

/// The value of `key=value` among the whitespace-separated words of `line`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Writes a raw disk image for the guest's `kiln.script=/dev/vdX`: the script
/// text followed by NUL bytes, `size` bytes in all (at least the script plus
/// one NUL, rounded up to whole 512-byte sectors). Give it to the test host
/// with `files`, e.g. `(path, "/images/script.img".into())`.
pub fn write_script_disk(path: &Path, script: &str, size: u64) -> Result<()> {
    if script.as_bytes().contains(&0) {
        return Err(Error("a guest script cannot contain NUL bytes".into()));
    }
    let need = script.len() as u64 + 1;
    let size = size.max(need).div_ceil(512) * 512;
    let mut data = script.as_bytes().to_vec();
    data.resize(size as usize, 0);
    std::fs::write(path, data)?;
    Ok(())
}

/// Where the test host mounts its real disk ([`HostOptions::disk_image`]).
pub const HOST_DISK: &str = "/disk";
/// Console marker: `KILN-TESTHOST-DISK dev=/dev/vdX`, the real disk is
/// mounted on [`HOST_DISK`].
pub const TESTHOST_DISK: &str = "KILN-TESTHOST-DISK";
/// The guest's tools disk in the test host ([`HostOptions::tools`]): an ext4
/// image with Debian's `fio`; a guest given it as a disk mounts it on
/// `/tools` (with `/tools/bin` on `PATH`) when booted with
/// `kiln.tools=/dev/vdX`.
pub const TOOLS_IMAGE: &str = "/images/tools.ext4";

/// Options of a test-host boot beyond the script, binaries and files.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// A real disk for the test host (`scripts/testhost --disk-image`): a
    /// virtio disk backed by this file on the build machine (created with
    /// the given size in MiB and formatted ext4 if it does not exist; kept
    /// as it is otherwise), opened with `cache=none,aio=io_uring`, mounted
    /// on [`HOST_DISK`] in the test host. Put it under [`target_dir`].
    pub disk_image: Option<(PathBuf, u64)>,
    /// The guest's tools disk (`scripts/testhost --tools`): [`TOOLS_IMAGE`].
    pub tools: bool,
    /// More `scripts/testhost` options, as for [`TestHost::run_with_args`].
    pub args: Vec<String>,
}

impl HostOptions {
    /// The `scripts/testhost` options these stand for.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some((path, mib)) = &self.disk_image {
            args.push("--disk-image".to_string());
            args.push(format!("{}:{mib}M", path.display()));
        }
        if self.tools {
            args.push("--tools".to_string());
        }
        args.extend(self.args.iter().cloned());
        args
    }
}

/// Boots test hosts through `scripts/testhost`.
pub struct TestHost;

impl TestHost {
    /// Boots a test host that runs `script` (a shell script; give it a `#!`
    /// line) as `/kiln/run`. `bins` are copied into `/kiln/bin` with their
    /// shared libraries; `files` are `(source, absolute destination)` pairs
    /// (not under /tmp, /run, /dev: those are mounted over). `timeout` bounds
    /// the test host's lifetime, boot included.
    ///
    /// Test hosts run one at a time: within this process by a mutex, across
    /// processes by `scripts/testhost`'s lock (a test host keeps two CPUs
    /// busy); the timeout starts when this run's test host boots. Returns an
    /// error only for harness failures; the script's result is in
    /// [`HostRun::status`].
    pub fn run(
        script: &str,
        bins: &[PathBuf],
        files: &[(PathBuf, String)],
        timeout: Duration,
    ) -> Result<HostRun> {
        Self::run_with_qemu_args(script, bins, files, &[], timeout)
    }

    /// [`TestHost::run`] with extra arguments for the test host's QEMU
    /// (`scripts/testhost --qemu-arg`), e.g. a disk that outlives the run.
    pub fn run_with_qemu_args(
        script: &str,
        bins: &[PathBuf],
        files: &[(PathBuf, String)],
        qemu_args: &[String],
        timeout: Duration,
    ) -> Result<HostRun> {
        let args: Vec<String> = qemu_args
            .iter()
            .flat_map(|a| ["--qemu-arg".to_string(), a.clone()])
            .collect();
        Self::run_with_args(script, bins, files, &args, timeout)
    }

    /// [`TestHost::run`] with a real disk, the tools disk or other options
    /// ([`HostOptions`]).
    pub fn run_with_options(
        script: &str,
        bins: &[PathBuf],
        files: &[(PathBuf, String)],
        options: &HostOptions,
        timeout: Duration,
    ) -> Result<HostRun> {
        Self::run_with_args(script, bins, files, &options.to_args(), timeout)
    }

    /// [`TestHost::run`] with extra options for `scripts/testhost` (given
    /// before the script), e.g. `["--tpm", dir, "--ima"]` for a test host
    /// with a TPM and measured boot, or `["--append", "ARG"]` for its kernel
    /// command line. See `scripts/testhost --help`.
    pub fn run_with_args(
        script: &str,
        bins: &[PathBuf],
        files: &[(PathBuf, String)],
        testhost_args: &[String],
        timeout: Duration,
    ) -> Result<HostRun> {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        static SEQ: AtomicUsize = AtomicUsize::new(0);

        ensure_images()?;
        // A test that panicked while holding the lock does not matter here.
        let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());

        // The nested environment itself sometimes wedges: the test host's
        // kernel reports a soft lockup of a VMM's vCPU thread (stuck inside
        // the test host's KVM), or the test host dies without a word. That
        // is not a result about the code under test; such a run is retried
        // once, and said so (`report::retry`: CI's log and its summary).
        let once = || {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            Self::run_once(script, bins, files, testhost_args, timeout, seq)
        };
        let first = once()?;
        let Some(why) = first.environment_failure() else {
            return Ok(first);
        };
        let kept = report::keep_retried(&format!("{}\n{}", first.output, first.stderr));
        retry(format!(
            "the test host failed on its own ({why}); booting it once more. {} (its console: {})",
            first.last_words(),
            kept.display()
        ));
        once()
    }

    fn run_once(
        script: &str,
        bins: &[PathBuf],
        files: &[(PathBuf, String)],
        testhost_args: &[String],
        timeout: Duration,
        seq: usize,
    ) -> Result<HostRun> {
        let dir = target_dir().join("kiln-tests");
        std::fs::create_dir_all(&dir)?;
        let script_path = dir.join(format!("run-{}-{seq}.sh", std::process::id()));
        std::fs::write(&script_path, script)?;
        let _cleanup = RemoveOnDrop(script_path.clone());

        let secs = timeout.as_secs().max(1);
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/testhost"))
            .arg("--timeout")
            .arg(secs.to_string());
        for b in bins {
            cmd.arg("--bin").arg(b);
        }
        for (src, dest) in files {
            let mut spec = src.as_os_str().to_owned();
            spec.push(":");
            spec.push(dest);
            cmd.arg("--file").arg(spec);
        }
        cmd.args(testhost_args);
        cmd.arg(&script_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so that a hung run can be killed with QEMU.
            .process_group(0);

        let start = Instant::now();
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // Console lines go through println!, which libtest captures per test
        // (shown on failure, or live with --nocapture).
        let lockup = Arc::new(AtomicBool::new(false));
        let lockup_seen = lockup.clone();
        let out_reader = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if is_host_lockup(&line) {
                    lockup_seen.store(true, Ordering::Relaxed);
                }
                println!("[testhost] {line}");
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        // scripts/testhost says "booting the test host" once it holds the
        // machine-wide test-host lock; the timeout counts from there.
        let booted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let booted = booted_at.clone();
        let err_reader = thread::spawn(move || {
            let mut all = String::new();
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let l = String::from_utf8_lossy(&line);
                if l.contains(BOOT_MESSAGE) {
                    booted.lock().unwrap().get_or_insert_with(Instant::now);
                }
                all.push_str(&l);
                line.clear();
            }
            all
        });

        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            let deadline = match *booted_at.lock().unwrap() {
                Some(t) => t + timeout + HARNESS_SLACK,
                None => start + PRE_BOOT_LIMIT,
            };
            if lockup.load(Ordering::Relaxed) {
                // The test host will not recover: stop it now rather than
                // at the timeout.
                kill_group(&mut child);
                let output = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Ok(HostRun {
                    status: STATUS_HOST_LOCKUP,
                    output,
                    stderr,
                    elapsed: start.elapsed(),
                });
            }
            if Instant::now() >= deadline {
                kill_group(&mut child);
                let output = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(Error(format!(
                    "scripts/testhost did not finish in time; killed it\n--- console ---\n{output}\n--- stderr ---\n{stderr}"
                )));
            }
            thread::sleep(Duration::from_millis(100));
        };
        let output = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        let status = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(HostRun {
            status,
            output,
            stderr,
            elapsed: start.elapsed(),
        })
    }
}

/// A test-host kernel line saying one of its VMM threads is stuck in the
/// kernel (`watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [kiln-vcpu0:138]`),
/// or that any of its tasks has been stuck for two minutes or more (a
/// kworker of a wedged test host: it does not come back, and waiting for
/// the timeout only costs CI the rest of it). A nested guest's own lockup
/// names a guest task and arrives tagged by the test script (`[net] [ 40.1]
/// ...`), so it does not match: only the test host's own kernel lines start
/// with their timestamp.
fn is_host_lockup(line: &str) -> bool {
    if !line.contains("BUG: soft lockup") {
        return false;
    }
    if line.contains("[kiln-") || line.contains("[qemu-system") {
        return true;
    }
    let own_kernel_line = line
        .trim_start_matches('\r')
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        });
    let stuck_secs = line
        .split_once("stuck for ")
        .and_then(|(_, rest)| rest.split_once('s'))
        .and_then(|(n, _)| n.parse::<u64>().ok());
    own_kernel_line && stuck_secs.is_some_and(|s| s >= 120)
}

/// SIGTERM to the process group (scripts/testhost forwards it to QEMU), then
/// SIGKILL if it is still there after 10 s.
fn kill_group(child: &mut Child) {
    let pgid = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &pgid]).status();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
    let _ = child.wait();
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(output: &str) -> HostRun {
        HostRun {
            status: 0,
            output: output.to_string(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Only a kiln-vmm's own report of a guest's triple fault counts: a
    /// guest's console saying the words does not.
    #[test]
    fn only_a_vmm_reporting_a_triple_fault_is_a_guest_death() {
        let died = "[mig-src:err] 2026-12-05T06:04:02.945168Z  WARN vCPU 0: triple fault (where is unknown); resetting";
        let r = run_with(&format!(
            "CASE-START mig-src t=47.1\n[mig-src] MIG-HB n=3\n{died}\n"
        ));
        assert_eq!(r.guest_triple_fault().as_deref(), Some(died));
        let r = run_with(
            "[mig-src] echo triple fault\n[mig-src:err] INFO migration to unix:/run/kmig/m.sock started\n",
        );
        assert_eq!(r.guest_triple_fault(), None);
    }

    #[test]
    fn a_power_cut_on_purpose_is_no_environment_failure() {
        let mut r = run_with("KILN-TESTHOST-READY\nKILN-POWER-CUT after=5s\n");
        r.status = STATUS_NO_REPORT;
        assert!(r.power_cut());
        assert_eq!(r.environment_failure(), None);
        let mut r = run_with("KILN-TESTHOST-READY\n");
        r.status = STATUS_NO_REPORT;
        assert!(!r.power_cut());
        assert!(r.environment_failure().is_some());
        r.status = STATUS_TIMEOUT;
        assert!(r.environment_failure().is_some());
        r.status = 1;
        assert_eq!(r.environment_failure(), None);
    }

    #[test]
    fn a_failed_runs_last_words_name_how_it_stopped() {
        let mut r = run_with("KILN-TESTHOST-READY\n[12.1] kiln-vmm: started\n\n");
        r.stderr = "testhost: booting the test host (timeout 60s)\ntesthost: test host stopped without reporting the script's status (QEMU status 0; ready after 9.0 s; its CPU triple-faulted)\n".into();
        let w = r.last_words();
        assert!(w.contains("its CPU triple-faulted"), "{w}");
        assert!(
            w.ends_with("the console's last line: [12.1] kiln-vmm: started"),
            "{w}"
        );
        assert!(run_with("").last_words().contains("(nothing)"));
        // A hang's last line is the script's, not the watchdog report's.
        let r = run_with("KILN-TESTHOST-READY\nn2 in-sync\nKILN-TESTHOST-WATCHDOG: /kiln/run still runs\n[watchdog] pid=1 init\nKILN-TESTHOST-WATCHDOG: end of the report\n");
        let w = r.last_words();
        assert!(
            w.contains("last line: n2 in-sync; the test host's watchdog reported"),
            "{w}"
        );
    }

    #[test]
    fn markers_are_found_mid_line() {
        let r = run_with(
            "\x1bc\x1b[?7l\x1b[2JKILN-TESTHOST-READY\n[1.5] KILN-GUEST-READY uptime=0.93 cpus=1\nKILN-TESTHOST-EXIT rc=3\n",
        );
        assert!(r.host_ready());
        assert_eq!(r.script_status(), Some(3));
        let g = r.line_with(GUEST_READY).unwrap();
        assert_eq!(field(g, "cpus"), Some("1"));
        assert_eq!(field(g, "uptime"), Some("0.93"));
        assert_eq!(field(g, "up"), None);
    }

    #[test]
    fn script_disk_is_padded_with_nuls() {
        let p = std::env::temp_dir().join(format!("kiln-script-disk-{}", std::process::id()));
        write_script_disk(&p, "echo hi\n", 0).unwrap();
        let d = std::fs::read(&p).unwrap();
        assert_eq!(d.len(), 512);
        assert!(d.starts_with(b"echo hi\n\0"));
        assert!(d[8..].iter().all(|&b| b == 0));
        write_script_disk(&p, "x", 4097).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4608);
        assert!(write_script_disk(&p, "a\0b", 0).is_err());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn host_options_become_testhost_arguments() {
        let o = HostOptions {
            disk_image: Some((PathBuf::from("/x/disk.img"), 2048)),
            tools: true,
            args: vec!["--append".into(), "a=b".into()],
        };
        assert_eq!(
            o.to_args(),
            [
                "--disk-image",
                "/x/disk.img:2048M",
                "--tools",
                "--append",
                "a=b"
            ]
        );
        assert!(HostOptions::default().to_args().is_empty());
    }

    #[test]
    fn root_has_the_scripts() {
        let root = repo_root();
        assert!(root.join("images/build").is_file());
        assert!(root.join("scripts/testhost").is_file());
    }
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn a_vmm_thread_stuck_in_the_test_hosts_kernel_is_a_host_lockup() {
        assert!(is_host_lockup(
            "[  320.452887] watchdog: BUG: soft lockup - CPU#0 stuck for 257s! [kiln-vcpu0:138]"
        ));
        assert!(is_host_lockup(
            "[ 99.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [qemu-system-x86:301]"
        ));
        // A nested guest's lockup names a guest task.
        assert!(!is_host_lockup(
            "[net] [   40.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:0]"
        ));
        assert!(!is_host_lockup("KILN-GUEST-READY uptime=3.1 cpus=1"));
        // Any task of the test host's own kernel, stuck for two minutes.
        assert!(is_host_lockup(
            "[  900.1] watchdog: BUG: soft lockup - CPU#1 stuck for 808s! [kworker/1:2:77]"
        ));
        assert!(is_host_lockup(
            "[ 300.5] watchdog: BUG: soft lockup - CPU#0 stuck for 120s! [kworker/0:1:12]"
        ));
        // A short one may pass; a guest's, tagged, never counts.
        assert!(!is_host_lockup(
            "[  60.2] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [kworker/1:2:77]"
        ));
        assert!(!is_host_lockup(
            "[net] [ 400.1] watchdog: BUG: soft lockup - CPU#0 stuck for 300s! [kworker/0:1:9]"
        ));
    }
}
