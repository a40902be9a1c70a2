//! kiln-bootprobe: time one VM boot from the outside.
//!
//! Usage: kiln-bootprobe [--init-marker INIT] [--timeout SECS] MARKER GUEST_MIB -- VMM [ARGS...]
//!
//! Starts the VMM with its console on a pipe, notes when a console line
//! containing MARKER (and INIT, if given) first appears, samples
//! /proc/PID/smaps every 50 ms until the VMM exits, and prints one line:
//!
//!   BOOTPROBE [init_ms=T ]marker_ms=T total_ms=T overhead_kib=K rc=N
//!
//! init_ms, marker_ms and total_ms count from just before the VMM is
//! spawned; a marker that never appeared reads "none". With --timeout, a
//! VMM still running after SECS seconds is killed and rc reads "timeout".
//! overhead_kib is the resident memory of the VMM process outside its guest
//! RAM (the largest mapping, which must be at least GUEST_MIB), from the last
//! smaps sample taken before the process exited. Lines the VMM prints are
//! passed through on stderr, prefixed with "| " and the milliseconds since
//! the VMM was spawned.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Resident KiB outside the largest mapping, or None if smaps is gone or the
/// largest mapping is smaller than the guest's RAM.
fn overhead_kib(pid: u32, guest_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total_rss, mut largest_size, mut largest_rss) = (0u64, 0u64, 0u64);
    let mut size = 0u64;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("Size:"), Some(v)) => size = v,
            (Some("Rss:"), Some(v)) => {
                total_rss += v;
                if size > largest_size {
                    largest_size = size;
                    largest_rss = v;
                }
            }
            _ => {}
        }
    }
    (largest_size >= guest_kib).then(|| total_rss - largest_rss)
}

fn main() {
    const USAGE: &str =
        "usage: kiln-bootprobe [--init-marker INIT] [--timeout SECS] MARKER GUEST_MIB -- VMM [ARGS...]";
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let (mut init_marker, mut timeout) = (None, None);
    while matches!(
        args.first().map(String::as_str),
        Some("--init-marker" | "--timeout")
    ) {
        if args.len() < 2 {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
        let value = args.remove(1);
        if args.remove(0) == "--init-marker" {
            init_marker = Some(value);
        } else {
            match value.parse::<u64>() {
                Ok(secs) if secs > 0 => timeout = Some(Duration::from_secs(secs)),
                _ => {
                    eprintln!("kiln-bootprobe: --timeout needs a positive number of seconds");
                    std::process::exit(2);
                }
            }
        }
    }
    let (marker, guest_mib, cmd) = match args.as_slice() {
        [m, g, sep, cmd @ ..] if sep == "--" && !cmd.is_empty() => (m.clone(), g.clone(), cmd),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let guest_kib: u64 = match guest_mib.parse::<u64>() {
        Ok(m) => m * 1024,
        Err(_) => {
            eprintln!("kiln-bootprobe: GUEST_MIB must be a number");
            std::process::exit(2);
        }
    };

    let start = Instant::now();
    let mut child = match Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln-bootprobe: cannot start {}: {e}", cmd[0]);
            std::process::exit(1);
        }
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");

    let marker_at: Arc<Mutex<Option<Duration>>> = Arc::default();
    let init_at: Arc<Mutex<Option<Duration>>> = Arc::default();
    let reader = {
        let (marker_at, init_at) = (marker_at.clone(), init_at.clone());
        let init_marker = init_marker.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&marker) {
                    marker_at.lock().unwrap().get_or_insert(start.elapsed());
                }
                if init_marker
                    .as_ref()
                    .is_some_and(|m| line.contains(m.as_str()))
                {
                    init_at.lock().unwrap().get_or_insert(start.elapsed());
                }
                eprintln!("| {:>6} ms | {line}", start.elapsed().as_millis());
            }
        })
    };

    let mut overhead = None;
    let mut timed_out = false;
    let status = loop {
        if let Some(v) = overhead_kib(pid, guest_kib) {
            overhead = Some(v);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if !timed_out && timeout.is_some_and(|t| start.elapsed() >= t) => {
                eprintln!("kiln-bootprobe: the VMM is still running after {timeout:?}; killing it");
                timed_out = true;
                let _ = child.kill();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                eprintln!("kiln-bootprobe: wait failed: {e}");
                std::process::exit(1);
            }
        }
    };
    let total = start.elapsed();
    let _ = reader.join();
    let ms = |d: Option<Duration>| d.map_or("none".to_string(), |d| d.as_millis().to_string());
    let init = match init_marker {
        Some(_) => format!("init_ms={} ", ms(*init_at.lock().unwrap())),
        None => String::new(),
    };
    println!(
        "BOOTPROBE {init}marker_ms={} total_ms={} overhead_kib={} rc={}",
        ms(*marker_at.lock().unwrap()),
        total.as_millis(),
        overhead.map_or("none".to_string(), |v| v.to_string()),
        if timed_out {
            "timeout".to_string()
        } else {
            status.code().unwrap_or(-1).to_string()
        }
    );
}
