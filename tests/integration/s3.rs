//! The staging store in S3 (moto in server mode, on loopback): replication into the bucket,
//! a receiver killed mid-stream, bit rot in the bucket found by scrub and healed by the agent,
//! an unreachable bucket refused at start; and leases taken with conditional writes.

use lifeboat_tests::moto::Moto;
use lifeboat_tests::*;
use std::process::Output;
use std::time::Duration;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Blocks go to the bucket under the prefix (none to the state directory); a receiver
/// SIGKILLed mid-stream restarts on the bucket and the agent completes; every point restores
/// byte-exact; rot in a block object is quarantined by scrub and healed by the agent.
#[test]
fn an_s3_store_takes_the_blocks_survives_kill_9_and_heals_rot() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-staging");
    let mut rx = Receiver::start(w.path());
    rx.use_s3(&moto.url(), "lifeboat-staging", "fleet/");
    let img = w.path().join("disk.img");
    let data = random_image(&img, 120, 91);
    let mut spec = AgentSpec::new("s3-01", &[("root", &img)]);
    spec.bandwidth_mbps = 32; // about 15 s for 60 MiB
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    wait_for("some blocks to arrive", Duration::from_secs(60), || {
        rx.try_counter("s3-01", "blocks_stored").unwrap_or(0) >= 10
    });
    rx.kill();
    assert!(
        rx.points("s3-01").is_empty(),
        "the sync finished before the kill; nothing was tested"
    );
    rx.restart();
    wait_for(
        "a point after the restart",
        Duration::from_secs(120),
        || !rx.points("s3-01").is_empty(),
    );
    agent.kill();
    rx.expect_restore("s3-01", "root", "latest", &data);
    // Dedupe answers came from the index once it was listed (in the background).
    assert!(
        rx.log_text().contains("staging store index listed"),
        "{}",
        rx.log_text()
    );
    // Every block acknowledged before the kill was in the bucket: none had to be forgotten
    // and sent again (which would heal, and so hide, an ack given too early).
    assert!(
        !rx.log_text().contains("blocks missing from the store"),
        "{}",
        rx.log_text()
    );

    let blocks = moto.keys("lifeboat-staging", "fleet/blocks/");
    assert_eq!(blocks.len(), 120, "{blocks:?}");
    assert!(
        rx.store_blocks().is_empty(),
        "blocks were written to the state directory too"
    );

    // The bucket's requests are counted (a restarted receiver counts from zero, so at least
    // what the agent's completing run needed); the receiver is healthy with no store/ dir.
    let (code, m) = http_get(&rx.metrics_addr(), "/metrics");
    assert_eq!(code, 200);
    let requests = sample(&m, "lifeboat_receiver_store_requests_total").unwrap();
    assert!(requests >= 1.0, "{m}");
    assert_eq!(
        sample(&m, "lifeboat_receiver_store_throttles_total"),
        Some(0.0)
    );
    let (code, body) = http_get(&rx.metrics_addr(), "/healthz");
    assert_eq!(code, 200, "{body}");

    // Rot in one object: scrub finds it and moves it aside; the point no longer restores.
    let victim = blocks[7].clone();
    let mut body = moto.get("lifeboat-staging", &victim).unwrap();
    body[100] ^= 0x01;
    moto.put("lifeboat-staging", &victim, &body);
    let o = rx.cli(&["scrub", "--json"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["blocks_checked"], 120);
    let name = victim.rsplit('/').next().unwrap();
    assert_eq!(v["corrupt"][0]["hash"], name);
    assert!(moto.get("lifeboat-staging", &victim).is_none());
    let moved = moto.keys("lifeboat-staging", "fleet/quarantine/");
    assert!(
        moved.iter().any(|k| k.contains(name)) && moved.iter().any(|k| k.ends_with("/mark")),
        "{moved:?}"
    );
    let o = rx.restore("s3-01", "root", "latest", &w.path().join("broken.img"));
    assert_eq!(o.status.code(), Some(65), "restored without its block");

    // The agent's next run sends the block again: every point restores.
    agent.run_once_ok();
    rx.expect_restore("s3-01", "root", "latest", &data);
    assert!(moto.get("lifeboat-staging", &victim).is_some());
}

