//! The fleet's block sweep (moto in server mode, on loopback): one receiver deletes the blocks
//! no server of the fleet names, while the others keep answering dedupe queries. A block
//! another receiver answered "held" for is never deleted; a block brought during the sweep is
//! written again after it; a holder that stopped renewing loses its lease rather than hold
//! the sweep up; and what is left is exactly what the bucket's servers name.

use lifeboat_common::block::hash_block;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::BlockHash;
use lifeboat_receiver::fleet::bucket::BucketFleet;
use lifeboat_receiver::fleet::{Batches, Fleet, Taken};
use lifeboat_receiver::store::{BlockStore, VerifiedBlock};
use lifeboat_tests::moto::Moto;
use lifeboat_tests::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BUCKET: &str = "lifeboat-sweep";

/// Receivers A and B of one fleet on the bucket (created here), running.
fn two_receivers(w: &std::path::Path, moto: &Moto, lease_secs: u64) -> (Receiver, Receiver) {
    moto.create_bucket(BUCKET);
    crate::fleet::fleet_on(w, (&moto.url(), &moto.url()), BUCKET, lease_secs, |_| {})
}

/// Two receivers' fleets in this process, over the state directories of a fleet made by
/// `fleet_on` (stopped): A and B, each with its own dedupe index and batches.
fn in_process(w: &std::path::Path, moto: &Moto) -> (BucketFleet, BucketFleet, Receiver, Receiver) {
    let (mut a, mut b) = two_receivers(w, moto, 3);
    a.kill();
    b.kill();
    (
        crate::fleet::in_process(&a),
        crate::fleet::in_process(&b),
        a,
        b,
    )
}

fn block(content: &[u8]) -> VerifiedBlock {
    let mut plain = content.to_vec();
    plain.resize(lifeboat_common::BLOCK_SIZE, 0);
    let hash = hash_block(&plain);
    let (codec, data) = lifeboat_common::codec::encode(&plain, 1).unwrap();
    lifeboat_receiver::store::verify(hash, codec, data).unwrap()
}

fn in_bucket(moto: &Moto, hash: &BlockHash) -> bool {
    let hex = hash.to_hex();
    moto.get(BUCKET, &format!("fleet/blocks/{}/{hex}", &hex[..2]))
        .is_some()
}

/// B's rounds as `serve` runs them, until `stop`: renewals every 300 ms, and beside them (a
/// barrier may wait up to 10 s) the sweep followed with its barrier.
fn rounds(fb: &BucketFleet, batches: &Batches, stop: &AtomicBool) {
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                fb.renew();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        while !stop.load(Ordering::SeqCst) {
            let _ = fb.follow_sweep(batches, true);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

/// Sets its flag when dropped: a failed assertion stops the threads of a scope it is in.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The race the epoch exists for. Receiver B told a batch that block X is held before the
/// sweep opened; the batch journals X only after B is fenced (and after a pause long enough
/// for the sweeper to delete X, were it not waited for). B acknowledges the sweep only once
/// that batch is done, so the sweeper reads X's reference before deleting and keeps it. A
/// batch that brings Y after the fence waits for the sweep to end, which deletes Y (nothing
/// names it), and then writes Y again.
#[test]
fn a_sweep_never_deletes_a_block_another_receiver_answered_for() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (fa, fb, _a, _b) = in_process(w.path(), &moto);
    let (ba, bb) = (Batches::default(), Batches::default());
    let (x, y) = (block(b"answered for"), block(b"brought during the sweep"));
    assert_eq!(
        fb.store()
            .insert(&[block(b"answered for"), block(b"brought during the sweep")])
            .unwrap(),
        2
    );
    // Older than a grace of zero by the bucket's clock (whole seconds).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fb.take("race-01").unwrap(), Taken::Held);
    fb.follow_sweep(&bb, false).unwrap();
    let answered = bb.enter();
    assert!(
        fb.store().has(&x.hash).unwrap(),
        "X is held before any sweep"
    );
    let stop = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let sweeper = s.spawn(|| fa.sweep(Duration::ZERO, &ba));
        let b_rounds = s.spawn(|| rounds(&fb, &bb, &stop));
        let _stop = StopOnDrop(&stop);
        wait_for("B to be fenced", Duration::from_secs(60), || {
            fb.store().sweep_fenced().is_some()
        });
        assert!(
            !fb.store().has(&x.hash).unwrap(),
            "a candidate is not held while fenced"
        );
        assert!(
            fb.store().holds(&x.hash).unwrap(),
            "but it is still in the bucket"
        );
        // Time enough for a sweeper that did not wait to delete X.
        std::thread::sleep(Duration::from_secs(3));
        fb.journal("race-01", &vec![("root".into(), vec![(0, x.hash)])])
            .unwrap();
        drop(answered);
        // A batch after the fence, bringing Y: it waits for the sweep to end.
        let late = bb.enter();
        fb.wait_for_sweep(&[y.hash], late.generation());
        assert_eq!(
            fb.store().sweep_fenced(),
            None,
            "the wait ended with B still fenced"
        );
        assert!(
            !in_bucket(&moto, &y.hash),
            "the wait ended before the sweep deleted Y"
        );
        let report = sweeper.join().unwrap().unwrap();
        stop.store(true, Ordering::SeqCst);
        b_rounds.join().unwrap();
        report
    });
    assert!(report.ran, "{report:?}");
    assert_eq!(
        (report.candidates, report.deleted, report.kept),
        (2, 1, 1),
        "{report:?}"
    );
    assert!(
        in_bucket(&moto, &x.hash),
        "X was deleted though B's batch named it"
    );
    // The waiting batch now writes Y again: it is new in the bucket, and held.
    let y_hash = y.hash;
    assert_eq!(fb.store().insert(&[y]).unwrap(), 1);
    assert!(in_bucket(&moto, &y_hash));
    assert!(fb.store().has(&x.hash).unwrap() && fb.store().sweep_fenced().is_none());
}

