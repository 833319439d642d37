//! The EBS target against the strict EBS test server (real HTTP on loopback, the real AWS
//! SDK in the receiver): incremental snapshots, restore from EBS, failures.

use lifeboat_common::BLOCK_SIZE;
use lifeboat_tests::ebs_server::EbsServer;
use lifeboat_tests::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

fn snapshot(rx: &Receiver, server: &str, point: &str) -> Value {
    let o = rx.cli(&["snapshot", "--server", server, "--point", point, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("snapshot printed no JSON: {}", stderr(&o)));
    assert!(o.status.success(), "snapshot failed: {v} {}", stderr(&o));
    v
}

fn restore_from_ebs(rx: &Receiver, point: &str, to: &Path) -> std::process::Output {
    rx.restore_with("web-01", "root", point, to, &["--from", "ebs"])
}

fn write_at(path: &Path, data: &[u8], at: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, at).unwrap();
}

/// Three points: the first whole, each later one as exactly the blocks that changed over
/// its parent (a block that became zero put as zeros; a disk that grew past a GiB into a
/// larger volume); every point restored from EBS byte-exact.
#[test]
fn a_chain_of_points_goes_to_ebs_incrementally_and_restores_byte_exact() {
    let ebs = EbsServer::start();
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    // Points go to EBS by `snapshot` here; the background uploader's retention (one point
    // per 10 minutes) would delete the older ones mid-test on a slow machine.
    rx.serve_args = vec!["--ebs-interval-secs".into(), "3600".into()];
    let kms = "arn:aws:kms:us-east-1:111122223333:key/lifeboat-test";
    rx.use_ebs(&ebs.url(), &[&format!("kms_key_arn = \"{kms}\"")]);
    let img = w.path().join("disk.img");
    let mut versions = vec![make_image(&img, 40, 1234, 21)];
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    let first = snapshot(&rx, "web-01", "latest");
    let data_blocks = versions[0]
        .chunks(BLOCK_SIZE)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64;
    assert_eq!(first["state"], "on_ebs", "{first}");
    assert_eq!(first["disks"]["root"]["changed_blocks"], data_blocks);
    assert!(first["disks"]["root"]["parent"].is_null());

    // Point 2: a data block becomes zero, two others change.
    let zeroed = versions[0]
        .chunks(BLOCK_SIZE)
        .position(|b| b.iter().any(|x| *x != 0))
        .unwrap();
    let mut v = versions[0].clone();
    v[zeroed * BLOCK_SIZE..(zeroed + 1) * BLOCK_SIZE].fill(0);
    for i in [zeroed + 3, 17] {
        v[i * BLOCK_SIZE + 100] ^= 0x5a;
    }
    std::fs::write(&img, &v).unwrap();
    versions.push(v);
    agent.run_once_ok();
    let second = snapshot(&rx, "web-01", "latest");
    let parent = first["disks"]["root"]["snapshot_id"].as_str().unwrap();
    assert_eq!(second["disks"]["root"]["parent"]["snapshot_id"], parent);
    assert_eq!(
        second["disks"]["root"]["changed_blocks"], 3,
        "exactly the blocks that differ: {second}"
    );

    // Point 3: the disk grows past 1 GiB (a 2 GiB volume over a 1 GiB parent).
    let grown = (1u64 << 30) + 3 * BLOCK_SIZE as u64 + 777;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(grown)
        .unwrap();
    let tail: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
    write_at(&img, &tail, 1 << 30);
    agent.run_once_ok();
    let third = snapshot(&rx, "web-01", "latest");
    assert_eq!(third["disks"]["root"]["volume_size_gib"], 2);
    assert_eq!(third["disks"]["root"]["changed_blocks"], 1, "{third}");

    let points = rx.points("web-01");
    assert_eq!(points.len(), 3);
    for p in &points {
        assert_eq!(p["ebs"]["state"], "on_ebs", "{p}");
    }
    // Every point, from EBS, byte-exact (the third compared with the grown file).
    let third_bytes = std::fs::read(&img).unwrap();
    versions.push(third_bytes);
    for (p, expected) in points.iter().zip(&versions) {
        let n = p["point"].as_u64().unwrap().to_string();
        let out = w.path().join(format!("from-ebs-{n}.img"));
        let o = restore_from_ebs(&rx, &n, &out);
        assert!(o.status.success(), "restore of point {n}: {}", stderr(&o));
        assert!(
            std::fs::read(&out).unwrap() == *expected,
            "point {n} restored from EBS holds other bytes"
        );
    }
    // The server agrees: a snapshot's whole content is the disk, zero-padded to its volume.
    let snaps = ebs.snapshots();
    assert_eq!(snaps.len(), 3);
    for s in &snaps {
        assert!(s.encrypted, "encrypted by default");
        assert_eq!(s.kms_key_arn.as_deref(), Some(kms));
        let tag = |k: &str| {
            s.tags
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(tag("lifeboat:server").as_deref(), Some("web-01"));
        assert_eq!(tag("lifeboat:disk").as_deref(), Some("root"));
    }
    let content = ebs.content(parent);
    assert!(content[..versions[0].len()] == versions[0][..]);
    assert!(content[versions[0].len()..].iter().all(|b| *b == 0));
    // One StartSnapshot per disk and point; every put was needed.
    assert_eq!(ebs.count("StartSnapshot"), 3);
    assert_eq!(ebs.count("PutSnapshotBlock"), data_blocks + 3 + 1);
}

/// Access denied is permanent: one attempt, the point goes `failed` with AWS's words, and
/// `points` shows it; once allowed, `snapshot` tries again and succeeds.
#[test]
fn access_denied_fails_once_and_is_shown() {
    let ebs = EbsServer::start();
    ebs.faults(|f| f.deny = vec!["StartSnapshot".into()]);
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.use_ebs(&ebs.url(), &[]);
    let img = w.path().join("disk.img");
    let data = make_image(&img, 8, 0, 3);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    let o = rx.cli(&["snapshot", "--server", "web-01", "--point", "latest"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("AccessDeniedException"),
        "the AWS error is named: {}",
        stderr(&o)
    );
    assert_eq!(ebs.count("StartSnapshot"), 1, "no retry storm");
    let points = rx.points("web-01");
    assert_eq!(points[0]["ebs"]["state"], "failed");
    let shown = stdout(&rx.cli(&["points", "--server", "web-01"]));
    assert!(
        shown.contains("failed on EBS") && shown.contains("AccessDenied"),
        "{shown}"
    );
    let shown = stdout(&rx.cli(&["servers"]));
    assert!(
        shown.contains("failed on EBS") && shown.contains("AccessDenied"),
        "servers shows it too: {shown}"
    );

    ebs.faults(|f| f.deny.clear());
    let v = snapshot(&rx, "web-01", "latest");
    assert_eq!(v["state"], "on_ebs");
    assert_eq!(v["disks"]["root"]["attempt"], 1, "a new ClientToken: {v}");
    let out = w.path().join("r.img");
    let o = restore_from_ebs(&rx, "latest", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).unwrap() == data);
}

/// Throttling past a rate, a hung request and "does not exist" right after StartSnapshot
/// are all ridden out by timeouts and jittered retries.
#[test]
fn throttling_hangs_and_fresh_snapshots_are_retried() {
    let ebs = EbsServer::start();
    ebs.faults(|f| {
        f.throttle_per_sec = Some(20);
        f.not_found_after_start = 2;
        f.hang_next = 1;
        f.hang_ops = vec!["PutSnapshotBlock".into()];
        f.completion_delay = Duration::from_secs(4);
    });
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.use_ebs(&ebs.url(), &["puts_in_flight = 8"]);
    let img = w.path().join("disk.img");
    let data = make_image(&img, 48, 0, 5);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    let v = snapshot(&rx, "web-01", "latest");
    assert_eq!(v["state"], "on_ebs", "{v}");
    let out = w.path().join("r.img");
    ebs.faults(|f| f.throttle_per_sec = None);
    let o = restore_from_ebs(&rx, "latest", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).unwrap() == data);
    // `on_ebs` only once EC2 said `completed`, after saying `pending` for a while.
    let described = ebs.described();
    assert_eq!(
        described.first().map(String::as_str),
        Some("pending"),
        "{described:?}"
    );
    assert_eq!(
        described.last().map(String::as_str),
        Some("completed"),
        "{described:?}"
    );
    // Every fault was met and ridden out.
    let data_blocks = data
        .chunks(BLOCK_SIZE)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64;
    let counts = ebs.counts();
    assert!(
        counts["PutSnapshotBlock"] > data_blocks + 2,
        "retries happened: {counts:?}"
    );
    ebs.faults(|f| assert_eq!(f.hang_next, 0, "the hung request was made"));
    assert!(
        ebs.throttled() > 0,
        "throttling happened and was ridden out"
    );
}

