//! `e2e-bench --incremental`: what continuous replication costs per change, eBPF tracker
//! against the hash scan, on a loop device holding the reference image (root needed).
//!
//! For each tracker: a fresh receiver and a continuous agent (a point every second) on a
//! loop device over a copy of the image; after the initial sync and one idle point,
//! 1. 81 MiB of writes in 1 MiB extents at random places, then
//! 2. 84 MiB of scattered 4 KiB writes,
//!
//! each followed by `fsync`. Reported per step: the agent's time for the cycle that carried the
//! change (from its log), the time from the end of the writes to that point's commit (which
//! includes waiting for the next cycle), bytes read from the disk, and bytes on the wire per
//! changed byte.

use anyhow::{bail, Context, Result};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) struct Setup {
    /// The agent's binary and config, to detach its pinned tracker at the end.
    agent_bin: PathBuf,
    cfg: PathBuf,
    pub(crate) receiver: Child,
    pub(crate) agent: Child,
    state: PathBuf,
    log: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = Command::new(&self.agent_bin)
            .args(["untrack", "--config"])
            .arg(&self.cfg)
            .output();
        let _ = self.receiver.kill();
        let _ = self.receiver.wait();
    }
}

pub(crate) fn status(s: &Setup) -> Result<serde_json::Value> {
    let text = std::fs::read(s.state.join("status.json")).context("agent status.json")?;
    Ok(serde_json::from_slice(&text)?)
}

pub(crate) fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn bytes_read(v: &serde_json::Value) -> u64 {
    v["disks"]
        .as_array()
        .map(|d| d.iter().map(|x| u(x, "bytes_read")).sum())
        .unwrap_or(0)
}

/// Waits until the agent has committed a point cut after `after_ms`; returns its number.
pub(crate) fn point_after(s: &Setup, after_ms: u64, limit: Duration) -> Result<u64> {
    let t = Instant::now();
    loop {
        if let Ok(v) = status(s) {
            if u(&v, "last_point_unix_ms") > after_ms {
                return Ok(u(&v, "last_point"));
            }
        }
        if t.elapsed() > limit {
            bail!(
                "no point after {after_ms} within {limit:?}; see {}",
                s.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's own time for the cycle that committed `point` (its log line).
fn cycle_secs(log: &Path, point: u64) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("point committed") && l.contains(&format!(" point={point} ")))?;
    let s = line.split("seconds=\"").nth(1)?.split('"').next()?;
    s.parse().ok()
}

pub(crate) fn start(
    a: &super::Args,
    dev: &Path,
    tracker: &str,
    rx: &Path,
    agent: &Path,
) -> Result<Setup> {
    let work = a.dir.join(format!("incr-{tracker}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (receiver, port, v) = super::start_receiver(rx, &work.join("receiver"))?;
    let state = work.join("agent");
    let cfg = work.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "server_id = \"incr\"\nstate_dir = \"{}\"\npoint_interval_secs = 1\ntracker = \"{tracker}\"\n[receiver]\naddress = \"127.0.0.1:{port}\"\nca_fingerprint = \"{}\"\ntoken = \"{}\"\n[[disks]]\nid = \"root\"\npath = \"{}\"\n",
            state.display(),
            v["ca_fingerprint"].as_str().unwrap_or_default(),
            v["token"].as_str().unwrap_or_default(),
            dev.display()
        ),
    )?;
    let log = work.join("agent.log");
    let agent_bin = agent.to_path_buf();
    let agent = Command::new(agent)
        .args(["--log", "info", "run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(Setup {
        agent_bin,
        cfg,
        receiver,
        agent,
        state,
        log,
    })
}

/// Writes `count` pieces of `len` bytes at random `len`-aligned offsets, then fsync.
fn writes(dev: &Path, len: usize, count: usize, seed: u64) -> Result<u64> {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev)?;
    let size = f.seek(SeekFrom::End(0))?;
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; len];
    for _ in 0..count {
        for c in buf.chunks_mut(8) {
            let v = next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        let off = next() % (size / len as u64) * len as u64;
        f.write_all_at(&buf, off)?;
    }
    f.flush()?;
    f.sync_all()?;
    Ok((len * count) as u64)
}

struct Step {
    cycle: Option<f64>,
    to_commit: f64,
    read: u64,
    wire: u64,
    changed: u64,
}

fn step(s: &Setup, dev: &Path, len: usize, count: usize, seed: u64) -> Result<Step> {
    let before = status(s)?;
    let changed = writes(dev, len, count, seed)?;
    let (t0, ms0) = (Instant::now(), now_ms());
    let point = point_after(s, ms0, Duration::from_secs(600))?;
    let to_commit = t0.elapsed().as_secs_f64();
    let after = status(s)?;
    Ok(Step {
        cycle: cycle_secs(&s.log, point),
        to_commit,
        read: bytes_read(&after).saturating_sub(bytes_read(&before)),
        wire: u(&after, "bytes_sent").saturating_sub(u(&before, "bytes_sent")),
        changed,
    })
}

pub fn run(a: &super::Args, img: &Path, rx: &Path, agent: &Path) -> Result<()> {
    let copy = a.dir.join("incr.img");
    eprintln!("copying the reference image to {} (sparse)", copy.display());
    super::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(img)
            .arg(&copy),
    )?;
    let dev = super::run(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&copy),
    )?;
    let dev = PathBuf::from(dev.trim());
    let _detach = Detach(dev.clone(), copy.clone());
    println!("== incremental: 8 GiB reference image on {}", dev.display());
    println!("| tracker | change | agent cycle | end of writes → point committed | read from disk | wire bytes per changed byte |");
    println!("|---|---|---|---|---|---|");
    for (t, tracker) in ["ebpf", "scan"].into_iter().enumerate() {
        let s = start(a, &dev, tracker, rx, agent)?;
        // The initial sync, then one idle point: steady state.
        point_after(&s, 0, Duration::from_secs(1800))?;
        point_after(&s, now_ms(), Duration::from_secs(600))?;
        for (label, len, count, seed) in [
            ("81 MiB in 1 MiB extents", 1 << 20, 81, 11),
            ("84 MiB of scattered 4 KiB writes", 4096, 21504, 12),
        ] {
            // New content for each tracker (the same writes again would change nothing).
            let r = step(&s, &dev, len, count, seed + 100 * t as u64)?;
            println!(
                "| {tracker} | {label} | {} | {:.2} s | {:.0} MiB | {:.2} |",
                r.cycle.map(|c| format!("{c:.1} s")).unwrap_or("?".into()),
                r.to_commit,
                r.read as f64 / (1 << 20) as f64,
                r.wire as f64 / r.changed as f64
            );
        }
    }
    Ok(())
}

struct Detach(PathBuf, PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        let _ = std::fs::remove_file(&self.1);
    }
}
