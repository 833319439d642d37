//! Tests whose outcome depends on the machine being otherwise quiet. `cargo test` runs test
//! binaries one after another, so these run alone, after the parallel integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lifeboat_common::BLOCK_SIZE;
use lifeboat_tests::*;
use std::time::Duration;

/// The agent raises its zstd level only with CPU to spare, so this needs a quiet machine.
#[test]
fn compression_level_climbs_when_the_network_is_the_bottleneck() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    // Words in random order: compressible, and more so at higher levels.
    let words = [
        "replica", "block", "point", "restore", "durable", "snapshot", "agent", "disk", "lifeboat",
        "zstd",
    ];
    let mut rng = Rng::new(81);
    let mut data = Vec::with_capacity(32 * BLOCK_SIZE);
    while data.len() < 32 * BLOCK_SIZE {
        data.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
        data.push(if rng.below(9) == 0 { b'\n' } else { b' ' });
    }
    data.truncate(32 * BLOCK_SIZE);
    std::fs::write(&img, &data).unwrap();
    let mut spec = AgentSpec::new("slow-link", &[("root", &img)]);
    spec.bandwidth_mbps = 2; // 250 kB/s: the link, not the CPU, sets the pace
    let agent = Agent::new(w.path(), &rx, &spec);
    // The agent's decisions, for the failure message (this binary runs one test at a time).
    std::env::set_var("LIFEBOAT_LOG", "lifeboat_agent=debug");
    let o = agent.run_once(120);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    // Replay every period the agent logged through the rule, and check each decision it
    // took. Values are logged with two decimals: a period within rounding of a threshold is
    // not judged.
    use lifeboat_agent::adapt::{BUSY_CPU, CPU_BOUND, NETWORK_BOUND, SPARE_CPU};
    let field = |line: &str, key: &str| -> String {
        let at = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
        line[at..]
            .trim_start_matches('"')
            .split(['"', ' '])
            .next()
            .unwrap()
            .to_string()
    };
    let near = |v: f64, t: f64| (v - t).abs() <= 0.006;
    let (floor, ceiling) = (1i64, 9i64);
    let mut level = floor;
    let (mut judged, mut raised) = (0, 0);
    let periods: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("compression period"))
        .collect();
    assert!(!periods.is_empty(), "no compression periods logged:\n{log}");
    for line in &periods {
        let net: f64 = field(line, "network_share").parse().unwrap();
        let idle: f64 = field(line, "cpu_idle").parse().unwrap();
        let idle = if idle < 0.0 { 0.0 } else { idle };
        let producing = field(line, "producing") == "true";
        let logged: i64 = field(line, "level").parse().unwrap();
        let ambiguous = near(idle, BUSY_CPU)
            || near(idle, SPARE_CPU)
            || near(net, NETWORK_BOUND)
            || near(net, CPU_BOUND);
        let expected = if idle < BUSY_CPU {
            (level - 1).max(floor)
        } else if net >= NETWORK_BOUND && idle >= SPARE_CPU {
            (level + 1).min(ceiling)
        } else if producing && net <= CPU_BOUND {
            (level - 1).max(floor)
        } else {
            level
        };
        if !ambiguous {
            assert_eq!(logged, expected, "wrong decision on {line}\n{log}");
            judged += 1;
        }
        raised += usize::from(logged > level);
        level = logged;
    }
    assert!(judged > 0, "every period was ambiguous:\n{log}");
    assert_eq!(
        agent.status()["compression_level"].as_i64().unwrap(),
        level,
        "the status disagrees with the last decision"
    );
    eprintln!(
        "{judged} of {} periods judged; the level rose {raised} time(s)",
        periods.len()
    );
    let out = w.path().join("out.img");
    assert!(rx
        .restore("slow-link", "root", "latest", &out)
        .status
        .success());
    assert!(std::fs::read(&out).unwrap() == data);
}

