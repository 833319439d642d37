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
    rx.restart_with_retention(0, 7, 0);
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

#[test]
fn a_damaged_manifest_is_reported_and_gc_goes_on_for_the_rest() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 6, 0, 700);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("gc-02", &[("root", &img)]));
    let mut versions = Vec::new();
    for round in 0..3 {
        // Every block fresh: each point's blocks are its own.
        let mut data = vec![0u8; std::fs::metadata(&img).unwrap().len() as usize];
        Rng::new(710 + round).fill(&mut data);
        std::fs::write(&img, &data).unwrap();
        versions.push(data);
        agent.run_once_ok();
    }
    assert_eq!(rx.points("gc-02").len(), 3);
    let before = rx.store_blocks().len();

    // Point 3's manifest rots.
    let m = rx
        .dir
        .join("servers/gc-02/points/0000000000000003/root.manifest");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&m, bytes).unwrap();

    rx.restart_with_retention(0, 7, 0);
    // Point 1 goes by retention (point 2 is the newest restorable one), its blocks are
    // collected although point 3 cannot be read.
    let t = std::time::Instant::now();
    while !(rx.points("gc-02").len() == 2 && rx.store_blocks().len() < before) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "GC did not collect point 1: {}",
            rx.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let points = rx.points("gc-02");
    let numbers: Vec<u64> = points
        .iter()
        .map(|p| p["point"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![2, 3]);
    assert!(points[0]["damaged"].is_null());
    let why = points[1]["damaged"].as_str().unwrap_or_default();
    assert!(why.contains("root.manifest"), "{points:?}");
    assert!(rx.log_text().contains("point 3 of server gc-02 is damaged"));
    assert!(
        !rx.log_text().contains("gc pass failed"),
        "{}",
        rx.log_text()
    );
    let listing = stdout(&rx.cli(&["points", "--server", "gc-02"]));
    assert!(
        listing.contains("DAMAGED") && listing.contains("point 3 is damaged"),
        "{listing}"
    );
    let listing = stdout(&rx.cli(&["servers"]));
    assert!(listing.contains("gc-02: point 3 is damaged"), "{listing}");
    // Point 2 restores; point 3 fails naming its manifest.
    rx.expect_restore("gc-02", "root", "2", &versions[1]);
    let o = rx.restore("gc-02", "root", "3", &w.path().join("p3.img"));
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    // Later passes do not report it again (they run every second, and each new point
    // makes the next one delete a point).
    assert_eq!(rx.log_text().matches("is damaged (disk root)").count(), 1);
    let passes = rx.log_text().matches("retention: point deleted").count();
    for seed in 0..2 {
        mutate(&img, 800 + seed, 1);
        agent.run_once_ok();
        wait_for("the next deletion", Duration::from_secs(30), || {
            rx.log_text().matches("retention: point deleted").count() > passes + seed as usize
        });
    }
    assert_eq!(rx.log_text().matches("is damaged (disk root)").count(), 1);
}

/// A point with one damaged disk manifest keeps its other disks restorable: their blocks
/// are still referenced, never swept.
#[test]
fn the_sound_disks_of_a_damaged_point_are_kept() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let (root, data) = (w.path().join("root.img"), w.path().join("data.img"));
    let fresh = |p: &std::path::Path, seed: u64| {
        let mut bytes = vec![0u8; 4 * lifeboat_common::BLOCK_SIZE];
        Rng::new(seed).fill(&mut bytes);
        std::fs::write(p, &bytes).unwrap();
        bytes
    };
    fresh(&root, 900);
    let data_at_1 = fresh(&data, 901);
    let agent = Agent::new(
        w.path(),
        &rx,
        &AgentSpec::new("two", &[("root", &root), ("data", &data)]),
    );
    agent.run_once_ok();
    // Point 1's root manifest rots; then both disks change: point 1's data blocks are now
    // referenced by point 1 alone.
    let m = rx
        .dir
        .join("servers/two/points/0000000000000001/root.manifest");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&m, bytes).unwrap();
    fresh(&root, 902);
    fresh(&data, 903);
    agent.run_once_ok();
    let before = rx.store_blocks().len();

    rx.restart_with_retention(10, 7, 0);
    // A serve sweeps at its first pass: point 1 is found damaged there.
    wait_for("point 1 marked damaged", Duration::from_secs(30), || {
        rx.points("two")[0]["damaged"].is_string()
    });
    wait_for("the sweep to finish", Duration::from_secs(30), || {
        rx.log_text().contains("gc pass done")
    });
    // Only point 1's root blocks were garbage (4 of them).
    assert_eq!(rx.store_blocks().len(), before - 4);
    rx.expect_restore("two", "data", "1", &data_at_1);
    let o = rx.restore("two", "root", "1", &w.path().join("r1.img"));
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
}
