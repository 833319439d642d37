//! Crashes: the agent or the receiver killed with SIGKILL mid-stream.

use lifeboat_tests::*;
use std::time::Duration;

/// Waits until the receiver has journaled `records` blocks of `server`'s disk `root` (the
/// journal is written before each ack, with no lag, unlike the saved counters).
fn wait_for_journal(rx: &Receiver, server: &str, records: u64) {
    let journal = rx.dir.join(format!("servers/{server}/disks/root/journal"));
    wait_for("blocks to be journaled", Duration::from_secs(60), || {
        std::fs::metadata(&journal).is_ok_and(|m| m.len() >= records * 44)
    });
}

#[test]
fn agent_killed_mid_initial_sync_resumes_without_resending() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let blocks = 200u64;
    let data = random_image(&img, blocks as usize, 21);
    let mut spec = AgentSpec::new("kill-agent", &[("root", &img)]);
    // 10 MB/s: about 10 s for 100 MiB, so the kill lands mid-sync even though the receiver's
    // counters (saved every 2 s) lag by up to 40 blocks.
    spec.bandwidth_mbps = 80;
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    // Half the disk acknowledged: more than a window's worth, so a resume that forgot what
    // was acknowledged would show in what run 2 sends.
    wait_for_journal(&rx, "kill-agent", blocks / 2);
    agent.kill();
    // Once the session ends the receiver's counters are final for the first run.
    wait_for(
        "the receiver to notice the agent is gone",
        Duration::from_secs(30),
        || {
            rx.cli(&["servers", "--json"])
                .stdout
                .windows(12)
                .any(|w| w == b"disconnected")
        },
    );
    let stored_before = rx.counter("kill-agent", "blocks_stored");
    assert!(
        stored_before < blocks,
        "the sync finished before the kill; nothing was tested"
    );
    let refs_before = rx.counter("kill-agent", "refs_received");

    agent.run_once_ok();
    let received = rx.counter("kill-agent", "blocks_received");
    let stored = rx.counter("kill-agent", "blocks_stored");
    assert_eq!(stored, blocks, "every block stored exactly once");
    // Nor were they queried again: a dedupe answer would have turned each into a Ref (the
    // image has no zero or repeated blocks). At most the window that was in flight.
    let refs = rx.counter("kill-agent", "refs_received") - refs_before;
    assert!(
        refs <= 64,
        "run 2 sent {refs} Refs: it re-queried blocks acknowledged before the kill \
         ({stored_before} of them)"
    );
    // Blocks acknowledged before the kill were not sent again. (A block that was in flight,
    // sent but not yet acknowledged, may legitimately be sent twice.)
    assert!(
        received <= blocks + 64,
        "received {received} blocks for a {blocks}-block disk: acknowledged blocks were resent"
    );
    rx.expect_restore("kill-agent", "root", "latest", &data);
}

#[test]
fn receiver_killed_mid_stream_agent_reconnects_and_completes() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 160, 33);
    let mut spec = AgentSpec::new("kill-rx", &[("root", &img)]);
    spec.bandwidth_mbps = 80; // about 8 s for 80 MiB
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    wait_for("some blocks to arrive", Duration::from_secs(60), || {
        rx.try_counter("kill-rx", "blocks_stored").unwrap_or(0) >= 20
    });
    rx.kill();
    assert!(
        rx.points("kill-rx").is_empty(),
        "the sync finished before the kill; nothing was tested"
    );
    std::thread::sleep(Duration::from_millis(500));
    rx.restart();
    wait_for(
        "a point after the restart",
        Duration::from_secs(120),
        || {
            rx.cli(&["points", "--server", "kill-rx", "--json"])
                .status
                .success()
                && !rx.points("kill-rx").is_empty()
        },
    );
    agent.kill();
    assert!(
        agent.log_text().contains("retrying"),
        "the agent never saw the receiver go"
    );
    // No listed point lacks a block: every one restores, verified.
    for p in rx.points("kill-rx") {
        let n = p["point"].as_u64().unwrap().to_string();
        rx.expect_restore("kill-rx", "root", &n, &data);
    }
}

