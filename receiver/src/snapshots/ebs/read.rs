//! Reading a point back from its EBS snapshot: `ListSnapshotBlocks` (paginated) for the
//! blocks the snapshot holds, its own and inherited, then `GetSnapshotBlock` for each, many in
//! flight. Every block is checked twice: against the SHA-256 EBS returns with it, and against
//! the point's blake3 manifest. A block the manifest names but the snapshot lacks, or one
//! that fails a check, is named with its index and hash.

use super::client::{Aws, EbsError};
use base64::Engine as _;
use lifeboat_common::block::hash_block;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::BLOCK_SIZE;
use std::collections::BTreeMap;
use std::sync::Arc;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Index → block token, for every block the snapshot holds.
pub async fn list_blocks(aws: &Aws, snapshot_id: &str) -> Result<BTreeMap<u64, String>, EbsError> {
    let mut out = BTreeMap::new();
    let mut next: Option<String> = None;
    let what = format!("snapshot {snapshot_id}");
    loop {
        let page = aws
            .retry("ListSnapshotBlocks", &what, None, || {
                aws.ebs
                    .list_snapshot_blocks()
                    .snapshot_id(snapshot_id)
                    .max_results(10_000)
                    .set_next_token(next.clone())
                    .send()
            })
            .await?;
        if let Some(bs) = page.block_size() {
            if bs as usize != BLOCK_SIZE {
                return Err(EbsError::Local(format!(
                    "{what} has block size {bs}, not {BLOCK_SIZE}"
                )));
            }
        }
        for b in page.blocks() {
            if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                out.insert(i as u64, t.to_string());
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => return Ok(out),
        }
    }
}

/// Where each checked block goes: `(index, the whole 512 KiB block)`.
pub type BlockSink = Arc<dyn Fn(u64, &[u8]) -> anyhow::Result<()> + Send + Sync>;

/// A block that failed its checks, or is missing: the restore cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadBlock(pub String);

/// Fetches and checks every block the manifest needs and `wanted` asks for; hands each to
/// `write(index, bytes)` (full 512 KiB blocks; the caller trims the last). Zero blocks the
/// snapshot does not hold are not fetched: the caller knows them from the manifest.
pub async fn fetch_all(
    aws: &Aws,
    snapshot_id: &str,
    manifest: Arc<Manifest>,
    in_flight: usize,
    wanted: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    write: BlockSink,
) -> anyhow::Result<u64> {
    let tokens = list_blocks(aws, snapshot_id).await?;
    for (i, h) in manifest.hashes.iter().enumerate() {
        if !h.is_zero() && !tokens.contains_key(&(i as u64)) {
            return Err(BadBlock(format!(
                "block {i} ({h}) is missing from snapshot {snapshot_id}"
            ))
            .into());
        }
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut fetched = 0u64;
    let n = manifest.hashes.len() as u64;
    for (index, token) in tokens.into_iter().filter(|(i, _)| *i < n && wanted(*i)) {
        let permit = limit.clone().acquire_owned().await?;
        while let Some(r) = tasks.try_join_next() {
            r??;
            fetched += 1;
        }
        let aws = aws.clone();
        let id = snapshot_id.to_string();
        let manifest = manifest.clone();
        let write = write.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let what = format!("snapshot {id} block {index}");
            // The body is read under the same bound as the request (the SDK's timeouts end
            // with the headers), and a body that breaks or stalls is fetched again.
            let limit = std::time::Duration::from_secs(aws.config.attempt_timeout_secs);
            let max = aws.config.max_attempts.max(1);
            let mut tries = 0;
            let (sum, data) = loop {
                tries += 1;
                let out = aws
                    .retry("GetSnapshotBlock", &what, None, || {
                        aws.ebs
                            .get_snapshot_block()
                            .snapshot_id(&id)
                            .block_index(index as i32)
                            .block_token(&token)
                            .send()
                    })
                    .await?;
                let sum = out.checksum().unwrap_or("").to_string();
                let why = match tokio::time::timeout(limit, out.block_data.collect()).await {
                    Ok(Ok(b)) => break (sum, b.into_bytes()),
                    Ok(Err(e)) => format!("reading the block's data: {e}"),
                    Err(_) => format!("its data did not arrive within {} s", limit.as_secs()),
                };
                if tries >= max {
                    return Err(EbsError::Exhausted {
                        op: "GetSnapshotBlock",
                        what: what.clone(),
                        attempts: tries,
                        message: why,
                    }
                    .into());
                }
                tracing::debug!("{what}: {why}; fetching it again");
            };
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let want = manifest.hashes[index as usize];
                if data.len() != BLOCK_SIZE {
                    return Err(BadBlock(format!(
                        "{what} ({want}): {} bytes, not {BLOCK_SIZE}",
                        data.len()
                    ))
                    .into());
                }
                let actual = ring::digest::digest(&ring::digest::SHA256, &data);
                if B64.encode(actual.as_ref()) != sum {
                    return Err(BadBlock(format!(
                        "{what} ({want}): its SHA-256 is not the {sum:?} EBS gave with it"
                    ))
                    .into());
                }
                let got = hash_block(&data);
                if got != want {
                    return Err(BadBlock(format!(
                        "{what}: holds {got}, the point's manifest names {want}"
                    ))
                    .into());
                }
                write(index, &data)
            })
            .await?
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
        fetched += 1;
    }
    Ok(fetched)
}
