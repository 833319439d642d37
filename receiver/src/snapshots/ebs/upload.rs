//! One disk of one point to one EBS snapshot: StartSnapshot, PutSnapshotBlock for exactly
//! the blocks that differ from the parent snapshot's point, CompleteSnapshot, then wait until
//! EC2 says `completed`.
//!
//! The blocks to put are computed from the two manifests, never from a session: index `i`
//! goes when the point's hash differs from the parent's (past the parent's end, from zero).
//! A block that became all-zero is put as zeros; with no parent, zero blocks are skipped.
//! Each block is read from the staging store, which checks it against its blake3 name, and
//! hashed with SHA-256 for the API.
//!
//! Memory stays bounded whatever the change: the indices are walked twice (count, then put),
//! never collected, and at most `puts_in_flight` blocks plus one chunk being read are held.
//! The LINEAR aggregate (SHA-256 over the blocks' SHA-256s in index order) is fed in order by
//! the reading thread, so it needs no buffer either.

use super::client::{Aws, EbsError};
use super::record::ParentRef;
use crate::store::BlockStore;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine as _;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use std::sync::Arc;
use std::time::{Duration, Instant};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Blocks read (and hashed) together by the reading thread.
const CHUNK: usize = 16;

pub struct DiskJob<'a> {
    /// This receiver's install id (see [`super::install_id`]).
    pub install: &'a str,
    pub server: &'a str,
    pub point: u64,
    pub disk: &'a str,
    pub manifest: &'a Manifest,
    pub parent: Option<(ParentRef, Manifest)>,
    pub attempt: u32,
}

#[derive(Debug)]
pub struct Uploaded {
    pub snapshot_id: String,
    pub changed_blocks: u64,
    pub volume_size_gib: u64,
}

pub fn volume_size_gib(disk_size: u64) -> u64 {
    disk_size.div_ceil(1 << 30).max(1)
}

/// Whether block `i` must be put over `parent` (`None`: no parent). Past the point's end
/// (a disk that shrank within its volume) the point holds zeros.
fn differs(m: &Manifest, parent: Option<&Manifest>, i: usize) -> bool {
    let now = m.hashes.get(i).copied().unwrap_or(BlockHash::ZERO);
    match parent {
        None => !now.is_zero(),
        Some(p) => now != p.hashes.get(i).copied().unwrap_or(BlockHash::ZERO),
    }
}

/// How many block indices to compare: the point's, or the parent's if longer.
fn span(m: &Manifest, parent: Option<&Manifest>) -> usize {
    m.hashes.len().max(parent.map_or(0, |p| p.hashes.len()))
}

/// The block the point holds at `i` (zero past its end).
fn hash_at(m: &Manifest, i: usize) -> BlockHash {
    m.hashes.get(i).copied().unwrap_or(BlockHash::ZERO)
}

/// The idempotency token of one upload attempt of one disk of one point: this receiver's
/// install id and the point's manifest digest keep two receivers, or two histories, from
/// ever getting each other's snapshot back.
pub fn client_token(
    install: &str,
    server: &str,
    disk: &str,
    point: u64,
    manifest: &Manifest,
    attempt: u32,
) -> String {
    let h = blake3::hash(
        format!(
            "lifeboat/2/{install}/{server}/{disk}/{point}/{}/{attempt}",
            manifest.digest()
        )
        .as_bytes(),
    );
    h.to_hex()[..40].to_string()
}