#[test]
fn restore_fails_naming_a_corrupt_block() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 12, 0, 5);
    Agent::new(w.path(), &rx, &AgentSpec::new("corrupt", &[("root", &img)])).run_once_ok();
    let blocks = rx.store_blocks();
    let victim = &blocks[0];
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(victim, bytes).unwrap();

    let out = w.path().join("out.img");
    let o = rx.restore("corrupt", "root", "latest", &out);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&name),
        "error does not name the block's hash: {err}"
    );
    assert!(err.contains("block ") && err.contains("corrupt"), "{err}");
    assert!(!out.exists(), "an incomplete restore was left behind");

    // A missing block is named too.
    std::fs::remove_file(victim).unwrap();
    let o = rx.restore("corrupt", "root", "latest", &out);
    assert_eq!(o.status.code(), Some(65));
    assert!(
        stderr(&o).contains("not in the staging store"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn hung_receiver_is_detected_and_replication_recovers() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 120, 55);
    let mut spec = AgentSpec::new("hung-rx", &[("root", &img)]);
    spec.bandwidth_mbps = 40; // ~12 s of sync: the hang lands in the middle
    spec.timeout_secs = 4;
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    wait_for_journal(&rx, "hung-rx", 10);
    // The process stays, its sockets stay open, nothing answers.
    rx.signal(libc::SIGSTOP);
    assert!(
        rx.points("hung-rx").is_empty(),
        "the sync finished before the hang; nothing was tested"
    );
    wait_for(
        "the agent to notice the silence",
        Duration::from_secs(60),
        || agent.log_text().contains("did not answer within 4s"),
    );
    rx.signal(libc::SIGCONT);
    // The stale connection is replaced by the agent's new one, and the sync completes.
    wait_for("a point after the hang", Duration::from_secs(120), || {
        rx.cli(&["points", "--server", "hung-rx", "--json"])
            .status
            .success()
            && !rx.points("hung-rx").is_empty()
    });
    agent.kill();
    rx.expect_restore("hung-rx", "root", "latest", &data);
}

#[test]
fn receiver_sigterm_drains_and_restarts_cleanly() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 80, 66);
    let mut spec = AgentSpec::new("drain", &[("root", &img)]);
    spec.bandwidth_mbps = 40; // ~8 s of sync: the signal lands in the middle
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    wait_for_journal(&rx, "drain", 10);
    rx.signal(libc::SIGTERM);
    wait_for("the receiver to exit", Duration::from_secs(20), || {
        !rx.is_running()
    });
    assert!(
        rx.points("drain").is_empty(),
        "the sync finished before the signal; nothing was tested"
    );
    let log = rx.log_text();
    assert!(
        log.contains("draining connections connections=1")
            && log.contains("lifeboat-receiver stopped"),
        "{log}"
    );
    // After a drain no server is shown as connected.
    let servers: serde_json::Value =
        serde_json::from_slice(&rx.cli(&["servers", "--json"]).stdout).unwrap();
    assert_eq!(servers[0]["connected"], false, "{servers}");
    rx.forget();
    rx.restart();
    wait_for(
        "a point after the restart",
        Duration::from_secs(120),
        || !rx.points("drain").is_empty(),
    );
    agent.kill();
    rx.expect_restore("drain", "root", "latest", &data);
}

#[test]
fn full_disk_at_the_receiver_loses_nothing_and_recovers() {
    let w = workdir();
    let fs = match SmallFs::new(w.path(), 128) {
        Ok(f) => f,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: cannot mount a loop filesystem here ({e})");
            return;
        }
        Err(e) => panic!("CI must be able to mount a loop filesystem: {e}"),
    };
    let rx = Receiver::start_at(w.path(), &fs.dir.join("receiver"));
    // A first point fits.
    let img = w.path().join("disk.img");
    let small = random_image(&img, 8, 90);
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("full", &[("root", &img)]));
    agent.run_once_ok();

    // The next does not: 40 MiB of new data, 16 MiB free.
    let ballast = fs.fill_leaving(16);
    let big = random_image(&img, 80, 91);
    agent.spawn();
    wait_for(
        "the agent to report the full disk",
        Duration::from_secs(60),
        || agent.log_text().contains("No space left on device"),
    );
    agent.kill();
    wait_for("the session to end", Duration::from_secs(30), || {
        rx.cli(&["servers", "--json"])
            .stdout
            .windows(12)
            .any(|w| w == b"disconnected")
    });
    let log = agent.log_text();
    assert!(
        log.contains("staging store"),
        "the error does not say where: {log}"
    );
    let tmp: Vec<_> = std::fs::read_dir(rx.dir.join("store/tmp"))
        .unwrap()
        .collect();
    assert!(
        tmp.is_empty(),
        "a failed batch left {} temp files",
        tmp.len()
    );
    // The point that fitted is intact and still the only one.
    assert_eq!(rx.points("full").len(), 1);
    rx.expect_restore("full", "root", "1", &small);

    // Space comes back: replication completes, nothing lost.
    std::fs::remove_file(ballast).unwrap();
    agent.run_once_ok();
    rx.expect_restore("full", "root", "latest", &big);
}

