//! Per-agent identities: one-time enrolment codes, mutual TLS with the certificate they buy,
//! renewal, revocation, and every refusal around them, with the real binaries.

use lifeboat_common::protocol::{ErrorCode, Message};
use lifeboat_tests::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// `lifeboat-receiver enroll --server S`: the code.
fn enroll_code(rx: &Receiver, server: &str, extra: &[&str]) -> String {
    let mut args = vec!["enroll", "--server", server, "--json"];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_slice(&ok(rx.cli(&args)).stdout).unwrap();
    v["code"].as_str().unwrap().to_string()
}

/// `lifeboat-agent enroll` with `args` (the code as `--code`, or `--renew`), or the code on
/// stdin when `stdin` is given.
fn agent_enroll(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(bin("lifeboat-agent"));
    c.args(["enroll", "--config"]).arg(config).args(args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        writeln!(input, "{s}").unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn agents(rx: &Receiver) -> Value {
    serde_json::from_slice(&ok(rx.cli(&["agents", "--json"])).stdout).unwrap()
}

fn agent_entry(rx: &Receiver, server: &str) -> Value {
    agents(rx)["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["server"] == server)
        .cloned()
        .unwrap_or_else(|| panic!("{server} not listed by `agents`"))
}

fn certificate(state_dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(state_dir.join("certificate.json")).unwrap()).unwrap()
}

/// TLS without a client certificate, preface, `Hello` with `token`: the receiver's answer.
fn token_hello(rx: &Receiver, server: &str, token: &str) -> Message {
    let mut c = RawClient::connect(rx);
    c.preface();
    c.send(&hello_frame(server, token, "0123456789abcdef"))
        .unwrap();
    c.read_frames(1).pop().expect("no answer to Hello")
}

fn refused_with(m: &Message, needle: &str) {
    match m {
        Message::Error {
            code: ErrorCode::Auth,
            message,
            ..
        } => assert!(message.contains(needle), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn metric(addr: &str, series: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    sample(&body, series)
}

#[test]
fn an_enrolled_agent_replicates_over_mutual_tls_and_its_token_stops_working() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 8, 0, 51);
    let mut spec = AgentSpec::new("web", &[("root", &img)]);
    let agent = Agent::new(w.path(), &rx, &spec);
    // A token deployment, as before identities.
    agent.run_once_ok();
    assert_eq!(agent_entry(&rx, "web")["auth"], "token");

    let code = enroll_code(&rx, "web", &[]);
    let pending = agents(&rx)["pending_codes"].clone();
    assert_eq!(pending[0]["server"], "web", "{pending}");
    // The code piped in, as the receiver's instructions suggest.
    let o = ok(agent_enroll(&agent.config, &[], Some(&code)));
    assert!(
        stdout(&o).contains("enrolled as server web"),
        "{}",
        stdout(&o)
    );
    let cert = certificate(&agent.state_dir);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.state_dir.join("certificate.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
    assert!(agents(&rx)["pending_codes"].as_array().unwrap().is_empty());

    // A code works once.
    let o = agent_enroll(&agent.config, &["--code", &code], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already used"), "{}", stderr(&o));
    assert_eq!(
        certificate(&agent.state_dir),
        cert,
        "a refused enrolment changed the files"
    );

    // The token is gone from agent.toml: the certificate alone authenticates.
    spec.token = Some(String::new());
    let agent = Agent::new(w.path(), &rx, &spec);
    let data = make_image(&img, 8, 0, 52);
    agent.run_once_ok();
    let points = rx.points("web");
    rx.expect_restore(
        "web",
        "root",
        &points.last().unwrap()["point"].to_string(),
        &data,
    );
    let entry = agent_entry(&rx, "web");
    assert_eq!(entry["auth"], "certificate");
    assert_eq!(entry["certificate_sha256"], cert["sha256"]);
    assert!(entry["last_contact_unix_ms"].as_u64().is_some(), "{entry}");
    let table = stdout(&ok(rx.cli(&["agents"])));
    assert!(
        table.contains("web") && table.contains("certificate"),
        "{table}"
    );

    // The token that served web before no longer does.
    refused_with(
        &token_hello(&rx, "web", &rx.token),
        "authenticates with its certificate",
    );
    // Other servers keep their tokens.
    let other = w.path().join("other.img");
    make_image(&other, 2, 0, 53);
    Agent::new(w.path(), &rx, &AgentSpec::new("db", &[("root", &other)])).run_once_ok();

    let addr = rx.metrics_addr();
    let expiry = metric(
        &addr,
        "lifeboat_receiver_agent_certificate_expiry_timestamp_seconds{server=\"web\"}",
    )
    .expect("no certificate expiry for web");
    let in_a_year = lifeboat_common::now_ms() as f64 / 1000.0 + 365.0 * 86_400.0;
    assert!((expiry - in_a_year).abs() < 86_400.0, "{expiry}");
    assert!(
        metric(
            &addr,
            "lifeboat_receiver_connections_refused_total{reason=\"certificate\"}"
        )
        .unwrap()
            >= 1.0
    );
    // No secret in the receiver's log.
    let log = rx.log_text();
    assert!(!log.contains(&code) && !log.contains(&code.replace('-', "")));
    assert!(!log.contains(&rx.token));
}

#[test]
fn codes_unknown_expired_or_for_another_server_are_refused_and_never_logged() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 2, 0, 61);
    let mut spec = AgentSpec::new("db", &[("root", &img)]);
    spec.token = Some(String::new());
    let agent = Agent::new(w.path(), &rx, &spec);

    // Neither a token nor a certificate: refused before anything is sent, and `validate`
    // says what to do.
    let o = agent.run_once(2);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("neither a certificate"),
        "{}",
        stderr(&o)
    );
    let v = Command::new(bin("lifeboat-agent"))
        .args(["validate", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(64), "{}", stderr(&v));
    assert!(stderr(&v).contains("receiver.token"), "{}", stderr(&v));

    let o = agent_enroll(
        &agent.config,
        &["--code", "0000-1111-2222-3333-4444-5555-6666-7777"],
        None,
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown enrolment code"),
        "{}",
        stderr(&o)
    );

    let web_code = enroll_code(&rx, "web", &[]);
    let o = agent_enroll(&agent.config, &["--code", &web_code], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("this enrolment code is for server web, not db"),
        "{}",
        stderr(&o)
    );
    // Not spent by that: web can still use it.
    let web_img = w.path().join("web.img");
    make_image(&web_img, 2, 0, 62);
    let mut web_spec = AgentSpec::new("web", &[("root", &web_img)]);
    web_spec.token = Some(String::new());
    let web = Agent::new(w.path(), &rx, &web_spec);
    ok(agent_enroll(&web.config, &["--code", &web_code], None));
    web.run_once_ok();

    // An expired code: the receiver's clock decides.
    let short = enroll_code(&rx, "db", &["--valid-minutes", "1"]);
    rx.wrapper = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "+3m",
    ]
    .map(String::from)
    .to_vec();
    rx.kill();
    rx.restart();
    let o = agent_enroll(&agent.config, &["--code", &short], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("expired at"), "{}", stderr(&o));
    // Counted by this run of the receiver (the count starts again at a restart).
    let m = metric(
        &rx.metrics_addr(),
        "lifeboat_receiver_connections_refused_total{reason=\"enrolment\"}",
    );
    assert!(m.unwrap() >= 1.0, "{m:?}");
    rx.wrapper.clear();
    rx.kill();
    rx.restart();
    let bad = rx.cli(&["enroll", "--server", "db", "--valid-minutes", "0"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--valid-minutes"), "{}", stderr(&bad));

    // A fresh code works, and nothing ever logged one.
    let good = enroll_code(&rx, "db", &[]);
    ok(agent_enroll(&agent.config, &["--code", &good], None));
    agent.run_once_ok();
    let log = rx.log_text();
    for c in [&web_code, &short, &good] {
        assert!(!log.contains(c.as_str()) && !log.contains(&c.replace('-', "")));
    }
    assert!(log.contains("agent enrolled"), "{log}");
}

#[test]
fn a_running_agent_moves_to_its_certificate_by_itself_and_a_revoke_cuts_it_off() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 71);
    let mut agent = Agent::new(w.path(), &rx, &AgentSpec::new("web", &[("root", &img)]));
    agent.spawn();
    let connected = |rx: &Receiver| agent_entry(rx, "web")["connected"] == true;
    wait_for(
        "the token agent to connect",
        Duration::from_secs(60),
        || !rx.points("web").is_empty() && connected(&rx),
    );

    // Enrolled while it runs: its token session is closed and it comes back with the
    // certificate, without a restart.
    let code = enroll_code(&rx, "web", &[]);
    ok(agent_enroll(&agent.config, &["--code", &code], None));
    wait_for(
        "the token session to be closed",
        Duration::from_secs(30),
        || rx.log_text().contains("authenticates with its certificate"),
    );
    let before = rx.points("web").len();
    make_image(&img, 4, 0, 72);
    wait_for(
        "a point over the certificate",
        Duration::from_secs(60),
        || rx.points("web").len() > before && connected(&rx),
    );
    assert!(agent.is_running());
    let expiry = metric(
        &agent.metrics_addr(),
        "lifeboat_agent_certificate_expiry_timestamp_seconds",
    );
    assert!(expiry.is_some(), "the agent exports no certificate expiry");

    // Revoked: cut off within seconds, and refused from then on.
    let o = ok(rx.cli(&["revoke", "--server", "web"]));
    assert!(stdout(&o).contains("revoked"), "{}", stdout(&o));
    rx.wait_disconnected("web");
    wait_for(
        "the agent to log the revocation",
        Duration::from_secs(30),
        || agent.log_text().contains("revoked"),
    );
    assert_eq!(agent_entry(&rx, "web")["auth"], "revoked");
    agent.kill();
    let o = agent.run_once(2);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));
    let m = metric(
        &rx.metrics_addr(),
        "lifeboat_receiver_connections_refused_total{reason=\"revoked\"}",
    );
    assert!(m.unwrap() >= 1.0, "{m:?}");

    // Enrolling again lets it back.
    let again = enroll_code(&rx, "web", &[]);
    ok(agent_enroll(&agent.config, &["--code", &again], None));
    agent.run_once_ok();
    assert_eq!(agent_entry(&rx, "web")["auth"], "certificate");

    // A server that never enrolled can be revoked too: its token stops working.
    let other = w.path().join("old.img");
    make_image(&other, 2, 0, 73);
    Agent::new(w.path(), &rx, &AgentSpec::new("old", &[("root", &other)])).run_once_ok();
    ok(rx.cli(&["revoke", "--server", "old"]));
    refused_with(&token_hello(&rx, "old", &rx.token), "revoked");
    let unknown = rx.cli(&["revoke", "--server", "nobody"]);
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("neither enrolled nor known"));
}