/// GC against commits and compaction (issue: GC read a live manifest from before a
/// compaction with a journal from after it). Grace 0, retention as tight as it goes, a pass
/// every second, a continuous agent with 1 s points on a disk rewritten all the time; then
/// every listed point restores with every block verified, and the last one byte-exact.
/// LIFEBOAT_STRESS_SECS sets how long the disk is rewritten (default 30; longer by hand).
#[test]
fn gc_every_second_never_takes_a_block_a_point_needs() {
    let secs: u64 = std::env::var("LIFEBOAT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.restart_with_retention(0, 1, 0);

    let blocks = 48;
    let img = w.path().join("busy.img");
    make_image(&img, blocks, 0, 90);
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("busy", &[("root", &img)]));
    agent.spawn();
    wait_for("the first point", Duration::from_secs(120), || {
        !rx.points("busy").is_empty()
    });

    // Whole-block rewrites with fresh content, a few a second, for `secs`.
    let mut rng = Rng::new(91);
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let mut buf = vec![0u8; BLOCK_SIZE];
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut rewrites = 0u64;
    while std::time::Instant::now() < until {
        use std::os::unix::fs::FileExt;
        rng.fill(&mut buf);
        let i = rng.below(blocks as u64);
        f.write_all_at(&buf, i * BLOCK_SIZE as u64).unwrap();
        rewrites += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(f);
    let final_image = std::fs::read(&img).unwrap();
    let newest = |rx: &Receiver| {
        rx.points("busy")
            .iter()
            .filter_map(|p| p["point"].as_u64())
            .max()
            .unwrap_or(0)
    };
    // Two more points after the last write: the second covers it entirely.
    let last = newest(&rx);
    wait_for(
        "two points after the writes",
        Duration::from_secs(120),
        || newest(&rx) >= last + 2,
    );
    agent.kill();
    // Let GC run over the final state a few more times.
    std::thread::sleep(Duration::from_secs(3));
    let points = rx.points("busy");
    assert!(
        points.len() < 10,
        "retention kept {} points: the stress did not exercise GC",
        points.len()
    );
    for p in &points {
        let n = p["point"].as_u64().unwrap().to_string();
        let out = w.path().join(format!("restore-{n}"));
        let o = rx.restore("busy", "root", &n, &out);
        assert!(
            o.status.success(),
            "point {n} does not restore after {rewrites} rewrites: {}",
            stderr(&o)
        );
        let _ = std::fs::remove_file(out);
    }
    rx.expect_restore("busy", "root", "latest", &final_image);
}

/// The crash matrix: SIGKILL of the agent or the receiver at random instants, across the
/// initial sync, incremental syncs, continuous mode, commits and GC (a pass every second,
/// grace 0, retention as tight as it goes). After every kill the survivors finish the round,
/// and every listed point must restore byte-exact to the disk as it was in the round that
/// committed it. LIFEBOAT_CRASH_ITERATIONS sets the rounds (CI: 12; by hand, 50 or more).
#[test]
fn crash_matrix_every_listed_point_restores_byte_exact() {
    let rounds: u64 = std::env::var("LIFEBOAT_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.restart_with_retention(0, 1, 0);

    let blocks = 32;
    let img = w.path().join("crash.img");
    let mut image = vec![0u8; blocks * BLOCK_SIZE];
    let mut rng = Rng::new(4242);
    rng.fill(&mut image);
    std::fs::write(&img, &image).unwrap();
    let mut spec = AgentSpec::new("crash", &[("root", &img)]);
    // 30 Mbit/s (with a burst of about 4 MB): the initial sync takes ~4 s, a round's
    // changes (1-16 blocks) up to ~1.5 s.
    spec.bandwidth_mbps = 30;
    let mut agent = Agent::new(w.path(), &rx, &spec);

    // Which round's disk each point holds.
    let mut round_of: std::collections::HashMap<u64, usize> = Default::default();
    let mut references: Vec<Vec<u8>> = Vec::new();
    let (mut agent_kills, mut receiver_kills, mut mid_sync, mut continuous) = (0, 0, 0, 0);
    let newest = |rx: &Receiver| {
        rx.points("crash")
            .iter()
            .filter_map(|p| p["point"].as_u64())
            .max()
            .unwrap_or(0)
    };
    for round in 0..rounds as usize {
        if round > 0 {
            // Whole-block rewrites, in place, while no agent runs.
            let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            for _ in 0..1 + rng.below(16) {
                let i = rng.below(blocks as u64) as usize;
                rng.fill(&mut image[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                use std::io::{Seek, SeekFrom, Write};
                f.seek(SeekFrom::Start((i * BLOCK_SIZE) as u64)).unwrap();
                f.write_all(&image[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE])
                    .unwrap();
            }
            f.sync_all().unwrap();
        }
        references.push(image.clone());
        let before = newest(&rx);
        let in_continuous = round % 4 == 3;
        if in_continuous {
            agent.spawn();
            continuous += 1;
        } else {
            agent.spawn_once();
        }
        // Often early (connect, scan, the first blocks), sometimes late (commits, idle, GC).
        let delay = match (round, rng.below(2)) {
            (0, _) => rng.below(4000),
            (_, 0) => rng.below(250),
            _ => rng.below(1500),
        };
        std::thread::sleep(Duration::from_millis(delay));
        let kill_receiver = rng.below(2) == 0;
        if newest(&rx) == before {
            mid_sync += 1;
        }
        if kill_receiver {
            rx.kill();
            receiver_kills += 1;
            rx.restart();
            if in_continuous {
                wait_for(
                    "a point after the restart",
                    Duration::from_secs(120),
                    || newest(&rx) > before,
                );
                agent.kill();
            } else {
                assert!(
                    agent.wait(),
                    "round {round}: the agent gave up: {}",
                    agent.log_text()
                );
            }
        } else {
            agent.kill();
            agent_kills += 1;
            agent.run_once_ok();
        }
        let after = newest(&rx);
        assert!(after > before, "round {round}: no point committed");
        for p in rx.points("crash") {
            let n = p["point"].as_u64().unwrap();
            round_of.entry(n).or_insert(round);
        }
        // Every listed point, byte-exact to its round's disk.
        for p in rx.points("crash") {
            let n = p["point"].as_u64().unwrap();
            let r = round_of[&n];
            let out = w.path().join("check.img");
            let _ = std::fs::remove_file(&out);
            let o = rx.restore("crash", "root", &n.to_string(), &out);
            let listed = || rx.points("crash").iter().any(|q| q["point"] == n);
            if !o.status.success() && stderr(&o).contains("has no point") && !listed() {
                continue; // retention deleted it since the listing
            }
            assert!(
                o.status.success(),
                "round {round}: point {n} (round {r}) does not restore: {}",
                stderr(&o)
            );
            assert!(
                std::fs::read(&out).unwrap() == references[r],
                "round {round}: point {n} does not hold round {r}'s disk"
            );
        }
    }
    eprintln!(
        "crash matrix: {rounds} rounds, {agent_kills} agent kills, {receiver_kills} receiver \
         kills, {mid_sync} before the round's point, {continuous} in continuous mode; every \
         listed point restored byte-exact"
    );
}
