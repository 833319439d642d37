//! Adaptive compression: the zstd level follows whichever resource is spare.
//!
//! Every period the sender reports how long it was held up by the network (its window full,
//! or its writes and the bandwidth limiter blocking), and [`CpuSampler`] reports how idle the
//! machine's CPUs were. Then, one level per period, between the configured floor and ceiling:
//! - the machine is busy (< 10 % idle): go down, the server's own work comes first;
//! - held up by the network most of the time and CPU to spare (≥ 30 % idle): go up, bytes on
//!   the wire are the bottleneck and compressing harder costs no time;
//! - rarely held up while the scan is still producing: go down, the workers are the
//!   bottleneck.
//!
//! Where the receiver shares the machine (a lab, the benchmark), a slow receiver looks like a
//! slow network; the idle check keeps the level down there, because the CPU is not spare.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const NETWORK_BOUND: f64 = 0.8;
pub const CPU_BOUND: f64 = 0.2;
pub const SPARE_CPU: f64 = 0.3;
pub const BUSY_CPU: f64 = 0.1;

pub struct LevelControl {
    /// The floor and ceiling: shared, so a reload (SIGHUP) changes them live.
    min: Arc<AtomicI32>,
    max: Arc<AtomicI32>,
    level: Arc<AtomicI32>,
}

impl LevelControl {
    pub fn new(min: i32, max: i32) -> LevelControl {
        LevelControl::with_bounds(Arc::new(AtomicI32::new(min)), Arc::new(AtomicI32::new(max)))
    }

    /// Bounds that follow `min` and `max`.
    pub fn with_bounds(min: Arc<AtomicI32>, max: Arc<AtomicI32>) -> LevelControl {
        let level = Arc::new(AtomicI32::new(min.load(Ordering::Relaxed)));
        LevelControl { min, max, level }
    }

    fn bounds(&self) -> (i32, i32) {
        let min = self.min.load(Ordering::Relaxed);
        (min, self.max.load(Ordering::Relaxed).max(min))
    }

    /// The level the workers read for each block.
    pub fn shared(&self) -> Arc<AtomicI32> {
        self.level.clone()
    }

    pub fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// Feeds one period: how long the sender was held up by the network out of how long,
    /// whether the scan was still producing, and the machine's idle CPU share (None when
    /// unknown). Returns the new level when it changed.
    pub fn period(
        &mut self,
        held_up: Duration,
        period: Duration,
        producing: bool,
        idle: Option<f64>,
    ) -> Option<i32> {
        if period.is_zero() {
            return None;
        }
        let share = held_up.as_secs_f64() / period.as_secs_f64();
        let idle = idle.unwrap_or(0.0);
        let (min, max) = self.bounds();
        // A level outside new bounds (a reload) comes inside them first.
        let now = self.level().clamp(min, max);
        let next = if idle < BUSY_CPU {
            (now - 1).max(min)
        } else if share >= NETWORK_BOUND && idle >= SPARE_CPU {
            (now + 1).min(max)
        } else if producing && share <= CPU_BOUND {
            (now - 1).max(min)
        } else {
            now
        };
        if next == self.level() {
            return None;
        }
        self.level.store(next, Ordering::Relaxed);
        Some(next)
    }
}

/// The machine's idle CPU share between calls, from `/proc/stat` (idle + iowait over all).
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    pub fn new() -> CpuSampler {
        CpuSampler {
            last: read_proc_stat(),
        }
    }

    /// Idle share since the previous call; None where /proc/stat is unreadable.
    pub fn idle_share(&mut self) -> Option<f64> {
        let now = read_proc_stat()?;
        let (idle0, total0) = self.last.replace(now)?;
        let total = now.1.saturating_sub(total0);
        (total > 0).then(|| now.0.saturating_sub(idle0) as f64 / total as f64)
    }
}

impl Default for CpuSampler {
    fn default() -> Self {
        CpuSampler::new()
    }
}

/// (idle + iowait, total) jiffies of the "cpu" line.
fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest counted in user already).
    let total = v.iter().take(8).sum();
    Some((v[3] + v[4], total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(2);
    const IDLE: Option<f64> = Some(0.9);

    #[test]
    fn climbs_when_network_bound_with_spare_cpu() {
        let mut c = LevelControl::new(1, 4);
        assert_eq!(
            c.period(Duration::from_millis(1900), P, true, IDLE),
            Some(2)
        );
        assert_eq!(
            c.period(Duration::from_millis(1900), P, true, IDLE),
            Some(3)
        );
        assert_eq!(
            c.period(Duration::from_millis(1900), P, true, IDLE),
            Some(4)
        );
        assert_eq!(c.period(P, P, true, IDLE), None, "ceiling");
        assert_eq!(c.shared().load(Ordering::Relaxed), 4);
        // Half and half: stay.
        assert_eq!(c.period(Duration::from_secs(1), P, true, IDLE), None);
        // Workers are the bottleneck: down.
        assert_eq!(c.period(Duration::ZERO, P, true, IDLE), Some(3));
        // An open window because the scan has nothing more to send is not CPU pressure.
        assert_eq!(c.period(Duration::ZERO, P, false, IDLE), None);
        for _ in 0..5 {
            c.period(Duration::ZERO, P, true, IDLE);
        }
        assert_eq!(c.level(), 1, "floor");
    }

    #[test]
    fn no_spare_cpu_no_climb_and_a_busy_server_comes_first() {
        let mut c = LevelControl::new(1, 9);
        // Network-bound, but the CPUs are only 20 % idle: stay.
        assert_eq!(c.period(P, P, true, Some(0.2)), None);
        assert_eq!(
            c.period(P, P, true, None),
            None,
            "unknown CPU is not spare CPU"
        );
        c.period(P, P, true, IDLE);
        c.period(P, P, true, IDLE);
        assert_eq!(c.level(), 3);
        // The server gets busy: down, even though the network is the bottleneck.
        assert_eq!(c.period(P, P, true, Some(0.05)), Some(2));
    }

    #[test]
    fn cpu_sampler_reads_proc_stat() {
        let mut s = CpuSampler::new();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        std::thread::sleep(Duration::from_millis(50));
        let idle = s.idle_share().expect("/proc/stat readable on Linux");
        assert!((0.0..=1.0).contains(&idle), "{idle}");
    }
}
