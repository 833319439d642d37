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
    agent.run_once_ok();
    let level = agent.status()["compression_level"].as_i64().unwrap();
    assert!(level > 1, "the level stayed at {level} on a saturated link");
    let out = w.path().join("out.img");
    assert!(rx
        .restore("slow-link", "root", "latest", &out)
        .status
        .success());
    assert!(std::fs::read(&out).unwrap() == data);
}
