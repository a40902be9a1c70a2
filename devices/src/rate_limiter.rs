//! Per-device I/O rate limits: token buckets for bytes and operations per
//! second, and a timerfd that wakes the device's worker when the budget is
//! back.
//!
//! A bucket holds at most [`BURST`] worth of its rate and refills
//! continuously. A request is admitted when the bucket holds what it costs
//! (or is full, for a request larger than the whole bucket) and then takes
//! its full cost, which may leave the bucket in debt; the debt is paid back
//! before the next request goes. Over any long run the device moves at most
//! `rate × time + burst`, whatever the request sizes.
//!
//! A worker asks [`RateLimiter::admit`] before each request; on `false` it
//! puts the request back (the limiter has armed its timer) and waits for the
//! timerfd, which it polls beside its queue eventfds, then calls
//! [`RateLimiter::timer_expired`] and goes on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// How much of its rate a bucket can save up: 100 ms worth.
pub const BURST: Duration = Duration::from_millis(100);

/// One token bucket: `rate` tokens a second, at most `capacity` saved.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens held; negative while a large request's debt is paid back.
    tokens: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` tokens a second (`rate` > 0).
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        let capacity = (u128::from(rate) * BURST.as_millis() / 1000).max(1) as u64;
        Self {
            rate,
            capacity,
            tokens: i128::from(capacity),
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let earned = elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000;
        if earned == 0 {
            // Keep the fraction: don't move `last` until a token is earned.
            return;
        }
        // Advance `last` by exactly the time the earned tokens took, so no
        // fraction of a token is ever lost.
        let took = earned * 1_000_000_000 / u128::from(self.rate);
        self.last += Duration::from_nanos(took.min(u64::MAX as u128) as u64);
        let tokens = self
            .tokens
            .saturating_add(earned.min(i128::MAX as u128) as i128);
        self.tokens = tokens.min(i128::from(self.capacity));
        if self.tokens == i128::from(self.capacity) {
            self.last = now;
        }
    }

    /// What a request of `cost` needs in the bucket before it may go.
    fn needed(&self, cost: u64) -> i128 {
        i128::from(cost.min(self.capacity))
    }

    /// How long until a request of `cost` may go (zero: now).
    pub fn wait(&mut self, cost: u64, now: Instant) -> Duration {
        self.refill(now);
        let missing = self.needed(cost) - self.tokens;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let nanos = (missing as u128 * 1_000_000_000).div_ceil(u128::from(self.rate));
        Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }

    /// Takes `cost` tokens (call after [`TokenBucket::wait`] returned zero).
    pub fn take(&mut self, cost: u64) {
        self.tokens -= i128::from(cost);
    }

    /// The budget held at `now`.
    fn snapshot(&mut self, now: Instant) -> BucketSnapshot {
        self.refill(now);
        BucketSnapshot {
            rate: self.rate,
            tokens: self
                .tokens
                .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
        }
    }

    /// Holds `saved`'s budget from `now` on (at most a full bucket).
    fn restore(&mut self, saved: &BucketSnapshot, now: Instant) {
        self.tokens = i128::from(saved.tokens).min(i128::from(self.capacity));
        self.last = now;
    }
}

/// A bucket's budget: tokens held (negative: a debt), saved as a count;
/// the time they were earned is not kept, a restored bucket refills from
/// the moment it is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSnapshot {
    /// The bucket's rate when saved (informative: the rate in force is the
    /// restoring VMM's).
    pub rate: u64,
    pub tokens: i64,
}

/// The budgets of a device's [`RateLimiter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterSnapshot {
    pub bytes: Option<BucketSnapshot>,
    pub ops: Option<BucketSnapshot>,
}

/// The limits of one device, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second, `None` for unlimited.
    pub bytes_per_sec: Option<u64>,
    /// Operations (requests, frames) per second, `None` for unlimited.
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

/// A device's byte and operation buckets and its wake-up timer.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer is armed: requests wait for it.
    blocked: bool,
}