/// A holder that stopped renewing (paused, or dead) does not hold the sweep up: once its
/// lease went a whole period and a margin unrenewed, the sweeper ends it, and the holder,
/// resumed, loses the lease at its next renewal and acknowledges nothing more.
#[test]
fn a_sweep_ends_a_paused_holders_lease_and_the_holder_acknowledges_nothing_after() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (fa, fb, _a, _b) = in_process(w.path(), &moto);
    let ba = Batches::default();
    let z = block(b"named by nothing");
    fb.store().insert(&[block(b"named by nothing")]).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fb.take("paused-01").unwrap(), Taken::Held);
    // B is "paused" from here: no renewal, no follow, no acknowledgement.
    let t = Instant::now();
    let report = fa.sweep(Duration::ZERO, &ba).unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "the sweep went on before the lease could have run out"
    );
    assert_eq!((report.candidates, report.deleted), (1, 1), "{report:?}");
    assert!(!in_bucket(&moto, &z.hash));
    let lease: serde_json::Value =
        serde_json::from_slice(&moto.get(BUCKET, "fleet/leases/paused-01.json").unwrap()).unwrap();
    assert_eq!(lease["holder"], "", "{lease}");
    // B resumes: its renewal fails, and nothing more is acknowledged for the server.
    fb.renew();
    assert!(!fb.holds("paused-01"));
    let e = fb
        .journal("paused-01", &vec![("root".into(), vec![(0, z.hash)])])
        .unwrap_err();
    assert!(e.to_string().contains("no longer holds its lease"), "{e}");
}

/// Every block named by a server's state in the bucket: live bases, journal segments and
/// point manifests.
fn named(moto: &Moto) -> HashSet<BlockHash> {
    let mut out = HashSet::new();
    for key in moto.keys(BUCKET, "fleet/servers/") {
        let Some(raw) = moto.get(BUCKET, &key) else {
            continue;
        };
        if key.contains("/journal/") {
            let records = lifeboat_receiver::fleet::segment::decode(&raw).unwrap();
            out.extend(records.into_iter().flat_map(|(_, r)| r).map(|(_, h)| h));
        } else if key.contains("/live/") || key.ends_with(".manifest") {
            out.extend(Manifest::decode(&raw).unwrap().hashes);
        }
    }
    out.remove(&BlockHash::ZERO);
    out
}

fn blocks(moto: &Moto) -> HashSet<BlockHash> {
    moto.keys(BUCKET, "fleet/blocks/")
        .iter()
        .filter_map(|k| BlockHash::from_hex(k.rsplit('/').next()?))
        .collect()
}

