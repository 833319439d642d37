//! Which points to keep: every point of the last `recent_minutes`, then DRS's default policy
//! (one point per 10 minutes for the last hour, one per hour for the last 24 hours, one per
//! day for the last `daily_days` days). Older points go. The newest point is always kept.
//!
//! Within a bucket the newest point is kept. Buckets are aligned to UTC (10-minute, hour,
//! day boundaries) and nest, so the point kept for an hour is the one kept for its last
//! 10 minutes: a point that survives a coarser tier had survived every finer one.

use lifeboat_common::config::RetentionConfig;
use std::collections::HashSet;

const MIN_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MIN_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Given `(point, created_unix_ms)` pairs, returns the points to keep at `now_ms`.
pub fn keep(points: &[(u64, u64)], now_ms: u64, policy: &RetentionConfig) -> HashSet<u64> {
    let mut kept = HashSet::new();
    let Some(newest) = points.iter().max_by_key(|(p, t)| (*t, *p)) else {
        return kept;
    };
    kept.insert(newest.0);
    // (max age, bucket width) from fine to coarse.
    let tiers = [
        (HOUR_MS, 10 * MIN_MS),
        (DAY_MS, HOUR_MS),
        (policy.daily_days.saturating_mul(DAY_MS), DAY_MS),
    ];
    let mut best: std::collections::HashMap<(usize, u64), (u64, u64)> = Default::default();
    for &(point, t) in points {
        let age = now_ms.saturating_sub(t);
        if age <= policy.recent_minutes.saturating_mul(MIN_MS) {
            kept.insert(point);
            continue;
        }
        for (tier, &(max_age, width)) in tiers.iter().enumerate() {
            if age <= max_age {
                let slot = best.entry((tier, t / width)).or_insert((point, t));
                if (t, point) > (slot.1, slot.0) {
                    *slot = (point, t);
                }
            }
        }
    }
    kept.extend(best.values().map(|(p, _)| *p));
    kept
}

/// Under Object Lock, how long each point is locked at first, with retention keeping every
/// point of the last `recent_ms`: until retention may thin it out, and then long enough for
/// its 10-minute slot to close and the lock keeper to extend the lock of the point retention
/// keeps for it (20 minutes at least).
pub fn first_lock_ms(recent_ms: u64) -> u64 {
    recent_ms.saturating_add(10 * MIN_MS).max(20 * MIN_MS)
}

