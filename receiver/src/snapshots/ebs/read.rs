//! Reading a point back from its EBS snapshot: `ListSnapshotBlocks` (paginated) for the
//! blocks the snapshot holds, its own and inherited, and `GetSnapshotBlock` for each, many in
//! flight, a page of the listing at a time (so memory and the age of a block token are
//! bounded by a page, whatever the disk's size). Every block is checked twice: against the SHA-256 EBS returns with it, and against
//! the point's blake3 manifest. A block the manifest names but the snapshot lacks, or one
//! that fails a check, is named with its index and hash.

use super::client::{Aws, EbsError};
use base64::Engine as _;
use lifeboat_common::block::hash_block;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::BLOCK_SIZE;
use std::sync::Arc;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One page of `ListSnapshotBlocks`: (index, block token) pairs, and the next page's token.
async fn list_page(
    aws: &Aws,
    snapshot_id: &str,
    next: Option<String>,
) -> Result<(Vec<(u64, String)>, Option<String>), EbsError> {
    let what = format!("snapshot {snapshot_id}");
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
    check_block_size(&what, page.block_size())?;
    let blocks = page
        .blocks()
        .iter()
        .filter_map(|b| Some((b.block_index()? as u64, b.block_token()?.to_string())))
        .collect();
    Ok((
        blocks,
        page.next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    ))
}

fn check_block_size(what: &str, bs: Option<i32>) -> Result<(), EbsError> {
    match bs {
        Some(bs) if bs as usize != BLOCK_SIZE => Err(EbsError::Local(format!(
            "{what} has block size {bs}, not {BLOCK_SIZE}"
        ))),
        _ => Ok(()),
    }
}

/// Marks in `changed` every block that differs between two snapshots of one disk's lineage
/// (`ListChangedBlocks`, paginated): blocks `second` wrote, or `first` held and `second`
/// no longer does. Returns how many were marked.
pub async fn mark_changed(
    aws: &Aws,
    first: &str,
    second: &str,
    changed: &mut [bool],
) -> Result<u64, EbsError> {
    let what = format!("snapshots {first} → {second}");
    let mut next: Option<String> = None;
    let mut marked = 0;
    loop {
        let page = aws
            .retry("ListChangedBlocks", &what, None, || {
                aws.ebs
                    .list_changed_blocks()
                    .first_snapshot_id(first)
                    .second_snapshot_id(second)
                    .max_results(10_000)
                    .set_next_token(next.clone())
                    .send()
            })
            .await?;
        check_block_size(&what, page.block_size())?;
        for i in page.changed_blocks().iter().filter_map(|b| b.block_index()) {
            // (Past the end of a disk that shrank there is nothing to write.)
            if let Some(slot) = changed.get_mut(i as usize) {
                marked += u64::from(!*slot);
                *slot = true;
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => return Ok(marked),
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
    // The listing is walked a page at a time (10 000 tokens), each page's blocks fetched
    // while their tokens are fresh: memory holds one page whatever the disk's size. The
    // manifest's data blocks the listing showed are kept as a bitmap, one bit a block.
    let n = manifest.hashes.len() as u64;
    let mut listed = vec![0u64; n.div_ceil(64) as usize];
    let limit = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut fetched = 0u64;
    let mut next: Option<String> = None;
    loop {
        let (blocks, more) = list_page(aws, snapshot_id, next.take()).await?;
        for (index, token) in blocks {
            if index >= n {
                continue;
            }
            listed[(index / 64) as usize] |= 1 << (index % 64);
            if !wanted(index) {
                continue;
            }
            let permit = limit.clone().acquire_owned().await?;
            while let Some(r) = tasks.try_join_next() {
                r??;
                fetched += 1;
            }
            spawn_fetch(
                &mut tasks,
                aws,
                snapshot_id,
                &manifest,
                &write,
                index,
                token,
                permit,
            );
        }
        match more {
            Some(t) => next = Some(t),
            None => break,
        }
    }
    for (i, h) in manifest.hashes.iter().enumerate() {
        if !h.is_zero() && listed[i / 64] & (1 << (i % 64)) == 0 {
            return Err(BadBlock(format!(
                "block {i} ({h}) is missing from snapshot {snapshot_id}"
            ))
            .into());
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
        fetched += 1;
    }
    Ok(fetched)
}

/// Fetches one block and checks it against the SHA-256 EBS gives with it and the manifest,
/// then hands it to `write`.
#[allow(clippy::too_many_arguments)]
fn spawn_fetch(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    aws: &Aws,
    snapshot_id: &str,
    manifest: &Arc<Manifest>,
    write: &BlockSink,
    index: u64,
    token: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
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
