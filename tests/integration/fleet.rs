//! A fleet: two receivers sharing one bucket (moto in server mode, on loopback), each server
//! owned by one of them through a lease. A receiver SIGKILLed mid-stream is taken over by the
//! other and the agent completes without a full resync; a receiver paused past its lease
//! acknowledges nothing more; every point restores from either receiver.

use lifeboat_common::codec::Codec;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::protocol::{ErrorCode, Message};
use lifeboat_tests::moto::Moto;
use lifeboat_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

const BUCKET: &str = "lifeboat-fleet";

/// Two receivers of one fleet (one CA, one bucket), under `root/a` and `root/b`, running.
fn fleet(root: &Path, moto: &Moto, lease_secs: u64) -> (Receiver, Receiver) {
    fleet_through(root, moto, &moto.url(), lease_secs)
}

/// As [`fleet`], with receiver A reaching the bucket through `a_endpoint` (a proxy).
fn fleet_through(
    root: &Path,
    moto: &Moto,
    a_endpoint: &str,
    lease_secs: u64,
) -> (Receiver, Receiver) {
    moto.create_bucket(BUCKET);
    fleet_on(root, (a_endpoint, &moto.url()), BUCKET, lease_secs, |_| {})
}

/// Two receivers of one fleet on `bucket` (which exists), under `root/a` and `root/b`, reaching
/// it at `endpoints` (A's, B's), each configured further by `configure` (stopped), running.
pub(crate) fn fleet_on(
    root: &Path,
    endpoints: (&str, &str),
    bucket: &str,
    lease_secs: u64,
    configure: impl Fn(&mut Receiver),
) -> (Receiver, Receiver) {
    let (ra, rb) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&ra).unwrap();
    std::fs::create_dir_all(&rb).unwrap();
    let mut a = Receiver::start(&ra);
    let mut b = Receiver::start(&rb);
    a.kill();
    b.kill();
    b.share_ca_with(&a);
    a.join_fleet(endpoints.0, bucket, lease_secs);
    b.join_fleet(endpoints.1, bucket, lease_secs);
    configure(&mut a);
    configure(&mut b);
    a.restart();
    b.restart();
    (a, b)
}

/// The fleet of receiver `rx` (stopped) in this process, as its commands use it: with its
/// own dedupe index, leases and sweep following.
pub(crate) fn in_process(rx: &Receiver) -> lifeboat_receiver::fleet::bucket::BucketFleet {
    // The receivers' commands read AWS credentials from the environment, as serve does.
    for (k, v) in &rx.env {
        std::env::set_var(k, v);
    }
    lifeboat_receiver::fleet::for_commands(&rx.dir)
        .unwrap()
        .unwrap()
}

/// The agent replicates through receiver A; A is SIGKILLed mid-stream; B takes the server's
/// lease once it expired, takes its state from the bucket, and the agent completes there,
/// sending only what A had not acknowledged. Every point restores byte-exact from either.
#[test]
fn a_killed_receivers_server_moves_to_another_and_completes_without_a_resync() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, b) = fleet(w.path(), &moto, 3);
    let img = w.path().join("disk.img");
    let data = random_image(&img, 120, 17);
    let mut spec = AgentSpec::new("fleet-01", &[("root", &img)]);
    spec.bandwidth_mbps = 32; // about 15 s for 60 MiB
    spec.more_receivers = vec![format!("127.0.0.1:{}", b.port)];
    let mut agent = Agent::new(w.path(), &a, &spec);
    agent.spawn();
    wait_for(
        "blocks to reach receiver A",
        Duration::from_secs(60),
        || a.try_counter("fleet-01", "blocks_stored").unwrap_or(0) >= 20,
    );
    a.kill();
    let acked_at_a = a.counter("fleet-01", "blocks_stored");
    assert!(
        moto.keys(BUCKET, "fleet/servers/fleet-01/points/")
            .is_empty(),
        "the sync finished before the kill; nothing was tested"
    );
    wait_for(
        "a point committed through receiver B",
        Duration::from_secs(120),
        || !b.points("fleet-01").is_empty(),
    );
    agent.kill();
    // What B was sent, data or reference: only what A had not made durable. (A's count is
    // as of its last status save: a lower bound.) Had B not taken A's state from the bucket,
    // the agent would have sent B every block again, most as references.
    let sent_to_b =
        b.counter("fleet-01", "blocks_received") + b.counter("fleet-01", "refs_received");
    assert!(
        sent_to_b + acked_at_a <= 120,
        "B was sent {sent_to_b} blocks after A had stored {acked_at_a}: sent again"
    );
    let blog = b.log_text();
    assert!(
        blog.contains("took the server's state from the bucket"),
        "{blog}"
    );
    // The agent went to B by itself, and B first sent it back to the dead holder.
    let alog = agent.log_text();
    assert!(
        alog.contains("redirected to the receiver that holds this server"),
        "{alog}"
    );
    // (The agent may adopt B's manifest: A made batches durable whose acks the kill cut off;
    // the verify scan then finds those blocks already there, as the count above shows.)
    // Every point listed, from either receiver (A's serve is dead: its CLI reads the bucket).
    let points_b = b.points("fleet-01");
    let points_a = a.points("fleet-01");
    assert_eq!(points_a, points_b);
    for p in &points_b {
        let n = p["point"].as_u64().unwrap().to_string();
        b.expect_restore("fleet-01", "root", &n, &data);
        a.expect_restore("fleet-01", "root", &n, &data);
    }
    // Blocks are in the bucket only.
    assert!(a.store_blocks().is_empty() && b.store_blocks().is_empty());
    assert_eq!(moto.keys(BUCKET, "fleet/blocks/").len(), 120);
}

