//! Hostile or broken peers: the receiver refuses them clearly and keeps serving others.

use lifeboat_common::codec::Codec;
use lifeboat_common::protocol::{ErrorCode, Message, MAX_FRAME};
use lifeboat_tests::*;
use std::io::{Read, Write};
use std::time::Duration;

fn hello(server: &str, token: &str) -> Vec<u8> {
    // 16 hex digits, as an agent's instance id is.
    let h = blake3::hash(server.as_bytes()).to_hex();
    hello_as(server, token, &h[..16])
}

/// A `Hello` from machine `instance` (a server id belongs to one instance at a time).
fn hello_as(server: &str, token: &str, instance: &str) -> Vec<u8> {
    hello_frame(server, token, instance)
}

fn good_agent_still_served(w: &std::path::Path, rx: &Receiver, server: &str) {
    let img = w.join(format!("{server}.img"));
    make_image(&img, 4, 0, 9);
    Agent::new(w, rx, &AgentSpec::new(server, &[("root", &img)])).run_once_ok();
    assert_eq!(rx.points(server).len(), 1);
}

#[test]
fn wrong_token_is_refused_clearly() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 1);
    let mut spec = AgentSpec::new("intruder", &[("root", &img)]);
    spec.token = Some("0".repeat(64));
    let o = Agent::new(w.path(), &rx, &spec).run_once(2);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("token refused for server intruder"), "{err}");
    assert!(rx.log_text().contains("token refused for server intruder"));
    assert!(
        !rx.dir.join("servers/intruder").exists(),
        "a refused agent left state behind"
    );
    good_agent_still_served(w.path(), &rx, "after-token");
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    let w = workdir();
    let rx = Receiver::start(w.path());

    // Random bytes instead of TLS.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", rx.port)).unwrap();
    let mut noise = vec![0u8; 4096];
    Rng::new(77).fill(&mut noise);
    let _ = tcp.write_all(&noise);
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut sink = [0u8; 1024];
    let _ = tcp.read(&mut sink);

    // Random bytes inside TLS, where the preface should be.
    let mut c = RawClient::connect(&rx);
    c.send(&noise[..64]).unwrap();
    let mut pre = [0u8; 12];
    c.stream.read_exact(&mut pre).unwrap();
    let replies = c.read_frames(1);
    assert!(
        matches!(&replies[..], [Message::Error { code: ErrorCode::Protocol, message, .. }] if message.contains("bad preface")),
        "{replies:?}"
    );

    // An oversized frame after a valid Hello.
    let mut c = RawClient::connect(&rx);
    c.preface();
    c.send(&hello("big", &rx.token)).unwrap();
    let welcome = c.read_frames(1);
    assert!(matches!(welcome[0], Message::Welcome { .. }), "{welcome:?}");
    let mut frame = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    frame.push(9);
    c.send(&frame).unwrap();
    let replies = c.read_frames(5);
    assert!(
        replies.iter().any(|m| matches!(m, Message::Error { code: ErrorCode::Protocol, message, .. } if message.contains("exceeds"))),
        "{replies:?}"
    );

    wait_for(
        "the reasons in the receiver log",
        Duration::from_secs(10),
        || {
            let log = rx.log_text();
            log.contains("TLS handshake failed")
                && log.contains("bad preface")
                && log.contains("exceeds")
        },
    );
    good_agent_still_served(w.path(), &rx, "after-garbage");
}

