//! S3 Object Lock (`[s3] object_lock_days`) on a bucket created with it (moto in server mode,
//! on loopback): what each point needs is written locked, no one can delete it early, and the
//! lock of a block written long ago is extended when a new point names it.

use lifeboat_tests::moto::{sdk_client, Moto};
use lifeboat_tests::*;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BUCKET: &str = "lifeboat-locked";
const DAY_MS: u64 = 86_400_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// (mode, retain-until in unix ms, version id) of the current version of `key`.
fn lock_of(
    rt: &tokio::runtime::Runtime,
    s3: &aws_sdk_s3::Client,
    key: &str,
) -> (String, u64, String) {
    lock_of_version(rt, s3, key, None)
}

/// As [`lock_of`], of `version` of `key` (0: not locked).
fn lock_of_version(
    rt: &tokio::runtime::Runtime,
    s3: &aws_sdk_s3::Client,
    key: &str,
    version: Option<&str>,
) -> (String, u64, String) {
    let h = rt
        .block_on(
            s3.head_object()
                .bucket(BUCKET)
                .key(key)
                .set_version_id(version.map(str::to_string))
                .send(),
        )
        .unwrap_or_else(|e| panic!("HEAD {key}: {e:?}"));
    let until = h
        .object_lock_retain_until_date()
        .map(|t| t.to_millis().unwrap() as u64)
        .unwrap_or(0);
    (
        h.object_lock_mode()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default(),
        until,
        h.version_id().unwrap_or_default().to_string(),
    )
}