#[test]
fn scrub_quarantines_rot_and_the_agent_heals_every_point() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 10, 123);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("rot", &[("root", &img)]));
    agent.run_once_ok();

    // Bit rot in one stored block.
    let victim = rx.store_blocks()[0].clone();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();

    let o = rx.cli(&["scrub", "--json"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["blocks_checked"], 10);
    assert_eq!(v["corrupt"][0]["hash"], name.as_str());
    assert!(!victim.exists(), "the corrupt block was not moved aside");
    // serve exports what the scrub (another process) found.
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&m, "lifeboat_receiver_scrub_last_checked_blocks"),
        Some(10.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "lifeboat_receiver_scrub_last_corrupt_blocks"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        std::fs::read_dir(rx.dir.join("store/quarantine"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "mark")
            .count(),
        1
    );
    let o = rx.restore("rot", "root", "1", &w.path().join("broken.img"));
    assert_eq!(
        o.status.code(),
        Some(65),
        "point 1 restored without its block"
    );

    // The agent's next run sends the content again; every point restores again.
    agent.run_once_ok();
    assert!(
        rx.log_text().contains("blocks missing from the store"),
        "{}",
        rx.log_text()
    );
    rx.expect_restore("rot", "root", "2", &data);
    rx.expect_restore("rot", "root", "1", &data);
    let o = rx.cli(&["scrub"]);
    assert!(
        o.status.success() && stdout(&o).contains("0 corrupt"),
        "{}",
        stdout(&o)
    );
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&m, "lifeboat_receiver_scrub_last_corrupt_blocks"),
        Some(0.0),
        "{m}"
    );
}

/// Flips a byte in the stored block at `victim`.
fn rot(victim: &std::path::Path) {
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(victim, bytes).unwrap();
}

#[test]
fn a_block_quarantined_under_a_live_session_is_never_named_by_a_new_point() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 10, 321);
    let mut agent = Agent::new(
        w.path(),
        &rx,
        &AgentSpec::new("live-rot", &[("root", &img)]),
    );
    agent.spawn();
    wait_for("the first point", Duration::from_secs(60), || {
        !rx.points("live-rot").is_empty()
    });
    // Rot, found by scrub while the agent stays connected.
    rot(&rx.store_blocks()[0]);
    let o = rx.cli(&["scrub"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let after_scrub = rx
        .points("live-rot")
        .iter()
        .filter_map(|p| p["point"].as_u64())
        .max()
        .unwrap();
    // A point committed after the scrub must restore: the session noticed the quarantine
    // (without a reconnect to prompt it) and had the agent resend the block first.
    wait_for(
        "two points after the scrub",
        Duration::from_secs(60),
        || {
            rx.points("live-rot")
                .iter()
                .filter_map(|p| p["point"].as_u64())
                .any(|p| p >= after_scrub + 2)
        },
    );
    agent.kill();
    rx.expect_restore("live-rot", "root", "latest", &data);
    // The commit after the scrub was refused with the reason (the receiver's manifest no
    // longer names the block), and the agent resent it.
    let log = agent.log_text();
    assert!(log.contains("DigestMismatch"), "{log}");
    assert!(rx.log_text().contains("blocks missing from the store"));
    // ... and counted as such.
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    let refused =
        r#"lifeboat_receiver_commits_refused_total{reason="digest_mismatch",server="live-rot"}"#;
    assert!(sample(&m, refused).is_some_and(|v| v >= 1.0), "{m}");
    // Content addressing heals the older points too.
    for p in rx.points("live-rot") {
        let n = p["point"].as_u64().unwrap().to_string();
        rx.expect_restore("live-rot", "root", &n, &data);
    }
}

#[test]
fn scrub_during_a_sync_breaks_nothing() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let data = random_image(&img, 64, 654);
    let mut spec = AgentSpec::new("scrubbed", &[("root", &img)]);
    spec.bandwidth_mbps = 40; // ~8 s of sync: many batches in flight during the scrubs
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let mut scrubs = 0;
    while rx.points("scrubbed").is_empty() {
        let o = rx.cli(&["scrub"]);
        assert!(o.status.success(), "scrub: {}", stderr(&o));
        scrubs += 1;
        assert!(scrubs < 2000, "no point after {scrubs} scrubs");
    }
    agent.kill();
    assert!(scrubs >= 3, "only {scrubs} scrubs ran during the sync");
    let log = rx.log_text();
    assert!(
        !log.contains("staging store I/O") && !log.contains("Storage"),
        "a scrub broke a batch in flight: {log}"
    );
    assert!(
        !agent.log_text().contains("interrupted"),
        "{}",
        agent.log_text()
    );
    rx.expect_restore("scrubbed", "root", "latest", &data);
}