/// Uploads one disk. `started` is called with the snapshot id as soon as StartSnapshot
/// answered (to record it durably), before any block is put; `completing` with the number
/// of blocks put, just before CompleteSnapshot (so that a resumed upload only waits).
pub async fn upload_disk(
    aws: &Aws,
    store: Arc<dyn BlockStore>,
    job: DiskJob<'_>,
    started: impl FnOnce(&str) -> Result<(), EbsError>,
    completing: impl FnOnce(u64) -> Result<(), EbsError>,
) -> Result<Uploaded, EbsError> {
    let what = format!(
        "server {} point {} disk {}",
        job.server, job.point, job.disk
    );
    let size_gib = volume_size_gib(job.manifest.disk_size);
    let parent_manifest = job.parent.as_ref().map(|(_, m)| m);
    let n = span(job.manifest, parent_manifest);
    let changed = (0..n)
        .filter(|&i| differs(job.manifest, parent_manifest, i))
        .count() as u64;
    let cfg = &aws.config;
    let token = client_token(
        job.install,
        job.server,
        job.disk,
        job.point,
        job.manifest,
        job.attempt,
    );
    let tag = |k: &str, v: String| Tag::builder().key(k).value(v).build();
    let start = aws
        .retry("StartSnapshot", &what, None, || {
            let mut req = aws
                .ebs
                .start_snapshot()
                .volume_size(size_gib as i64)
                .client_token(&token)
                .encrypted(cfg.encrypted)
                .timeout(cfg.snapshot_timeout_minutes as i32)
                .description(format!(
                    "Lifeboat point {} of server {} disk {}",
                    job.point, job.server, job.disk
                ))
                .tags(tag("lifeboat:server", job.server.to_string()))
                .tags(tag("lifeboat:disk", job.disk.to_string()))
                .tags(tag("lifeboat:point", job.point.to_string()))
                .tags(tag(
                    "lifeboat:version",
                    env!("CARGO_PKG_VERSION").to_string(),
                ));
            if let Some((p, _)) = &job.parent {
                req = req.parent_snapshot_id(&p.snapshot_id);
            }
            if let Some(k) = &cfg.kms_key_arn {
                req = req.kms_key_arn(k);
            }
            req.send()
        })
        .await?;
    let id = start
        .snapshot_id()
        .ok_or_else(|| EbsError::Local(format!("{what}: StartSnapshot answered no snapshot id")))?
        .to_string();
    if let Some(bs) = start.block_size() {
        if bs as usize != BLOCK_SIZE {
            return Err(EbsError::Local(format!(
                "{what}: snapshot {id} has block size {bs}, not {BLOCK_SIZE}"
            )));
        }
    }
    started(&id)?;
    // The token named a snapshot that is past its puts (a resumed upload whose record had
    // no id yet): only the wait remains, or nothing can be done with it.
    match start.status().map(|s| s.as_str()) {
        Some("pending") | None => {}
        Some("completed") => {
            wait_completed(aws, &id, &what).await?;
            return Ok(Uploaded {
                snapshot_id: id,
                changed_blocks: changed,
                volume_size_gib: size_gib,
            });
        }
        Some(other) => {
            return Err(EbsError::Local(format!(
                "{what}: snapshot {id} is {other}; the next attempt starts a new one"
            )))
        }
    }
    {
        let fresh = Instant::now() + Duration::from_secs(60);
        let aggregate = put_blocks(aws, store, &job, &id, changed, fresh, &what).await?;
        completing(changed)?;
        aws.retry("CompleteSnapshot", &what, Some(fresh), || {
            aws.ebs
                .complete_snapshot()
                .snapshot_id(&id)
                .changed_blocks_count(changed as i32)
                .checksum(&aggregate)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
                .send()
        })
        .await?;
    }
    wait_completed(aws, &id, &what).await?;
    Ok(Uploaded {
        snapshot_id: id,
        changed_blocks: changed,
        volume_size_gib: size_gib,
    })
}

type Item = Result<(u64, Vec<u8>, String), EbsError>;