impl RateLimiter {
    /// Creates the limiter and its timerfd (do this before the worker is
    /// confined: creating a timerfd is not in the workers' syscall set).
    pub fn new(limit: RateLimit) -> io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bytes: limit.bytes_per_sec.map(|r| TokenBucket::new(r, now)),
            ops: limit.ops_per_sec.map(|r| TokenBucket::new(r, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// May a request moving `bytes` go now? If yes its cost is taken; if
    /// not, the timer is armed for when it can and the caller must wait for
    /// the timerfd.
    pub fn admit(&mut self, bytes: u64) -> io::Result<bool> {
        if self.blocked {
            return Ok(false);
        }
        let now = Instant::now();
        let wait = [
            self.bytes.as_mut().map(|b| b.wait(bytes, now)),
            self.ops.as_mut().map(|b| b.wait(1, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            if let Some(b) = self.bytes.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(1);
            }
            return Ok(true);
        }
        // A zero it_value would disarm the timer.
        self.timer
            .reset(wait.max(Duration::from_micros(1)), None)
            .map_err(io::Error::from)?;
        self.blocked = true;
        Ok(false)
    }

    /// The budgets held now.
    pub fn snapshot(&mut self) -> RateLimiterSnapshot {
        let now = Instant::now();
        RateLimiterSnapshot {
            bytes: self.bytes.as_mut().map(|b| b.snapshot(now)),
            ops: self.ops.as_mut().map(|b| b.snapshot(now)),
        }
    }

    /// Takes over saved budgets, for the buckets both have (a limit the
    /// restoring VMM does not set is not restored; one the snapshot lacks
    /// starts full). Budgets above the bucket's capacity are capped. Any
    /// wait in progress ends: the next request re-arms the timer.
    pub fn restore(&mut self, saved: &RateLimiterSnapshot) {
        let now = Instant::now();
        if let (Some(b), Some(s)) = (self.bytes.as_mut(), saved.bytes.as_ref()) {
            b.restore(s, now);
        }
        if let (Some(b), Some(s)) = (self.ops.as_mut(), saved.ops.as_ref()) {
            b.restore(s, now);
        }
        self.blocked = false;
    }

    /// Whether requests are waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timerfd fired: consume its expiry count and let requests retry.
    pub fn timer_expired(&mut self) {
        // A spurious wake-up (nothing to read) is harmless: `admit` re-arms.
        let _ = self.timer.wait();
        self.blocked = false;
    }
}

/// A limiter kept by its device across activations and used by the
/// device's worker.
pub type SharedRateLimiter = Arc<Mutex<RateLimiter>>;

/// A shared limiter for `limit`, `None` when it limits nothing.
pub fn shared(limit: RateLimit) -> io::Result<Option<SharedRateLimiter>> {
    if limit.is_unlimited() {
        return Ok(None);
    }
    Ok(Some(Arc::new(Mutex::new(RateLimiter::new(limit)?))))
}

/// Locks a shared limiter. Only the device's worker uses it, and a panic
/// while holding it cannot leave it inconsistent.
pub(crate) fn lock(l: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    l.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_holds_a_tenth_of_a_second() {
        let t0 = Instant::now();
        let b = TokenBucket::new(10_000, t0);
        assert_eq!(b.capacity(), 1_000);
        // Tiny rates still admit one unit at a time.
        assert_eq!(TokenBucket::new(3, t0).capacity(), 1);
    }

    #[test]
    fn requests_wait_for_the_tokens_they_cost() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000, t0); // capacity 100
        assert_eq!(b.wait(60, t0), Duration::ZERO);
        b.take(60);
        // 40 left; 60 more need 20 tokens = 20 ms.
        assert_eq!(b.wait(60, t0), 20 * MS);
        assert_eq!(b.wait(60, t0 + 10 * MS), 10 * MS);
        assert_eq!(b.wait(60, t0 + 20 * MS), Duration::ZERO);
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000, t0); // capacity 100
        assert_eq!(b.wait(500, t0), Duration::ZERO);
        b.take(500);
        // 400 in debt: the next 1-token request waits for 401 tokens.
        assert_eq!(b.wait(1, t0), 401 * MS);
        assert_eq!(b.wait(1, t0 + 401 * MS), Duration::ZERO);
    }

