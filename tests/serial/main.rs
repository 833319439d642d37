//! Tests whose outcome depends on the machine being otherwise quiet. `cargo test` runs test
//! binaries one after another, so these run alone, after the parallel integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lifeboat_common::BLOCK_SIZE;
use lifeboat_tests::*;

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
    let level = agent.status()["compression_level"].as_i64().unwrap();
    // Judge the decision against what the agent observed: a period held up by the network
    // (>= 0.8) with the CPUs at least 30 % idle must raise the level; without one, the level
    // must stay at the floor (a busy machine is no reason to compress harder).
    let field = |line: &str, key: &str| -> f64 {
        let at = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
        line[at..]
            .trim_start_matches('"')
            .split(['"', ' '])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let periods: Vec<(f64, f64)> = log
        .lines()
        .filter(|l| l.contains("compression period"))
        .map(|l| (field(l, "network_share"), field(l, "cpu_idle")))
        .collect();
    assert!(!periods.is_empty(), "no compression periods logged:\n{log}");
    let qualifying = periods
        .iter()
        .filter(|(net, idle)| *net >= 0.8 && *idle >= 0.3)
        .count();
    if qualifying > 0 {
        assert!(
            level > 1,
            "{qualifying} network-bound periods with spare CPU, yet level {level}:\n{log}"
        );
    } else {
        eprintln!("NOTE: the machine was busy throughout ({periods:?}); checking the level held");
        assert_eq!(level, 1, "the level climbed without spare CPU:\n{log}");
    }
    let out = w.path().join("out.img");
    assert!(rx
        .restore("slow-link", "root", "latest", &out)
        .status
        .success());
    assert!(std::fs::read(&out).unwrap() == data);
}