/// `serve` uploads by policy in the background, and only when a point is due.
#[test]
fn serve_uploads_by_policy_in_the_background() {
    let ebs = EbsServer::start();
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.serve_args = vec!["--ebs-interval-secs".into(), "1".into()];
    rx.use_ebs(&ebs.url(), &["every_minutes = 1"]);
    let img = w.path().join("disk.img");
    make_image(&img, 16, 0, 9);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    wait_for(
        "the uploader to put the point on EBS",
        Duration::from_secs(60),
        || rx.points("web-01")[0]["ebs"]["state"] == "on_ebs",
    );
    // The next point is not due yet (less than every_minutes after the last).
    mutate(&img, 2, 3);
    agent.run_once_ok();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rx.points("web-01")[1]["ebs"]["state"], "staged");
    assert_eq!(ebs.count("StartSnapshot"), 1);
}

/// SIGKILL of the receiver mid-upload: after a restart the upload resumes with the same
/// ClientToken, and there is exactly one snapshot for the disk and point, completed; nothing
/// stays `uploading`.
#[test]
fn a_receiver_killed_mid_upload_resumes_to_exactly_one_snapshot() {
    let ebs = EbsServer::start();
    ebs.faults(|f| f.latency = Duration::from_millis(150));
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.serve_args = vec!["--ebs-interval-secs".into(), "1".into()];
    rx.use_ebs(&ebs.url(), &["every_minutes = 1", "puts_in_flight = 2"]);
    rx.kill();
    rx.restart();
    let img = w.path().join("disk.img");
    let data = make_image(&img, 64, 0, 13);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    wait_for("some blocks put", Duration::from_secs(60), || {
        ebs.count("PutSnapshotBlock") >= 6
    });
    // Two processes at once: the command is refused while `serve` uploads that server.
    let o = rx.cli(&["snapshot", "--server", "web-01", "--point", "latest"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("under way"), "{}", stderr(&o));
    rx.kill();
    assert_eq!(rx.points("web-01")[0]["ebs"]["state"], "uploading");
    ebs.faults(|f| f.latency = Duration::ZERO);
    rx.restart();
    wait_for(
        "the upload to resume and complete",
        Duration::from_secs(60),
        || rx.points("web-01")[0]["ebs"]["state"] == "on_ebs",
    );
    let snaps = ebs.snapshots();
    assert_eq!(
        snaps.len(),
        1,
        "one snapshot, resumed by its ClientToken: {snaps:?}"
    );
    assert_eq!(ebs.count("StartSnapshot"), 2, "started, then resumed");
    let out = w.path().join("r.img");
    let o = restore_from_ebs(&rx, "latest", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).unwrap() == data);
}

