//! Waiting for a replica's answer by polling its socket for a moment
//! before sleeping in `read`.
//!
//! A small replicated write is answered in tens of microseconds, about
//! what it costs to put a thread to sleep and wake it again on a virtual
//! machine (the wake-up is an interrupt through the hypervisor). Spinning
//! on the socket first, as QEMU's iothreads poll before they sleep,
//! catches most answers awake: on the build machine 3-replica 4 KiB
//! writes at depth 1 took a median 70-85 us instead of 73-108 us, with a
//! shorter tail (docs/benchmarks.md, session 39).
//!
//! Only when the request is the only one on this node waiting for other
//! nodes' answers ([`Outstanding`]): with more in flight the CPUs have other work, and a
//! spinning thread would take it from them (depth 32 lost 5-10% with every
//! waiter spinning). Only for requests whose answer is quick
//! ([`worth_polling`]): one that carries a lot of data, or a flush, waits
//! for a disk for longer than any spin. And for no longer than answers
//! take ([`Window`]): the spin starts at the configured ceiling
//! ([`set_reply_poll`], `serve --reply-poll-us`), is halved after an answer
//! that took longer than the ceiling (a slow link or a slow peer: spinning
//! would only burn the CPU), and doubled again after one that a longer
//! spin within the ceiling would have caught.

use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::proto::Request;

/// The ceiling of the poll unless configured (`kiln-store serve
/// --reply-poll-us`).
pub const DEFAULT_REPLY_POLL: Duration = Duration::from_micros(50);

/// Requests carrying more data than this are not polled for: their answer
/// waits for that much data to cross the link and reach a disk.
pub const POLL_MAX_DATA: usize = 64 << 10;

/// The smallest spin a window grows to from zero.
const MIN_POLL_US: u64 = 4;

static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);
static WINDOW: Window = Window::new(DEFAULT_REPLY_POLL);

/// How long this process spins for a lone request's answer: a ceiling,
/// and the current spin within it, learnt from how long answers take.
pub struct Window {
    ceiling_us: AtomicU64,
    now_us: AtomicU64,
}

impl Window {
    pub const fn new(ceiling: Duration) -> Window {
        let us = ceiling.as_micros() as u64;
        Window {
            ceiling_us: AtomicU64::new(us),
            now_us: AtomicU64::new(us),
        }
    }

    /// Sets the ceiling (zero: never spin), and the spin to it.
    pub fn set(&self, ceiling: Duration) {
        let us = ceiling.as_micros().min(u128::from(u64::MAX)) as u64;
        self.ceiling_us.store(us, Ordering::Relaxed);
        self.now_us.store(us, Ordering::Relaxed);
    }

    pub fn ceiling(&self) -> Duration {
        Duration::from_micros(self.ceiling_us.load(Ordering::Relaxed))
    }

    /// How long to spin for the next answer.
    pub fn spin(&self) -> Duration {
        Duration::from_micros(self.now_us.load(Ordering::Relaxed))
    }

    /// Learns from a lone request's answer that took `waited` from when it
    /// was awaited: caught within the spin, the spin stays; within the
    /// ceiling but after the spin, the spin doubles; later than the
    /// ceiling, it halves (to zero in the end, from where an answer within
    /// the ceiling grows it again).
    pub fn learn(&self, waited: Duration) {
        let ceiling = self.ceiling_us.load(Ordering::Relaxed);
        let now = self.now_us.load(Ordering::Relaxed);
        let waited = waited.as_micros().min(u128::from(u64::MAX)) as u64;
        let next = if waited <= now {
            now
        } else if waited <= ceiling {
            now.saturating_mul(2).max(MIN_POLL_US).min(ceiling)
        } else {
            now / 2
        };
        // Racing learners may each win; any of their values is sound.
        self.now_us.store(next, Ordering::Relaxed);
    }
}

/// Sets this process's poll ceiling (zero: never; every waiter sleeps in
/// `read` at once).
pub fn set_reply_poll(d: Duration) {
    WINDOW.set(d);
}

/// This process's poll ceiling.
pub fn reply_poll() -> Duration {
    WINDOW.ceiling()
}

