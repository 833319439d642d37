//! `--ebs`: one point of the reference image uploaded to EBS, and restored from it, against
//! the strict EBS test server (`tests/support/ebs_server.rs`) with 50 ms of latency added to
//! every request, in this process on loopback.
//!
//! Steps: an initial sync of the image into a fresh receiver (not timed), then `snapshot
//! --point latest` (timed: every data block read from the staging store and checked, hashed
//! with SHA-256, put; CompleteSnapshot; the wait for `completed`), then `restore --from ebs`
//! (timed: every block listed, fetched, checked against its SHA-256 and the manifest, written,
//! and the file read back), compared byte for byte with the image. CPU seconds are the
//! receiver's (its children's rusage) per GiB of changed data.

use super::{agent_config, run, start_receiver, Args};
use anyhow::{bail, Context, Result};
use lifeboat_tests::ebs_server::EbsServer;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn children_cpu() -> f64 {
    let mut r = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    #[allow(unsafe_code)]
    // SAFETY: getrusage writes one rusage into the pointer we give it.
    let r = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, r.as_mut_ptr());
        r.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

pub fn run_ebs(
    a: &Args,
    img: &Path,
    rx: &Path,
    agent: &Path,
    latency_ms: u64,
    in_flight: usize,
) -> Result<()> {
    let work = a.dir.join("ebs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let state = work.join("receiver");
    let (mut server, port, v) = start_receiver(rx, &state)?;
    let cfg = agent_config(&work, port, &v, img)?;
    eprintln!("initial sync of {} (not timed)", img.display());
    run(Command::new(agent)
        .args(["--log", "warn", "run", "--once", "--config"])
        .arg(&cfg))?;
    let _ = server.kill();
    let _ = server.wait();

    let ebs = EbsServer::start();
    ebs.faults(|f| f.latency = Duration::from_millis(latency_ms));
    let toml = state.join("receiver.toml");
    let mut text = std::fs::read_to_string(&toml)?;
    text.push_str(&format!(
        "\n[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nputs_in_flight = {in_flight}\n",
        ebs.url()
    ));
    std::fs::write(&toml, text)?;
    let cli = |args: &[&str]| {
        let mut c = Command::new(rx);
        c.arg("--state-dir")
            .arg(&state)
            .args(["--log", "warn"])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stderr(Stdio::inherit());
        c
    };

    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = cli(&[
        "snapshot", "--server", "bench", "--point", "latest", "--json",
    ])
    .output()?;
    let took = t.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    if !out.status.success() {
        bail!("snapshot failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("snapshot --json")?;
    let blocks = v["disks"]["root"]["changed_blocks"].as_u64().unwrap_or(0);
    let gib = (blocks * 512 * 1024) as f64 / (1u64 << 30) as f64;
    println!(
        "== EBS upload of one point ({latency_ms} ms per request, {in_flight} puts in flight)"
    );
    println!(
        "upload: {blocks} blocks ({gib:.2} GiB changed) in {took:.2} s = {:.0} MiB/s of changed data; \
         receiver CPU {cpu:.1} s = {:.1} s per GiB; requests: {:?}",
        gib * 1024.0 / took,
        cpu / gib.max(1e-9),
        ebs.counts()
    );

    let dest = work.join("restored.img");
    let cpu0 = children_cpu();
    let t = Instant::now();
    run(cli(&[
        "restore", "--server", "bench", "--disk", "root", "--point", "latest", "--from", "ebs",
        "--to",
    ])
    .arg(&dest))?;
    let took = t.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    let same = Command::new("cmp").arg("-s").arg(img).arg(&dest).status()?;
    if !same.success() {
        bail!("the point restored from EBS differs from {}", img.display());
    }
    let logical = std::fs::metadata(img)?.len() as f64;
    println!(
        "restore from EBS: {took:.2} s = {:.0} MB/s of data fetched ({:.0} MB/s of disk), \
         read back and identical to the source; receiver CPU {cpu:.1} s",
        (blocks * 512 * 1024) as f64 / 1e6 / took,
        logical / 1e6 / took
    );
    let _ = std::fs::remove_file(&dest);
    Ok(())
}
