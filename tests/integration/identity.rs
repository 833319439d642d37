//! Who an agent is and what time it is: one machine per server id, the receiver's clock for
//! retention and lag.

use lifeboat_tests::*;
use std::time::Duration;

#[test]
fn a_second_machine_with_the_same_server_id_is_refused_naming_both() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 31);
    let spec = AgentSpec::new("web-01", &[("root", &img)]);

    // The first machine replicates continuously.
    let mut first = Agent::new(w.path(), &rx, &spec);
    first.spawn();
    wait_for("the first point", Duration::from_secs(60), || {
        !rx.points("web-01").is_empty()
    });
    let first_instance = first.status()["instance"].as_str().unwrap().to_string();
    assert_eq!(first_instance.len(), 16);

    // A clone: same server id, its own agent state (so its own instance).
    let clone_root = w.path().join("clone");
    std::fs::create_dir_all(&clone_root).unwrap();
    let clone = Agent::new(&clone_root, &rx, &spec);
    let o = clone.run_once(5);
    assert!(!o.status.success(), "the clone was let in");
    let err = stderr(&o);
    assert!(
        err.contains("server id web-01 belongs to host")
            && err.contains(&first_instance)
            && err.contains("refused host"),
        "{err}"
    );
    let clone_instance = clone.status()["instance"].as_str().unwrap().to_string();
    assert_ne!(clone_instance, first_instance);
    assert!(err.contains(&clone_instance), "{err}");

    // The first machine was never kicked and goes on committing points.
    let before = rx.points("web-01").len();
    wait_for("a newer point", Duration::from_secs(60), || {
        rx.points("web-01").len() > before
    });
    assert!(
        !first.log_text().contains("replaced by a newer connection"),
        "{}",
        first.log_text()
    );
    let o = rx.cli(&["servers", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["instance"], first_instance.as_str());
    assert_eq!(v[0]["refused_claim"]["instance"], clone_instance.as_str());
    let o = rx.cli(&["servers"]);
    assert!(
        stdout(&o).contains("warning: web-01: refused host"),
        "{}",
        stdout(&o)
    );

    // While the first is connected, `release` refuses; once it is gone, `release` lets the
    // replacement in at once (without waiting out server_lease_minutes).
    let o = rx.cli(&["release", "--server", "web-01"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is connected now"), "{}", stderr(&o));
    first.kill();
    rx.wait_disconnected("web-01");
    let o = clone.run_once(5);
    assert!(!o.status.success(), "the lease did not hold");
    let o = rx.cli(&["release", "--server", "web-01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    clone.run_once_ok();
    let o = rx.cli(&["servers", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["instance"], clone_instance.as_str());
    assert!(v[0]["refused_claim"].is_null(), "{v}");
}

#[test]
fn an_agent_clock_30_days_behind_neither_ages_points_nor_hides_lag() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 41);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("late", &[("root", &img)]));
    let faketime = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "-30d",
    ];
    for seed in 0..3 {
        mutate(&img, 42 + seed, 2);
        let o = agent.run_once_wrapped(&faketime, 120);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let points = rx.points("late");
    assert_eq!(points.len(), 3);
    // The agent really ran 30 days behind: its own time is recorded, and the skew measured.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let created = points[0]["created_unix_ms"].as_i64().unwrap();
    assert!(now_ms - created > 29 * 86_400_000, "faketime did not apply");
    let skew = points[2]["agent_clock_skew_ms"].as_i64().unwrap();
    assert!(skew < -29 * 86_400_000, "skew {skew}");
    let o = rx.cli(&["servers", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["clock_skew_exceeded"], true, "{v}");
    assert!(v[0]["lag_seconds"].as_f64().unwrap() < 3600.0, "{v}");
    assert!(stdout(&rx.cli(&["servers"])).contains("the agent's clock is -30d"));
    assert!(rx.log_text().contains("behind the receiver's"));

    // Retention passes every second: by the agent's clock all but the newest point are
    // 30 days old and would go; by the receiver's they are minutes old and stay.
    rx.kill();
    rx.gc_interval_secs = 1;
    rx.env = vec![(
        "LIFEBOAT_LOG".into(),
        "info,lifeboat_receiver::gc=debug".into(),
    )];
    rx.restart();
    wait_for("three retention passes", Duration::from_secs(30), || {
        rx.log_text().matches("gc pass: retention applied").count() >= 3
    });
    assert_eq!(
        rx.points("late").len(),
        3,
        "retention aged points by the agent's clock"
    );
}