#[test]
fn foreign_replaced_and_renewed_away_certificates_are_refused_and_no_impostor_gets_a_code() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 2, 0, 81);
    let mut spec = AgentSpec::new("web", &[("root", &img)]);
    spec.token = Some(String::new());
    let agent = Agent::new(w.path(), &rx, &spec);
    let code = enroll_code(&rx, "web", &[]);

    // A man in the middle: another receiver at the address, with a CA that is not pinned.
    // The code is never sent to it (the TLS handshake fails first), and stays good.
    let other_root = w.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let impostor = Receiver::start(&other_root);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mitm = w.path().join("mitm.toml");
    std::fs::write(
        &mitm,
        text.replace(
            &format!("127.0.0.1:{}", rx.port),
            &format!("127.0.0.1:{}", impostor.port),
        ),
    )
    .unwrap();
    let o = agent_enroll(&mitm, &["--code", &code], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not match receiver.ca_fingerprint"),
        "{}",
        stderr(&o)
    );
    assert!(!agent.state_dir.join("certificate.json").exists());
    assert!(!impostor.log_text().contains(&code));
    ok(agent_enroll(&agent.config, &["--code", &code], None));
    agent.run_once_ok();
    let first = std::fs::read(agent.state_dir.join("certificate.json")).unwrap();

    // A certificate from another receiver's CA: refused in the TLS handshake.
    let mut their_spec = AgentSpec::new("web", &[("root", &img)]);
    their_spec.token = Some(String::new());
    let theirs = Agent::new(&other_root, &impostor, &their_spec);
    let their_code = enroll_code(&impostor, "web", &[]);
    ok(agent_enroll(&theirs.config, &["--code", &their_code], None));
    let foreign = std::fs::read(theirs.state_dir.join("certificate.json")).unwrap();
    std::fs::write(agent.state_dir.join("certificate.json"), &foreign).unwrap();
    let o = agent.run_once(2);
    assert!(!o.status.success(), "a foreign certificate was accepted");
    wait_for(
        "the receiver to log the refusal",
        Duration::from_secs(10),
        || rx.log_text().contains("TLS handshake failed"),
    );
    assert!(
        metric(
            &rx.metrics_addr(),
            "lifeboat_receiver_connections_refused_total{reason=\"tls\"}"
        )
        .unwrap()
            >= 1.0
    );
    std::fs::write(agent.state_dir.join("certificate.json"), &first).unwrap();

    // Renewed: the old certificate is accepted until the new one has been used (an agent
    // that died before saving it is not locked out), then never again.
    let o = ok(agent_enroll(&agent.config, &["--renew"], None));
    assert!(
        stdout(&o).contains("renewed for server web"),
        "{}",
        stdout(&o)
    );
    let renewed = std::fs::read(agent.state_dir.join("certificate.json")).unwrap();
    assert_ne!(renewed, first);
    std::fs::write(agent.state_dir.join("certificate.json"), &first).unwrap();
    agent.run_once_ok();
    std::fs::write(agent.state_dir.join("certificate.json"), &renewed).unwrap();
    agent.run_once_ok();
    std::fs::write(agent.state_dir.join("certificate.json"), &first).unwrap();
    let o = agent.run_once(2);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not server web's"), "{}", stderr(&o));

    // Enrolled again (a rebuilt machine): the certificate before is refused.
    std::fs::write(agent.state_dir.join("certificate.json"), &renewed).unwrap();
    let again = enroll_code(&rx, "web", &[]);
    ok(agent_enroll(&agent.config, &["--code", &again], None));
    agent.run_once_ok();
    std::fs::write(agent.state_dir.join("certificate.json"), &renewed).unwrap();
    let o = agent.run_once(2);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not server web's"), "{}", stderr(&o));
}

#[test]
fn the_agent_renews_its_certificate_by_itself_once_two_thirds_of_its_life_passed() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 2, 0, 91);
    let mut spec = AgentSpec::new("web", &[("root", &img)]);
    spec.token = Some(String::new());
    let agent = Agent::new(w.path(), &rx, &spec);
    let code = enroll_code(&rx, "web", &[]);
    ok(agent_enroll(&agent.config, &["--code", &code], None));
    let first = certificate(&agent.state_dir);
    // Not due: nothing changes.
    agent.run_once_ok();
    assert_eq!(certificate(&agent.state_dir), first);

    // 250 of 365 days later (by the agent's clock), it renews before connecting.
    let later = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "+250d",
    ];
    let o = agent.run_once_wrapped(&later, 120);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("client certificate renewed"),
        "{}",
        stderr(&o)
    );
    let second = certificate(&agent.state_dir);
    assert_ne!(second["sha256"], first["sha256"]);
    assert_eq!(
        agent_entry(&rx, "web")["certificate_sha256"],
        second["sha256"]
    );
    assert!(rx.log_text().contains("agent certificate renewed"));
}
