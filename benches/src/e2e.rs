//! End-to-end benchmark: initial sync of a reference image, agent → receiver over loopback
//! TLS (both on this machine), against `zstd -1 -T2` over the same image, in one run.
//!
//!   cargo build --release --bins -p lifeboat-agent -p lifeboat-receiver
//!   cargo run --release -p lifeboat-benches --bin e2e-bench -- [--runs N] [--dir D] [--size-gib G]
//!
//! The reference image is `mkfs.ext4 -d /usr` into a sparse file (8 GiB by default), made
//! once under the work dir and reused. Runs alternate zstd / Lifeboat so that drift in the
//! machine's speed hits both alike; the page cache is dropped before every run (when
//! permitted) so both read the image from disk. Lifeboat's time is the agent's `run --once`:
//! connect, read and hash every block, compress, send, receiver verifies and stores durably,
//! point committed. zstd's is `zstd -1 -T2 -f image -o image.zst`.
//!
//! After the last timed run the point is restored (timed apart: `restore` checks every block
//! against the manifest and reads the destination back) and compared with the source byte
//! for byte, so the figures are of a sync that really produced the data.
//!
//! `--incremental` measures continuous replication instead (see `incremental.rs`); `--ebs`
//! the upload of one point to EBS and its restore (see `ebs.rs`); `--s3` the initial sync
//! into the S3 staging store against the directory store (see `s3.rs`).
//!
//! `--device` runs the same against a fully allocated loop device holding the image (root
//! needed): a block device has no holes to skip, so every byte is read, hashed and checked.

mod ebs;
mod incremental;
mod lag;
mod s3;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Args {
    runs: usize,
    pub(crate) dir: PathBuf,
    size_gib: u64,
    source: PathBuf,
    device: bool,
    incremental: bool,
    lag: bool,
    /// `--ebs`: upload and restore through the strict EBS test server.
    ebs: bool,
    ebs_latency_ms: u64,
    ebs_in_flight: usize,
    /// `--s3`: the directory store against the S3 store (moto on loopback).
    s3: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        dir: PathBuf::from("/var/tmp/lifeboat-bench"),
        size_gib: 8,
        source: PathBuf::from("/usr"),
        device: false,
        incremental: false,
        lag: false,
        ebs: false,
        ebs_latency_ms: 50,
        ebs_in_flight: 64,
        s3: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = v()?.parse()?,
            "--dir" => a.dir = v()?.into(),
            "--size-gib" => a.size_gib = v()?.parse()?,
            "--source" => a.source = v()?.into(),
            "--device" => a.device = true,
            "--incremental" => a.incremental = true,
            "--lag" => a.lag = true,
            "--ebs" => a.ebs = true,
            "--ebs-latency-ms" => a.ebs_latency_ms = v()?.parse()?,
            "--ebs-in-flight" => a.ebs_in_flight = v()?.parse()?,
            "--s3" => a.s3 = true,
            "-h" | "--help" => {
                println!("e2e-bench [--runs N (3)] [--dir D (/var/tmp/lifeboat-bench)] [--size-gib G (8)] [--source DIR (/usr)] [--device] [--incremental] [--lag] [--ebs [--ebs-latency-ms 50] [--ebs-in-flight 64]] [--s3]");
                std::process::exit(0);
            }
            // `cargo bench` passes --bench; ignore it.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe has no dir")?.join(name);
    if !p.exists() {
        bail!(
            "{} not found: cargo build --release --bins -p lifeboat-agent -p lifeboat-receiver",
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn reference_image(a: &Args) -> Result<PathBuf> {
    std::fs::create_dir_all(&a.dir)?;
    let img = a.dir.join(format!("ref-{}g.img", a.size_gib));
    let done = a.dir.join(format!("ref-{}g.done", a.size_gib));
    if done.exists() && img.exists() {
        return Ok(img);
    }
    eprintln!(
        "building the reference image: mkfs.ext4 -d {} into {} GiB (once)",
        a.source.display(),
        a.size_gib
    );
    let _ = std::fs::remove_file(&img);
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!("{}G", a.size_gib))
        .arg(&img))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&a.source)
        .arg(&img))?;
    std::fs::write(&done, b"")?;
    Ok(img)
}

