//! Leases on a real S3 server (moto in server mode, on loopback), driven through the
//! receiver's own lease code with two clients of their own, as two receivers would be.

use lifeboat_receiver::aws::s3::S3;
use lifeboat_receiver::lease::{Acquired, Current, Held, Leases};
use lifeboat_tests::moto::Moto;
use lifeboat_tests::*;
use std::time::Duration;

/// A client of its own (its own connections) of the S3 server at `url`, with test credentials.
fn client(url: &str, bucket: &str) -> S3 {
    S3::from_client(lifeboat_tests::moto::sdk_client(url), bucket, "fleet/", 4)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A bucket, and the leases of receivers rx-a and rx-b in it, with a 2 s period.
fn two_receivers(moto: &Moto) -> (Leases, Leases, Duration, tokio::runtime::Runtime) {
    moto.create_bucket("lifeboat-leases");
    two_receivers_at(&moto.url())
}

/// As [`two_receivers`], on the S3 server at `url` (its bucket exists or needs none).
fn two_receivers_at(url: &str) -> (Leases, Leases, Duration, tokio::runtime::Runtime) {
    let period = Duration::from_secs(2);
    let leases =
        |id: &str, address: &str| Leases::new(client(url, "lifeboat-leases"), id, address, period);
    (
        leases("rx-a", "10.0.0.1:7443"),
        leases("rx-b", "10.0.0.2:7443"),
        period,
        runtime(),
    )
}

fn held(a: Acquired) -> Option<Held> {
    match a {
        Acquired::Held(h) => Some(h),
        _ => None,
    }
}

/// Two receivers asking for the same free lease at once, 60 times: exactly one holds it each
/// time, and the other is told who does. Then, for 20 leases whose holder went quiet, both
/// wait a whole period and race to take over: again exactly one wins each.
#[test]
fn of_two_receivers_racing_for_a_lease_exactly_one_wins_each_time() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    moto.create_bucket("lifeboat-leases");
    races(&moto.url());
}

/// The same races on a server whose conditional writes are atomic (tests/support/s3_server.rs),
/// each conditional write holding its lock 20 ms so that the racers always overlap. moto checks
/// a condition and then writes, so a race it let through would go unseen; here only the lease
/// logic decides, and the losers' writes are refused (412).
#[test]
fn on_a_server_whose_conditional_writes_are_atomic_exactly_one_wins_each_race() {
    let server = lifeboat_tests::s3_server::S3Server::start();
    server.hold_conditional(Duration::from_millis(20));
    races(&server.url());
    let refused = server.refused.load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused >= 1, "no race ever overlapped: nothing was tested");
}

/// 60 races for a free lease, then 20 takeovers raced, by rx-a and rx-b on the server at `url`.
fn races(url: &str) {
    let (a, b, period, rt) = two_receivers_at(url);
    let mut double = Vec::new();
    for i in 0..60 {
        let server = format!("race-{i}");
        let (ra, rb) = rt.block_on(async { tokio::join!(a.acquire(&server), b.acquire(&server)) });
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let winners = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Acquired::Held(_)))
            .count();
        if winners != 1 {
            double.push((server.clone(), format!("{ra:?} / {rb:?}")));
        }
        // Whoever lost now sees the winner's lease.
        let cur = rt.block_on(a.current(&server)).unwrap();
        let Current::Present { body, .. } = cur else {
            panic!("{server}: no lease after the race");
        };
        assert!(body.holder == "rx-a" || body.holder == "rx-b", "{body:?}");
    }
    assert!(
        double.is_empty(),
        "{} of 60 races ended with two receivers (or none) holding the lease, e.g. {:?}",
        double.len(),
        double.first()
    );

    // Takeovers: rx-c holds 20 leases and goes quiet; rx-a and rx-b each see them, wait a whole
    // period, and race.
    let c = Leases::new(
        client(url, "lifeboat-leases"),
        "rx-c",
        "10.0.0.3:7443",
        period,
    );
    let servers: Vec<String> = (0..20).map(|i| format!("quiet-{i}")).collect();
    for s in &servers {
        assert!(held(rt.block_on(c.acquire(s)).unwrap()).is_some());
        for l in [&a, &b] {
            assert!(matches!(
                rt.block_on(l.acquire(s)).unwrap(),
                Acquired::Owned { ref holder, ref address, .. }
                    if holder == "rx-c" && address == "10.0.0.3:7443"
            ));
        }
    }
    std::thread::sleep(period + Duration::from_millis(200));
    for s in &servers {
        let (ra, rb) = rt.block_on(async { tokio::join!(a.acquire(s), b.acquire(s)) });
        let n = [ra.unwrap(), rb.unwrap()]
            .into_iter()
            .filter(|r| matches!(r, Acquired::Held(_)))
            .count();
        assert_eq!(n, 1, "{s}: {n} receivers took over one lease");
    }
}

/// A holder that renews keeps its lease however long others wait; one that stops is taken
/// over after a period, and its next renewal fails, so it stops acting for the server; a
/// released lease is taken at once.
#[test]
fn renewals_keep_a_lease_and_a_taken_lease_cannot_be_renewed() {
    let w = workdir();
    let Some(moto) = Moto::start(w.path()) else {
        return;
    };
    let (a, b, period, rt) = two_receivers(&moto);
    let mut h = held(rt.block_on(a.acquire("web-01")).unwrap()).unwrap();
    assert!(h.valid(lifeboat_receiver::lease::Moment::now()));
    // Renewed every third of the period for three periods: b never gets it.
    for _ in 0..9 {
        std::thread::sleep(period / 3);
        h = rt.block_on(a.renew("web-01", &h)).unwrap();
        assert!(matches!(
            rt.block_on(b.acquire("web-01")).unwrap(),
            Acquired::Owned { .. }
        ));
    }
    // a goes quiet (as if paused): b takes over after a period, and a's lease has run out by
    // its own count before b could take it.
    let quiet_since = std::time::Instant::now();
    let (taken, asked) = loop {
        // Before the request that takes it: a's lease must have run out by a's own count
        // before b's write could even be sent.
        let asked = lifeboat_receiver::lease::Moment::now();
        if let Some(t) = held(rt.block_on(b.acquire("web-01")).unwrap()) {
            break (t, asked);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(quiet_since.elapsed() >= period - Duration::from_millis(700));
    assert!(!h.valid(asked), "both held web-01");
    let e = rt.block_on(a.renew("web-01", &h)).unwrap_err().to_string();
    assert!(e.contains("another receiver took the lease"), "{e}");
    // b releases; a takes it at once.
    rt.block_on(b.release("web-01", &taken)).unwrap();
    assert!(held(rt.block_on(a.acquire("web-01")).unwrap()).is_some());
}
