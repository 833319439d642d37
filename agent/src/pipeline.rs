//! The per-disk block pipeline: reader thread → worker threads → async sender.
//!
//! The reader takes buffers from a fixed pool (so memory is bounded by the pool, not by the
//! disk), reads candidate blocks in batches through the [`BlockReader`], and hands them to a
//! fixed pool of worker threads on a bounded crossbeam channel. Each worker names the block
//! (zero check, blake3), drops it when it matches the acknowledged manifest, else compresses
//! it (zstd) and passes it to the sender on a bounded tokio channel. A block known to be
//! partly written (the tracker's page marks, or the page sums of [`crate::pagesums`]) goes
//! as a patch: its changed pages over the acknowledged content. With io_uring the pool's
//! buffers are registered with the ring (pinned once, read with `READ_FIXED`). A full channel blocks the
//! stage before it: backpressure runs from the network back to the disk reads. The first
//! error stops every stage.

use crate::pagesums::{self, PageSums};
use crate::reader::{aligned_len, AlignedBuf, BlockReader, ReadReq};
use crossbeam_channel::{bounded, Receiver, Sender};
use lifeboat_common::block::{block_len, hash_block};
use lifeboat_common::codec::{self, Codec};
use lifeboat_common::config::ReaderEngine;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::protocol::{MAX_DELTA_RUNS, PAGES_PER_BLOCK, PAGE_SIZE};
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the sender gets for a changed block.
pub enum Payload {
    Zero,
    Data { codec: Codec, bytes: Vec<u8> },
}

pub struct Prepared {
    pub disk: usize,
    pub index: u64,
    /// The block's name. For a patch, the name the receiver must give the result when the
    /// agent knows it (the block was read whole), else ZERO (the receiver names it).
    pub hash: BlockHash,
    pub payload: Payload,
    /// The block as the pages changed over its acknowledged content.
    pub patch: Option<Patch>,
}

/// Pages written over a block's acknowledged content `base` (see `Message::Patch`).
pub struct Patch {
    pub base: BlockHash,
    pub pages: Vec<(u32, u32)>,
    pub codec: Codec,
    pub bytes: Vec<u8>,
}

/// Most pages of a block read and sent alone; past this the whole block is read.
const MAX_PATCH_PAGES: u32 = PAGES_PER_BLOCK / 2;

/// Compresses a payload (reporting a failure itself).
type Compress<'a> = dyn Fn(&[u8]) -> Option<(Codec, Vec<u8>)> + 'a;

/// A block's changed pages, to go over its acknowledged content `acked`; `expect` is the
/// block's whole name when known (ZERO: the receiver names it).
#[allow(clippy::too_many_arguments)]
fn patch_of(
    input: &ScanInput,
    index: u64,
    acked: BlockHash,
    expect: BlockHash,
    runs: &[(u32, u32)],
    bytes: &[u8],
    progress: &ScanProgress,
    compress: &Compress<'_>,
) -> Option<Prepared> {
    let (codec, bytes) = compress(bytes)?;
    progress.changed.fetch_add(1, Ordering::Relaxed);
    Some(Prepared {
        disk: input.disk,
        index,
        hash: expect,
        payload: Payload::Zero,
        patch: Some(Patch {
            base: acked,
            pages: runs.to_vec(),
            codec,
            bytes,
        }),
    })
}

/// The pages to read alone for `block`, when the tracker knows them: at most half the block,
/// the block whole (not a disk's short last block).
pub fn patch_runs(
    pages: &std::collections::HashMap<u64, u128>,
    block: u64,
    size: u64,
) -> Option<(u128, Vec<(u32, u32)>)> {
    let mask = *pages.get(&block)?;
    if block_len(block, size) != BLOCK_SIZE || mask.count_ones() > MAX_PATCH_PAGES {
        return None;
    }
    let r = runs(mask);
    (r.len() <= MAX_DELTA_RUNS).then_some((mask, r))
}

