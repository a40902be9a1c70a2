//! Loopback TCP ports for the servers a test starts.
//!
//! Binding port 0 and handing the port on is racy in a subtle way: the
//! kernel gives out the same ephemeral range for the local end of every
//! outgoing connection, and the tests in a binary run in parallel and talk
//! HTTPS to their own servers all the time. Between the pick and the server's
//! bind, one of those client sockets can take the port (seen in CI: "cannot
//! listen on 127.0.0.1:35019: Address already in use"). So ports come from
//! below the ephemeral range (32768 and up, `ip_local_port_range`), where no
//! client socket lands, each process walking its own part of it from a
//! counter, and a port is handed out only if a bind on it succeeds right now.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// First port handed out, above the registered ports most services use.
const LOW: u32 = 12_000;
/// One past the last: the ephemeral range starts at 32768 by default.
const HIGH: u32 = 32_000;
/// Ports a process walks through before it overlaps the next process's start.
const STRIDE: u32 = 500;

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

fn next_candidate() -> u16 {
    let span = HIGH - LOW;
    let start = (std::process::id() % (span / STRIDE)) * STRIDE;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (LOW + n % span) as u16
}

fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A port on 127.0.0.1 that nothing listens on right now, outside the
/// kernel's ephemeral range, and not handed out before by this process.
pub fn loopback_port() -> u16 {
    loopback_ports(1)
}

/// The first of `n` consecutive such ports (`n` >= 1).
pub fn loopback_ports(n: u16) -> u16 {
    pick(next_candidate, n)
}

/// The first run of `n` consecutive candidates from `next` that all bind.
/// Panics, saying so, once a whole range's worth of candidates has been
/// tried without one (every port taken), rather than spinning forever.
fn pick(mut next: impl FnMut() -> u16, n: u16) -> u16 {
    let n = n.max(1);
    let mut tried: u32 = 0;
    loop {
        tried += u32::from(n);
        assert!(
            tried <= 2 * (HIGH - LOW),
            "no run of {n} free loopback ports in {LOW}..{HIGH}: every candidate is in use"
        );
        let first = next();
        if u32::from(first) + u32::from(n) > HIGH {
            continue;
        }
        // Take the rest of the run from the counter too, so that no later
        // call hands out a port inside it.
        let rest: Vec<u16> = (1..n).map(|_| next()).collect();
        let consecutive = rest
            .iter()
            .enumerate()
            .all(|(i, &p)| u32::from(p) == u32::from(first) + i as u32 + 1);
        if consecutive && (first..first + n).all(bindable) {
            return first;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_distinct_and_free() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = loopback_port();
            assert!((LOW..HIGH).contains(&u32::from(p)), "{p}");
            assert!(seen.insert(p), "port {p} handed out twice");
        }
        let first = loopback_ports(2);
        assert!(seen.insert(first) && seen.insert(first + 1));
        assert!(bindable(first) && bindable(first + 1));
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        // Two ports handed to this test alone (tests run in parallel: a
        // port next to one of them may be another test's), the first kept
        // busy.
        let (busy, free) = (loopback_port(), loopback_port());
        let _l = TcpListener::bind((Ipv4Addr::LOCALHOST, busy)).unwrap();
        let mut candidates = [busy, free].into_iter();
        assert_eq!(pick(|| candidates.next().unwrap(), 1), free);
    }

    #[test]
    #[should_panic(expected = "no run of 1 free loopback ports")]
    fn a_range_with_every_port_taken_is_an_error_not_a_hang() {
        // A candidate source that only ever offers one busy port: the pick
        // must give up with a clear message instead of looping forever.
        let busy = loopback_port();
        let _l = TcpListener::bind((Ipv4Addr::LOCALHOST, busy)).unwrap();
        pick(|| busy, 1);
    }
}
