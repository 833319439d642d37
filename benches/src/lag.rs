//! `e2e-bench --lag`: replication lag under a sustained write load (root: loop device, ext4,
//! eBPF, fio).
//!
//! A 2 GiB loop device holding a mounted ext4; a receiver and a continuous agent (a point every
//! second, eBPF tracking, freeze on). After the initial point, fio writes 4 KiB blocks at random
//! places of a 512 MiB file with O_DIRECT at 20 MB/s for 60 s. Every 100 ms the harness reads
//! the agent's status: lag = now − the instant of the newest committed point. Reported: lag
//! p50/p99/max, each point's freeze time, the agent's CPU (all of it: tracker, hashing,
//! compression, TLS), and the BPF program's own run time per event (kernel bpf_stats).

use super::incremental::{now_ms, point_after, start, status, u};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (in parentheses): utime and stime are the 12th and 13th.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// (run_time_ns, run_cnt) of the tracker's program, from `bpftool prog show`.
fn bpf_stats() -> Option<(u64, u64)> {
    let o = Command::new("bpftool")
        .args(["prog", "show", "name", "on_complete", "--json"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let v = if v.is_array() { v[0].clone() } else { v };
    Some((v["run_time_ns"].as_u64()?, v["run_cnt"].as_u64()?))
}

struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.1).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

pub fn run(a: &super::Args, rx: &Path, agent: &Path) -> Result<()> {
    if Command::new("fio").arg("--version").output().is_err() {
        bail!("fio is needed (apt-get install fio)");
    }
    let img = a.dir.join("lag.img");
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img)?.set_len(2 << 30)?;
    let dev = super::run(Command::new("losetup").args(["--find", "--show"]).arg(&img))?;
    let dev = PathBuf::from(dev.trim());
    let mnt = a.dir.join("lag-mnt");
    std::fs::create_dir_all(&mnt)?;
    super::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev))?;
    super::run(Command::new("mount").arg(&dev).arg(&mnt))?;
    let _cleanup = Cleanup(dev.clone(), mnt.clone());
    let s = start(a, &dev, "ebpf", rx, agent)?;
    point_after(&s, 0, Duration::from_secs(600)).context("initial sync")?;
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let bpf0 = bpf_stats();
    let pid = s.agent.id();
    let rpid = s.receiver.id();
    let cpu0 = cpu_ticks(pid).unwrap_or(0);
    let rcpu0 = cpu_ticks(rpid).unwrap_or(0);
    let secs = 60;
    let mut fio = Command::new("fio")
        .args([
            "--name=lag",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--size=512m",
            "--rate=20m",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output=/dev/null",
        ])
        .arg(format!("--filename={}", mnt.join("fio.dat").display()))
        .spawn()?;
    let t0 = Instant::now();
    let (mut lags, mut freezes, mut last_point) = (Vec::new(), Vec::new(), 0);
    while fio.try_wait()?.is_none() {
        if let Ok(v) = status(&s) {
            let p = u(&v, "last_point");
            // Once the load is on: the first seconds are the layout of fio's file.
            if t0.elapsed() > Duration::from_secs(5) {
                lags.push(now_ms().saturating_sub(u(&v, "last_point_unix_ms")) as f64 / 1000.0);
                if p != last_point {
                    if let Some(f) = v["last_freeze_ms"].as_u64() {
                        freezes.push(f as f64);
                    }
                }
            }
            last_point = p;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu0) as f64 / 100.0;
    let rcpu = cpu_ticks(rpid).unwrap_or(0).saturating_sub(rcpu0) as f64 / 100.0;
    let bpf = match (bpf0, bpf_stats()) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some(((t1 - t0) / (c1 - c0), c1 - c0)),
        _ => None,
    };
    let v = status(&s)?;
    let consistent = v["last_point_consistency"]
        .as_str()
        .unwrap_or("-")
        .to_string();
    println!(
        "== lag under fio randwrite 4 KiB, O_DIRECT, 20 MB/s for {secs} s, ext4 on {}",
        dev.display()
    );
    println!(
        "lag: p50 {:.2} s, p99 {:.2} s, max {:.2} s ({} samples); target p99 <= 2 s -> {}",
        pct(&mut lags.clone(), 0.5),
        pct(&mut lags.clone(), 0.99),
        pct(&mut lags.clone(), 1.0),
        lags.len(),
        if pct(&mut lags, 0.99) <= 2.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "freeze per point: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} points; last point {consistent})",
        pct(&mut freezes.clone(), 0.5),
        pct(&mut freezes.clone(), 0.99),
        pct(&mut freezes.clone(), 1.0),
        freezes.len()
    );
    println!(
        "agent CPU: {:.1} % of one core ({cpu:.1} s over {wall:.0} s: tracking, reading, hashing, compressing, sending)",
        100.0 * cpu / wall
    );
    println!(
        "receiver CPU: {:.1} % of one core ({rcpu:.1} s: applying each patch to its base, naming, compressing and storing the block)",
        100.0 * rcpu / wall
    );
    match bpf {
        Some((ns, n)) => println!("BPF program: {ns} ns per completed request ({n} requests)"),
        None => println!("BPF program: no stats (bpftool or kernel.bpf_stats_enabled unavailable)"),
    }
    Ok(())
}