/// End to end: server web-01 replicates through A, web-02 (which starts as a copy of web-01's
/// disk, so its blocks are web-01's first ones) through B. web-01 is rewritten whole three
/// times; retention at A deletes its older points; A's sweep deletes the blocks nothing names
/// any more while both agents stay connected, and keeps web-02's (named only by B's server).
/// What is left is exactly what the bucket's servers name; every newest point restores
/// byte-exact from either receiver; and a block the sweep deleted, written again on web-02,
/// is sent again (B's index dropped it) and restores.
#[test]
fn a_fleet_sweep_deletes_what_no_server_names_and_nothing_else() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, b) = two_receivers(w.path(), &moto, 3);
    let (img1, img2) = (w.path().join("web-01.img"), w.path().join("web-02.img"));
    let v1 = random_image(&img1, 8, 41);
    std::fs::write(&img2, &v1).unwrap();
    let mut agent1 = Agent::new(w.path(), &a, &AgentSpec::new("web-01", &[("root", &img1)]));
    let mut agent2 = Agent::new(w.path(), &b, &AgentSpec::new("web-02", &[("root", &img2)]));
    agent1.spawn();
    agent2.spawn();
    let newest = |rx: &Receiver, server: &str| {
        rx.points(server)
            .last()
            .map_or(0, |p| p["point"].as_u64().unwrap())
    };
    wait_for("a point of each server", Duration::from_secs(90), || {
        newest(&a, "web-01") > 0 && newest(&b, "web-02") > 0
    });
    let mut versions = Vec::new();
    for seed in [42, 43, 44] {
        let before = newest(&a, "web-01");
        versions.push(random_image(&img1, 8, seed));
        wait_for(
            "a point of the new version",
            Duration::from_secs(90),
            || newest(&a, "web-01") > before,
        );
    }
    let v4 = versions.last().unwrap().clone();
    // Four versions of 8 blocks, web-02's shared (more if a scan caught a rewrite halfway).
    let before = blocks(&moto).len();
    assert!(before >= 32, "{before} blocks");
    // Retention keeps the newest point (and at most one more, across a 10-minute boundary):
    // at least one rewritten version is named by nothing then. No grace.
    a.restart_with_retention(0, 1, 0);
    wait_for(
        "the sweep to delete blocks",
        Duration::from_secs(120),
        || a.log_text().contains("block sweep closed") && blocks(&moto).len() < before,
    );
    wait_for("B to end its fence", Duration::from_secs(60), || {
        b.log_text().contains("block sweep closed")
    });
    let left = blocks(&moto);
    let want = named(&moto);
    assert_eq!(left, want, "blocks left != blocks named");
    assert!(
        left.len() <= before - 8,
        "{} of {before} blocks left",
        left.len()
    );
    for h in v1.chunks(lifeboat_common::BLOCK_SIZE).map(hash_block) {
        assert!(left.contains(&h), "a block only web-02 names was deleted");
    }
    // web-01's agent stops first: a newer point would let retention delete the one restored.
    agent1.kill();
    let n1 = newest(&a, "web-01").to_string();
    let n2 = newest(&b, "web-02").to_string();
    for rx in [&a, &b] {
        rx.expect_restore("web-01", "root", &n1, &v4);
        rx.expect_restore("web-02", "root", &n2, &v1);
    }
    // web-02 now holds a version the sweep deleted: B no longer holds those blocks for
    // dedupe, so the agent sends them.
    let gone = versions
        .iter()
        .find(|v| {
            v.chunks(lifeboat_common::BLOCK_SIZE)
                .all(|c| !left.contains(&hash_block(c)))
        })
        .expect("a version whose blocks were all deleted")
        .clone();
    // Written in place (no truncation for a scan to see), then two points: the second began
    // after the write.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img2)
        .unwrap()
        .write_all_at(&gone, 0)
        .unwrap();
    let before = newest(&b, "web-02");
    wait_for("web-02's new points", Duration::from_secs(90), || {
        newest(&b, "web-02") >= before + 2
    });
    let n2 = newest(&b, "web-02").to_string();
    agent2.kill();
    for rx in [&a, &b] {
        rx.expect_restore("web-02", "root", &n2, &gone);
    }
}