const DISK: u64 = 4 * lifeboat_common::BLOCK_SIZE as u64;

/// Sends Block `seq` (disk handle 0, block `index`) holding `content`; returns the block as
/// named (zero-padded).
fn send_block(c: &mut RawClient, seq: u64, index: u64, content: &[u8]) -> Vec<u8> {
    let mut block = content.to_vec();
    block.resize(lifeboat_common::BLOCK_SIZE, 0);
    let mut out = Vec::new();
    Message::Block {
        seq,
        handle: 0,
        index,
        hash: lifeboat_common::block::hash_block(&block),
        codec: Codec::Raw,
        data: content.to_vec(),
    }
    .encode(&mut out);
    c.send(&out).unwrap();
    block
}

/// Opens disk "root" (handle 0, 4 blocks) without waiting for the answer.
fn send_open(c: &mut RawClient) {
    let mut out = Vec::new();
    Message::OpenDisk {
        handle: 0,
        disk_id: "root".into(),
        size: DISK,
    }
    .encode(&mut out);
    c.send(&out).unwrap();
}

/// Opens disk "root" and checks that the receiver's live state of it is `want`.
fn expect_opened_as(c: &mut RawClient, want: &Manifest) {
    send_open(c);
    let opened = c.read_frames(1);
    assert!(
        matches!(&opened[..], [Message::DiskOpened { digest, .. }] if *digest == want.digest()),
        "{opened:?}"
    );
}

/// The replies to a block sent to a receiver that lost the server: an error naming the lease,
/// and no acknowledgement.
fn expect_refused_for_the_lease(c: &mut RawClient) {
    let replies = c.read_frames(3);
    assert!(
        !replies.iter().any(|m| matches!(m, Message::Acks { .. })),
        "acknowledged without the lease: {replies:?}"
    );
    assert!(
        replies.iter().any(|m| matches!(m, Message::Error { code: ErrorCode::Busy, message, .. } if message.contains("lease"))),
        "{replies:?}"
    );
}

/// Connects to `rx` and says Hello; returns the client and the first reply.
fn connect(rx: &Receiver, server: &str) -> (RawClient, Message) {
    let mut c = RawClient::connect(rx);
    c.preface();
    c.send(&hello_frame(server, &rx.token, "0123456789abcdef"))
        .unwrap();
    let first = c.read_frames(1).pop().expect("an answer to Hello");
    (c, first)
}