/// Each point's lock as `points --json` shows it: (point, until, blocks_locked).
fn locks(points: &[Value]) -> Vec<(u64, u64, bool)> {
    points
        .iter()
        .map(|p| {
            let l = &p["lock"];
            assert!(l.is_object(), "a point without a lock: {p}");
            (
                p["point"].as_u64().unwrap(),
                l["until_unix_ms"].as_u64().unwrap(),
                l["blocks_locked"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The blocks (keys) point `n`'s manifest of disk `root` names, as the bucket holds it.
fn blocks_named(moto: &Moto, server: &str, n: u64) -> Vec<String> {
    let raw = moto
        .get(
            BUCKET,
            &format!("fleet/servers/{server}/points/{n:016}/root.manifest"),
        )
        .expect("the point's manifest is in the bucket");
    let m = lifeboat_common::manifest::Manifest::decode(&raw).unwrap();
    m.hashes
        .iter()
        .filter(|h| !h.is_zero())
        .map(|h| {
            let hex = h.to_hex();
            format!("fleet/blocks/{}/{hex}", &hex[..2])
        })
        .collect()
}

/// moto with [`BUCKET`] created under Object Lock, a runtime and a client of its own.
fn locked_bucket(
    root: &std::path::Path,
) -> Option<(Moto, tokio::runtime::Runtime, aws_sdk_s3::Client)> {
    let moto = Moto::start(root)?;
    let rt = runtime();
    let s3 = sdk_client(&moto.url());
    rt.block_on(
        s3.create_bucket()
            .bucket(BUCKET)
            .object_lock_enabled_for_bucket(true)
            .send(),
    )
    .unwrap();
    Some((moto, rt, s3))
}

/// GC passes run so far by `rx`'s serve.
fn gc_runs(rx: &Receiver) -> f64 {
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    sample(&m, "lifeboat_receiver_gc_runs_total").unwrap_or(0.0)
}

/// Restarts `rx` with its clock `days` ahead (monotonic time left alone).
fn days_later(rx: &mut Receiver, days: u64) {
    rx.kill();
    rx.wrapper = vec![
        "env".into(),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        "faketime".into(),
        "-f".into(),
        format!("+{days}d"),
    ];
    rx.restart();
}

/// With `object_lock_days = 3` in compliance mode, on a bucket with Object Lock:
/// - every point's record and manifests are written locked for 20 minutes (the newest, once its
///   agent left, for 3 days), and every new block for 3 + 7 days; `points` shows each lock; a
///   DELETE of a locked version is refused;
/// - retention keeps a point it would drop while its lock lasts;
/// - two days later (the receiver's clock) the lock keeper has extended the lock of the point
///   retention keeps for its day to 3 days, and retention dropped the other;
/// - twelve days later a new point names blocks whose locks ended: the keeper extends them past
///   the new point's lock before `points` says its blocks are locked; a block someone wrote
///   over meanwhile (a new version, as ransomware holding the credentials would) has the
///   version the points name extended, not the intruder's.
///
/// A bucket without Object Lock is refused, named; so is a receiver of the fleet that does not
/// lock alike.
#[test]
fn object_lock_keeps_each_point_and_every_block_it_names_until_its_end() {
    let w = workdir();
    let Some((moto, rt, s3)) = locked_bucket(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-unlocked");

    let mut rx = Receiver::start(w.path());
    rx.kill();
    // First on a bucket without Object Lock: refused, named.
    rx.join_fleet(&moto.url(), "lifeboat-unlocked", 5);
    rx.set_s3("object_lock_days", "3");
    let o = rx.cli(&["points", "--server", "lock-01"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not have Object Lock enabled"),
        "{}",
        stderr(&o)
    );
    let toml = rx.dir.join("receiver.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("\"lifeboat-unlocked\"", &format!("\"{BUCKET}\""));
    std::fs::write(&toml, text).unwrap();
    rx.set_s3("object_lock_mode", "\"compliance\"");
    // Retention would keep the newest point only (nothing recent, one a day for a day).
    rx.restart_with_retention(0, 1, 0);

    let img = w.path().join("disk.img");
    let mut versions = vec![random_image(&img, 12, 31)];
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("lock-01", &[("root", &img)]));
    agent.run_once_ok();
    versions.push(mutate(&img, 32, 3));
    // Connected, so this receiver holds the server and runs retention for it.
    agent.spawn();
    wait_for(
        "a second point, and the keeper to check both points' blocks",
        Duration::from_secs(60),
        || {
            let l = locks(&rx.points("lock-01"));
            l.len() >= 2 && l.iter().all(|(_, _, b)| *b)
        },
    );
    let runs = gc_runs(&rx);
    wait_for("two more GC passes", Duration::from_secs(30), || {
        gc_runs(&rx) >= runs + 2.0
    });
    agent.kill();
    let written_by = now_ms();
    // Its agent gone, the newest point may be the one to recover from: locked as a day's
    // point at once, by the keeper run at the release of the server.
    wait_for(
        "the newest point locked for 3 days as its agent left",
        Duration::from_secs(30),
        || {
            let points = rx.points("lock-01");
            let newest = points.last().unwrap();
            let l = &newest["lock"];
            l["until_unix_ms"].as_u64()
                == newest["committed_unix_ms"].as_u64().map(|c| c + 3 * DAY_MS)
                && l["blocks_locked"] == true
        },
    );
    let points = rx.points("lock-01");
    // Retention would have kept only the newest; the locks kept every one.
    let numbers: Vec<u64> = points
        .iter()
        .map(|p| p["point"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..=*numbers.last().unwrap()).collect::<Vec<u64>>(),
        "retention deleted a locked point"
    );
    for p in &points {
        let n = p["point"].as_u64().unwrap();
        let until = p["lock"]["until_unix_ms"].as_u64().unwrap();
        let committed = p["committed_unix_ms"].as_u64().unwrap();
        assert!(until >= committed + 20 * 60_000, "point {n}: {p}");
        // Its record and manifest: locked exactly that long, in the configured mode.
        for key in ["point.json", "root.manifest"] {
            let (mode, object_until, _) = lock_of(
                &rt,
                &s3,
                &format!("fleet/servers/lock-01/points/{n:016}/{key}"),
            );
            assert_eq!(mode, "COMPLIANCE", "{key} of point {n}");
            assert!(object_until.abs_diff(until) < 1000, "{key} of point {n}");
        }
        // Every block it names: a new block for 3 + 7 days.
        for key in blocks_named(&moto, "lock-01", n) {
            let (mode, block_until, _) = lock_of(&rt, &s3, &key);
            assert_eq!(mode, "COMPLIANCE", "{key}");
            assert!(block_until >= until, "{key} ends before point {n}");
            assert!(block_until + 600_000 >= written_by + 10 * DAY_MS, "{key}");
        }
    }
    let table = stdout(&rx.cli(&["points", "--server", "lock-01"]));
    assert!(table.contains("LOCKED UNTIL (UTC)"), "{table}");
    // The bucket keeps every noncurrent version: said at the start.
    assert!(
        rx.log_text()
            .contains("has no lifecycle rule expiring noncurrent versions"),
        "{}",
        rx.log_text()
    );

    // Another receiver of the fleet that does not lock, or locks otherwise, is refused.
    let other_root = w.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let mut other = Receiver::start(&other_root);
    other.kill();
    other.join_fleet(&moto.url(), BUCKET, 5);
    let o = other.cli(&["points", "--server", "lock-01"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("this fleet locks its points"),
        "{}",
        stderr(&o)
    );
    other.set_s3("object_lock_days", "3");
    let o = other.cli(&["points", "--server", "lock-01"]);
    assert!(
        stderr(&o).contains("this fleet locks in compliance mode"),
        "{}",
        stderr(&o)
    );

    // Whoever holds the bucket's credentials cannot destroy a locked version: a delete of the
    // version is refused (a plain delete only hides it behind a delete marker).
    let block = blocks_named(&moto, "lock-01", 1).remove(0);
    for key in [
        block.clone(),
        "fleet/servers/lock-01/points/0000000000000001/point.json".to_string(),
    ] {
        let (_, _, version) = lock_of(&rt, &s3, &key);
        let r = rt.block_on(
            s3.delete_object()
                .bucket(BUCKET)
                .key(&key)
                .version_id(&version)
                .send(),
        );
        assert!(r.is_err(), "a locked version of {key} was deleted");
        assert!(moto.get(BUCKET, &key).is_some(), "{key} is gone");
    }

    // Two days on: every slot of the newest point has closed, so the keeper locks it for
    // 3 days from its commit, the one retention keeps for its day; the points cut while the
    // agent was connected had 20 minutes, and retention drops them. Point 1 stays: it was the
    // newest when its agent left (after `run --once`), and was locked for 3 days then.
    let newest = points.last().unwrap();
    let (n2, committed2) = (
        newest["point"].as_u64().unwrap(),
        newest["committed_unix_ms"].as_u64().unwrap(),
    );
    days_later(&mut rx, 2);
    agent.spawn();
    wait_for(
        "the newest point locked for its day, and the older dropped",
        Duration::from_secs(60),
        || {
            let l = locks(&rx.points("lock-01"));
            !l.iter().any(|(n, _, _)| *n > 1 && *n < n2)
                && l.iter()
                    .any(|(n, u, b)| *n == n2 && *u == committed2 + 3 * DAY_MS && *b)
        },
    );
    agent.kill();
    let first = locks(&rx.points("lock-01"))[0];
    let committed1 = rx.points("lock-01")[0]["committed_unix_ms"]
        .as_u64()
        .unwrap();
    assert_eq!(first, (1, committed1 + 3 * DAY_MS, true));
    for key in ["point.json", "root.manifest"] {
        let (_, until2, _) = lock_of(
            &rt,
            &s3,
            &format!("fleet/servers/lock-01/points/{n2:016}/{key}"),
        );
        assert!(until2.abs_diff(committed2 + 3 * DAY_MS) < 1000, "{key}");
    }

    // (The agent may have cut points of the same content meanwhile.)
    let last = rx.points("lock-01").last().unwrap()["point"]
        .as_u64()
        .unwrap();
    // Twelve days on: those points' locks and their new blocks' (3 + 7 days) have ended. A new
    // point names most of them; the keeper extends their locks past its own.
    let old: Vec<(String, u64)> = blocks_named(&moto, "lock-01", last)
        .into_iter()
        .map(|k| {
            let (_, until, _) = lock_of(&rt, &s3, &k);
            (k, until)
        })
        .collect();
    // An intruder writes over one of them: a new, unlocked version.
    let (shadowed, _) = old[0].clone();
    let (_, _, original) = lock_of(&rt, &s3, &shadowed);
    rt.block_on(
        s3.put_object()
            .bucket(BUCKET)
            .key(&shadowed)
            .body(b"encrypted by ransomware".to_vec().into())
            .send(),
    )
    .unwrap();
    let (_, _, intruder) = lock_of(&rt, &s3, &shadowed);
    assert_ne!(original, intruder);
    days_later(&mut rx, 12);
    versions.push(mutate(&img, 33, 2));
    agent.spawn();
    wait_for(
        "a new point with its blocks' locks extended, and the older dropped",
        Duration::from_secs(120),
        || {
            let l = locks(&rx.points("lock-01"));
            !l.is_empty() && l.iter().all(|(n, _, _)| *n > last) && l.iter().any(|(_, _, b)| *b)
        },
    );
    agent.kill();
    let (n, until, _) = locks(&rx.points("lock-01"))
        .into_iter()
        .rfind(|(_, _, b)| *b)
        .unwrap();
    assert!(until > now_ms() + 12 * DAY_MS, "faketime did not apply");
    let named = blocks_named(&moto, "lock-01", n);
    for key in named.iter().filter(|k| **k != shadowed) {
        let (_, block_until, _) = lock_of(&rt, &s3, key);
        assert!(block_until >= until, "{key} ends before point {n}");
    }
    // The shadowed block: the version the points name was extended, the intruder's not.
    assert!(named.contains(&shadowed));
    let (_, pinned, _) = lock_of_version(&rt, &s3, &shadowed, Some(&original));
    assert!(
        pinned >= until,
        "the original version of {shadowed} ends before point {n}"
    );
    let (_, theirs, _) = lock_of_version(&rt, &s3, &shadowed, Some(&intruder));
    assert!(theirs < until, "the intruder's version was locked");
    // The admin removes the intruder's version (not locked): the original is current again.
    rt.block_on(
        s3.delete_object()
            .bucket(BUCKET)
            .key(&shadowed)
            .version_id(&intruder)
            .send(),
    )
    .unwrap();
    let reused: Vec<&(String, u64)> = old.iter().filter(|(k, _)| named.contains(k)).collect();
    assert!(reused.len() >= 8, "{} blocks reused", reused.len());
    for (key, before) in reused {
        assert!(
            *before < until,
            "{key} needed no extension: nothing was tested"
        );
    }
    assert!(
        rx.log_text().contains("lock keeper: locks checked"),
        "{}",
        rx.log_text()
    );
    let (_, m) = http_get(&rx.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&m, "lifeboat_receiver_fleet_lock_failures_total"),
        Some(0.0),
        "{m}"
    );
    for p in rx.points("lock-01") {
        let n = p["point"].as_u64().unwrap().to_string();
        rx.expect_restore("lock-01", "root", &n, &versions[2]);
    }
}

/// A receiver that takes a server over knows nothing of the locks its first holder extended
/// (they are in the other's state directory): its retention asks the bucket before deleting,
/// and keeps a point the first holder locked though its own policy and records would drop it.
/// Then an intruder hides a point and a block behind delete markers, and `undelete` brings
/// them back.
#[test]
fn a_receiver_taking_a_server_over_keeps_what_the_first_holder_locked() {
    let w = workdir();
    let Some((moto, rt, s3)) = locked_bucket(w.path()) else {
        return;
    };
    // This bucket expires noncurrent versions (as the docs ask).
    use aws_sdk_s3::types::{
        BucketLifecycleConfiguration, ExpirationStatus, LifecycleRule, LifecycleRuleFilter,
        NoncurrentVersionExpiration,
    };
    let rule = LifecycleRule::builder()
        .id("noncurrent")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .noncurrent_version_expiration(
            NoncurrentVersionExpiration::builder()
                .noncurrent_days(1)
                .build(),
        )
        .build()
        .unwrap();
    rt.block_on(
        s3.put_bucket_lifecycle_configuration()
            .bucket(BUCKET)
            .lifecycle_configuration(
                BucketLifecycleConfiguration::builder()
                    .rules(rule)
                    .build()
                    .unwrap(),
            )
            .send(),
    )
    .unwrap();
    let url = moto.url();
    let (mut a, mut b) =
        super::fleet::fleet_on(w.path(), (&url, &url), BUCKET, 3, |rx: &mut Receiver| {
            rx.set_s3("object_lock_days", "3");
        });
    let img = w.path().join("disk.img");
    let mut versions = vec![random_image(&img, 8, 41)];
    let mut spec = AgentSpec::new("lock-02", &[("root", &img)]);
    spec.more_receivers = vec![format!("127.0.0.1:{}", b.port)];
    let mut agent = Agent::new(w.path(), &a, &spec);
    // Two points through A, each the newest as its agent left: A locked each for 3 days.
    agent.run_once_ok();
    versions.push(mutate(&img, 42, 2));
    agent.run_once_ok();
    let at_a = a.points("lock-02");
    assert_eq!(at_a.len(), 2);
    let committed1 = at_a[0]["committed_unix_ms"].as_u64().unwrap();
    assert_eq!(at_a[0]["lock"]["until_unix_ms"], committed1 + 3 * DAY_MS);
    a.kill();
    // Two days on, B takes the server; its policy keeps the newest only, and its records say
    // point 1 was locked for 20 minutes.
    b.kill();
    b.wrapper = vec![
        "env".into(),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        "faketime".into(),
        "-f".into(),
        "+2d".into(),
    ];
    b.restart_with_retention(0, 1, 0);
    agent.spawn();
    wait_for(
        "B to learn point 1's lock from the bucket",
        Duration::from_secs(90),
        || {
            b.points("lock-02").first().is_some_and(|p| {
                p["point"] == 1 && p["lock"]["until_unix_ms"] == committed1 + 3 * DAY_MS
            })
        },
    );
    let runs = gc_runs(&b);
    wait_for("two more GC passes at B", Duration::from_secs(30), || {
        gc_runs(&b) >= runs + 2.0
    });
    agent.kill();
    let points = b.points("lock-02");
    assert_eq!(points[0]["point"], 1, "B deleted a point A had locked");
    assert!(
        !b.log_text().contains("no lifecycle rule"),
        "{}",
        b.log_text()
    );
    b.expect_restore("lock-02", "root", "1", &versions[0]);

    // An intruder with the credentials deletes point 1's record and one of its blocks: plain
    // DELETEs, delete markers over the locked versions. The block is gone for every reader,
    // and a restore of point 1 fails; `undelete` brings both back.
    use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
    let since = DateTime::from_secs(now_ms() as i64 / 1000 - 60)
        .fmt(DateTimeFormat::DateTime)
        .unwrap();
    let block = blocks_named(&moto, "lock-02", 1).remove(0);
    let record = "fleet/servers/lock-02/points/0000000000000001/point.json";
    for key in [block.as_str(), record] {
        rt.block_on(s3.delete_object().bucket(BUCKET).key(key).send())
            .unwrap();
        assert!(moto.get(BUCKET, key).is_none(), "{key} still there");
    }
    let o = b.restore("lock-02", "root", "1", &w.path().join("before.img"));
    assert!(!o.status.success(), "restored with a block deleted");
    let o = b.cli(&["undelete", "--since", &since, "--dry-run", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed: Vec<&str> = v["deleted_since"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&block.trim_start_matches("fleet/"))
            && listed.contains(&record.trim_start_matches("fleet/")),
        "{listed:?}"
    );
    assert!(
        moto.get(BUCKET, &block).is_none(),
        "--dry-run changed the bucket"
    );
    let o = b.cli(&["undelete", "--since", &since]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("objects are back"), "{}", stdout(&o));
    assert!(moto.get(BUCKET, &block).is_some() && moto.get(BUCKET, record).is_some());
    b.expect_restore("lock-02", "root", "1", &versions[0]);
    let o = b.cli(&["undelete", "--since", "yesterday"]);
    assert!(
        !o.status.success() && stderr(&o).contains("is not a time such as"),
        "{}",
        stderr(&o)
    );
}