/// Whether a patch's pages are read alone (few runs), or cut out of a whole read.
fn read_alone(runs: &[(u32, u32)]) -> bool {
    runs.len() <= crate::tracker::dirty::MAX_PAGE_READS as usize
}

/// Most bytes of pages read in one batch (each run its own buffer).
const PAGE_BATCH_BYTES: usize = 8 << 20;

/// The bytes of `runs`' pages of a whole block, one run after the other.
fn cut_pages(block: &[u8], runs: &[(u32, u32)]) -> Vec<u8> {
    let mut bytes =
        Vec::with_capacity(runs.iter().map(|r| r.1 as usize).sum::<usize>() * PAGE_SIZE);
    for &(first, count) in runs {
        let (start, len) = (first as usize * PAGE_SIZE, count as usize * PAGE_SIZE);
        bytes.extend_from_slice(&block[start..start + len]);
    }
    bytes
}

/// The pages of a whole block that changed from its acknowledged content, by page sums:
/// runs when few enough changed for a patch, else None (sent whole). Records the block's own
/// sums for the next time it changes.
fn changed_runs(
    sums: &PageSums,
    index: u64,
    acked: &BlockHash,
    hash: &BlockHash,
    block: &[u8],
) -> Option<Vec<(u32, u32)>> {
    let new = pagesums::of(block);
    let old = sums.load(index, acked);
    sums.store(index, hash, &new);
    // Equal sums with another name: a change the sums missed.
    let mask = pagesums::changed(&old?, &new);
    if mask == 0 || mask.count_ones() > MAX_PATCH_PAGES {
        return None;
    }
    let r = runs(mask);
    (r.len() <= MAX_DELTA_RUNS).then_some(r)
}