/// Receiver A holds a server and acknowledged a block; A is paused (SIGSTOP) past the lease;
/// B, which first sent the agent to A, takes the server over with A's acknowledged block in
/// its state; A, resumed, acknowledges nothing more for that server.
#[test]
fn a_receiver_paused_past_its_lease_acknowledges_nothing_more() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, b) = fleet(w.path(), &moto, 3);
    let (mut ca, first) = connect(&a, "paused-01");
    assert!(matches!(first, Message::Welcome { .. }), "{first:?}");
    send_open(&mut ca);
    let block0 = send_block(&mut ca, 1, 0, b"acknowledged by A");
    let replies = ca.read_frames(2);
    assert!(
        replies
            .iter()
            .any(|m| matches!(m, Message::Acks { seqs } if seqs == &vec![1])),
        "{replies:?}"
    );

    // While A holds it, B sends agents to A.
    let (_, first) = connect(&b, "paused-01");
    match first {
        Message::Redirect { address, .. } => {
            assert_eq!(address, format!("127.0.0.1:{}", a.port))
        }
        other => panic!("B did not redirect to A: {other:?}"),
    }

    a.signal(libc::SIGSTOP);
    // B takes over once the lease went a whole period unrenewed.
    let started = Instant::now();
    let mut cb = loop {
        let (c, first) = connect(&b, "paused-01");
        match first {
            Message::Welcome { .. } => break c,
            Message::Redirect { .. } => {}
            other => panic!("unexpected answer from B: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B never took the lease"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "B took the lease before it could have expired"
    );
    // B's state holds what A acknowledged: its digest is that of a disk with block 0.
    let mut want = Manifest::zeroed(DISK);
    want.hashes[0] = lifeboat_common::block::hash_block(&block0);
    expect_opened_as(&mut cb, &want);

    // A resumes: the block its paused session now gets is refused, never acknowledged.
    a.signal(libc::SIGCONT);
    send_block(&mut ca, 2, 1, b"sent to A after it lost the lease");
    expect_refused_for_the_lease(&mut ca);
    // A counts the lease it lost; B the server it took and holds.
    assert!(a.is_running(), "A died: {}", a.log_text());
    let (_, m) = http_get(&a.metrics_addr(), "/metrics");
    assert!(
        sample(&m, "lifeboat_receiver_fleet_leases_lost_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    let (_, m) = http_get(&b.metrics_addr(), "/metrics");
    assert_eq!(
        sample(&m, "lifeboat_receiver_fleet_servers_held"),
        Some(1.0),
        "{m}"
    );
    assert!(sample(&m, "lifeboat_receiver_fleet_takes_total").unwrap_or(0.0) >= 1.0);
    // Nothing of it reached the server's state in the bucket: B's view is unchanged.
    drop(cb);
    b.wait_disconnected("paused-01");
    let (mut cb, first) = connect(&b, "paused-01");
    assert!(matches!(first, Message::Welcome { .. }), "{first:?}");
    expect_opened_as(&mut cb, &want);
}

/// A journal segment that reaches the bucket but whose answer comes back after the lease ran
/// out (renewals answered as late) is not acknowledged: the lease is checked after the write
/// returned, not only before it was sent.
#[test]
fn a_write_that_returns_after_the_lease_ran_out_is_not_acknowledged() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let proxy = lifeboat_tests::slowdown::SlowDown::start(moto.addr, 1_000_000);
    let (a, _b) = fleet_through(w.path(), &moto, &proxy.url(), 3);
    let (mut ca, first) = connect(&a, "late-01");
    assert!(matches!(first, Message::Welcome { .. }), "{first:?}");
    send_open(&mut ca);
    send_block(&mut ca, 1, 0, b"acknowledged in time");
    let replies = ca.read_frames(2);
    assert!(
        replies.iter().any(|m| matches!(m, Message::Acks { .. })),
        "{replies:?}"
    );
    // From now on the journal's and the lease's answers take 6 s: two lease periods.
    proxy.hold(&["/journal/", "/leases/"], Duration::from_secs(6));
    send_block(&mut ca, 2, 1, b"its segment is written, but late");
    expect_refused_for_the_lease(&mut ca);
    // The segment itself did reach the bucket (this is the case the check after it is for).
    assert!(
        moto.keys(BUCKET, "fleet/servers/late-01/journal/").len() >= 2,
        "{:?}",
        moto.keys(BUCKET, "fleet/servers/late-01/")
    );
    proxy.hold(&[], Duration::ZERO);
}

/// Retention in a fleet: the receiver holding a server applies it, deleting points from the
/// bucket (record first) and its own catalog; another receiver's listing follows the bucket,
/// and what is left restores from it.
#[test]
fn the_holder_applies_retention_and_every_receiver_lists_what_is_left() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, b) = fleet(w.path(), &moto, 3);
    let img = w.path().join("disk.img");
    let data = random_image(&img, 8, 5);
    let mut agent = Agent::new(w.path(), &a, &AgentSpec::new("kept-01", &[("root", &img)]));
    agent.spawn();
    let records = |m: &Moto| {
        m.keys(BUCKET, "fleet/servers/kept-01/points/")
            .into_iter()
            .filter(|k| k.ends_with("/point.json"))
            .count()
    };
    wait_for("four points in the bucket", Duration::from_secs(60), || {
        records(&moto) >= 4
    });
    // Keep only the newest (and at most one more, should a 10-minute boundary pass).
    a.restart_with_retention(0, 1, 10);
    wait_for(
        "retention to delete points in the bucket",
        Duration::from_secs(60),
        || {
            let n = records(&moto);
            let listed = a.points("kept-01").len();
            (1..=2).contains(&n) && (1..=2).contains(&listed)
        },
    );
    // Compaction (off the sessions' threads) made a point's manifest each disk's live base and
    // deleted the bases and journal segments it superseded.
    wait_for(
        "the journal compacted into a live base",
        Duration::from_secs(30),
        || {
            let live = moto.keys(BUCKET, "fleet/servers/kept-01/disks/root/live/");
            let journal = moto.keys(BUCKET, "fleet/servers/kept-01/journal/");
            (1..=2).contains(&live.len()) && journal.len() <= 2
        },
    );
    agent.kill();
    assert!(
        a.log_text().contains("retention: point deleted"),
        "{}",
        a.log_text()
    );
    let in_bucket = records(&moto);
    let listed_b = b.points("kept-01");
    assert_eq!(listed_b.len(), in_bucket, "B lists what the bucket holds");
    for p in &listed_b {
        let n = p["point"].as_u64().unwrap().to_string();
        b.expect_restore("kept-01", "root", &n, &data);
    }
    // No manifest of a deleted point is left behind.
    let manifests = moto
        .keys(BUCKET, "fleet/servers/kept-01/points/")
        .into_iter()
        .filter(|k| k.ends_with(".manifest"))
        .count();
    assert!(
        manifests <= in_bucket + 1,
        "{manifests} manifests for {in_bucket} points"
    );
}

