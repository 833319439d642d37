//! `e2e-bench --s3`: the initial sync of the reference image into the S3 staging store (moto
//! in server mode on loopback, as the tests use it) against the directory store, runs
//! alternating, in one process; with the S3 store's requests per acknowledged block. A third
//! run each time does the same as one receiver of a fleet (`[fleet]`: the server's lease, a
//! journal segment per batch and the points in the bucket too).
//!
//!   tests/prereqs.sh tests   # moto, once
//!   cargo build --release --bins -p lifeboat-agent -p lifeboat-receiver
//!   LIFEBOAT_MOTO_SERVER=/var/tmp/lifeboat-venv/bin/moto_server \
//!     cargo run --release -p lifeboat-benches --bin e2e-bench -- --s3 [--runs N] [--size-gib G]
//!
//! Each S3 run writes under a prefix of its own, so no run finds the blocks of another. moto
//! keeps objects in its Python process: its speed, not S3's, bounds the S3 figure here, so the
//! ratio is a floor on what a real bucket allows, and the requests per block are the point.
//! After the last S3 run the point is restored from the bucket and compared with the image.

use super::{agent_config, drop_caches, median, run, start_receiver_with, Args};
use anyhow::{bail, Context, Result};
use lifeboat_tests::moto::Moto;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "lifeboat-bench";

const ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "lifeboat-bench"),
    ("AWS_SECRET_ACCESS_KEY", "lifeboat-bench"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/nonexistent"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
];

struct Run {
    took: Duration,
    /// Store requests (S3 only) and blocks the receiver took (stored or referenced).
    requests: Option<f64>,
    blocks: f64,
}

/// A value of the receiver's `/metrics`.
fn metric(state: &Path, name: &str) -> Option<f64> {
    let addr = std::fs::read_to_string(state.join("metrics.addr")).ok()?;
    let (_, body) = lifeboat_tests::http_get(addr.trim(), "/metrics");
    lifeboat_tests::sample(&body, name)
}

fn one(
    a: &Args,
    img: &Path,
    rx: &Path,
    agent: &Path,
    s3: Option<(&Moto, &str, bool)>,
    verify: bool,
) -> Result<Run> {
    let work = a.dir.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let state = work.join("receiver");
    let mut extra = "metrics_listen = \"127.0.0.1:0\"\n".to_string();
    if let Some((moto, prefix, fleet)) = s3 {
        extra = format!(
            "{extra}[s3]\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\nregion = \"us-east-1\"\n\
             endpoint_url = \"{}\"\npath_style = true\n",
            moto.url()
        );
        if fleet {
            // The address only matters to agents other receivers redirect: there are none.
            extra.push_str("[fleet]\naddress = \"127.0.0.1:7443\"\n");
        }
    }
    let (mut server, port, v) = start_receiver_with(rx, &state, &extra, &ENV)?;
    let cfg = agent_config(&work, port, &v, img)?;
    drop_caches();
    let t = Instant::now();
    let status = Command::new(agent)
        .args(["--log", "warn", "run", "--once", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .status()?;
    let took = t.elapsed();
    if !status.success() {
        let _ = server.kill();
        bail!("agent failed: {status}");
    }
    let requests = metric(&state, "lifeboat_receiver_store_requests_total");
    // (In a fleet `servers` reads the bucket: it needs the credentials too.)
    let out = run(Command::new(rx)
        .arg("--state-dir")
        .arg(&state)
        .args(["servers", "--json"])
        .envs(ENV));
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = server.kill();
            let _ = server.wait();
            return Err(e);
        }
    };
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let c = &v[0]["counters"];
    let blocks =
        c["blocks_received"].as_f64().unwrap_or(0.0) + c["refs_received"].as_f64().unwrap_or(0.0);
    let _ = server.kill();
    let _ = server.wait();
    if verify {
        let restored = work.join("restored.img");
        run(Command::new(rx)
            .arg("--state-dir")
            .arg(&state)
            .args([
                "restore", "--server", "bench", "--disk", "root", "--point", "latest", "--to",
            ])
            .arg(&restored)
            .envs(ENV))?;
        if !Command::new("cmp")
            .arg("-s")
            .arg(img)
            .arg(&restored)
            .status()?
            .success()
        {
            bail!(
                "the point restored from the bucket differs from {}",
                img.display()
            );
        }
        let _ = std::fs::remove_file(&restored);
    }
    Ok(Run {
        took,
        requests,
        blocks,
    })
}

pub fn run_s3(a: &Args, img: &Path, data: u64, rx: &Path, agent: &Path) -> Result<()> {
    let moto = Moto::start(&a.dir).context("moto_server is needed: tests/prereqs.sh tests")?;
    moto.create_bucket(BUCKET);
    let (mut dirs, mut s3s, mut ratios, mut per_block) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fleets, mut fleet_ratios, mut fleet_per_block) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.runs {
        let last = i + 1 == a.runs;
        let d = one(a, img, rx, agent, None, false)?;
        let prefix = format!("run-{i}/");
        let s = one(a, img, rx, agent, Some((&moto, &prefix, false)), last)?;
        let prefix = format!("fleet-{i}/");
        let f = one(a, img, rx, agent, Some((&moto, &prefix, true)), last)?;
        let (dt, st, ft) = (
            d.took.as_secs_f64(),
            s.took.as_secs_f64(),
            f.took.as_secs_f64(),
        );
        let rpb = s.requests.unwrap_or(f64::NAN) / s.blocks.max(1.0);
        let fpb = f.requests.unwrap_or(f64::NAN) / f.blocks.max(1.0);
        eprintln!(
            "run {}: directory {dt:.2}s  s3 {st:.2}s (ratio {:.2}, {} requests for {} blocks, {rpb:.3} a block)  \
             fleet {ft:.2}s (ratio {:.2}, {} requests, {fpb:.3} a block)",
            i + 1,
            st / dt,
            s.requests.unwrap_or(f64::NAN),
            s.blocks,
            ft / dt,
            f.requests.unwrap_or(f64::NAN),
        );
        dirs.push(dt);
        s3s.push(st);
        ratios.push(st / dt);
        per_block.push(rpb);
        fleets.push(ft);
        fleet_ratios.push(ft / dt);
        fleet_per_block.push(fpb);
    }
    let mib = data as f64 / (1 << 20) as f64;
    let (d, s, r, q) = (
        median(&mut dirs),
        median(&mut s3s),
        median(&mut ratios),
        median(&mut per_block),
    );
    println!("== initial sync: directory store vs S3 store (moto on loopback)");
    println!(
        "directory store: median {d:.2}s ({:.0} MiB/s of data)",
        mib / d
    );
    println!(
        "S3 store:        median {s:.2}s ({:.0} MiB/s of data)",
        mib / s
    );
    println!(
        "ratio s3/directory: median {r:.2} (per-run: {})",
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("S3 requests per acknowledged block: median {q:.3}");
    let (f, fr, fq) = (
        median(&mut fleets),
        median(&mut fleet_ratios),
        median(&mut fleet_per_block),
    );
    println!(
        "S3 store, fleet: median {f:.2}s ({:.0} MiB/s of data), ratio to directory {fr:.2}, \
         {fq:.3} requests per acknowledged block",
        mib / f
    );
    println!("the last runs' points restored from the bucket and identical to the image");
    Ok(())
}