/// A bucket that does not exist stops `serve` at start with its name, rather than failing at
/// the first block; so do a prefix another receiver holds (their GCs would delete each other's
/// blocks) and `[s3]` added to a receiver whose points name blocks in its directory store.
#[test]
fn a_missing_bucket_a_taken_prefix_and_a_local_store_are_refused_at_start() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let mut rx = Receiver::start(w.path());
    rx.kill();
    rx.use_s3(&moto.url(), "no-such-bucket", "");
    let o = rx.cli(&["scrub"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"no-such-bucket\""), "{}", stderr(&o));
    let mut serve = std::process::Command::new(bin("lifeboat-receiver"));
    serve
        .arg("--state-dir")
        .arg(&rx.dir)
        .arg("serve")
        .envs(rx.env.iter().map(|(k, v)| (k, v)));
    let o = serve.output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bucket \"no-such-bucket\" does not answer"),
        "{}",
        stderr(&o)
    );

    // Two receivers, one prefix: the second is refused; with a prefix of its own it runs.
    moto.create_bucket("lifeboat-shared");
    let w2 = workdir();
    let mut a = Receiver::start(w2.path());
    a.use_s3(&moto.url(), "lifeboat-shared", "fleet/");
    let b_dir = w2.path().join("receiver-b");
    let mut b = Receiver::start_at(w2.path(), &b_dir);
    b.kill();
    b.use_s3(&moto.url(), "lifeboat-shared", "fleet/");
    let o = b.cli(&["scrub"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(
            "s3://lifeboat-shared/fleet/owner.json says this prefix belongs to another receiver"
        ),
        "{}",
        stderr(&o)
    );
    assert!(
        a.cli(&["scrub"]).status.success(),
        "the owner was refused too"
    );
    // A fleet's receiver on that prefix is refused too, and a lone one on a fleet's prefix.
    let path = b.dir.join("receiver.toml");
    let lone = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{lone}\n[fleet]\naddress = \"127.0.0.1:{}\"\n", b.port),
    )
    .unwrap();
    let o = b.cli(&["scrub"]);
    assert!(
        !o.status.success() && stderr(&o).contains("this receiver is in a fleet"),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        &path,
        format!(
            "{}\n[fleet]\naddress = \"127.0.0.1:{}\"\n",
            lone.replace("\"fleet/\"", "\"fleet-2/\""),
            b.port
        ),
    )
    .unwrap();
    assert!(
        b.cli(&["scrub"]).status.success(),
        "{}",
        stderr(&b.cli(&["scrub"]))
    );
    std::fs::write(&path, lone.replace("\"fleet/\"", "\"fleet-2/\"")).unwrap();
    let o = b.cli(&["scrub"]);
    assert!(
        !o.status.success() && stderr(&o).contains("it is a fleet's"),
        "{}",
        stderr(&o)
    );

    // A receiver with blocks in its directory store cannot move to S3 by a config change.
    let w3 = workdir();
    let mut c = Receiver::start(w3.path());
    let img = w3.path().join("disk.img");
    random_image(&img, 2, 3);
    Agent::new(
        w3.path(),
        &c,
        &AgentSpec::new("local-01", &[("root", &img)]),
    )
    .run_once_ok();
    c.kill();
    c.use_s3(&moto.url(), "lifeboat-shared", "other/");
    let o = c.cli(&["scrub"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("moving a directory store into S3 is not supported"),
        "{}",
        stderr(&o)
    );
}