/// Retention of snapshots on the receiver's clock: three days on, with `daily_days = 1`,
/// only the newest snapshot stays; the others are deleted with DeleteSnapshot, and the one
/// left (a child of the deleted) still restores byte-exact.
#[test]
fn retention_deletes_exactly_the_expired_snapshots() {
    let ebs = EbsServer::start();
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.use_ebs(&ebs.url(), &["daily_days = 1", "every_minutes = 10080"]);
    let img = w.path().join("disk.img");
    let mut last = make_image(&img, 12, 0, 17);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    snapshot(&rx, "web-01", "latest");
    for seed in 0..2 {
        last = mutate(&img, 30 + seed, 3);
        agent.run_once_ok();
        snapshot(&rx, "web-01", "latest");
    }
    assert_eq!(ebs.snapshots().len(), 3);
    let points = rx.points("web-01");
    let newest = points[2]["ebs"]["disks"]["root"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Three days later (the receiver's clock; monotonic time is left alone).
    rx.kill();
    rx.wrapper = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "+3d",
    ]
    .map(String::from)
    .to_vec();
    rx.serve_args = vec!["--ebs-interval-secs".into(), "1".into()];
    rx.restart();
    wait_for(
        "retention to delete the old snapshots",
        Duration::from_secs(60),
        || ebs.count("DeleteSnapshot") >= 2,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ebs.count("DeleteSnapshot"), 2, "exactly the expired ones");
    let left: Vec<String> = ebs.snapshots().into_iter().map(|s| s.id).collect();
    assert_eq!(left, vec![newest]);
    let states: Vec<Value> = rx
        .points("web-01")
        .iter()
        .map(|p| p["ebs"]["state"].clone())
        .collect();
    assert_eq!(states, ["deleted", "deleted", "on_ebs"]);
    let out = w.path().join("r.img");
    let o = restore_from_ebs(&rx, "latest", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).unwrap() == last);
}