/// Whether `req`'s answer may come back within a poll: a write or a batch
/// of writes of at most [`POLL_MAX_DATA`] in all.
pub fn worth_polling(req: &Request) -> bool {
    match req {
        Request::Write { data, .. } => data.len() <= POLL_MAX_DATA,
        Request::WriteBatch { writes, .. } => {
            writes.iter().map(|w| w.data.len()).sum::<usize>() <= POLL_MAX_DATA
        }
        _ => false,
    }
}

/// A replicated request in flight on this node, counted while it lives.
pub struct Outstanding(());

impl Outstanding {
    pub fn enter() -> Outstanding {
        OUTSTANDING.fetch_add(1, Ordering::Relaxed);
        Outstanding(())
    }

    /// Whether it is the only replicated request in flight on this node
    /// now: only then is its answer polled for ([`Outstanding::spin`]),
    /// and learnt from ([`Outstanding::learn`]).
    pub fn alone(&self) -> bool {
        OUTSTANDING.load(Ordering::Relaxed) == 1
    }

    /// How long to spin for its answer (see [`Window`]).
    pub fn spin(&self) -> Duration {
        WINDOW.spin()
    }

    /// Learns from how long its answer took (see [`Window::learn`]).
    pub fn learn(&self, waited: Duration) {
        if !WINDOW.ceiling().is_zero() {
            WINDOW.learn(waited);
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        OUTSTANDING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Spins until `sock` has something to read (data, its end, or an error)
/// or `spin` has passed, without consuming anything or blocking; whether
/// it became readable.
pub fn spin_until_readable(sock: &TcpStream, spin: Duration) -> bool {
    let sock = socket2::SockRef::from(sock);
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let start = Instant::now();
    loop {
        match sock.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Data, the end of the stream, or an error the read will report.
            _ => return true,
        }
        if start.elapsed() >= spin {
            return false;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn polling_waits_for_data_at_most_the_spin_and_consumes_nothing() {
        let (mut a, mut b) = pair();
        let start = Instant::now();
        assert!(!spin_until_readable(&b, Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        a.write_all(b"answer").unwrap();
        assert!(spin_until_readable(&b, Duration::from_secs(10)));
        let mut got = [0u8; 6];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"answer", "the poll left the data in place");
        drop(a);
        assert!(
            spin_until_readable(&b, Duration::from_secs(10)),
            "the end of the stream is readable"
        );
    }

    #[test]
    fn the_spin_follows_how_long_answers_take_within_the_ceiling() {
        let us = Duration::from_micros;
        let w = Window::new(us(50));
        assert_eq!(w.spin(), us(50));
        // Caught: the spin stays.
        w.learn(us(20));
        assert_eq!(w.spin(), us(50));
        // Answers slower than the ceiling: spinning is wasted, it halves
        // down to nothing.
        for _ in 0..8 {
            w.learn(us(400));
        }
        assert_eq!(w.spin(), Duration::ZERO);
        // Fast answers again: it grows back, never past the ceiling.
        w.learn(us(30));
        assert_eq!(w.spin(), us(MIN_POLL_US));
        w.learn(us(30));
        w.learn(us(30));
        w.learn(us(30));
        assert_eq!(w.spin(), us(32));
        for _ in 0..4 {
            w.learn(us(45));
        }
        assert_eq!(w.spin(), us(50));
        // A ceiling of zero never spins.
        w.set(Duration::ZERO);
        w.learn(us(1));
        assert_eq!(w.spin(), Duration::ZERO);
    }

    #[test]
    fn only_a_lone_request_polls() {
        let (a, b) = (Outstanding::enter(), Outstanding::enter());
        assert!(!a.alone() && !b.alone());
    }

    #[test]
    fn small_writes_are_polled_for_large_ones_and_flushes_not() {
        use crate::iobuf::IoBuf;
        let write = |n: usize| Request::Write {
            name: "v".into(),
            epoch: 1,
            offset: 0,
            data: IoBuf::copy_from(&vec![0u8; n]),
            stale: vec![],
        };
        assert!(worth_polling(&write(4096)));
        assert!(worth_polling(&write(POLL_MAX_DATA)));
        assert!(!worth_polling(&write(POLL_MAX_DATA + 4096)));
        assert!(!worth_polling(&Request::Flush {
            name: "v".into(),
            epoch: 1
        }));
    }
}
