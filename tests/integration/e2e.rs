//! End to end: initial sync, mutations, several points, restore of every point byte-exact.

use lifeboat_common::BLOCK_SIZE;
use lifeboat_tests::*;
use std::time::Duration;

#[test]
fn every_point_restores_byte_exact() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let mut versions = vec![make_image(&img, 48, 1234, 7)];
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();

    // Initial sync: each distinct non-zero block crossed the wire once, duplicates as refs.
    let unique = unique_data_blocks(&versions[0]) as u64;
    assert_eq!(rx.counter("web-01", "blocks_received"), unique);
    assert_eq!(rx.counter("web-01", "blocks_stored"), unique);

    for round in 0..3u64 {
        versions.push(mutate(&img, 100 + round, 6));
        agent.run_once_ok();
    }
    let points = rx.points("web-01");
    assert_eq!(points.len(), 4, "{points:?}");
    for (p, expected) in points.iter().zip(&versions) {
        let n = p["point"].as_u64().unwrap().to_string();
        assert_eq!(p["consistency"], "best_effort");
        let out = w.path().join(format!("restored-{n}.img"));
        let o = rx.restore("web-01", "root", &n, &out);
        assert!(o.status.success(), "restore of point {n}: {}", stderr(&o));
        let got = std::fs::read(&out).unwrap();
        assert!(got == *expected, "point {n} restored different bytes");
    }
    // `latest` is the last point.
    let out = w.path().join("latest.img");
    assert!(rx
        .restore("web-01", "root", "latest", &out)
        .status
        .success());
    assert!(std::fs::read(&out).unwrap() == *versions.last().unwrap());
}

#[test]
fn dedupe_across_disks_and_servers() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let a = w.path().join("a.img");
    let data = make_image(&a, 24, 0, 11);
    let b = w.path().join("b.img");
    std::fs::copy(&a, &b).unwrap();
    let unique = unique_data_blocks(&data) as u64;

    // Two identical disks on one server: the second costs no data.
    let agent = Agent::new(
        w.path(),
        &rx,
        &AgentSpec::new("db-01", &[("data", &a), ("copy", &b)]),
    );
    agent.run_once_ok();
    assert_eq!(rx.counter("db-01", "blocks_received"), unique);

    // Another server with the same content: nothing but refs.
    let c = w.path().join("c.img");
    std::fs::copy(&a, &c).unwrap();
    let other = Agent::new(w.path(), &rx, &AgentSpec::new("db-02", &[("data", &c)]));
    other.run_once_ok();
    assert_eq!(rx.counter("db-02", "blocks_received"), 0);
    assert!(rx.counter("db-02", "refs_received") >= unique);

    for (server, disk) in [("db-01", "data"), ("db-01", "copy"), ("db-02", "data")] {
        rx.expect_restore(server, disk, "latest", &data);
    }
}

#[test]
fn both_reader_engines_give_identical_points() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 20, 4096 + 17, 3);
    let mut digests = Vec::new();
    for (server, reader) in [("engine-pread", "pread"), ("engine-uring", "io_uring")] {
        let mut spec = AgentSpec::new(server, &[("root", &img)]);
        spec.reader = reader;
        let agent = Agent::new(w.path(), &rx, &spec);
        let o = agent.run_once(60);
        if reader == "io_uring"
            && !o.status.success()
            && stderr(&o).contains("Operation not permitted")
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must allow io_uring: {}",
                stderr(&o)
            );
            eprintln!("SKIPPED: io_uring is not permitted here");
            return;
        }
        assert!(o.status.success(), "{reader}: {}", stderr(&o));
        // Each run really used the engine it names; io_uring reads into registered buffers.
        let disk = &agent.status()["disks"][0];
        assert_eq!(disk["reader"], reader);
        let fixed = disk["fixed_reads"].as_u64().unwrap();
        match reader {
            "io_uring" => assert!(fixed > 0, "no read into a registered buffer: {disk}"),
            _ => assert_eq!(fixed, 0),
        }
        let p = rx.points(server);
        digests.push(p[0]["disks"][0]["digest"].as_str().unwrap().to_string());
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn zero_blocks_restore_sparse_and_grown_disk_is_followed() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    // A sparse 64-block file with data in two blocks.
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 * BLOCK_SIZE as u64).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"boot sector", 0).unwrap();
        f.write_all_at(b"superblock", 40 * BLOCK_SIZE as u64 + 3)
            .unwrap();
    }
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("sparse", &[("root", &img)]));
    agent.run_once_ok();
    let out = w.path().join("out.img");
    assert!(rx
        .restore("sparse", "root", "latest", &out)
        .status
        .success());
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * BLOCK_SIZE as u64,
        "zero blocks were written: {allocated} bytes allocated"
    );

    // The disk grows: the next point has the new size and content.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(70 * BLOCK_SIZE as u64 + 5).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"new tail", 70 * BLOCK_SIZE as u64).unwrap();
    }
    agent.run_once_ok();
    let out2 = w.path().join("out2.img");
    let o = rx.restore("sparse", "root", "latest", &out2);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out2).unwrap() == std::fs::read(&img).unwrap());
}