    #[test]
    fn the_bucket_never_saves_more_than_its_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000, t0);
        b.take(100);
        // Idle for 10 s: still only 100 tokens.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.wait(100, t1), Duration::ZERO);
        b.take(100);
        assert_eq!(b.wait(100, t1), 100 * MS);
    }

    #[test]
    fn long_runs_move_rate_times_time_plus_one_burst() {
        // Requests of 7 tokens at 1000/s for a simulated 10 s: at most
        // 10 000 + 100 tokens, and not much less.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000, t0);
        let mut now = t0;
        let end = t0 + Duration::from_secs(10);
        let mut moved = 0u64;
        while now < end {
            let w = b.wait(7, now);
            if w.is_zero() {
                b.take(7);
                moved += 7;
            } else {
                now += w;
            }
        }
        assert!(moved <= 10_100 + 7, "moved {moved}");
        assert!(moved >= 9_900, "moved {moved}");
    }

    #[test]
    fn the_limiter_arms_its_timer_and_releases_after_it_fires() {
        let mut l = RateLimiter::new(RateLimit {
            bytes_per_sec: Some(100_000), // 10 000-byte bucket
            ops_per_sec: None,
        })
        .unwrap();
        assert!(l.admit(10_000).unwrap());
        let start = Instant::now();
        assert!(!l.admit(5_000).unwrap());
        assert!(l.is_blocked());
        // Blocked requests stay blocked until the timer fires.
        assert!(!l.admit(1).unwrap());
        l.timer_expired(); // blocks until the timer fires: ~50 ms
        assert!(start.elapsed() >= 45 * MS, "{:?}", start.elapsed());
        assert!(!l.is_blocked());
        assert!(l.admit(5_000).unwrap());
    }

    #[test]
    fn the_ops_bucket_limits_requests_whatever_their_size() {
        let mut l = RateLimiter::new(RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(100), // 10-op bucket
        })
        .unwrap();
        for _ in 0..10 {
            assert!(l.admit(0).unwrap());
        }
        assert!(!l.admit(0).unwrap());
    }

    #[test]
    fn budgets_survive_a_snapshot_as_counts() {
        let limit = RateLimit {
            bytes_per_sec: Some(100_000), // 10 000-byte bucket
            ops_per_sec: Some(1_000),     // 100-op bucket
        };
        let mut l = RateLimiter::new(limit).unwrap();
        assert!(l.admit(30_000).unwrap()); // 20 000 in debt
        let saved = l.snapshot();
        let bytes = saved.bytes.unwrap();
        assert_eq!(bytes.rate, 100_000);
        // Refilled a little since the admit, but still deep in debt.
        assert!(
            (-20_000..-19_000).contains(&bytes.tokens),
            "{}",
            bytes.tokens
        );
        assert_eq!(saved.ops.unwrap().tokens, 99);
        let json = serde_json::to_string(&saved).unwrap();
        let back: RateLimiterSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        // A new limiter starts full; restored, it carries the debt.
        let mut fresh = RateLimiter::new(limit).unwrap();
        fresh.restore(&back);
        assert!(!fresh.admit(1).unwrap(), "the debt was carried over");
        assert!(fresh.is_blocked());
        let again = fresh.snapshot();
        assert!(again.bytes.unwrap().tokens <= bytes.tokens + 1_000);

        // A budget above the capacity is capped; a bucket absent from the
        // snapshot stays full.
        let mut capped = RateLimiter::new(limit).unwrap();
        capped.restore(&RateLimiterSnapshot {
            bytes: Some(BucketSnapshot {
                rate: 1,
                tokens: i64::MAX,
            }),
            ops: None,
        });
        let s = capped.snapshot();
        assert_eq!(s.bytes.unwrap().tokens, 10_000);
        assert_eq!(s.ops.unwrap().tokens, 100);
    }

    #[test]
    fn an_unlimited_limiter_admits_everything() {
        let limit = RateLimit::default();
        assert!(limit.is_unlimited());
        let mut l = RateLimiter::new(limit).unwrap();
        for _ in 0..1000 {
            assert!(l.admit(1 << 30).unwrap());
        }
    }
}