/// The sessions' side of the fence, end to end. A sweep is held at its most dangerous moment,
/// between the sweeper's last reading of the references and its deletes; meanwhile the agent
/// of web-01 (at receiver B) writes a block whose content is a candidate. B, fenced, answers
/// that it lacks the block, and the batch that brings it waits for the sweep to end, then
/// writes it again: the point that names it restores. (A batch that did not wait would find
/// the block still there, be journaled where the sweeper no longer reads, and be acknowledged
/// for a block the sweep then deletes.)
#[test]
fn a_block_brought_while_a_sweep_deletes_is_written_again_after_it() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, mut b) = two_receivers(w.path(), &moto, 3);
    a.kill();
    let fa = crate::fleet::in_process(&a);
    // A block nothing names, older than a grace of zero: the sweep's one candidate. B is
    // restarted so that its dedupe index (listed at start) holds it: only the fence stops B
    // from answering "held" for it.
    let c = random_image(&w.path().join("c.img"), 1, 52);
    fa.store().insert(&[block(&c)]).unwrap();
    let c_hash = hash_block(&c);
    std::thread::sleep(Duration::from_millis(1100));
    b.kill();
    b.restart();
    let img = w.path().join("web-01.img");
    let mut data = random_image(&img, 8, 51);
    let mut agent = Agent::new(w.path(), &b, &AgentSpec::new("web-01", &[("root", &img)]));
    agent.spawn();
    let newest = || {
        b.points("web-01")
            .last()
            .map_or(0, |p| p["point"].as_u64().unwrap())
    };
    wait_for("web-01's first point", Duration::from_secs(90), || {
        newest() > 0
    });
    let (img2, c2, b_log) = (img.clone(), c.clone(), b.proc.log.clone());
    let waits = "a batch waits for the fleet's block sweep to end";
    fa.test_before_deletes(move || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&c2, 3 * lifeboat_common::BLOCK_SIZE as u64)
            .unwrap();
        // The agent sends it, and B's batch waits (were it not to wait, it would be
        // acknowledged here, and the block deleted next).
        wait_for(
            "B's batch to wait for the sweep",
            Duration::from_secs(60),
            || std::fs::read_to_string(&b_log).is_ok_and(|l| l.contains(waits)),
        );
    });
    let report = fa.sweep(Duration::ZERO, &Batches::default()).unwrap();
    assert_eq!((report.candidates, report.deleted), (1, 1), "{report:?}");
    data[3 * lifeboat_common::BLOCK_SIZE..4 * lifeboat_common::BLOCK_SIZE].copy_from_slice(&c);
    // Two points after the sweep: the second began after the block was acknowledged.
    let after = newest();
    wait_for(
        "two points after the sweep",
        Duration::from_secs(90),
        || newest() >= after + 2,
    );
    agent.kill();
    assert!(
        in_bucket(&moto, &c_hash),
        "the block the agent brought during the sweep was deleted by it"
    );
    let blog = b.log_text();
    assert!(blog.contains("block sweep open"), "{blog}");
    let n = newest().to_string();
    b.expect_restore("web-01", "root", &n, &data);
}

/// A receiver asked to stop while its sweep waits for an acknowledgement gives the sweep up at
/// once (deleting nothing, the epoch closed) rather than hold its stop up to the sweep's
/// deadline; the candidate is still in the bucket.
#[test]
fn a_stopping_receiver_gives_its_sweep_up_and_closes_it() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    // A lease period of 10 s: the sweeper would wait 50 s for the missing acknowledgement.
    let (mut a, mut b) = two_receivers(w.path(), &moto, 10);
    a.kill();
    b.kill();
    // B, in this process, holds a server and renews its lease but never follows the sweep.
    let fb = crate::fleet::in_process(&b);
    let z = block(b"named by no server");
    let z_hash = z.hash;
    fb.store().insert(&[z]).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fb.take("quiet-01").unwrap(), Taken::Held);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                fb.renew();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let _stop = StopOnDrop(&stop);
        // A sweeps at its first pass (no grace), and waits for B's acknowledgement.
        a.restart_with_retention(0, 1, 0);
        wait_for("A's sweep to open", Duration::from_secs(60), || {
            a.log_text().contains("block sweep opened")
        });
        a.signal(libc::SIGTERM);
        // Well inside the 50 s the sweep would otherwise wait for the acknowledgement.
        assert_eq!(
            a.proc.wait_within(Duration::from_secs(35)),
            Some(true),
            "A did not stop cleanly, or not before the sweep's wait was over:\n{}",
            a.log_text()
        );
    });
    let log = a.log_text();
    assert!(
        log.contains("the receiver is stopping: sweep 1 given up, nothing deleted"),
        "{log}"
    );
    let epoch: serde_json::Value =
        serde_json::from_slice(&moto.get(BUCKET, "fleet/gc/epoch").unwrap()).unwrap();
    assert_eq!(
        (epoch["state"].as_str(), epoch["deleted"].as_u64()),
        (Some("closed"), Some(0)),
        "{epoch}"
    );
    assert!(in_bucket(&moto, &z_hash));
}