/// A point whose objects vanish under a receiver listing it (retention at its holder deletes
/// the record, then the manifests; here a manifest is gone with the record left) is left out
/// of the list, named in the log, and the other points are listed. (`points` used to fail
/// whole: "vanished while it was being read"; seen when retention raced a listing.)
#[test]
fn a_point_missing_an_object_is_left_out_of_the_list_not_fatal() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (a, b) = fleet(w.path(), &moto, 3);
    let img = w.path().join("disk.img");
    random_image(&img, 4, 9);
    let mut agent = Agent::new(w.path(), &a, &AgentSpec::new("torn-01", &[("root", &img)]));
    agent.spawn();
    wait_for("three points", Duration::from_secs(60), || {
        a.points("torn-01").len() >= 3
    });
    agent.kill();
    let records: Vec<String> = moto
        .keys(BUCKET, "fleet/servers/torn-01/points/")
        .into_iter()
        .filter(|k| k.ends_with("/point.json"))
        .collect();
    let victim = records[0].replace("point.json", "root.manifest");
    moto.delete(BUCKET, &victim);
    // B has listed nothing of torn-01 yet: it reads every point now.
    let out = b.cli(&["points", "--server", "torn-01", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), records.len() - 1, "{listed:?}");
    assert!(
        stderr.contains("root.manifest") && stderr.contains("missing"),
        "{stderr}"
    );
}

/// Retention and compaction waiting on a slow bucket hold no session up: with the answers to
/// DeleteObjects held back for two minutes (and a request allowed to take that long), a
/// receiver whose retention is stuck in one still takes its agent's blocks and commits point
/// after point (each compaction's deletes held back as well).
#[test]
fn retention_stuck_on_the_bucket_holds_no_session_up() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let proxy = lifeboat_tests::slowdown::SlowDown::start(moto.addr, 1_000_000);
    let (mut a, _b) = fleet_through(w.path(), &moto, &proxy.url(), 3);
    a.kill();
    let toml = a.dir.join("receiver.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("attempt_timeout_secs = 10", "attempt_timeout_secs = 300");
    std::fs::write(&toml, text).unwrap();
    a.restart();
    let img = w.path().join("disk.img");
    random_image(&img, 8, 6);
    let mut agent = Agent::new(
        w.path(),
        &a,
        &AgentSpec::new("slowgc-01", &[("root", &img)]),
    );
    agent.spawn();
    let newest = |rx: &Receiver| {
        rx.points("slowgc-01")
            .last()
            .map_or(0, |p| p["point"].as_u64().unwrap())
    };
    wait_for("three points", Duration::from_secs(60), || newest(&a) >= 3);
    // Deleting a point ends in a DeleteObjects (`?delete`): its answers now take 2 minutes.
    proxy.hold(&["?delete"], Duration::from_secs(120));
    a.restart_with_retention(0, 1, 10);
    // Stuck: retention waits for a held answer, and has deleted no point yet.
    let stuck = || {
        proxy.holding.load(std::sync::atomic::Ordering::SeqCst) > 0
            && !a.log_text().contains("retention: point deleted")
    };
    wait_for(
        "retention to be stuck deleting a point",
        Duration::from_secs(60),
        &stuck,
    );
    // Two new points: after the first, the compaction of the journal (its deletes are held
    // back too) must not hold the session up either.
    for seed in [7, 8] {
        let before = newest(&a);
        mutate(&img, seed, 2);
        wait_for(
            "a new point while retention waits on the bucket",
            Duration::from_secs(60),
            || newest(&a) > before,
        );
    }
    assert!(stuck(), "retention finished meanwhile: nothing was tested");
    agent.kill();
    proxy.hold(&[], Duration::ZERO);
}