#[test]
fn block_whose_data_does_not_match_its_hash_is_rejected() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("liar", &rx.token);
    Message::OpenDisk {
        handle: 0,
        disk_id: "root".into(),
        size: 4 * lifeboat_common::BLOCK_SIZE as u64,
    }
    .encode(&mut out);
    let claimed = lifeboat_common::block::hash_block(b"what the agent claims");
    Message::Block {
        seq: 1,
        handle: 0,
        index: 2,
        hash: claimed,
        codec: Codec::Raw,
        data: b"something else entirely".to_vec(),
    }
    .encode(&mut out);
    c.send(&out).unwrap();
    let replies = c.read_frames(4);
    let err = replies
        .iter()
        .find_map(|m| match m {
            Message::Error {
                code: ErrorCode::BadBlock,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no BadBlock error: {replies:?}"));
    assert!(
        err.contains("disk root block 2") && err.contains("not stored"),
        "{err}"
    );
    assert!(
        !replies.iter().any(|m| matches!(m, Message::Acks { .. })),
        "a bad block was acknowledged"
    );
    assert!(!rx
        .dir
        .join("store/blocks")
        .join(&claimed.to_hex()[..2])
        .join(claimed.to_hex())
        .exists());
    wait_for(
        "the rejection to be counted",
        Duration::from_secs(10),
        || rx.try_counter("liar", "blocks_rejected") == Some(1),
    );
    assert_eq!(rx.counter("liar", "blocks_stored"), 0);
    good_agent_still_served(w.path(), &rx, "after-liar");
}

#[test]
fn repeated_commit_is_answered_again_and_an_old_point_is_refused() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let img = w.path().join("disk.img");
    make_image(&img, 6, 0, 13);
    let agent = Agent::new(w.path(), &rx, &AgentSpec::new("retry", &[("root", &img)]));
    agent.run_once_ok();
    mutate(&img, 14, 3);
    agent.run_once_ok();
    assert_eq!(rx.points("retry").len(), 2);
    let size = std::fs::metadata(&img).unwrap().len();

    // The agent's machine speaking: another would be refused the server id.
    let instance = agent.status()["instance"].as_str().unwrap().to_string();
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello_as("retry", &rx.token, &instance);
    Message::OpenDisk {
        handle: 0,
        disk_id: "root".into(),
        size,
    }
    .encode(&mut out);
    c.send(&out).unwrap();
    let replies = c.read_frames(2);
    let Message::DiskOpened { digest, .. } = replies[1] else {
        panic!("{replies:?}")
    };
    let commit = |point| {
        let mut out = Vec::new();
        Message::Commit {
            point,
            created_unix_ms: 1,
            consistency: lifeboat_common::protocol::Consistency::BestEffort,
            why: "test".into(),
            disks: vec![(0, digest)],
        }
        .encode(&mut out);
        out
    };
    // The agent's answer was lost and it asks again: same point, same content.
    c.send(&commit(2)).unwrap();
    assert_eq!(c.read_frames(1), vec![Message::Committed { point: 2 }]);
    // An older point number with other content is out of order.
    c.send(&commit(1)).unwrap();
    let r = c.read_frames(1);
    assert!(
        matches!(&r[..], [Message::Error { code: ErrorCode::Protocol, message, .. }] if message.contains("not after the last committed point 2")),
        "{r:?}"
    );
    assert_eq!(rx.points("retry").len(), 2, "nothing was added");
}

#[test]
fn a_server_scoped_token_cannot_write_another_servers_replicas() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    let o = rx.cli(&["token-add", "--server", "web-01", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let web_token = v["token"].as_str().unwrap().to_string();
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 3);

    // web-01 with its own token: accepted (no restart needed).
    let mut spec = AgentSpec::new("web-01", &[("root", &img)]);
    spec.token = Some(web_token.clone());
    Agent::new(w.path(), &rx, &spec).run_once_ok();

    // web-01's token used to act as db-01: refused.
    let mut spec = AgentSpec::new("db-01", &[("root", &img)]);
    spec.token = Some(web_token);
    let o = Agent::new(w.path(), &rx, &spec).run_once(2);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("scoped to server web-01"),
        "{}",
        stderr(&o)
    );

    // The enrolment token no longer works for web-01, still does for others.
    let other = w.path().join("other-host");
    std::fs::create_dir_all(&other).unwrap();
    let o = Agent::new(&other, &rx, &AgentSpec::new("web-01", &[("root", &img)])).run_once(2);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has its own token"), "{}", stderr(&o));
    good_agent_still_served(w.path(), &rx, "db-02");
    assert_eq!(
        rx.points("web-01").len(),
        1,
        "web-01's replicas were touched"
    );
}