/// Under Object Lock, until when each of `points` (`(point, committed_unix_ms)`) must stay
/// locked as seen at `now_ms`, with retention keeping every point of the last `recent_ms`:
/// every point for [`first_lock_ms`]; the newest point of a closed 10-minute slot for 2 hours,
/// of a closed hour for 2 days, of a closed UTC day for `lock_days` days. Only closed slots
/// count: the newest point of an open one can still be displaced, and a lock cannot be taken
/// back; with `newest_final` (its agent is gone), the newest point's slots count as closed.
/// So the points retention keeps stay locked as long as it keeps them (with `lock_days` for
/// the daily ones), provided the keeper runs within 10 minutes of each slot's end, and the
/// points it thins out are locked minutes, not days: at a point every 10 seconds, locking
/// every point for days would keep thousands of full manifests a day.
pub fn lock_horizons(
    points: &[(u64, u64)],
    now_ms: u64,
    lock_days: u64,
    recent_ms: u64,
    newest_final: bool,
) -> std::collections::HashMap<u64, u64> {
    // (slot width, lock): each lock outlasts the closing of the next wider slot by at least
    // a whole slot of its own, so the keeper has time to extend the one retention keeps.
    let tiers = [
        (10 * MIN_MS, 2 * HOUR_MS),
        (HOUR_MS, 2 * DAY_MS),
        (DAY_MS, lock_days.saturating_mul(DAY_MS)),
    ];
    let mut newest: std::collections::HashMap<(usize, u64), (u64, u64)> = Default::default();
    for &(point, t) in points {
        for (tier, &(width, _)) in tiers.iter().enumerate() {
            let slot = newest.entry((tier, t / width)).or_insert((t, point));
            if (t, point) > *slot {
                *slot = (t, point);
            }
        }
    }
    let final_point = points.iter().max_by_key(|(p, t)| (*t, *p)).copied();
    points
        .iter()
        .map(|&(point, t)| {
            let mut until = t.saturating_add(first_lock_ms(recent_ms));
            let last = newest_final && final_point == Some((point, t));
            for (tier, &(width, horizon)) in tiers.iter().enumerate() {
                let closed = last || now_ms >= (t / width + 1).saturating_mul(width);
                if closed && newest.get(&(tier, t / width)) == Some(&(t, point)) {
                    until = until.max(t.saturating_add(horizon));
                }
            }
            (point, until)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(recent: u64, days: u64) -> RetentionConfig {
        RetentionConfig {
            recent_minutes: recent,
            daily_days: days,
            gc_grace_minutes: 10,
        }
    }

    /// The policy, stated independently: exactly the newest point, every recent point, and
    /// for each tier the newest point of every bucket that has a point young enough for it.
    /// (Lower bound and upper bound at once: a tier that deleted everything fails here.)
    fn assert_exactly_the_policy(pts: &[(u64, u64)], now: u64, p: &RetentionConfig) {
        let k = keep(pts, now, p);
        let mut expected = HashSet::new();
        if let Some(newest) = pts.iter().max_by_key(|(n, t)| (*t, *n)) {
            expected.insert(newest.0);
        }
        let tiers = [
            (HOUR_MS, 10 * MIN_MS),
            (DAY_MS, HOUR_MS),
            (p.daily_days * DAY_MS, DAY_MS),
        ];
        for (max_age, width) in tiers {
            let mut buckets: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
            for &(n, t) in pts {
                let age = now - t;
                if age <= p.recent_minutes * MIN_MS {
                    expected.insert(n);
                } else if age <= max_age {
                    let b = buckets.entry(t / width).or_insert((t, n));
                    if (t, n) > *b {
                        *b = (t, n);
                    }
                }
            }
            expected.extend(buckets.values().map(|&(_, n)| n));
        }
        assert_eq!(
            k.len(),
            expected.len(),
            "kept {} points, the policy says {}",
            k.len(),
            expected.len()
        );
        assert_eq!(k, expected);
    }

    #[test]
    fn keeps_recent_then_thins_out() {
        let now = 100 * DAY_MS;
        // One point every 5 seconds for the last 20 minutes.
        let mut pts: Vec<(u64, u64)> = (0..240)
            .map(|i| (100_000 + i, now - (240 - i) * 5_000))
            .collect();
        // One point every minute from 2 days ago to 20 minutes ago.
        let mut n = 0;
        let mut t = now - 2 * DAY_MS;
        while t < now - 20 * MIN_MS {
            pts.push((n, t));
            n += 1;
            t += MIN_MS;
        }
        let k = keep(&pts, now, &policy(10, 7));
        // All points of the last 10 minutes.
        for &(p, tp) in &pts {
            if now - tp <= 10 * MIN_MS {
                assert!(k.contains(&p), "recent point {p} dropped");
            }
        }
        // Between 1 h and 24 h ago: one per hour at most.
        let mut per_hour = std::collections::HashMap::new();
        for &(p, tp) in &pts {
            let age = now - tp;
            if k.contains(&p) && age > HOUR_MS && age <= DAY_MS {
                *per_hour.entry(tp / HOUR_MS).or_insert(0) += 1;
            }
        }
        assert!(per_hour.values().all(|&c| c <= 7), "{per_hour:?}");
        // Older than a day, inside 7 days: few points.
        let old: Vec<_> = pts
            .iter()
            .filter(|(p, tp)| k.contains(p) && now - tp > DAY_MS)
            .collect();
        assert!(old.len() <= 2, "{old:?}");
        assert!(k.len() < pts.len() / 4);
        // Each hour of the last day and each 10 minutes of the last hour keeps a point.
        assert!(per_hour.len() >= 23, "{per_hour:?}");
        assert_exactly_the_policy(&pts, now, &policy(10, 7));
        assert_exactly_the_policy(&pts, now, &policy(0, 1));
    }

    #[test]
    fn newest_always_kept_and_old_dropped() {
        let now = 400 * DAY_MS;
        let pts = [
            (1, now - 30 * DAY_MS),
            (2, now - 20 * DAY_MS),
            (3, now - 3 * DAY_MS),
        ];
        let k = keep(&pts, now, &policy(10, 7));
        assert!(k.contains(&3));
        assert!(!k.contains(&1) && !k.contains(&2));
        let k = keep(&pts, now, &policy(10, 25));
        assert!(k.contains(&2) && !k.contains(&1));
        let only_old = [(9, now - 300 * DAY_MS)];
        assert!(keep(&only_old, now, &policy(10, 7)).contains(&9));
    }

    #[test]
    fn locks_follow_what_retention_keeps_and_only_closed_slots() {
        let day0 = 100 * DAY_MS;
        // A point every 10 seconds from 00:00 to 02:00 of day 0, one at noon of day 1.
        let mut pts: Vec<(u64, u64)> = (0..720).map(|i| (i, day0 + i * 10_000)).collect();
        pts.push((720, day0 + DAY_MS + 12 * HOUR_MS));
        let at = |now: u64| lock_horizons(&pts, now, 30, 0, false);
        // At 02:00:05 of day 0: the first 10-minute slots and the first hour are closed.
        let h = at(day0 + 2 * HOUR_MS + 5_000);
        assert_eq!(h[&0], day0 + 20 * MIN_MS, "a thinned-out point");
        assert_eq!(
            h[&59],
            day0 + 590_000 + 2 * HOUR_MS,
            "newest of 00:00-00:10"
        );
        assert_eq!(
            h[&359],
            day0 + 3_590_000 + 2 * DAY_MS,
            "newest of 00:00-01:00"
        );
        // 01:59:50 is the newest of its hour and day, but the day is open: an hour's lock.
        assert_eq!(h[&719], day0 + 7_190_000 + 2 * DAY_MS);
        // Once day 0 is over, its newest point gets the daily lock; day 1's is still open.
        let h = at(day0 + DAY_MS + 13 * HOUR_MS);
        assert_eq!(h[&719], day0 + 7_190_000 + 30 * DAY_MS);
        assert_eq!(h[&720], day0 + DAY_MS + 12 * HOUR_MS + 2 * DAY_MS);
        // Every point the retention policy keeps (recent 0, 30 daily days) is locked now.
        let now = day0 + DAY_MS + 13 * HOUR_MS;
        for p in keep(&pts, now, &policy(0, 30)) {
            assert!(h[&p] > now, "point {p} kept but not locked");
        }
        // Its agent gone, the newest point is final: locked for a day's lock at once.
        let h = lock_horizons(&pts, now, 30, 0, true);
        assert_eq!(h[&720], day0 + DAY_MS + 12 * HOUR_MS + 30 * DAY_MS);
        assert_eq!(h[&719], day0 + 7_190_000 + 30 * DAY_MS);
        assert_eq!(first_lock_ms(0), 20 * MIN_MS);
        assert_eq!(first_lock_ms(60 * MIN_MS), 70 * MIN_MS);
    }

    #[test]
    fn every_point_retention_keeps_is_locked_at_every_moment() {
        // A point a minute for three days (some minutes skipped); retention with as many
        // daily days as the lock, and several recent windows: whatever it keeps at any moment
        // is locked by locks computed up to 10 minutes before (the keeper runs every minute).
        let base = 200 * DAY_MS + 7 * MIN_MS;
        let pts: Vec<(u64, u64)> = (0..3 * 1440)
            .filter(|i| i % 7 != 3)
            .map(|i| (i, base + i * MIN_MS + (i * 7919) % 50_000))
            .collect();
        for recent in [0, 10, 20, 45] {
            let p = policy(recent, 2);
            let mut now = base;
            while now < base + 4 * DAY_MS {
                let then = now.saturating_sub(9 * MIN_MS);
                let upto: Vec<(u64, u64)> =
                    pts.iter().copied().filter(|(_, t)| *t <= then).collect();
                let h = lock_horizons(&upto, then, 2, recent * MIN_MS, false);
                let upto_now: Vec<(u64, u64)> =
                    pts.iter().copied().filter(|(_, t)| *t <= now).collect();
                for k in keep(&upto_now, now, &p) {
                    // A point committed since the keeper last ran has its first lock.
                    let until = h.get(&k).copied().unwrap_or_else(|| {
                        upto_now.iter().find(|(n, _)| *n == k).unwrap().1
                            + first_lock_ms(recent * MIN_MS)
                    });
                    assert!(
                        until >= now,
                        "recent {recent}, at {now}: point {k} kept but not locked"
                    );
                }
                now += 17 * MIN_MS;
            }
        }
    }

    #[test]
    fn stable_as_time_passes() {
        // A point dropped at one time is never needed later: the kept set only shrinks.
        let base = 50 * DAY_MS;
        let pts: Vec<(u64, u64)> = (0..2000).map(|i| (i, base + i * 97_000)).collect();
        let p = policy(5, 3);
        let mut prev = keep(&pts, base + 2000 * 97_000, &p);
        for step in 1..50 {
            let now = base + 2000 * 97_000 + step * 37 * MIN_MS;
            let k = keep(&pts, now, &p);
            assert_exactly_the_policy(&pts, now, &p);
            assert!(
                k.is_subset(&prev),
                "step {step}: {:?}",
                k.difference(&prev).collect::<Vec<_>>()
            );
            prev = k;
        }
    }
}