/// Failback with `--only-changed`: onto an older copy of the disk, only the blocks that
/// differ from the point are written (from the staging store, and from EBS, where only those
/// blocks are fetched); the result is the point, byte-exact.
#[test]
fn failback_writes_only_the_blocks_that_differ() {
    let ebs = EbsServer::start();
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.serve_args = vec!["--ebs-interval-secs".into(), "3600".into()];
    rx.use_ebs(&ebs.url(), &[]);
    let img = w.path().join("disk.img");
    let old = make_image(&img, 24, 300, 19);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    // The point: four blocks changed, one of them to zeros.
    let mut new = old.clone();
    for i in [2usize, 9, 15] {
        new[i * BLOCK_SIZE + 7] ^= 0xff;
    }
    let z = new
        .chunks(BLOCK_SIZE)
        .position(|b| b.iter().any(|x| *x != 0))
        .unwrap();
    new[z * BLOCK_SIZE..(z + 1) * BLOCK_SIZE].fill(0);
    std::fs::write(&img, &new).unwrap();
    agent.run_once_ok();
    snapshot(&rx, "web-01", "latest");
    let differing = old
        .chunks(BLOCK_SIZE)
        .zip(new.chunks(BLOCK_SIZE))
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert_eq!(differing, 4);

    for from in ["staging", "ebs"] {
        let copy = w.path().join(format!("old-{from}.img"));
        std::fs::write(&copy, &old).unwrap();
        let gets = ebs.count("GetSnapshotBlock");
        let o = rx.restore_with(
            "web-01",
            "root",
            "latest",
            &copy,
            &["--only-changed", "--force", "--from", from, "--json"],
        );
        assert!(o.status.success(), "{from}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["blocks_written"], differing, "{from}: {v}");
        assert!(
            std::fs::read(&copy).unwrap() == new,
            "{from}: the older copy now holds the point"
        );
        if from == "ebs" {
            // The zeroed block needs no fetch: the manifest says zero.
            assert_eq!(ebs.count("GetSnapshotBlock") - gets, differing - 1);
        }
    }
    // Without an older copy there is nothing to compare: a clear refusal.
    let o = rx.restore_with(
        "web-01",
        "root",
        "latest",
        &w.path().join("absent.img"),
        &["--only-changed"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

/// Failback `--since` a point the destination holds: only the blocks changed since it are
/// written, found from the manifests and (from EBS) ListChangedBlocks, without reading the
/// destination first; a block where the destination did not hold that point is found by the
/// read-back and written too.
#[test]
fn failback_since_a_point_writes_what_changed_and_repairs_the_rest() {
    let ebs = EbsServer::start();
    // Listings of 5 entries a page: the restore walks many pages of both listings.
    ebs.faults(|f| f.page_cap = Some(5));
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.serve_args = vec!["--ebs-interval-secs".into(), "3600".into()];
    rx.use_ebs(&ebs.url(), &[]);
    let img = w.path().join("disk.img");
    let old = make_image(&img, 24, 300, 23);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    snapshot(&rx, "web-01", "latest");
    let mut new = old.clone();
    for i in [3usize, 11, 20] {
        new[i * BLOCK_SIZE + 99] ^= 0x5a;
    }
    std::fs::write(&img, &new).unwrap();
    agent.run_once_ok();
    snapshot(&rx, "web-01", "latest");

    for (from, diverged) in [
        ("staging", false),
        ("ebs", false),
        ("ebs", true),
        ("staging", true),
    ] {
        let copy = w.path().join(format!("copy-{from}-{diverged}.img"));
        let mut held = old.clone();
        if diverged {
            // The copy took a write after point 1 that point 2 knows nothing of.
            held[7 * BLOCK_SIZE] ^= 1;
        }
        std::fs::write(&copy, &held).unwrap();
        let listed = ebs.count("ListChangedBlocks");
        let pages = ebs.count("ListSnapshotBlocks");
        let gets = ebs.count("GetSnapshotBlock");
        let o = rx.restore_with(
            "web-01",
            "root",
            "2",
            &copy,
            &[
                "--only-changed",
                "--since",
                "1",
                "--force",
                "--from",
                from,
                "--json",
            ],
        );
        assert!(o.status.success(), "{from}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let repaired = u64::from(diverged);
        assert_eq!(v["blocks_written"], 3 + repaired, "{from}: {v}");
        assert_eq!(v["blocks_repaired"], repaired, "{from}: {v}");
        assert!(
            std::fs::read(&copy).unwrap() == new,
            "{from} diverged={diverged}: the copy now holds point 2"
        );
        if from == "ebs" {
            // Changes in three blocks: one page; 16 data blocks held, five a page, listed
            // once more for the repair.
            assert_eq!(ebs.count("ListChangedBlocks") - listed, 1, "{v}");
            assert_eq!(
                ebs.count("ListSnapshotBlocks") - pages,
                4 * (1 + repaired),
                "{v}"
            );
            assert_eq!(v["changed_from"], "manifests and EBS ListChangedBlocks");
            // Exactly the data blocks written were fetched (a zero block is written unfetched).
            let zero7 = new[7 * BLOCK_SIZE..8 * BLOCK_SIZE].iter().all(|b| *b == 0);
            let fetched = 3 + u64::from(diverged && !zero7);
            assert_eq!(ebs.count("GetSnapshotBlock") - gets, fetched, "{v}");
        } else {
            assert_eq!(ebs.count("ListChangedBlocks"), listed);
            assert_eq!(v["changed_from"], "manifests");
        }
    }
    // --since trusts the destination: only the read-back proves it, so it needs it.
    let o = rx.restore_with(
        "web-01",
        "root",
        "2",
        &w.path().join("copy-ebs-true.img"),
        &["--only-changed", "--since", "1", "--force", "--no-verify"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--no-verify cannot go with --since"),
        "{}",
        stderr(&o)
    );
    let o = rx.restore_with(
        "web-01",
        "root",
        "2",
        &w.path().join("copy-ebs-true.img"),
        &["--since", "1", "--force"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--only-changed"), "{}", stderr(&o));
}

/// `recover --drill` against moto (EC2 images and instances) behind the strict EBS server
/// (snapshots): the point goes to EBS, the image maps the point's snapshots (boot disk as
/// root device), an instance runs; `drills` lists it and `--terminate` cleans up. moto ignores
/// RegisterImage's block device mappings, so the test reads them from the request.
#[test]
fn recover_launches_an_instance_whose_image_maps_the_point() {
    let w = workdir();
    let Some(moto) = lifeboat_tests::moto::Moto::start(w.path()) else {
        return;
    };
    let ebs = EbsServer::start();
    ebs.forward_ec2_to(moto.addr);
    let mut rx = Receiver::start(w.path());
    rx.use_ebs(
        &ebs.url(),
        &[
            "[recovery.default]",
            "instance_type = \"t3.micro\"",
            "[recovery.web-01]",
            "boot_disk = \"sys\"",
        ],
    );
    let sys = w.path().join("sys.img");
    let data = w.path().join("data.img");
    make_image(&sys, 8, 0, 1);
    make_image(&data, 6, 0, 2);
    let agent = Agent::new(
        w.path(),
        &rx,
        &AgentSpec::new("web-01", &[("data", &data), ("sys", &sys)]),
    );
    agent.run_once_ok();

    // A dry run uploads and creates nothing.
    let o = rx.cli(&[
        "recover",
        "--server",
        "web-01",
        "--drill",
        "--dry-run",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["to_upload_first"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(ebs.count("StartSnapshot"), 0);

    let o = rx.cli(&["recover", "--server", "web-01", "--drill", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let instance = v["instance_id"].as_str().unwrap().to_string();
    assert!(instance.starts_with("i-"), "{v}");
    assert!(v["private_ip"].is_string(), "{v}");
    // The image maps both snapshots of the point, the boot disk as the root device.
    let points = rx.points("web-01");
    let snap = |disk: &str| {
        points[0]["ebs"]["disks"][disk]["snapshot_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let reg = ebs.forwarded("RegisterImage");
    assert_eq!(reg.len(), 1);
    let form = &reg[0];
    assert_eq!(form["RootDeviceName"], "/dev/xvda");
    let mapping = |n: u32| {
        (
            form[&format!("BlockDeviceMapping.{n}.DeviceName")].clone(),
            form[&format!("BlockDeviceMapping.{n}.Ebs.SnapshotId")].clone(),
        )
    };
    assert_eq!(mapping(1), ("/dev/xvda".to_string(), snap("sys")));
    assert_eq!(mapping(2), ("/dev/xvdb".to_string(), snap("data")));
    let run = ebs.forwarded("RunInstances");
    assert_eq!(run.len(), 1);
    assert_eq!(run[0]["ImageId"], v["image_id"].as_str().unwrap());
    assert_eq!(run[0]["InstanceType"], "t3.micro");

    // `drills` lists the instance and its image; --terminate cleans both up.
    let o = rx.cli(&["drills", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<&str> = d["drills"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&instance.as_str()), "{d}");
    assert!(ids.contains(&v["image_id"].as_str().unwrap()), "{d}");
    let o = rx.cli(&["drills", "--terminate"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = rx.cli(&["drills", "--json"]);
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["drills"].as_array().unwrap().len(), 0, "{d}");
}

/// SIGKILL after CompleteSnapshot, while EC2 still says `pending`: the restarted receiver
/// asks where the snapshot stands and only waits; no new snapshot, no block put again.
#[test]
fn a_receiver_killed_after_complete_snapshot_only_waits() {
    let ebs = EbsServer::start();
    ebs.faults(|f| f.completion_delay = Duration::from_secs(6));
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.serve_args = vec!["--ebs-interval-secs".into(), "1".into()];
    rx.use_ebs(&ebs.url(), &["every_minutes = 1"]);
    let img = w.path().join("disk.img");
    let data = make_image(&img, 12, 0, 23);
    let data_blocks = data
        .chunks(BLOCK_SIZE)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64;
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.run_once_ok();
    wait_for("CompleteSnapshot", Duration::from_secs(60), || {
        ebs.count("CompleteSnapshot") >= 1
    });
    rx.kill();
    let p = &rx.points("web-01")[0];
    assert_eq!(p["ebs"]["state"], "uploading", "{p}");
    assert_eq!(p["ebs"]["disks"]["root"]["completing"], true, "{p}");
    rx.restart();
    wait_for(
        "the resumed upload to complete",
        Duration::from_secs(60),
        || rx.points("web-01")[0]["ebs"]["state"] == "on_ebs",
    );
    assert_eq!(ebs.snapshots().len(), 1);
    assert_eq!(ebs.count("StartSnapshot"), 1, "{:?}", ebs.counts());
    assert_eq!(
        ebs.count("PutSnapshotBlock"),
        data_blocks,
        "{:?}",
        ebs.counts()
    );
    assert_eq!(
        rx.points("web-01")[0]["ebs"]["disks"]["root"]["changed_blocks"],
        data_blocks
    );
}
