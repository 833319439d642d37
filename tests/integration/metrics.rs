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
        why.contains("nothing acknowledged by the receiver")
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

/// Prometheus's HTTP API at `addr`: the first value of an instant query, if any (none while
/// Prometheus is still starting: it answers 503 until its storage is ready).
fn query(addr: &str, q: &str) -> Option<f64> {
    let enc: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
    let (code, body) = http_get(addr, &format!("/api/v1/query?query={enc}"));
    if code == 503 {
        return None;
    }
    assert_eq!(code, 200, "{q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Every `lifeboat_*` metric name in a text (alert rules, a dashboard).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("lifeboat_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.starts_with("lifeboat_agent_") || name.starts_with("lifeboat_receiver_") {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The shipped alert rules pass promtool's checks and their own unit tests; a real Prometheus
/// scrapes an agent and a receiver during a replication: the backlog rises and drains, the lag
/// falls once the points catch up, the rules load, and every metric the rules and the dashboard
/// name exists.
#[test]
fn prometheus_scrapes_both_daemons_and_the_rules_and_dashboard_hold() {
    let have = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("prometheus") || !have("promtool") {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus and promtool are needed under CI (tests/prereqs.sh installs them)"
        );
        eprintln!("SKIPPED (loudly): no prometheus/promtool here");
        return;
    }
    let pkg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    for args in [
        &["check", "rules", "lifeboat-rules.yml"][..],
        &["test", "rules", "lifeboat-rules.test.yml"][..],
    ] {
        let o = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&pkg)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
    let rules = std::fs::read_to_string(pkg.join("lifeboat-rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(pkg.join("lifeboat-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");

    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    let mut rng = Rng::new(77);
    let mut data = vec![0u8; 48 << 19];
    rng.fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let mut spec = AgentSpec::new("prom-01", &[("root", &img)]);
    spec.extra.push("tracker = \"scan\"".into());
    // 24 MiB of incompressible data at 2 MB/s: a backlog Prometheus sees for seconds, and a
    // rewrite of all of it that holds the next points back about 12 s. (A scan pass may catch
    // the rewrite half done and split it over two points; the larger part still holds one back
    // 6 s. Rewriting only half let a split leave 3 s, under the bound below.)
    spec.bandwidth_mbps = 16;
    let mut agent = Agent::new(w.path(), &rx, &spec);
    // Enrolled, so the certificate expiry metrics the rules name exist on both daemons.
    agent.enroll(&rx, "prom-01");
    agent.spawn();
    let (ra, aa) = (rx.metrics_addr(), agent.metrics_addr());

    let prom_port = free_port();
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let cfg = w.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: lifeboat-receiver\n    static_configs:\n      - targets: [\"{ra}\"]\n\
             \x20 - job_name: lifeboat-agent\n    static_configs:\n      - targets: [\"{aa}\"]\n",
            pkg.join("lifeboat-rules.yml").display()
        ),
    )
    .unwrap();
    let mut prom = Proc::new(w.path().join("prometheus.log"));
    let mut cmd = std::process::Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            w.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"));
    prom.start(cmd);
    wait_for("Prometheus to answer", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&prom_addr).is_ok()
            && query(&prom_addr, "up{job=\"lifeboat-receiver\"}") == Some(1.0)
            && query(&prom_addr, "up{job=\"lifeboat-agent\"}") == Some(1.0)
    });

    // The initial sync, then a rewrite of half the disk: the backlog rises and drains.
    let committed = |n: f64| {
        let aa = aa.clone();
        move || {
            sample(&scrape(&aa), "lifeboat_agent_points_committed_total").is_some_and(|v| v >= n)
        }
    };
    wait_for("the first point", Duration::from_secs(120), committed(1.0));
    let before = value(&scrape(&aa), "lifeboat_agent_points_committed_total");
    rng.fill(&mut data);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&data, 0).unwrap();
    }
    wait_for(
        "a point after the rewrite",
        Duration::from_secs(120),
        committed(before + 2.0),
    );
    let drained = r#"lifeboat_agent_backlog_bytes{disk="root"}"#;
    wait_for(
        "Prometheus to see the backlog drained",
        Duration::from_secs(60),
        || query(&prom_addr, drained) == Some(0.0),
    );
    let peak = query(&prom_addr, &format!("max_over_time({drained}[10m])")).unwrap();
    assert!(peak > 0.0, "Prometheus never saw a backlog");
    let lag = r#"lifeboat_receiver_replication_lag_seconds{server="prom-01",disk="root"}"#;
    let lag_peak = query(&prom_addr, &format!("max_over_time({lag}[10m])")).unwrap();
    assert!(
        lag_peak >= 4.0,
        "no lag while the rewrite crossed: peak {lag_peak}"
    );
    // The receiver's next scrape after the commit shows the lag down again.
    wait_for(
        "Prometheus to see the lag fall",
        Duration::from_secs(30),
        || query(&prom_addr, lag).is_some_and(|now| now <= lag_peak - 2.0),
    );
    rx.expect_restore("prom-01", "root", "latest", &data);

    // The rules loaded into a real server, and every metric they and the dashboard use exists.
    let (_, body) = http_get(&prom_addr, "/api/v1/rules");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), 15, "{body}");
    assert!(loaded.iter().all(|r| r["health"] == "ok"), "{body}");
    let names: Vec<String> = metric_names(&rules)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    // The scrub's metrics exist once a scrub has run (it is a command of its own).
    assert!(rx.cli(&["scrub"]).status.success());
    let missing = || -> Vec<&String> {
        names
            .iter()
            // A fleet's metrics exist only in fleet mode (tests/integration/fleet.rs reads them).
            .filter(|n| !n.starts_with("lifeboat_receiver_fleet_"))
            .filter(|n| query(&prom_addr, &format!("count({{__name__=\"{n}\"}})")).is_none())
            .collect()
    };
    let start = std::time::Instant::now();
    while !missing().is_empty() && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let missing = missing();
    assert!(
        missing.is_empty(),
        "metrics the rules or the dashboard use but no daemon exposes: {missing:?}"
    );
    // (The agent runs to the end: a target that goes down has its series marked stale.)
    agent.kill();
    prom.kill();
}