/// Retention and GC on the bucket: blocks no kept point names are deleted from it, and only
/// those; every kept point still restores.
#[test]
fn gc_deletes_from_the_bucket_exactly_what_no_kept_point_needs() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-gc");
    let mut rx = Receiver::start(w.path());
    rx.use_s3(&moto.url(), "lifeboat-gc", "");
    let img = w.path().join("disk.img");
    let mut versions = vec![random_image(&img, 12, 5)];
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("gc-s3", &[("root", &img)]));
    agent.run_once_ok();
    for round in 0..2 {
        versions.push(random_image(&img, 12, 600 + round));
        agent.run_once_ok();
    }
    assert_eq!(moto.keys("lifeboat-gc", "blocks/").len(), 36);

    rx.restart_with_retention(0, 7, 0);
    // Retention deletes points one at a time, so a listing taken mid-pass can still name a
    // point that is about to go: wait for the bucket to hold exactly the blocks of the points
    // listed at that moment, and for that listing to stay put.
    let listed = || -> Vec<u64> {
        rx.points("gc-s3")
            .iter()
            .map(|p| p["point"].as_u64().unwrap())
            .collect()
    };
    let mut kept = Vec::new();
    wait_for(
        "retention and GC to leave exactly the kept points' blocks",
        Duration::from_secs(60),
        || {
            kept = listed();
            kept.len() < 3
                && moto.keys("lifeboat-gc", "blocks/").len() == 12 * kept.len()
                && listed() == kept
        },
    );
    assert!(kept.contains(&3), "the newest point was dropped: {kept:?}");
    for p in &kept {
        rx.expect_restore("gc-s3", "root", &p.to_string(), &versions[*p as usize - 1]);
    }
}

/// S3 throttling (`503 SlowDown` past 10 requests a second) slows the store down and fails
/// nothing: the sync completes, every point restores, and the throttles are counted.
#[test]
fn slowdown_answers_slow_the_store_and_fail_no_session() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-slow");
    let proxy = lifeboat_tests::slowdown::SlowDown::start(moto.addr, 10);
    let mut rx = Receiver::start(w.path());
    rx.use_s3(&proxy.url(), "lifeboat-slow", "");
    let img = w.path().join("disk.img");
    let data = random_image(&img, 40, 77);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("slow-01", &[("root", &img)]));
    let o = agent.run_once(120);
    assert!(
        o.status.success(),
        "{}\nreceiver:\n{}",
        stderr(&o),
        rx.log_text()
    );
    // No batch failed for it (a failed insert names the store to the agent and in the log).
    assert!(
        !stderr(&o).contains("staging store in S3:"),
        "{}",
        stderr(&o)
    );
    let throttled = proxy.throttled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        throttled > 0,
        "the proxy throttled nothing; nothing was tested"
    );
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    let counted = sample(&m, "lifeboat_receiver_store_throttles_total").unwrap();
    assert!(counted >= 1.0, "throttles not counted: {m}");
    assert!(
        !rx.log_text().contains("staging store in S3:"),
        "{}",
        rx.log_text()
    );
    rx.expect_restore("slow-01", "root", "latest", &data);
    assert_eq!(moto.keys("lifeboat-slow", "blocks/").len(), 40);
}

/// Rot in the bucket found by `scrub` (another process) while the agent stays connected and
/// cuts points: the session notices the quarantine, has the block sent again before its next
/// point, and every point restores, older ones included.
#[test]
fn a_scrub_beside_a_live_session_on_s3_leaves_every_point_restorable() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-live");
    let mut rx = Receiver::start(w.path());
    rx.use_s3(&moto.url(), "lifeboat-live", "");
    let img = w.path().join("disk.img");
    let data = random_image(&img, 10, 4321);
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("live-s3", &[("root", &img)]));
    agent.spawn();
    wait_for("the first point", Duration::from_secs(60), || {
        !rx.points("live-s3").is_empty()
    });
    let victim = moto.keys("lifeboat-live", "blocks/")[3].clone();
    let mut body = moto.get("lifeboat-live", &victim).unwrap();
    body[50] ^= 0x80;
    moto.put("lifeboat-live", &victim, &body);
    let o = rx.cli(&["scrub"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let newest = |rx: &Receiver| {
        rx.points("live-s3")
            .iter()
            .filter_map(|p| p["point"].as_u64())
            .max()
            .unwrap()
    };
    let after_scrub = newest(&rx);
    wait_for(
        "two points after the scrub",
        Duration::from_secs(60),
        || newest(&rx) >= after_scrub + 2,
    );
    agent.kill();
    assert!(rx.log_text().contains("blocks missing from the store"));
    assert!(
        moto.get("lifeboat-live", &victim).is_some(),
        "never sent again"
    );
    for p in rx.points("live-s3") {
        let n = p["point"].as_u64().unwrap().to_string();
        rx.expect_restore("live-s3", "root", &n, &data);
    }
}
