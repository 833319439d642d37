//! Bandwidth limit: a token bucket over bytes written to the receiver.

use std::time::{Duration, Instant};

pub struct Limiter {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    /// `None` for 0 (no limit).
    pub fn new(mbit_per_sec: u64) -> Option<Limiter> {
        if mbit_per_sec == 0 {
            return None;
        }
        let bytes_per_sec = mbit_per_sec as f64 * 1_000_000.0 / 8.0;
        let burst = bytes_per_sec.max(1024.0 * 1024.0);
        Some(Limiter {
            bytes_per_sec,
            burst,
            tokens: burst,
            last: Instant::now(),
        })
    }

    /// How long to wait before sending `n` bytes; takes the tokens.
    pub fn take(&mut self, n: usize) -> Duration {
        self.take_at(n, Instant::now())
    }

    /// As [`Limiter::take`], at the instant `now` (tests give fixed instants).
    pub fn take_at(&mut self, n: usize, now: Instant) -> Duration {
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
        let mut l = Limiter::new(8).unwrap(); // 1 MB/s, burst 1 MiB
        let t0 = l.last;
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
    }
}