/// An enrolled agent (its certificate issued by receiver A) moves to receiver B when A dies:
/// B knows its certificate from the bucket. Revoked with A's CLI (A's serve is dead), it is cut
/// off at B within a renewal round, and refused from then on.
#[test]
fn an_enrolled_agent_moves_to_another_receiver_and_a_revocation_reaches_it_there() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, b) = fleet(w.path(), &moto, 3);
    let img = w.path().join("disk.img");
    random_image(&img, 8, 23);
    let mut spec = AgentSpec::new("cert-01", &[("root", &img)]);
    spec.more_receivers = vec![format!("127.0.0.1:{}", b.port)];
    let mut agent = Agent::new(w.path(), &a, &spec);
    agent.enroll(&a, "cert-01");
    agent.spawn();
    wait_for("a point through A", Duration::from_secs(60), || {
        !a.points("cert-01").is_empty()
    });
    a.kill();
    wait_for(
        "the enrolled agent to be served by B",
        Duration::from_secs(90),
        || b.try_counter("cert-01", "blocks_received").is_some(),
    );
    assert!(
        b.log_text()
            .contains("identity record taken from the bucket"),
        "{}",
        b.log_text()
    );
    // Revoked at A (its CLI writes the record to the bucket): B cuts the session.
    let o = a.cli(&["revoke", "--server", "cert-01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for(
        "B to refuse the revoked agent",
        Duration::from_secs(60),
        || b.log_text().contains("identity was revoked"),
    );
    // B logs its refusal before the agent reads it: wait for the agent's side too.
    wait_for(
        "the agent to log the revocation",
        Duration::from_secs(30),
        || agent.log_text().contains("identity was revoked"),
    );
    agent.kill();
}

/// A revocation is never undone by another receiver's write: each receiver writes a server's
/// identity record only over the version it last read, so B, which renewed the agent's
/// certificate after reading the record but before A's revocation reached the bucket, has its
/// write refused, and takes the revocation instead.
#[test]
fn a_revocation_at_one_receiver_is_never_overwritten_by_another() {
    use lifeboat_receiver::fleet::Fleet;
    use lifeboat_receiver::identities::Record;
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (mut a, mut b) = fleet(w.path(), &moto, 3);
    a.kill();
    b.kill();
    let (fa, fb) = (in_process(&a), in_process(&b));
    let enrolled = Record {
        server: "web-01".into(),
        certificate_sha256: "sha256:aa".into(),
        issued_unix_ms: 1_000,
        not_after_unix_ms: 10_000_000,
        enrolled_unix_ms: 1_000,
        previous_sha256: None,
        instance: "0123456789abcdef".into(),
        hostname: "web".into(),
        revoked_unix_ms: None,
    };
    enrolled.save(&b.dir).unwrap();
    fb.push_identity("web-01").unwrap();
    // B reads it again at a handshake; A revokes (its clock far behind B's).
    assert!(!fb.pull_identity("web-01").unwrap());
    lifeboat_receiver::fleet::revoke(&a.dir, "web-01", 2_000).unwrap();
    // B renews the certificate from what it read: later stamps, but an older version.
    let mut renewed = enrolled.clone();
    renewed.certificate_sha256 = "sha256:bb".into();
    renewed.issued_unix_ms = 9_000_000;
    renewed.previous_sha256 = Some("sha256:aa".into());
    renewed.save(&b.dir).unwrap();
    let e = fb.push_identity("web-01").unwrap_err().to_string();
    assert!(e.contains("changed its identity record meanwhile"), "{e}");
    // B takes the revocation, and so does the bucket's every reader.
    assert!(fb.pull_identity("web-01").unwrap());
    let at_b = Record::load(&b.dir, "web-01").unwrap().unwrap();
    assert_eq!(at_b.revoked_unix_ms, Some(2_000), "{at_b:?}");
    assert_eq!(at_b.certificate_sha256, "sha256:aa");
    drop((fa, fb));
}
