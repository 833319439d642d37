//! Retention and garbage collection inside `serve`: old points go, blocks only they needed
//! go, and every point still listed restores, verified.

use lifeboat_tests::*;
use std::time::Duration;

#[test]
fn gc_removes_what_no_listed_point_needs_and_nothing_else() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let mut versions = vec![make_image(&img, 16, 0, 41)];
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("gc-01", &[("root", &img)]));
    agent.run_once_ok();
    for round in 0..2 {
        // Rewrite every block with fresh content: the old points' blocks become garbage.
        let mut rng = Rng::new(500 + round);
        let mut data = vec![0u8; std::fs::metadata(&img).unwrap().len() as usize];
        rng.fill(&mut data);
        std::fs::write(&img, &data).unwrap();
        versions.push(data);
        agent.run_once_ok();
    }
    assert_eq!(rx.points("gc-01").len(), 3);
    let before = rx.store_blocks().len();

    // Keep as little as the policy allows: the newest point of each 10-minute bucket.
    rx.kill();
    let cfg = rx.dir.join("receiver.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace("recent_minutes = 10", "recent_minutes = 0")
        .replace("gc_grace_minutes = 10", "gc_grace_minutes = 0");
    std::fs::write(&cfg, text).unwrap();
    rx.gc_interval_secs = 1;
    rx.restart();
    // All three points fall in one 10-minute bucket, or (rarely) straddle two.
    wait_for(
        "retention to drop older points",
        Duration::from_secs(30),
        || rx.points("gc-01").len() < 3,
    );
    let kept: Vec<u64> = rx
        .points("gc-01")
        .iter()
        .map(|p| p["point"].as_u64().unwrap())
        .collect();
    assert!(kept.contains(&3), "the newest point was dropped: {kept:?}");
    let mut all_kept = Vec::new();
    for p in &kept {
        all_kept.extend_from_slice(&versions[*p as usize - 1]);
    }
    let needed = unique_data_blocks(&all_kept);
    wait_for(
        "GC to delete unreferenced blocks",
        Duration::from_secs(30),
        || rx.store_blocks().len() == needed,
    );
    assert!(before > needed, "nothing was garbage");
    assert!(rx.log_text().contains("retention: point deleted"));

    for p in &kept {
        let out = w.path().join(format!("out-{p}.img"));
        let o = rx.restore("gc-01", "root", &p.to_string(), &out);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(std::fs::read(&out).unwrap() == versions[*p as usize - 1]);
    }
    let out = w.path().join("out.img");

    // Replication continues on top of the collected store.
    mutate(&img, 9, 3);
    agent.run_once_ok();
    let o = rx.restore("gc-01", "root", "latest", &out);
    assert!(o.status.success(), "{}", stderr(&o));
}