/// `mask`'s pages as (first, count) runs.
fn runs(mask: u128) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut i = 0u32;
    while i < 128 {
        if mask >> i & 1 == 1 {
            let first = i;
            while i < 128 && mask >> i & 1 == 1 {
                i += 1;
            }
            out.push((first, i - first));
        } else {
            i += 1;
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("disk {disk}: cannot open {path}: {source}")]
    Open {
        disk: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {disk}: reading blocks {first}..={last} of {path}: {source}")]
    Read {
        disk: String,
        path: PathBuf,
        first: u64,
        last: u64,
        source: std::io::Error,
    },
    #[error("disk {disk}: {path} ended early: block {index} is short")]
    Short {
        disk: String,
        path: PathBuf,
        index: u64,
    },
    #[error("disk {disk}: compressing block {index}: {source}")]
    Compress {
        disk: String,
        index: u64,
        source: codec::CodecError,
    },
    #[error("scan cancelled")]
    Cancelled,
}

pub struct ScanInput {
    pub disk: usize,
    pub disk_id: String,
    pub path: PathBuf,
    pub size: u64,
    /// The acknowledged manifest when the scan starts.
    pub acked: Arc<Manifest>,
    pub candidates: Vec<u64>,
    /// For blocks the tracker saw partly written: the 4 KiB pages written since the block was
    /// last read (so the acknowledged content differs from the disk only there).
    pub pages: std::collections::HashMap<u64, u128>,
    /// Blocks read already (the final delta of a point, read under a freeze): examined
    /// before the candidates, without reading.
    pub preloaded: Vec<Loaded>,
    /// Per block: may hold data (false: inside a hole of a sparse file, known zero).
    pub maybe_data: Vec<bool>,
    pub engine: ReaderEngine,
    /// Reads in flight at once.
    pub depth: usize,
    /// zstd level, adjusted while the scan runs (see `adapt`).
    pub level: Arc<std::sync::atomic::AtomicI32>,
    pub workers: usize,
    /// The disk's page sums, so that a block read whole goes as the pages that changed.
    pub sums: Option<Arc<PageSums>>,
}

#[derive(Debug, Default, Clone)]
pub struct ScanStats {
    pub blocks_read: u64,
    pub bytes_read: u64,
    pub holes: u64,
    pub changed: u64,
    pub engine: &'static str,
    /// Reads into io_uring registered buffers.
    pub fixed_reads: u64,
}

/// Counters the sender reads while a scan runs.
#[derive(Default)]
pub struct ScanProgress {
    pub examined: AtomicU64,
    pub changed: AtomicU64,
}

struct Work {
    index: u64,
    len: usize,
    data: Data,
    /// Read into a buffer of the scan's pool (not preloaded).
    pooled: bool,
}

/// What was read of a block.
pub enum Data {
    /// All of it (a buffer of the pool); with runs, only those pages are to be sent (a block
    /// with too many runs to read them one by one).
    Block(AlignedBuf, Option<Vec<(u32, u32)>>),
    /// Only these pages, their bytes one after the other.
    Pages(Vec<(u32, u32)>, Vec<u8>),
}

/// A block read ahead of its pipeline.
pub struct Loaded {
    pub index: u64,
    pub len: usize,
    pub data: Data,
}

/// Reads the page runs of several blocks at once (each run its own read, `depth` in flight);
/// returns each block's pages, one after the other.
fn read_page_runs(
    reader: &mut BlockReader,
    items: &[(u64, Vec<(u32, u32)>)],
) -> std::io::Result<Vec<Vec<u8>>> {
    let mut reqs = Vec::new();
    for (block, runs) in items {
        for &(first, count) in runs {
            let len = count as usize * PAGE_SIZE;
            reqs.push(ReadReq {
                offset: block * BLOCK_SIZE as u64 + first as u64 * PAGE_SIZE as u64,
                len,
                done: 0,
                buf: AlignedBuf::with_len(len),
            });
        }
    }
    reader.read(&mut reqs)?;
    let mut reqs = reqs.into_iter();
    let mut out = Vec::with_capacity(items.len());
    for (_, runs) in items {
        let mut bytes =
            Vec::with_capacity(runs.iter().map(|r| r.1 as usize).sum::<usize>() * PAGE_SIZE);
        for _ in runs {
            let r = reqs
                .next()
                .ok_or_else(|| std::io::Error::other("page reads went missing"))?;
            if r.done < r.len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "a page read came back short",
                ));
            }
            bytes.extend_from_slice(&r.buf.as_slice()[..r.len]);
        }
        out.push(bytes);
    }
    Ok(out)
}

/// A disk to read from, and how.
#[derive(Clone, Copy)]
pub struct DiskRead<'a> {
    pub disk_id: &'a str,
    pub path: &'a std::path::Path,
    pub engine: ReaderEngine,
    pub depth: usize,
    pub size: u64,
}