#[test]
fn absurd_disk_sizes_and_too_many_disks_are_refused_and_others_go_on() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.set_config("max_disks_per_server", "2");
    let open = |handle: u32, disk: &str, size: u64| {
        let mut out = Vec::new();
        Message::OpenDisk {
            handle,
            disk_id: disk.into(),
            size,
        }
        .encode(&mut out);
        out
    };
    let refusal = |replies: &[Message]| {
        replies
            .iter()
            .find_map(|m| match m {
                Message::Error {
                    code: ErrorCode::Protocol,
                    message,
                    ..
                } => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Protocol error: {replies:?}"))
    };

    // 2^64 - 1 bytes: once enough to make the receiver allocate a petabyte and abort.
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("huge", &rx.token);
    out.extend(open(0, "root", u64::MAX));
    c.send(&out).unwrap();
    let e = refusal(&c.read_frames(3));
    assert!(
        e.contains("disk root") && e.contains("max_disk_size_gib"),
        "{e}"
    );
    assert!(rx.is_running(), "the receiver died");

    // A third disk on a receiver that allows two.
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("many", &rx.token);
    let small = 4 * lifeboat_common::BLOCK_SIZE as u64;
    for (h, d) in ["a", "b", "c"].iter().enumerate() {
        out.extend(open(h as u32, d, small));
    }
    c.send(&out).unwrap();
    let replies = c.read_frames(5);
    let opened = replies
        .iter()
        .filter(|m| matches!(m, Message::DiskOpened { .. }))
        .count();
    assert_eq!(opened, 2, "{replies:?}");
    let e = refusal(&replies);
    assert!(
        e.contains("disk c") && e.contains("max_disks_per_server"),
        "{e}"
    );
    // Reconnecting with other disk ids does not get past the limit either: it counts the
    // disks the receiver holds, not those of one connection.
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("many", &rx.token);
    out.extend(open(0, "d", small));
    c.send(&out).unwrap();
    let e = refusal(&c.read_frames(3));
    assert!(
        e.contains("disk d") && e.contains("2 disks on this receiver"),
        "{e}"
    );

    // Manifest memory: a 1 TiB disk needs 128 MiB of it.
    rx.set_config("max_manifest_memory_mib", "64");
    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("big", &rx.token);
    out.extend(open(0, "root", 1 << 40));
    c.send(&out).unwrap();
    let replies = c.read_frames(3);
    let e = replies
        .iter()
        .find_map(|m| match m {
            Message::Error {
                code: ErrorCode::Storage,
                retryable: true,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no retryable refusal: {replies:?}"));
    assert!(
        e.contains("need 128 MiB") && e.contains("max_manifest_memory_mib (64)"),
        "{e}"
    );
    good_agent_still_served(w.path(), &rx, "after-huge");
}

/// Peers that complete TLS and then trickle a `Hello` one byte a second, reconnecting as soon
/// as they are dropped, for as long as `stop` is false.
fn slow_loris(rx: &Receiver, stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        let mut c = RawClient::connect(rx);
        c.preface();
        // A length within the pre-auth cap, then the body a byte at a time.
        if c.send(&8000u32.to_le_bytes()).is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) && c.send(&[1]).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[test]
fn unauthenticated_peers_cannot_keep_agents_out() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.set_config("max_connections", "2");
    rx.set_config("handshake_timeout_secs", "3");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| slow_loris(&rx, &stop));
        }
        // A peer that announces a huge Hello is refused from the length alone.
        let mut c = RawClient::connect(&rx);
        c.preface();
        c.send(&(1u32 << 20).to_le_bytes()).unwrap();
        let r = c.read_frames(1);
        assert!(
            matches!(&r[..], [Message::Error { code: ErrorCode::Protocol, message, .. }] if message.contains("16384-byte cap")),
            "{r:?}"
        );
        // Let the trickling peers take their places first.
        std::thread::sleep(Duration::from_secs(1));
        let img = w.path().join("disk.img");
        make_image(&img, 4, 0, 21);
        let o =
            Agent::new(w.path(), &rx, &AgentSpec::new("patient", &[("root", &img)])).run_once(45);
        let served = o.status.success();
        if served {
            wait_for(
                "the handshake deadline in the log",
                Duration::from_secs(10),
                || rx.log_text().contains("handshake not completed within 3s"),
            );
        }
        stop.store(true, Ordering::Relaxed);
        assert!(served, "agent kept out: {}", stderr(&o));
    });
}

/// The agent trusts only the receiver CA it pins: a receiver with another CA is refused, and
/// so is an impostor that presents the pinned CA's (public) certificate with its own leaf.
#[test]
fn the_agent_refuses_a_receiver_whose_ca_is_not_the_pinned_one() {
    let w = workdir();
    let real = Receiver::start(w.path());
    let other_root = w.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let mut other = Receiver::start(&other_root);
    let img = w.path().join("disk.img");
    make_image(&img, 2, 0, 51);

    // Pinned to the real receiver, talking to the other one.
    let mut spec = AgentSpec::new("pinned", &[("root", &img)]);
    spec.token = Some(other.token.clone());
    let agent = Agent::new(w.path(), &real, &spec);
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(&format!(":{}\"", real.port), &format!(":{}\"", other.port));
    std::fs::write(&agent.config, cfg).unwrap();
    let o = agent.run_once(3);
    assert!(!o.status.success(), "the agent trusted another CA");
    assert!(
        stderr(&o).contains("the receiver's CA does not match receiver.ca_fingerprint"),
        "{}",
        stderr(&o)
    );

    // The impostor sends the real CA's certificate, with a leaf its own CA signed.
    other.kill();
    std::fs::copy(real.dir.join("tls/ca.pem"), other.dir.join("tls/ca.pem")).unwrap();
    other.restart();
    let o = agent.run_once(3);
    assert!(!o.status.success(), "the agent trusted an impostor");
    let err = stderr(&o);
    assert!(
        err.contains("certificate") && !err.contains("does not match receiver.ca_fingerprint"),
        "not refused by the signature check: {err}"
    );
    assert!(!other.dir.join("servers/pinned").exists());
    assert!(!real.dir.join("servers/pinned").exists());
}