#[test]
fn block_devices_replicate_and_restore() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let src_file = w.path().join("src.img");
    let first = make_image(&src_file, 24, 0, 61);
    let src = match Loop::attach(&src_file) {
        Ok(l) => l,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: loop devices unavailable here ({e})");
            return;
        }
        Err(e) => panic!("CI must be able to use loop devices: {e}"),
    };
    let agent = Agent::new(
        w.path(),
        &rx,
        &AgentSpec::new("bdev", &[("root", &src.dev)]),
    );
    agent.run_once_ok();

    // Write through the device, as a filesystem would.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(&[0xAB; 4096], 5 * BLOCK_SIZE as u64 + 8192)
            .unwrap();
        f.write_all_at(&vec![0u8; BLOCK_SIZE], 7 * BLOCK_SIZE as u64)
            .unwrap();
        f.sync_all().unwrap();
    }
    agent.run_once_ok();
    let second = std::fs::read(&src.dev).unwrap();
    assert!(second != first);

    // Restore each point onto another device full of garbage: zero blocks must be written.
    let dst_file = w.path().join("dst.img");
    let mut junk = vec![0u8; first.len()];
    Rng::new(99).fill(&mut junk);
    std::fs::write(&dst_file, &junk).unwrap();
    let dst = Loop::attach(&dst_file).unwrap();
    for (point, expected) in [("1", &first), ("2", &second)] {
        let o = rx.restore_with("bdev", "root", point, &dst.dev, &["--force"]);
        assert!(o.status.success(), "point {point}: {}", stderr(&o));
        assert!(stdout(&o).contains("zero blocks written"), "{}", stdout(&o));
        assert!(
            std::fs::read(&dst.dev).unwrap() == *expected,
            "point {point} differs on the device"
        );
    }
}

#[test]
fn continuous_mode_cuts_new_points_as_the_disk_changes() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 16, 0, 71);
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("live", &[("root", &img)]));
    agent.spawn();
    let digest_of = |p: &serde_json::Value| p["disks"][0]["digest"].as_str().unwrap().to_string();
    wait_for("two points", Duration::from_secs(60), || {
        rx.points("live").len() >= 2
    });
    let before = digest_of(rx.points("live").last().unwrap());

    let changed = mutate(&img, 72, 4);
    // Points are seconds apart, each one complete: soon the latest holds the change.
    let out = w.path().join("out.img");
    wait_for(
        "a point that restores the change",
        Duration::from_secs(60),
        || {
            let _ = std::fs::remove_file(&out);
            let o = rx.restore("live", "root", "latest", &out);
            assert!(o.status.success(), "{}", stderr(&o));
            std::fs::read(&out).unwrap() == changed
        },
    );
    assert!(digest_of(rx.points("live").last().unwrap()) != before);
    let servers: serde_json::Value =
        serde_json::from_slice(&rx.cli(&["servers", "--json"]).stdout).unwrap();
    assert_eq!(servers[0]["state"], "continuous", "{servers}");
    assert_eq!(servers[0]["connected"], true);
    agent.kill();
}

/// A hash scan sends a block it finds changed as the pages that changed (from the page sums
/// of its acknowledged content), and a change the sums miss still reaches the point whole.
#[test]
fn a_scan_sends_changed_pages_and_a_missed_change_goes_whole() {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let mut rng = Rng::new(41);
    let mut data = vec![0u8; 64 * BLOCK_SIZE];
    rng.fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let mut spec = AgentSpec::new("pages", &[("root", &img)]);
    spec.extra.push("tracker = \"scan\"".into());
    let agent = Agent::new(w.path(), &rx, &spec);
    agent.run_once_ok();
    assert!(
        agent.state_dir.join("disks/root.pagesums").exists(),
        "no page sums kept"
    );

    // Scattered 4 KiB writes of incompressible data: 2 pages in each of 20 blocks.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut page = vec![0u8; PAGE];
    for b in 0..20usize {
        for p in [b % 7, 64 + b % 5] {
            rng.fill(&mut page);
            let off = b * 3 * BLOCK_SIZE + p * PAGE;
            data[off..off + PAGE].copy_from_slice(&page);
            f.write_all_at(&page, off as u64).unwrap();
        }
    }
    let before = rx.counter("pages", "deltas_applied");
    agent.run_once_ok();
    let st = agent.status();
    assert_eq!(st["patches_sent"], 20, "{st}");
    assert_eq!(rx.counter("pages", "deltas_applied") - before, 20);
    // 160 KiB changed; whole blocks would be 10 MiB.
    let sent = st["bytes_sent"].as_u64().unwrap();
    assert!(sent < 400 << 10, "{sent} bytes sent for 160 KiB of pages");
    rx.expect_restore("pages", "root", "latest", &data);
    let second = data.clone();

    // Pages 5 and 9 of block 1 change, but the sums of its acknowledged content are made to
    // agree on page 9: the patch misses it, the receiver's name for the result differs from
    // the block's, and the block goes whole before the point is cut.
    let blk = BLOCK_SIZE;
    for p in [5usize, 9] {
        rng.fill(&mut page);
        let off = blk + p * PAGE;
        data[off..off + PAGE].copy_from_slice(&page);
        f.write_all_at(&page, off as u64).unwrap();
    }
    let sums_file = agent.state_dir.join("disks/root.pagesums");
    let record = lifeboat_agent::pagesums::RECORD;
    let sums = std::fs::OpenOptions::new()
        .write(true)
        .open(&sums_file)
        .unwrap();
    let new9 = lifeboat_agent::pagesums::of(&data[blk..2 * blk])[9];
    sums.write_all_at(&new9.to_le_bytes(), (record + 8 + 2 * 9) as u64)
        .unwrap();
    agent.run_once_ok();
    rx.expect_restore("pages", "root", "latest", &data);
    let st = agent.status();
    assert_eq!(st["patches_mismatched"], 1, "{st}");
    let points = rx.points("pages");
    assert_eq!(points.len(), 3, "{points:?}");
    rx.expect_restore("pages", "root", "2", &second);
}