/// Reads `blocks` of a disk into memory, in order, until all are read or `deadline` passes;
/// returns what was read (a prefix of `blocks`). For the final delta of a point, read while
/// the filesystems are frozen.
pub fn read_blocks(
    disk: &DiskRead<'_>,
    blocks: &[u64],
    pages: &std::collections::HashMap<u64, u128>,
    deadline: std::time::Instant,
) -> Result<Vec<Loaded>, ScanError> {
    let DiskRead {
        disk_id,
        path,
        engine,
        depth,
        size,
    } = *disk;
    let read_err = |first: u64, last: u64, source| ScanError::Read {
        disk: disk_id.to_string(),
        path: path.to_path_buf(),
        first,
        last,
        source,
    };
    let mut reader = BlockReader::open(path, engine, depth).map_err(|source| ScanError::Open {
        disk: disk_id.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::with_capacity(blocks.len());
    // In order: what was read is a prefix of `blocks`. Runs of page-read blocks, then runs of
    // whole blocks, batched.
    let mut at = 0;
    while at < blocks.len() {
        if std::time::Instant::now() >= deadline {
            break;
        }
        // Partly written blocks: their pages, many blocks' worth at once.
        let mut items = Vec::new();
        let mut batch_bytes = 0;
        while at < blocks.len() && batch_bytes < PAGE_BATCH_BYTES {
            match patch_runs(pages, blocks[at], size) {
                Some((mask, runs)) if read_alone(&runs) => {
                    batch_bytes += mask.count_ones() as usize * PAGE_SIZE;
                    items.push((blocks[at], runs));
                }
                _ => break,
            }
            at += 1;
        }
        if !items.is_empty() {
            let (first, last) = (items[0].0, items[items.len() - 1].0);
            let read = read_page_runs(&mut reader, &items).map_err(|e| read_err(first, last, e))?;
            for ((i, runs), bytes) in items.into_iter().zip(read) {
                out.push(Loaded {
                    index: i,
                    len: BLOCK_SIZE,
                    data: Data::Pages(runs, bytes),
                });
            }
            continue;
        }
        let mut end = at;
        while end < blocks.len()
            && end - at < depth.max(1)
            && !patch_runs(pages, blocks[end], size).is_some_and(|(_, r)| read_alone(&r))
        {
            end += 1;
        }
        let batch = &blocks[at..end];
        at = end;
        let mut reqs: Vec<ReadReq> = batch
            .iter()
            .map(|&i| ReadReq {
                offset: i * BLOCK_SIZE as u64,
                len: aligned_len(block_len(i, size)),
                done: 0,
                buf: AlignedBuf::new(),
            })
            .collect();
        reader
            .read(&mut reqs)
            .map_err(|e| read_err(batch[0], batch[batch.len() - 1], e))?;
        for (r, &i) in reqs.into_iter().zip(batch) {
            let len = block_len(i, size);
            if r.done < len {
                return Err(ScanError::Short {
                    disk: disk_id.to_string(),
                    path: path.to_path_buf(),
                    index: i,
                });
            }
            out.push(Loaded {
                index: i,
                len,
                data: Data::Block(r.buf, patch_runs(pages, i, size).map(|(_, r)| r)),
            });
        }
    }
    Ok(out)
}

/// Runs a whole scan on the calling thread (plus its workers); returns when every changed
/// block has been handed to `out`, or at the first error.
pub fn scan(
    input: &mut ScanInput,
    out: &tokio::sync::mpsc::Sender<Prepared>,
    progress: &ScanProgress,
    cancel: &AtomicBool,
) -> Result<ScanStats, ScanError> {
    let preloaded = std::mem::take(&mut input.preloaded);
    let input: &ScanInput = input;
    let _span = tracing::info_span!("disk", disk = %input.disk_id).entered();
    let workers = input.workers.max(1);
    let depth = input.depth.max(1);
    // The pool is made before the reader, so that it outlives the ring its buffers are
    // registered with; only the pool's buffers ever go back into it.
    let pool = depth * 2 + workers * 2;
    let mut bufs: Vec<AlignedBuf> = (0..pool).map(|_| AlignedBuf::new()).collect();
    let (free_tx, free_rx): (Sender<AlignedBuf>, Receiver<AlignedBuf>) = bounded(pool);
    let mut reader =
        BlockReader::open(&input.path, input.engine, input.depth).map_err(|source| {
            ScanError::Open {
                disk: input.disk_id.clone(),
                path: input.path.clone(),
                source,
            }
        })?;
    if let Err(why) = reader.register(&mut bufs) {
        if reader.engine_name() == "io_uring" {
            tracing::debug!("reading into unregistered buffers: {why}");
        }
    }
    for b in bufs {
        let _ = free_tx.send(b);
    }
    let (work_tx, work_rx) = bounded::<Work>(workers * 2);
    let first_err: Mutex<Option<ScanError>> = Mutex::new(None);
    let fail = |e: ScanError| {
        cancel.store(true, Ordering::Relaxed);
        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };
    let mut stats = ScanStats {
        engine: reader.engine_name(),
        ..Default::default()
    };
    let acked_at = |i: u64| {
        input
            .acked
            .hashes
            .get(i as usize)
            .copied()
            .unwrap_or(BlockHash::ZERO)
    };

    std::thread::scope(|s| {
        for _ in 0..workers {
            let work_rx = work_rx.clone();
            let free_tx = free_tx.clone();
            let fail = &fail;
            s.spawn(move || {
                for w in work_rx.iter() {
                    let prepared = if cancel.load(Ordering::Relaxed) {
                        None
                    } else {
                        examine(input, &w, progress, fail)
                    };
                    // The buffer goes back before the (possibly blocking) send downstream
                    // (a preloaded one is not the pool's: dropped).
                    if let (Data::Block(buf, _), true) = (w.data, w.pooled) {
                        let _ = free_tx.try_send(buf);
                    }
                    if let Some(p) = prepared {
                        if out.blocking_send(p).is_err() {
                            fail(ScanError::Cancelled);
                        }
                    }
                }
            });
        }
        drop(work_rx);

        // Blocks read already come first.
        for l in preloaded {
            stats.blocks_read += 1;
            stats.bytes_read += match &l.data {
                Data::Pages(_, bytes) => bytes.len() as u64,
                Data::Block(..) => l.len as u64,
            };
            let w = Work {
                index: l.index,
                len: l.len,
                data: l.data,
                pooled: false,
            };
            if cancel.load(Ordering::Relaxed) || work_tx.send(w).is_err() {
                break;
            }
        }

        // The reader: this thread.
        let mut batch: Vec<u64> = Vec::with_capacity(depth);
        let mut page_batch: Vec<(u64, Vec<(u32, u32)>)> = Vec::new();
        let mut iter = input.candidates.iter().copied().peekable();
        while iter.peek().is_some() && !cancel.load(Ordering::Relaxed) {
            batch.clear();
            page_batch.clear();
            let mut page_bytes = 0;
            for i in iter.by_ref() {
                let patch = patch_runs(&input.pages, i, input.size);
                if let Some((mask, runs)) = patch.filter(|(_, r)| read_alone(r)) {
                    // Only the pages written since the block was last read.
                    page_batch.push((i, runs));
                    page_bytes += mask.count_ones() as usize * PAGE_SIZE;
                    if page_bytes >= PAGE_BATCH_BYTES {
                        break;
                    }
                } else if input.maybe_data.get(i as usize).copied().unwrap_or(true) {
                    batch.push(i);
                    if batch.len() == depth {
                        break;
                    }
                } else {
                    // Inside a hole: zero without reading.
                    stats.holes += 1;
                    progress.examined.fetch_add(1, Ordering::Relaxed);
                    if !acked_at(i).is_zero() {
                        progress.changed.fetch_add(1, Ordering::Relaxed);
                        let p = Prepared {
                            disk: input.disk,
                            index: i,
                            hash: BlockHash::ZERO,
                            payload: Payload::Zero,
                            patch: None,
                        };
                        if out.blocking_send(p).is_err() {
                            fail(ScanError::Cancelled);
                            break;
                        }
                    }
                }
            }
            if !page_batch.is_empty() {
                let items = std::mem::take(&mut page_batch);
                let (first, last) = (items[0].0, items[items.len() - 1].0);
                match read_page_runs(&mut reader, &items) {
                    Ok(read) => {
                        for ((i, runs), bytes) in items.into_iter().zip(read) {
                            stats.blocks_read += 1;
                            stats.bytes_read += bytes.len() as u64;
                            let w = Work {
                                index: i,
                                len: BLOCK_SIZE,
                                data: Data::Pages(runs, bytes),
                                pooled: false,
                            };
                            if work_tx.send(w).is_err() {
                                break;
                            }
                        }
                    }
                    Err(source) => {
                        fail(ScanError::Read {
                            disk: input.disk_id.clone(),
                            path: input.path.clone(),
                            first,
                            last,
                            source,
                        });
                        break;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let mut reqs = Vec::with_capacity(batch.len());
            for &i in &batch {
                let Ok(buf) = free_rx.recv() else { break };
                reqs.push(ReadReq {
                    offset: i * BLOCK_SIZE as u64,
                    len: aligned_len(block_len(i, input.size)),
                    done: 0,
                    buf,
                });
            }
            if let Err(source) = reader.read(&mut reqs) {
                fail(ScanError::Read {
                    disk: input.disk_id.clone(),
                    path: input.path.clone(),
                    first: batch[0],
                    last: batch[batch.len() - 1],
                    source,
                });
                break;
            }
            for (r, &i) in reqs.into_iter().zip(&batch) {
                let len = block_len(i, input.size);
                if r.done < len {
                    fail(ScanError::Short {
                        disk: input.disk_id.clone(),
                        path: input.path.clone(),
                        index: i,
                    });
                    break;
                }
                stats.blocks_read += 1;
                stats.bytes_read += len as u64;
                if work_tx
                    .send(Work {
                        index: i,
                        len,
                        data: Data::Block(
                            r.buf,
                            patch_runs(&input.pages, i, input.size).map(|(_, r)| r),
                        ),
                        pooled: true,
                    })
                    .is_err()
                {
                    break;
                }
            }
        }
        drop(work_tx);
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    stats.changed = progress.changed.load(Ordering::Relaxed);
    stats.fixed_reads = reader.fixed_reads();
    Ok(stats)
}

/// Names one block read from disk; returns it for sending when it differs from the
/// acknowledged manifest.
fn examine(
    input: &ScanInput,
    w: &Work,
    progress: &ScanProgress,
    fail: &dyn Fn(ScanError),
) -> Option<Prepared> {
    progress.examined.fetch_add(1, Ordering::Relaxed);
    let acked = input
        .acked
        .hashes
        .get(w.index as usize)
        .copied()
        .unwrap_or(BlockHash::ZERO);
    let compress = |data: &[u8]| match codec::encode(data, input.level.load(Ordering::Relaxed)) {
        Ok(c) => Some(c),
        Err(source) => {
            fail(ScanError::Compress {
                disk: input.disk_id.clone(),
                index: w.index,
                source,
            });
            None
        }
    };
    let buf = match &w.data {
        Data::Block(buf, None) => buf,
        Data::Block(buf, Some(runs)) => {
            // Read whole (too many runs to read alone), sent as its pages all the same, with
            // the whole block's name: a page the tracker missed shows as another name at the
            // receiver, and the block goes whole.
            let data = &buf.as_slice()[..w.len];
            let hash = hash_block(data);
            if hash == acked {
                return None;
            }
            let bytes = cut_pages(data, runs);
            return patch_of(
                input, w.index, acked, hash, runs, &bytes, progress, &compress,
            );
        }
        Data::Pages(runs, bytes) => {
            let unknown = BlockHash::ZERO;
            return patch_of(
                input, w.index, acked, unknown, runs, bytes, progress, &compress,
            );
        }
    };
    let data = &buf.as_slice()[..w.len];
    let hash = hash_block(data);
    if hash == acked {
        return None;
    }
    let payload = if hash.is_zero() {
        Payload::Zero
    } else {
        let sums = input.sums.as_deref().filter(|_| w.len == BLOCK_SIZE);
        if let Some(runs) = sums.and_then(|s| changed_runs(s, w.index, &acked, &hash, data)) {
            let bytes = cut_pages(data, &runs);
            return patch_of(
                input, w.index, acked, hash, &runs, &bytes, progress, &compress,
            );
        }
        let (codec, bytes) = compress(data)?;
        Payload::Data { codec, bytes }
    };
    progress.changed.fetch_add(1, Ordering::Relaxed);
    Some(Prepared {
        disk: input.disk,
        index: w.index,
        hash,
        payload,
        patch: None,
    })
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn masks_become_runs() {
        assert_eq!(runs(0), vec![]);
        assert_eq!(runs(0b1011), vec![(0, 2), (3, 1)]);
        assert_eq!(runs(1 << 127), vec![(127, 1)]);
        assert_eq!(runs(u128::MAX), vec![(0, 128)]);
    }
}
