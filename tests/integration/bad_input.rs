//! Hostile or broken peers: the receiver refuses them clearly and keeps serving others.

use lifeboat_common::codec::Codec;
use lifeboat_common::protocol::{ErrorCode, Message, MAX_FRAME};
use lifeboat_tests::*;
use std::io::{Read, Write};
use std::time::Duration;

fn hello(server: &str, token: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Message::Hello {
        server_id: server.into(),
        token: token.into(),
        agent_version: "test".into(),
    }
    .encode(&mut out);
    out
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
        || rx.counter("liar", "blocks_rejected") == 1,
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

    let mut c = RawClient::connect(&rx);
    c.preface();
    let mut out = hello("retry", &rx.token);
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
