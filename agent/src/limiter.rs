//! Bandwidth limit: a token bucket over bytes written to the receiver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Limiter {
    /// The limit in Mbit/s, 0 for none: shared, so a reload (SIGHUP) changes it live.
    rate: Arc<AtomicU64>,
    mbit: u64,
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    /// `None` for 0 (no limit).
    pub fn new(mbit_per_sec: u64) -> Option<Limiter> {
        (mbit_per_sec > 0).then(|| Limiter::shared(Arc::new(AtomicU64::new(mbit_per_sec))))
    }

    /// A limiter that follows `rate` (Mbit/s; 0 lets everything through).
    pub fn shared(rate: Arc<AtomicU64>) -> Limiter {
        Limiter {
            rate,
            mbit: 0,
            bytes_per_sec: 0.0,
            burst: 0.0,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// How long to wait before sending `n` bytes; takes the tokens.
    pub fn take(&mut self, n: usize) -> Duration {
        self.take_at(n, Instant::now())
    }

    /// As [`Limiter::take`], at the instant `now` (tests give fixed instants).
    pub fn take_at(&mut self, n: usize, now: Instant) -> Duration {
        let mbit = self.rate.load(Ordering::Relaxed);
        if mbit != self.mbit {
            // A new limit: a full bucket of the new size.
            self.mbit = mbit;
            self.bytes_per_sec = mbit as f64 * 1_000_000.0 / 8.0;
            self.burst = self.bytes_per_sec.max(1024.0 * 1024.0);
            self.tokens = self.burst;
            self.last = now;
        }
        if mbit == 0 {
            return Duration::ZERO;
        }
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.bytes_per_sec).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_in_proportion() {
        assert!(Limiter::new(0).is_none());
        let rate = Arc::new(AtomicU64::new(8)); // 1 MB/s, burst 1 MiB
        let mut l = Limiter::shared(rate.clone());
        let t0 = Instant::now();
        assert_eq!(l.take_at(1024 * 1024, t0), Duration::ZERO);
        // The bucket is empty: 500 kB take exactly 0.5 s.
        assert_eq!(l.take_at(500_000, t0), Duration::from_millis(500));
        // 0.75 s later 750 kB have come back: the 500 kB debt is repaid and 250 kB are in
        // the bucket, so 600 kB more wait for 350 kB: 0.35 s.
        let t1 = t0 + Duration::from_millis(750);
        assert_eq!(l.take_at(0, t1), Duration::ZERO);
        assert_eq!(l.take_at(600_000, t1), Duration::from_millis(350));
        // Idle for long: the bucket refills to its burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(l.take_at(1024 * 1024, t2), Duration::ZERO);
        assert_eq!(l.take_at(1_000_000, t2), Duration::from_secs(1));
        // A reload lifts the limit, then sets another: it applies at the next write.
        rate.store(0, Ordering::Relaxed);
        assert_eq!(l.take_at(100 << 20, t2), Duration::ZERO);
        rate.store(16, Ordering::Relaxed); // 2 MB/s, burst 2 MB
        assert_eq!(l.take_at(2_000_000, t2), Duration::ZERO);
        assert_eq!(l.take_at(1_000_000, t2), Duration::from_millis(500));
    }
}
