//! `/metrics` and `/healthz` of both daemons during a real replication.

use lifeboat_tests::*;
use std::time::Duration;

fn scrape(addr: &str) -> String {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn metrics_and_health_follow_replication() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 32, 0, 5);
    let mut spec = AgentSpec::new("m-01", &[("root", &img)]);
    spec.extra.push("tracker = \"scan\"".into());
    spec.extra.push("health_stall_secs = 10".into());
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let (ra, aa) = (rx.metrics_addr(), agent.metrics_addr());

    // The agent: a point, its lag, its disk caught up, what it read and sent.
    wait_for("the agent's first point", Duration::from_secs(60), || {
        sample(&scrape(&aa), "lifeboat_agent_points_committed_total").is_some_and(|v| v >= 1.0)
    });
    wait_for("the disk to be continuous", Duration::from_secs(60), || {
        sample(
            &scrape(&aa),
            r#"lifeboat_agent_disk_state{disk="root",state="continuous"}"#,
        ) == Some(1.0)
    });
    let m = scrape(&aa);
    let lag = value(&m, r#"lifeboat_agent_replication_lag_seconds{disk="root"}"#);
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    assert_eq!(
        value(&m, r#"lifeboat_agent_backlog_bytes{disk="root"}"#),
        0.0
    );
    assert!(value(&m, r#"lifeboat_agent_read_bytes_total{disk="root"}"#) >= (32 << 19) as f64);
    let raw = value(
        &m,
        r#"lifeboat_agent_sent_uncompressed_bytes_total{disk="root"}"#,
    );
    let wire = value(&m, r#"lifeboat_agent_sent_bytes_total{disk="root"}"#);
    assert!(
        raw > 0.0 && wire > 0.0 && wire <= raw,
        "raw {raw} wire {wire}"
    );
    // The image repeats a block: the repeats are dedupe hits.
    assert!(value(&m, r#"lifeboat_agent_dedupe_hits_total{disk="root"}"#) >= 1.0);
    assert_eq!(value(&m, "lifeboat_agent_connected"), 1.0);
    assert!(m.contains("# TYPE lifeboat_agent_point_duration_seconds histogram"));
    assert_eq!(http_get(&aa, "/healthz"), (200, "ok\n".into()));

    // The receiver: the server's lag on its clock, the agent connected, what arrived.
    let r = scrape(&ra);
    let lag = value(
        &r,
        r#"lifeboat_receiver_replication_lag_seconds{disk="root",server="m-01"}"#,
    );
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    assert_eq!(
        value(&r, r#"lifeboat_receiver_agent_connected{server="m-01"}"#),
        1.0
    );
    assert_eq!(value(&r, "lifeboat_receiver_agents_connected"), 1.0);
    assert!(
        value(
            &r,
            r#"lifeboat_receiver_points_committed_total{server="m-01"}"#
        ) >= 1.0
    );
    assert!(
        value(
            &r,
            r#"lifeboat_receiver_blocks_stored_total{server="m-01"}"#
        ) >= 1.0
    );
    assert!(value(&r, "lifeboat_receiver_store_filesystem_avail_bytes") > 0.0);
    assert_eq!(
        value(
            &r,
            r#"lifeboat_receiver_connections_refused_total{reason="token"}"#
        ),
        0.0
    );
    assert_eq!(http_get(&ra, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&ra, "/nothing").0, 404);

    // A wrong token is counted by its reason.
    let mut bad = AgentSpec::new("m-02", &[("root", &img)]);
    bad.token = Some("not-the-token".into());
    let intruder = Agent::new(w.path(), &rx, &bad);
    assert!(!intruder.run_once(5).status.success());
    wait_for("the refusal to be counted", Duration::from_secs(10), || {
        sample(
            &scrape(&ra),
            r#"lifeboat_receiver_connections_refused_total{reason="token"}"#,
        ) >= Some(1.0)
    });

    // The receiver gone: the agent acknowledges nothing, and says so once past the bound.
    rx.kill();
    wait_for(
        "the agent to turn unhealthy",
        Duration::from_secs(60),
        || http_get(&aa, "/healthz").0 == 503,
    );
    let (_, why) = http_get(&aa, "/healthz");
    assert!(
        why.contains("nothing acknowledged by the receiver for")
            && why.contains("health_stall_secs = 10"),
        "{why}"
    );
    let m = scrape(&aa);
    assert_eq!(value(&m, "lifeboat_agent_connected"), 0.0);
    assert!(value(&m, "lifeboat_agent_reconnects_total") >= 1.0);
    agent.kill();
}

/// A receiver whose store cannot take blocks says so on /healthz.
#[test]
fn a_full_store_makes_the_receiver_unhealthy() {
    let w = workdir();
    let Some(fs) = needs_root("a small filesystem", SmallFs::new(w.path(), 32)) else {
        return;
    };
    let rx = Receiver::start_at(w.path(), &fs.dir.join("rx"));
    let addr = rx.metrics_addr();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let _ballast = fs.fill_leaving(0);
    let (code, why) = http_get(&addr, "/healthz");
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("is full"), "{why}");
}
