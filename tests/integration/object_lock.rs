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
    let h = rt
        .block_on(s3.head_object().bucket(BUCKET).key(key).send())
        .unwrap_or_else(|e| panic!("HEAD {key}: {e:?}"));
    let until = h
        .object_lock_retain_until_date()
        .map(|t| t.to_millis().unwrap() as u64)
        .unwrap_or_else(|| panic!("{key} is not locked"));
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

/// With `object_lock_days = 1` in compliance mode: every block, manifest and point record is
/// written locked (blocks a week longer), deleting a locked version is refused, `points`
/// shows each lock's end, and retention keeps points the policy would drop until their lock
/// ends. Nine days later (the receiver's clock), retention drops them, and a new point naming
/// blocks written then gets their locks extended past its own, with `points` saying so only
/// once they are. A bucket without Object Lock is refused, named.
#[test]
fn object_lock_keeps_each_point_and_every_block_it_names_until_its_end() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let rt = runtime();
    let s3 = sdk_client(&moto.url());
    rt.block_on(
        s3.create_bucket()
            .bucket(BUCKET)
            .object_lock_enabled_for_bucket(true)
            .send(),
    )
    .unwrap();
    moto.create_bucket("lifeboat-unlocked");

    let mut rx = Receiver::start(w.path());
    rx.kill();
    // First on a bucket without Object Lock: refused, named.
    rx.join_fleet(&moto.url(), "lifeboat-unlocked", 5);
    rx.set_s3("object_lock_days", "1");
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
    rx.restart_with_retention(0, 1, 0);

    let img = w.path().join("disk.img");
    let mut versions = vec![random_image(&img, 12, 31)];
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("lock-01", &[("root", &img)]));
    agent.run_once_ok();
    versions.push(mutate(&img, 32, 3));
    agent.run_once_ok();
    let written_by = now_ms();

    // The lock keeper (each GC pass) finds every block locked as long as its points.
    wait_for(
        "the lock keeper to check the points' blocks",
        Duration::from_secs(60),
        || {
            let l = locks(&rx.points("lock-01"));
            l.len() >= 2 && l.iter().all(|(_, _, b)| *b)
        },
    );
    // Retention (daily_days 1, recent 0) would keep the newest point only: the lock keeps
    // both.
    let points = rx.points("lock-01");
    assert_eq!(points.len(), 2, "a locked point was deleted: {points:?}");
    for p in &points {
        let n = p["point"].as_u64().unwrap();
        let until = p["lock"]["until_unix_ms"].as_u64().unwrap();
        let committed = p["committed_unix_ms"].as_u64().unwrap();
        assert_eq!(until, committed + DAY_MS, "point {n}");
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
        // Every block it names: at least as long, and a new block the slack (7 days) longer.
        for key in blocks_named(&moto, "lock-01", n) {
            let (mode, block_until, _) = lock_of(&rt, &s3, &key);
            assert_eq!(mode, "COMPLIANCE", "{key}");
            assert!(block_until >= until, "{key} ends before point {n}");
            assert!(
                block_until + 60_000 >= written_by + 8 * DAY_MS - 600_000,
                "{key}"
            );
        }
    }
    let table = stdout(&rx.cli(&["points", "--server", "lock-01"]));
    assert!(table.contains("LOCKED UNTIL (UTC)"), "{table}");

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

    // Nine days on (the receiver's clock): the points' locks ended, and so did the new
    // blocks' (1 + 7 days). Retention now drops the older point; a new point names old blocks,
    // whose locks the keeper extends past the new point's.
    rx.kill();
    rx.wrapper = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "+9d",
    ]
    .map(String::from)
    .to_vec();
    rx.restart();
    // The blocks of point 2, and their locks now: short of a point committed today. (Nothing
    // is dropped yet: retention runs where the server is held, and its agent is away.)
    let old: Vec<(String, u64)> = blocks_named(&moto, "lock-01", 2)
        .into_iter()
        .map(|k| {
            let (_, until, _) = lock_of(&rt, &s3, &k);
            (k, until)
        })
        .collect();
    versions.push(mutate(&img, 33, 2));
    let mut agent = agent;
    agent.spawn();
    wait_for(
        "a new point, its blocks' locks extended, and the older points dropped",
        Duration::from_secs(120),
        || {
            let l = locks(&rx.points("lock-01"));
            !l.is_empty() && l.iter().all(|(n, _, _)| *n >= 3) && l.iter().any(|(_, _, b)| *b)
        },
    );
    agent.kill();
    let (n, until, _) = locks(&rx.points("lock-01"))
        .into_iter()
        .rfind(|(_, _, b)| *b)
        .unwrap();
    assert!(until > now_ms() + 9 * DAY_MS, "faketime did not apply");
    let named = blocks_named(&moto, "lock-01", n);
    for key in &named {
        let (_, block_until, _) = lock_of(&rt, &s3, key);
        assert!(block_until >= until, "{key} ends before point {n}");
    }
    // Most of its blocks are point 2's, written nine days before on the receiver's clock, and
    // locked too briefly for it until the keeper extended them.
    let reused: Vec<&(String, u64)> = old.iter().filter(|(k, _)| named.contains(k)).collect();
    assert!(reused.len() >= 8, "{} blocks reused", reused.len());
    for (key, before) in reused {
        assert!(
            *before < until,
            "{key} needed no extension: nothing was tested"
        );
    }
    assert!(
        rx.log_text().contains("lock keeper: blocks checked"),
        "{}",
        rx.log_text()
    );
    for p in rx.points("lock-01") {
        let n = p["point"].as_u64().unwrap().to_string();
        rx.expect_restore("lock-01", "root", &n, &versions[2]);
    }
}
