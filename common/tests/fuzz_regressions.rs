//! The fuzz targets' checks over every committed input under `common/fuzz/regressions/`:
//! seeds (one valid frame of each message type, manifests) and any input a fuzz run ever
//! found a bug with (add it there, named for what it found). `cargo fuzz` can start from
//! them too: `cargo fuzz run decode_frame fuzz/regressions/decode_frame`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lifeboat_common::codec::Codec;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::protocol::{Consistency, DiskProgress, DiskState, ErrorCode, Message};
use lifeboat_common::{fuzzing, BlockHash, BLOCK_SIZE};
use std::path::PathBuf;

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir(target))
        .unwrap_or_else(|e| panic!("{}: {e}", dir(target).display()))
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Runs `check` (a fuzz target's) over every input of `target`'s corpus; a seed (a valid
/// input, `seed-*`) must also be accepted by `valid`, so the check ran in full.
fn run_corpus(target: &str, min: usize, check: fn(&[u8]), valid: fn(&[u8]) -> bool) {
    let files = corpus(target);
    assert!(files.len() >= min, "only {} {target} inputs", files.len());
    for (p, bytes) in files {
        let r = std::panic::catch_unwind(|| check(&bytes));
        assert!(r.is_ok(), "{} breaks the {target} check", p.display());
        let seed = p
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("seed-");
        assert!(
            !seed || valid(&bytes),
            "seed {} no longer decodes (format changed? rewrite the seeds)",
            p.display()
        );
    }
}

#[test]
fn every_frame_input_decodes_canonically_or_fails_cleanly() {
    run_corpus("decode_frame", 19, fuzzing::frames, |b| {
        matches!(lifeboat_common::protocol::decode_frame(b), Ok(Some(_)))
    });
}

#[test]
fn every_manifest_input_decodes_canonically_or_fails_cleanly() {
    run_corpus("decode_manifest", 3, fuzzing::manifest, |b| {
        Manifest::decode(b).is_ok()
    });
}

/// One message of every type.
fn seeds() -> Vec<(&'static str, Message)> {
    let h = BlockHash([7; 32]);
    vec![
        (
            "hello",
            Message::Hello {
                server_id: "web-01".into(),
                token: "t".into(),
                agent_version: "0.1.0".into(),
                instance: "0123456789abcdef".into(),
                hostname: "web-01".into(),
            },
        ),
        (
            "welcome",
            Message::Welcome {
                receiver_version: "0.1.0".into(),
                last_point: 3,
            },
        ),
        (
            "open_disk",
            Message::OpenDisk {
                handle: 0,
                disk_id: "root".into(),
                size: 10 * BLOCK_SIZE as u64,
            },
        ),
        (
            "disk_opened",
            Message::DiskOpened {
                handle: 0,
                digest: h,
            },
        ),
        ("get_manifest", Message::GetManifest { handle: 0 }),
        (
            "manifest_chunk",
            Message::ManifestChunk {
                handle: 0,
                start: 0,
                total: 2,
                hashes: vec![h, BlockHash::ZERO],
            },
        ),
        (
            "have",
            Message::Have {
                req: 1,
                hashes: vec![h; 3],
            },
        ),
        (
            "have_reply",
            Message::HaveReply {
                req: 1,
                present: vec![true, false, true],
            },
        ),
        (
            "block",
            Message::Block {
                seq: 1,
                handle: 0,
                index: 4,
                hash: h,
                codec: Codec::Raw,
                data: vec![1, 2, 3],
            },
        ),
        (
            "ref",
            Message::Ref {
                seq: 2,
                handle: 0,
                index: 5,
                hash: h,
            },
        ),
        ("acks", Message::Acks { seqs: vec![1, 2] }),
        ("need_data", Message::NeedData { seq: 2 }),
        (
            "commit",
            Message::Commit {
                point: 4,
                created_unix_ms: 1_700_000_000_000,
                consistency: Consistency::CrashConsistent,
                why: "filesystems frozen for 12 ms while 3 blocks were read".into(),
                disks: vec![(0, h)],
            },
        ),
        ("committed", Message::Committed { point: 4 }),
        (
            "patch",
            Message::Patch {
                seq: 3,
                handle: 0,
                index: 5,
                base: BlockHash::ZERO,
                pages: vec![(2, 1), (9, 2)],
                codec: Codec::Raw,
                data: vec![7; 3 * 4096],
            },
        ),
        (
            "named",
            Message::Named {
                named: vec![(3, h)],
            },
        ),
        (
            "progress",
            Message::Progress {
                agent_unix_ms: 1_700_000_000_000,
                disks: vec![DiskProgress {
                    handle: 0,
                    state: DiskState::Continuous,
                    backlog_blocks: 0,
                }],
            },
        ),
        (
            "enrol",
            Message::Enrol {
                server_id: "web-01".into(),
                code: "c".into(),
                public_key: vec![4; 65],
                instance: "0123456789abcdef".into(),
                hostname: "web-01".into(),
            },
        ),
        (
            "enrolled",
            Message::Enrolled {
                certificate: vec![0x30; 300],
                not_after_unix_ms: 1_800_000_000_000,
            },
        ),
        (
            "error",
            Message::Error {
                code: ErrorCode::Busy,
                retryable: true,
                message: "busy".into(),
            },
        ),
    ]
}

/// Writes the seed corpus (by hand, after a protocol change:
/// `cargo test -p lifeboat-common --test fuzz_regressions -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    let frames = dir("decode_frame");
    std::fs::create_dir_all(&frames).unwrap();
    let mut stream = Vec::new();
    for (name, m) in seeds() {
        let mut out = Vec::new();
        m.encode(&mut out);
        stream.extend_from_slice(&out);
        std::fs::write(frames.join(format!("seed-{name}")), out).unwrap();
    }
    std::fs::write(frames.join("seed-stream-of-all"), stream).unwrap();
    let manifests = dir("decode_manifest");
    std::fs::create_dir_all(&manifests).unwrap();
    let empty = Manifest::zeroed(0);
    std::fs::write(manifests.join("seed-empty"), empty.encode()).unwrap();
    let mut m = Manifest::zeroed(3 * BLOCK_SIZE as u64 + 17);
    m.hashes[1] = BlockHash([7; 32]);
    std::fs::write(manifests.join("seed-partial-tail"), m.encode()).unwrap();
    let full = Manifest::zeroed(64 * BLOCK_SIZE as u64);
    std::fs::write(manifests.join("seed-zeroed"), full.encode()).unwrap();
}
