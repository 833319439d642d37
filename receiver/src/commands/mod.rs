//! One file per CLI command.

pub mod agents;
pub mod drills;
pub mod enroll;
pub mod init;
pub mod points;
pub mod recover;
pub mod release;
pub mod restore;
pub mod revoke;
pub mod scrub;
pub mod serve;
pub mod servers;
pub mod snapshot;
pub mod token;
pub mod undelete;
pub mod validate;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `f(index)` for every index on a few threads; stops at the first error.
pub fn parallel(n: usize, f: impl Fn(usize) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(2)
        .clamp(2, 4);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                if let Err(e) = f(i) {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = first.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(e);
                    return;
                }
            });
        }
    });
    match first.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// "YYYY-MM-DD HH:MM:SS" (UTC) for a Unix time in milliseconds.
pub fn fmt_utc(ms: u64) -> String {
    lifeboat_common::fmt_utc(ms)
}

/// "4s", "3m12s", "2h05m", "3d04h".
pub fn fmt_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes in binary units: "512.0 KiB".
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Prints rows as an aligned table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_utc(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(fmt_age(4_000), "4s");
        assert_eq!(fmt_age(192_000), "3m12s");
        assert_eq!(fmt_bytes(512 * 1024), "512.0 KiB");
    }
}