#[test]
fn journal_damage_is_loud_and_the_disk_is_verified_again() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let blocks = 120u64;
    let data = random_image(&img, blocks as usize, 811);
    let mut spec = AgentSpec::new("jdamage", &[("root", &img)]);
    spec.bandwidth_mbps = 80;
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let journal = rx.dir.join("servers/jdamage/disks/root/journal");
    // Records are journaled as blocks are acknowledged; a point compacts them away.
    wait_for("a journal of 20 records", Duration::from_secs(60), || {
        std::fs::metadata(&journal).is_ok_and(|m| m.len() >= 20 * 44)
    });
    agent.kill();
    rx.wait_disconnected("jdamage");
    assert!(rx.points("jdamage").is_empty(), "the sync finished first");
    // Damage one record in the middle (the receiver reads the journal at the next open).
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[5 * 44 + 20] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();

    agent.run_once_ok();
    assert!(
        rx.log_text()
            .contains("is damaged: 1 record(s) fail their check"),
        "{}",
        rx.log_text()
    );
    assert_eq!(rx.counter("jdamage", "journal_records_damaged"), 1);
    rx.expect_restore("jdamage", "root", "latest", &data);
}

/// A panic in one agent's session (a bug: injected here, in debug builds only) ends that
/// session alone: the receiver keeps serving every other agent, and logs it as an error.
#[test]
fn a_panicking_session_takes_no_other_session_down() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.kill();
    rx.env = vec![("LIFEBOAT_TEST_PANIC_ON_DISK".into(), "boom".into())];
    rx.restart();
    let img = w.path().join("disk.img");
    let data = random_image(&img, 40, 91);
    // A healthy agent in the middle of its sync when the other's session panics.
    let mut spec = AgentSpec::new("healthy", &[("root", &img)]);
    spec.bandwidth_mbps = 40;
    let mut healthy = Agent::new(w.path(), &rx, &spec);
    healthy.spawn();
    wait_for_journal(&rx, "healthy", 5);
    let bad_root = w.path().join("bad");
    std::fs::create_dir_all(&bad_root).unwrap();
    let bad = Agent::new(&bad_root, &rx, &AgentSpec::new("victim", &[("boom", &img)]));
    let o = bad.run_once(3);
    assert!(!o.status.success());
    assert!(rx.is_running(), "the receiver died with the session");
    wait_for("the panic in the log", Duration::from_secs(10), || {
        rx.log_text()
            .contains("server victim: session panicked and was ended")
    });
    wait_for("the healthy agent's point", Duration::from_secs(60), || {
        !rx.points("healthy").is_empty()
    });
    healthy.kill();
    assert!(
        !healthy.log_text().contains("replication interrupted"),
        "the healthy agent lost its session: {}",
        healthy.log_text()
    );
    rx.expect_restore("healthy", "root", "latest", &data);
    // The tests run the dev profile, which always unwinds: the release profile must too, or
    // this isolation is dead code in the binaries users run.
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"),
    )
    .unwrap();
    let release = &manifest[manifest.find("[profile.release]").unwrap()..];
    let release = &release[..release[1..].find("\n[").map_or(release.len(), |i| i + 1)];
    assert!(
        release.contains("panic = \"unwind\""),
        "release profile: {release}"
    );
}