#[test]
fn max_connections_refuses_the_next_agent_clearly_and_frees_up() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.set_config("max_connections", "1");
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 23);
    let mut first = Agent::new(w.path(), &rx, &AgentSpec::new("first", &[("root", &img)]));
    first.spawn();
    wait_for("the first agent's point", Duration::from_secs(60), || {
        !rx.points("first").is_empty()
    });
    let second = Agent::new(w.path(), &rx, &AgentSpec::new("second", &[("root", &img)]));
    let o = second.run_once(3);
    assert!(
        !o.status.success(),
        "a second agent got in past max_connections = 1"
    );
    assert!(
        stderr(&o).contains("already serves max_connections = 1 agents"),
        "{}",
        stderr(&o)
    );
    first.kill();
    second.run_once_ok();
}

#[test]
fn refusals_a_peer_triggers_are_logged_at_a_bounded_rate() {
    let w = workdir();
    let rx = Receiver::start(w.path());
    // 150 connections that fail their TLS handshake, as fast as they come.
    let flood = std::time::Instant::now();
    for _ in 0..150 {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", rx.port)).unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut sink = [0u8; 64];
        let _ = tcp.read(&mut sink);
    }
    let secs = flood.elapsed().as_secs() + 1;
    // One more after the window, which reports how many were left out.
    std::thread::sleep(Duration::from_millis(1100));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", rx.port)).unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut sink = [0u8; 64];
    let _ = tcp.read(&mut sink);
    wait_for(
        "the summary of dropped lines",
        Duration::from_secs(10),
        || {
            rx.log_text().lines().any(|l| {
                l.contains("TLS handshake failed")
                    && !l.contains("dropped_similar=0")
                    && l.contains("dropped_similar=")
            })
        },
    );
    let lines = rx
        .log_text()
        .lines()
        .filter(|l| l.contains("TLS handshake failed"))
        .count();
    // 20 a second at most, whatever the flood took on this machine: a flood of under `secs`
    // seconds can span `secs + 1` one-second windows, and the last one comes after it (seen:
    // 41 lines for a flood of under a second).
    assert!(
        lines as u64 <= 20 * (secs + 1) + 1 && lines < 151,
        "{lines} log lines for 151 bad peers in {secs}s"
    );
}

#[test]
fn tokens_are_never_logged() {
    let w = workdir();
    let mut rx = Receiver::start(w.path());
    rx.kill();
    rx.env = vec![("LIFEBOAT_LOG".into(), "debug".into())];
    rx.restart();
    let img = w.path().join("disk.img");
    make_image(&img, 4, 0, 29);
    let wrong = "f00dfeed".repeat(8);
    let mut spec = AgentSpec::new("secretive", &[("root", &img)]);
    spec.token = Some(wrong.clone());
    let refused = Agent::new(w.path(), &rx, &spec);
    let debug = ["env", "LIFEBOAT_LOG=debug"];
    let o = refused.run_once_wrapped(&debug, 2);
    assert!(!o.status.success());
    let good_root = w.path().join("good");
    std::fs::create_dir_all(&good_root).unwrap();
    let good = Agent::new(
        &good_root,
        &rx,
        &AgentSpec::new("secretive2", &[("root", &img)]),
    );
    let o2 = good.run_once_wrapped(&debug, 60);
    assert!(o2.status.success(), "{}", stderr(&o2));
    let key = std::fs::read_to_string(rx.dir.join("tls/server.key")).unwrap();
    let key_line = key.lines().nth(1).unwrap().to_string();
    for (what, text) in [
        ("receiver log", rx.log_text()),
        ("refused agent's output", stderr(&o) + &stdout(&o)),
        ("agent's output", stderr(&o2) + &stdout(&o2)),
    ] {
        assert!(text.len() > 200, "{what} is too short to judge: {text}");
        assert!(
            !text.contains(&rx.token),
            "{what} contains the enrolment token"
        );
        assert!(!text.contains(&wrong), "{what} contains the refused token");
        assert!(!text.contains(&key_line), "{what} contains the TLS key");
    }
}