/// Puts every changed block; returns the LINEAR aggregate (base64).
async fn put_blocks(
    aws: &Aws,
    store: Arc<dyn BlockStore>,
    job: &DiskJob<'_>,
    id: &str,
    changed: u64,
    fresh: Instant,
    what: &str,
) -> Result<String, EbsError> {
    let in_flight = aws.config.puts_in_flight.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(in_flight);
    let manifest = job.manifest.clone();
    let parent = job.parent.as_ref().map(|(_, m)| m.clone());
    let reader_what = what.to_string();
    // The reading thread: chunks of blocks read and hashed on the rayon pool, then fed to
    // the aggregate and the channel in index order.
    let reader = tokio::task::spawn_blocking(move || -> Option<String> {
        use rayon::prelude::*;
        let mut aggregate = ring::digest::Context::new(&ring::digest::SHA256);
        let mut indices = (0..span(&manifest, parent.as_ref()))
            .filter(|&i| differs(&manifest, parent.as_ref(), i))
            .peekable();
        while indices.peek().is_some() {
            let chunk: Vec<usize> = indices.by_ref().take(CHUNK).collect();
            let read: Vec<Item> = chunk
                .par_iter()
                .map(|&i| {
                    let h = hash_at(&manifest, i);
                    let data = if h.is_zero() {
                        vec![0u8; BLOCK_SIZE]
                    } else {
                        store.read(&h).map_err(|e| {
                            EbsError::Local(format!(
                                "{reader_what}: block {i} ({h}) cannot be read from the staging \
                                 store: {e}"
                            ))
                        })?
                    };
                    let sum = ring::digest::digest(&ring::digest::SHA256, &data);
                    Ok((i as u64, data, B64.encode(sum.as_ref())))
                })
                .collect();
            for item in read {
                if let Ok((_, _, sum)) = &item {
                    // Infallible: we made this base64 just above.
                    if let Ok(raw) = B64.decode(sum) {
                        aggregate.update(&raw);
                    }
                }
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return None;
                }
            }
        }
        Some(B64.encode(aggregate.finish().as_ref()))
    });
    let mut puts = tokio::task::JoinSet::new();
    let mut done = 0u64;
    let mut first_err: Option<EbsError> = None;
    let limit = Arc::new(tokio::sync::Semaphore::new(in_flight));
    while let Some(item) = rx.recv().await {
        let (index, data, sum) = match item {
            Ok(x) => x,
            Err(e) => {
                first_err = Some(e);
                break;
            }
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        // Reap what finished, so that an error stops us early.
        while let Some(r) = puts.try_join_next() {
            match r {
                Ok(Ok(())) => done += 1,
                Ok(Err(e)) => first_err = Some(e),
                Err(e) => first_err = Some(EbsError::Local(format!("{what}: a put failed: {e}"))),
            }
        }
        if first_err.is_some() {
            break;
        }
        let aws = aws.clone();
        let id = id.to_string();
        let what = format!("{what} block {index}");
        let progress = ((done * 100) / changed.max(1)) as i32;
        let data = bytes::Bytes::from(data);
        puts.spawn(async move {
            let _permit = permit;
            aws.retry("PutSnapshotBlock", &what, Some(fresh), || {
                aws.ebs
                    .put_snapshot_block()
                    .snapshot_id(&id)
                    .block_index(index as i32)
                    .block_data(ByteStream::from(data.clone()))
                    .data_length(BLOCK_SIZE as i32)
                    .checksum(&sum)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .progress(progress)
                    .send()
            })
            .await
            .map(|_| ())
        });
    }
    drop(rx);
    if first_err.is_some() {
        puts.abort_all();
    }
    while let Some(r) = puts.join_next().await {
        match r {
            Ok(Ok(())) => done += 1,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_err.get_or_insert(EbsError::Local(format!("{what}: a put failed: {e}")));
            }
        }
    }
    let aggregate = reader
        .await
        .map_err(|e| EbsError::Local(format!("{what}: the reading thread failed: {e}")))?;
    if let Some(e) = first_err {
        return Err(e);
    }
    match aggregate {
        Some(a) if done == changed => Ok(a),
        _ => Err(EbsError::Local(format!(
            "{what}: {done} of {changed} blocks put"
        ))),
    }
}