fn allocated(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// `zstd -1 -T2` of `img` (a file or a device) from stdin to `out`.
fn time_zstd(img: &Path, out: &Path) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new("zstd")
        .args(["-q", "-1", "-T2", "-c"])
        .stdin(std::fs::File::open(img)?)
        .stdout(std::fs::File::create(out)?)
        .status()?;
    if !status.success() {
        bail!("zstd failed on {}: {status}", img.display());
    }
    Ok(t.elapsed())
}

/// The kernel's high-water mark of a process's resident memory, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

struct SyncRun {
    took: Duration,
    stored: u64,
    agent_peak: u64,
    receiver_peak: u64,
    /// The restore of the point, when asked for: how long it took.
    restored: Option<Duration>,
}

/// One timed initial sync of `img`; with `verify`, then restores the point (timed apart)
/// and compares it with `img` byte for byte.
fn time_lifeboat(a: &Args, img: &Path, rx: &Path, agent: &Path, verify: bool) -> Result<SyncRun> {
    let work = a.dir.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let state = work.join("receiver");
    let (mut server, port, v) = start_receiver(rx, &state)?;
    let cfg = agent_config(&work, port, &v, img)?;
    drop_caches();
    let t = Instant::now();
    let mut child = Command::new(agent)
        .args(["--log", "warn", "run", "--once", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .spawn()?;
    // VmHWM is a high-water mark: the last sample before exit holds the peak.
    let mut agent_peak = 0;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        agent_peak = agent_peak.max(vm_hwm(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    let receiver_peak = vm_hwm(server.id()).unwrap_or(0);
    let _ = server.kill();
    let _ = server.wait();
    if !status.success() {
        bail!("agent failed: {status}");
    }
    let stored = du(&state.join("store"))?;
    let restored = if verify {
        let out = work.join("restored.img");
        drop_caches();
        let t = Instant::now();
        run(Command::new(rx)
            .arg("--state-dir")
            .arg(&state)
            .args([
                "restore", "--server", "bench", "--disk", "root", "--point", "latest", "--to",
            ])
            .arg(&out))?;
        let took = t.elapsed();
        let same = Command::new("cmp").arg("-s").arg(img).arg(&out).status()?;
        if !same.success() {
            bail!("the restored point differs from {}", img.display());
        }
        let _ = std::fs::remove_file(&out);
        Some(took)
    } else {
        None
    };
    Ok(SyncRun {
        took,
        stored,
        agent_peak,
        receiver_peak,
        restored,
    })
}

/// `init` a receiver state directory in `state` on a free loopback port and start `serve`;
/// returns once it listens: the process, the port, and what `init` printed.
pub(crate) fn start_receiver(
    rx: &Path,
    state: &Path,
) -> Result<(std::process::Child, u16, serde_json::Value)> {
    start_receiver_with(rx, state, "", &[])
}

/// As [`start_receiver`], with `extra` added to receiver.toml (its top-level keys first, its
/// tables at the end) and `env` for `serve`.
pub(crate) fn start_receiver_with(
    rx: &Path,
    state: &Path,
    extra: &str,
    env: &[(&str, &str)],
) -> Result<(std::process::Child, u16, serde_json::Value)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let init = run(Command::new(rx).arg("--state-dir").arg(state).args([
        "init",
        "--json",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&init)?;
    if !extra.is_empty() {
        // Top-level keys before the file's tables, tables after them.
        let at = extra.find("\n[").map(|i| i + 1).unwrap_or(extra.len());
        let (top, tables) = extra.split_at(at);
        let path = state.join("receiver.toml");
        let text = format!("{top}{}\n{tables}", std::fs::read_to_string(&path)?);
        std::fs::write(&path, text)?;
    }
    let mut server = Command::new(rx)
        .arg("--state-dir")
        .arg(state)
        .args(["--log", "warn", "serve"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = server.kill();
            bail!("receiver did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, port, v))
}

/// Writes `<work>/agent.toml` for server "bench" replicating `img` as disk "root" to the
/// receiver `init` described in `v`, listening on `port`; returns its path.
pub(crate) fn agent_config(
    work: &Path,
    port: u16,
    v: &serde_json::Value,
    img: &Path,
) -> Result<PathBuf> {
    let cfg = work.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "server_id = \"bench\"\nstate_dir = \"{}\"\n[receiver]\naddress = \"127.0.0.1:{port}\"\nca_fingerprint = \"{}\"\ntoken = \"{}\"\n[[disks]]\nid = \"root\"\npath = \"{}\"\n",
            work.join("agent").display(),
            v["ca_fingerprint"].as_str().unwrap_or_default(),
            v["token"].as_str().unwrap_or_default(),
            img.display()
        ),
    )?;
    Ok(cfg)
}

/// A fully allocated copy of `img` on a loop device (detached on drop).
struct LoopDevice {
    dev: PathBuf,
    file: PathBuf,
}

impl LoopDevice {
    fn of(img: &Path, dir: &Path) -> Result<LoopDevice> {
        let file = dir.join("full.img");
        eprintln!(
            "copying the image without holes to {} (once per run of the bench)",
            file.display()
        );
        run(Command::new("cp").arg("--sparse=never").arg(img).arg(&file))?;
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&file))?;
        Ok(LoopDevice {
            dev: PathBuf::from(dev.trim()),
            file,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn du(p: &Path) -> Result<u64> {
    let out = run(Command::new("du").args(["-sb"]).arg(p))?;
    Ok(out.split_whitespace().next().unwrap_or("0").parse()?)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the comparison on `source` (the sparse image, or a device holding it) and prints it.
fn compare(a: &Args, label: &str, source: &Path, data: u64, rx: &Path, agent: &Path) -> Result<()> {
    let zst = a.dir.join("ref.img.zst");
    let (mut zs, mut ls, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // On a device, also a plain sequential read of it: the disk's own limit.
    let is_device = {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(source).is_ok_and(|m| m.file_type().is_block_device())
    };
    let mut dd_ratios = Vec::new();
    let (mut stored, mut agent_peak, mut receiver_peak, mut restored) = (0, 0, 0, None);
    for i in 0..a.runs {
        drop_caches();
        let z = time_zstd(source, &zst)?.as_secs_f64();
        let r = time_lifeboat(a, source, rx, agent, i + 1 == a.runs)?;
        let l = r.took.as_secs_f64();
        if is_device {
            drop_caches();
            let d = time_dd(source)?.as_secs_f64();
            eprintln!(
                "{label} run {}: dd iflag=direct bs=4M {d:.2}s  lifeboat/dd {:.2}",
                i + 1,
                l / d
            );
            dd_ratios.push(l / d);
        }
        stored = r.stored;
        agent_peak = agent_peak.max(r.agent_peak);
        receiver_peak = receiver_peak.max(r.receiver_peak);
        restored = restored.or(r.restored);
        eprintln!(
            "{label} run {}: zstd {z:.2}s  lifeboat {l:.2}s  ratio {:.2}",
            i + 1,
            l / z
        );
        zs.push(z);
        ls.push(l);
        ratios.push(l / z);
    }
    let zstd_size = std::fs::metadata(&zst)?.len();
    let _ = std::fs::remove_file(&zst);
    let (z, l, r) = (median(&mut zs), median(&mut ls), median(&mut ratios));
    println!("== {label}: {}", source.display());
    println!(
        "zstd -1 -T2:        median {z:.2}s  ({:.0} MiB/s of data), output {:.2} GiB",
        data as f64 / z / (1 << 20) as f64,
        zstd_size as f64 / (1u64 << 30) as f64
    );
    println!(
        "lifeboat sync:      median {l:.2}s  ({:.0} MiB/s of data), store {:.2} GiB",
        data as f64 / l / (1 << 20) as f64,
        stored as f64 / (1u64 << 30) as f64
    );
    println!(
        "ratio lifeboat/zstd: median {r:.2} (per-run: {})",
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "target: <= 1.5  -> {}",
        if r <= 1.5 { "met" } else { "NOT met" }
    );
    if !dd_ratios.is_empty() {
        let per_run = dd_ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let m = median(&mut dd_ratios);
        println!(
            "ratio lifeboat/(dd iflag=direct bs=4M): median {m:.2} (per-run: {per_run}); target <= 1.15 -> {}",
            if m <= 1.15 { "met" } else { "NOT met" }
        );
    }
    println!(
        "peak resident memory (max over runs): agent {:.0} MiB, receiver {:.0} MiB",
        agent_peak as f64 / (1 << 20) as f64,
        receiver_peak as f64 / (1 << 20) as f64
    );
    if let Some(t) = restored {
        println!(
            "restore of the last run's point: {:.2}s ({:.0} MiB/s of disk), every block \
             verified, read back, and identical to the source",
            t.as_secs_f64(),
            std::fs::metadata(source)
                .map(|m| m.len())
                .unwrap_or(0)
                .max(device_size(source)) as f64
                / t.as_secs_f64()
                / (1 << 20) as f64
        );
    }
    Ok(())
}

/// `dd if=<device> iflag=direct bs=4M of=/dev/null`: how fast the device reads alone.
fn time_dd(dev: &Path) -> Result<Duration> {
    let t = Instant::now();
    run(Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["of=/dev/null", "bs=4M", "iflag=direct", "status=none"]))?;
    Ok(t.elapsed())
}

/// A block device's size (0 for anything else).
fn device_size(p: &Path) -> u64 {
    use std::io::Seek;
    std::fs::File::open(p)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let a = args()?;
    let rx = sibling("lifeboat-receiver")?;
    let agent = sibling("lifeboat-agent")?;
    if a.lag {
        return lag::run(&a, &rx, &agent);
    }
    let img = reference_image(&a)?;
    let data = allocated(&img)?;
    let logical = std::fs::metadata(&img)?.len();
    let cache_note = if drop_caches() {
        "page cache dropped before each run"
    } else {
        "page cache NOT dropped (not permitted)"
    };
    eprintln!(
        "image {}: {:.2} GiB logical, {:.2} GiB allocated; {} runs each; {cache_note}",
        img.display(),
        logical as f64 / (1u64 << 30) as f64,
        data as f64 / (1u64 << 30) as f64,
        a.runs
    );
    println!(
        "reference image: {:.2} GiB logical, {:.2} GiB data",
        logical as f64 / (1u64 << 30) as f64,
        data as f64 / (1u64 << 30) as f64
    );
    if a.incremental {
        return incremental::run(&a, &img, &rx, &agent);
    }
    if a.s3 {
        return s3::run_s3(&a, &img, data, &rx, &agent);
    }
    if a.ebs {
        return ebs::run_ebs(&a, &img, &rx, &agent, a.ebs_latency_ms, a.ebs_in_flight);
    }
    compare(&a, "sparse file", &img, data, &rx, &agent)?;
    if a.device {
        let dev = LoopDevice::of(&img, &a.dir)?;
        // Every byte of a device is read: throughput is of the whole disk.
        compare(
            &a,
            "fully allocated loop device",
            &dev.dev,
            logical,
            &rx,
            &agent,
        )?;
    }
    Ok(())
}
