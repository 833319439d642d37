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
        let now = Instant::now();
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
        assert_eq!(l.take(1024 * 1024), Duration::ZERO);
        let wait = l.take(500_000);
        assert!(
            wait > Duration::from_millis(400) && wait < Duration::from_millis(600),
            "{wait:?}"
        );
    }
}