/// What EC2 says of a snapshot: its state ("pending", "completed", "error"), or `None`
/// when it does not exist.
pub async fn snapshot_state(aws: &Aws, id: &str, what: &str) -> Result<Option<String>, EbsError> {
    let r = aws
        .retry("DescribeSnapshots", what, None, || {
            aws.ec2.describe_snapshots().snapshot_ids(id).send()
        })
        .await;
    match r {
        Ok(out) => Ok(out
            .snapshots()
            .first()
            .and_then(|s| s.state())
            .map(|s| s.as_str().to_string())),
        Err(EbsError::Permanent { message, .. })
            if message.contains("InvalidSnapshot.NotFound") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Waits until EC2 says the snapshot is `completed` (bounded by the snapshot timeout).
pub async fn wait_completed(aws: &Aws, id: &str, what: &str) -> Result<(), EbsError> {
    let deadline = Instant::now() + Duration::from_secs(aws.config.snapshot_timeout_minutes * 60);
    let fresh = Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(200);
    loop {
        let out = aws
            .retry("DescribeSnapshots", what, Some(fresh), || {
                aws.ec2.describe_snapshots().snapshot_ids(id).send()
            })
            .await?;
        let state = out
            .snapshots()
            .first()
            .and_then(|s| s.state())
            .map(|s| s.as_str().to_string())
            .unwrap_or_default();
        match state.as_str() {
            "completed" => return Ok(()),
            "error" | "recoverable" | "recovering" => {
                let why = out
                    .snapshots()
                    .first()
                    .and_then(|s| s.state_message())
                    .unwrap_or("no reason given");
                return Err(EbsError::Permanent {
                    op: "DescribeSnapshots",
                    what: what.to_string(),
                    message: format!("snapshot {id} is in state {state}: {why}"),
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(EbsError::Local(format!(
                "{what}: snapshot {id} still {state:?} after {} minutes",
                aws.config.snapshot_timeout_minutes
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_that_shrank_puts_zeros_over_the_parents_tail() {
        let h = |b: u8| BlockHash([b; 32]);
        let m = Manifest {
            disk_size: 2 * BLOCK_SIZE as u64,
            hashes: vec![h(1), h(2)],
        };
        let p = Manifest {
            disk_size: 4 * BLOCK_SIZE as u64,
            hashes: vec![h(1), h(2), h(3), BlockHash::ZERO],
        };
        let n = span(&m, Some(&p));
        let vs: Vec<usize> = (0..n).filter(|&i| differs(&m, Some(&p), i)).collect();
        assert_eq!(vs, vec![2], "the parent's data past the new end is zeroed");
        assert!(hash_at(&m, 2).is_zero());
    }

    #[test]
    fn what_differs_from_the_parent() {
        let h = |b: u8| BlockHash([b; 32]);
        let m = Manifest {
            disk_size: 4 * BLOCK_SIZE as u64,
            hashes: vec![h(1), BlockHash::ZERO, h(3), h(4)],
        };
        let none: Vec<usize> = (0..4).filter(|&i| differs(&m, None, i)).collect();
        assert_eq!(none, vec![0, 2, 3], "no parent: zero blocks skipped");
        let p = Manifest {
            disk_size: 3 * BLOCK_SIZE as u64,
            hashes: vec![h(1), h(2), h(9)],
        };
        let vs: Vec<usize> = (0..4).filter(|&i| differs(&m, Some(&p), i)).collect();
        // 1 became zero (put as zeros), 2 changed, 3 is past the parent's end.
        assert_eq!(vs, vec![1, 2, 3]);
    }

    #[test]
    fn sizes_and_tokens() {
        assert_eq!(volume_size_gib(1), 1);
        assert_eq!(volume_size_gib(1 << 30), 1);
        assert_eq!(volume_size_gib((1 << 30) + 1), 2);
        let m = Manifest::zeroed(3 * BLOCK_SIZE as u64);
        let other = Manifest::zeroed(4 * BLOCK_SIZE as u64);
        let t = client_token("i1", "web-01", "root", 7, &m, 0);
        assert_eq!(t.len(), 40);
        assert_eq!(t, client_token("i1", "web-01", "root", 7, &m, 0));
        assert_ne!(t, client_token("i1", "web-01", "root", 7, &m, 1));
        assert_ne!(t, client_token("i1", "web-01", "data", 7, &m, 0));
        assert_ne!(
            t,
            client_token("i2", "web-01", "root", 7, &m, 0),
            "another receiver"
        );
        assert_ne!(
            t,
            client_token("i1", "web-01", "root", 7, &other, 0),
            "another history"
        );
    }
}
