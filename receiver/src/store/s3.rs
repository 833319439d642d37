//! The S3 backend of the staging store: blocks as objects in a bucket (`[s3]` in
//! receiver.toml), under the configured prefix.
//!
//! Layout: `blocks/<2 hex>/<64 hex>`, each object `codec u8 | encoded bytes` as in the
//! directory store; `quarantine/<hash>.<ms>` for corrupt blocks; `quarantine/mark`;
//! `owner.json`, the install id of the one receiver whose blocks these are.
//!
//! **Durability.** S3 stores an object durably before a PUT returns success, so
//! [`BlockStore::insert`] returns once every PUT of the batch has returned; the PUTs of a batch
//! run `requests_in_flight` at a time. A PUT carries `If-None-Match: *`: a block already in the
//! bucket is refused with 412 instead of written again, which is how `insert` counts what was
//! new without a request more. A 409 (another conditional write of the same key in flight, which
//! may still fail) is followed by an unconditional PUT: only a PUT that returned counts.
//!
//! **Reads** are verified like the directory store's ([`super::decode_stored`]).
//!
//! **Requests** go through [`crate::aws::retry`]: timeouts, 5xx and broken connections are tried
//! again with backoff, `SlowDown`/503 slow every request of the receiver down and are tried
//! again; what keeps failing fails the batch, which is then not acknowledged.
//!
//! The store runs its requests on a small runtime of its own, so its blocking API serves both
//! the receiver's blocking threads and the commands.
//!
//! **The index.** `has` answers from an in-memory set of every block under the prefix, listed
//! once (1000 keys a request) at the first call and kept up to date by this process: a block
//! joins it once its PUT returned (never before it is durable), and leaves it before a removal
//! or a quarantine starts. It can be trusted because one receiver alone writes and removes
//! blocks under a prefix (`owner.json`, see [`S3Store::claim`]); the one other writer, a
//! `scrub` of the same receiver in another process, changes the quarantine mark, and a changed
//! mark takes every quarantined block out of the index. One lock covers it all ([`Index`]):
//! the listing runs in the background under the quarantine fence with the mark read first
//! (a `has` asks with HEAD until it is done, so a bucket of millions of blocks never holds the
//! dedupe answers for minutes), removals hold the lock until their deletes returned, and an
//! insert or a listing that spanned a removal or purge adds nothing.
//! So a dedupe answer, a point's check of its blocks and a reconnecting agent's disk check
//! cost no request. It holds ~60 bytes per block: about 60 MiB per 512 GiB of unique data.
//! In a fleet, other receivers add blocks (a reference to one is answered "send it" once, and
//! its PUT finds it there) and one of them at a time sweeps: while a sweep is open its
//! candidates are fenced out of the index ([`S3Store::begin_sweep`]), and what it deleted
//! stays out after it ([`S3Store::end_sweep`]).
//!
//! **The quarantine fence** is a `flock` on `<state-dir>/quarantine.lock`, as the directory
//! store's: `scrub` runs in another process on the same state directory (and so the same
//! machine), and the prefix belongs to this receiver alone.

use super::{BlockStore, Fence, StoreError, VerifiedBlock};
use crate::aws::retry::CallError;
use crate::aws::s3::{Condition, Lock, PutError, Retention, S3};
use lifeboat_common::config::{LockMode, S3Config};
use lifeboat_common::BlockHash;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

const QUARANTINE_MARK: &str = "quarantine/mark";
/// Which receiver the prefix belongs to (see [`S3Store::claim`]).
const OWNER: &str = "owner.json";
/// A fleet's Object Lock settings, which every receiver of it must share.
const LOCK_SETTINGS: &str = "object-lock.json";
/// The owner a fleet's prefix names: every receiver of the fleet shares it.
pub const FLEET: &str = "fleet";

/// New blocks are locked this many days past `object_lock_days`, so a block written today and
/// named by a point committed up to this many days later needs no request more; the lock
/// keeper ([`S3Store::keep_locked`]) extends the rest.
pub const LOCK_SLACK_DAYS: u64 = 7;
const DAY_MS: u64 = 86_400_000;

/// `object_lock_days` and `object_lock_mode` of `[s3]`.
#[derive(Clone, Copy, Debug)]
pub struct LockPolicy {
    pub days: u32,
    pub mode: LockMode,
}

impl LockPolicy {
    /// The lock a block written (or extended) at `now_ms` gets.
    fn block_until_ms(&self, now_ms: u64) -> u64 {
        now_ms + (u64::from(self.days) + LOCK_SLACK_DAYS) * DAY_MS
    }

    pub fn lock(&self, until_ms: u64) -> Lock {
        Lock {
            mode: self.mode,
            until: std::time::UNIX_EPOCH + std::time::Duration::from_millis(until_ms),
        }
    }
}

/// What a pass of [`S3Store::keep_locked`] did.
#[derive(Debug, Default)]
pub struct LockReport {
    /// Blocks whose lock was read from the bucket (not known to this receiver).
    pub read: usize,
    /// Blocks whose lock was extended.
    pub extended: usize,
    /// Blocks not locked long enough, and why (missing from the bucket, a request failed).
    pub failed: Vec<(BlockHash, String)>,
}

pub struct S3Store {
    s3: S3,
    lock: Option<LockPolicy>,
    /// Each block's locked version and when its lock ends, as far as this receiver knows: set
    /// by its writes and extensions, read from the bucket when unknown; kept in `locks_path`
    /// between runs (`None` until first used).
    locks: std::sync::Mutex<Option<LockMap>>,
    locks_path: std::path::PathBuf,
    /// Held while `locks_path` is written.
    locks_save: std::sync::Mutex<()>,
    /// Which bucket and prefix the lock file speaks of (its header): one written for another
    /// is not read.
    locks_of: String,
    /// Dropped with `shutdown_background` (see `Drop`): a runtime may not be dropped where
    /// blocking is not allowed, and the store's last reference may go in async code.
    rt: Option<tokio::runtime::Runtime>,
    in_flight: usize,
    /// The quarantine fence's lock file: shared by sessions, exclusive around a quarantine.
    fence: std::path::PathBuf,
    /// See [`Index`] and the module docs.
    index: Arc<std::sync::Mutex<Index>>,
    /// Signalled when a sweep's fence ends, or the receiver stops.
    sweep_ended: std::sync::Condvar,
    /// The receiver is stopping: no batch waits for a sweep any more ([`S3Store::stop_waiting`]).
    stopping: std::sync::atomic::AtomicBool,
    /// How long one attempt of a request may take (`attempt_timeout_secs`).
    attempt_timeout: std::time::Duration,
}

/// Every block of the prefix, as this process knows it. One lock for all of it: listings,
/// removals and purges never interleave.
#[derive(Default)]
struct Index {
    /// Listed at the first `has` (under the quarantine fence), then kept by this process's
    /// writes and removals; `None` until then or after an error.
    blocks: Option<HashSet<BlockHash>>,
    /// The quarantine mark the blocks are current with: read before the listing, and again
    /// at each purge.
    mark: Option<Vec<u8>>,
    /// Bumped by every removal, purge and reset: an insert whose PUTs spanned one adds
    /// nothing (its blocks then look absent and are sent again, which is always safe), and a
    /// listing that spanned one is thrown away.
    epoch: u64,
    /// A listing is under way in the background (`has` asks with HEAD meanwhile).
    loading: bool,
    /// The fleet's block sweep this receiver is fenced for, while it is open.
    sweep: Option<SweepFence>,
}

/// A fleet sweep's fence in the index (see `crate::fleet::bucket::sweep`): its candidates
/// are not held for dedupe (`has` says no, so agents send them), and a batch of generation
/// `from` or later that brings one waits for the sweep to end before writing it.
struct SweepFence {
    id: String,
    candidates: HashSet<BlockHash>,
    /// The first batch generation that sees the fence.
    from: u64,
    /// By this receiver's clock, the sweeper sends no delete after then.
    until: std::time::Instant,
    /// Candidates taken out of the index meanwhile (removed, quarantined): never put back.
    dropped: HashSet<BlockHash>,
}

impl Index {
    fn reset(&mut self) {
        self.blocks = None;
        self.epoch += 1;
    }

    /// Takes `hashes` out of the index (and out of what a sweep's end puts back).
    fn drop_blocks<'a>(&mut self, hashes: impl IntoIterator<Item = &'a BlockHash>) {
        for h in hashes {
            if let Some(blocks) = self.blocks.as_mut() {
                blocks.remove(h);
            }
            if let Some(s) = self.sweep.as_mut() {
                if s.candidates.contains(h) {
                    s.dropped.insert(*h);
                }
            }
        }
    }

    fn candidate(&self, hash: &BlockHash) -> bool {
        self.sweep
            .as_ref()
            .is_some_and(|s| s.candidates.contains(hash))
    }
}

fn remote(e: CallError) -> StoreError {
    StoreError::Remote {
        retryable: matches!(e, CallError::Exhausted { .. }),
        message: e.to_string(),
    }
}

fn put_err(e: PutError) -> StoreError {
    match e {
        PutError::Failed(c) => remote(c),
        other => StoreError::Remote {
            message: format!("a conditional write was refused: {other}"),
            retryable: true,
        },
    }
}

/// The blocks of a listing of `blocks/`: exactly a block's key, nothing nested or misplaced.
fn blocks_of(listed: Vec<crate::aws::s3::Listed>) -> Vec<(BlockHash, SystemTime)> {
    listed
        .into_iter()
        .filter_map(|o| {
            let hash = BlockHash::from_hex(o.key.rsplit('/').next()?)?;
            (o.key == block_key(&hash)).then_some((hash, o.modified))
        })
        .collect()
}

/// The quarantine fence at `path`, on a descriptor of its own (flock belongs to the open file,
/// so threads must not share one).
fn lock_fence_at(path: &std::path::Path, exclusive: bool) -> Result<std::fs::File, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    crate::sys::flock(&f, exclusive, false).map_err(io)?;
    Ok(f)
}

/// Where a block lives in the bucket, under the prefix.
pub(crate) fn block_key(hash: &BlockHash) -> String {
    let hex = hash.to_hex();
    format!("blocks/{}/{hex}", &hex[..2])
}

impl S3Store {
    /// Connects to the bucket of `cfg` and checks it answers (a listing of one key), so a
    /// wrong bucket, endpoint or credentials fail here, named, and not at the first block.
    /// `state_dir`: where the quarantine fence's lock file lives.
    pub fn open(
        cfg: &S3Config,
        owner: &str,
        state_dir: &std::path::Path,
    ) -> Result<S3Store, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lifeboat-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Remote {
                message: format!("starting the S3 client's runtime: {e}"),
                retryable: false,
            })?;
        let c = cfg.clone();
        let s3 = run_on(&rt, async move { S3::connect(&c).await });
        let store = S3Store {
            s3,
            lock: cfg.object_lock_days.map(|days| LockPolicy {
                days,
                mode: cfg.object_lock_mode,
            }),
            locks: Default::default(),
            locks_path: state_dir.join("object-locks"),
            locks_save: Default::default(),
            locks_of: format!("{}/{}", cfg.bucket, cfg.prefix),
            rt: Some(rt),
            in_flight: cfg.requests_in_flight.max(1),
            fence: state_dir.join("quarantine.lock"),
            index: Default::default(),
            sweep_ended: Default::default(),
            stopping: Default::default(),
            attempt_timeout: std::time::Duration::from_secs(cfg.attempt_timeout_secs.max(1)),
        };
        // Through the retry policy: a bucket throttling at start slows the start down.
        let probe = store.s3.clone();
        store
            .run(async move { probe.probe("blocks/").await })
            .map_err(|e| StoreError::Remote {
                message: format!("bucket {:?} does not answer: {e}", cfg.bucket),
                retryable: false,
            })?;
        if store.lock.is_some() {
            let s3 = store.s3.clone();
            let enabled = store
                .run(async move { s3.object_lock_enabled().await })
                .map_err(remote)?;
            if !enabled {
                return Err(StoreError::Remote {
                    message: format!(
                        "bucket {:?} does not have Object Lock enabled, and object_lock_days is \
                         set in [s3]: enable it on the bucket (versioning on, then \
                         `aws s3api put-object-lock-configuration --bucket {} \
                         --object-lock-configuration ObjectLockEnabled=Enabled`), or remove \
                         object_lock_days",
                        cfg.bucket, cfg.bucket
                    ),
                    retryable: false,
                });
            }
        }
        store.claim(owner)?;
        if owner == FLEET {
            store.agree_on_locks()?;
        }
        if store.lock.is_some() {
            store.check_lifecycle(&cfg.bucket);
        }
        Ok(store)
    }

    /// Under Object Lock the bucket is versioned: lease renewals, segments and every other
    /// object rewritten or deleted leave noncurrent versions, kept forever without a
    /// lifecycle rule that expires them. Said at start, never refused.
    fn check_lifecycle(&self, bucket: &str) {
        let s3 = self.s3.clone();
        match self.run(async move { s3.expires_noncurrent_versions().await }) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "bucket {bucket:?} has no lifecycle rule expiring noncurrent versions: every \
                 lease renewal, journal segment and deleted point stays stored, and billed, \
                 forever. Add one (NoncurrentVersionExpiration, a day or more; it cannot remove \
                 a locked version before its lock ends): see docs/scale.md, Object Lock"
            ),
            Err(e) => tracing::warn!(
                "reading the lifecycle rules of bucket {bucket:?}: {e}; make sure one expires \
                 noncurrent versions (docs/scale.md, Object Lock)"
            ),
        }
    }

    /// In a fleet, every receiver must lock alike: one that does not would write unlocked
    /// blocks and points, and its retention would hide locked points behind delete markers.
    /// The first receiver under Object Lock records the settings (`object-lock.json`);
    /// every receiver checks them at its start.
    fn agree_on_locks(&self) -> Result<(), StoreError> {
        let s3 = self.s3.clone();
        let url = s3.url(LOCK_SETTINGS);
        let there = self
            .run(async move { s3.get(LOCK_SETTINGS).await })
            .map_err(remote)?;
        let refuse = |message: String| {
            Err(StoreError::Remote {
                message,
                retryable: false,
            })
        };
        match (there, self.lock) {
            (None, None) => Ok(()),
            (None, Some(p)) => {
                let body = serde_json::to_vec_pretty(&serde_json::json!({
                    "object_lock_days": p.days,
                    "object_lock_mode": p.mode,
                }))
                .unwrap_or_default();
                let s3 = self.s3.clone();
                match self.run(async move { s3.put(LOCK_SETTINGS, body, &Condition::Absent).await })
                {
                    // Another receiver's at the same moment: checked at the next start.
                    Ok(_) | Err(PutError::Lost | PutError::Conflict) => Ok(()),
                    Err(e) => Err(put_err(e)),
                }
            }
            (Some((raw, _)), mine) => {
                let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
                let days = v["object_lock_days"].as_u64();
                let mode: Option<LockMode> =
                    serde_json::from_value(v["object_lock_mode"].clone()).ok();
                let (Some(days), Some(mode)) = (days, mode) else {
                    return refuse(format!(
                        "{url} is unreadable: {}",
                        String::from_utf8_lossy(&raw)
                    ));
                };
                let theirs = format!(
                    "object_lock_days = {days}, object_lock_mode = {:?}",
                    mode.as_s3().to_lowercase()
                );
                match mine {
                    None => refuse(format!(
                        "this fleet locks its points ({theirs}, as {url} says) and this receiver \
                         does not: set them in [s3] (or, to stop locking in the whole fleet, \
                         delete that object and the settings of every receiver)"
                    )),
                    Some(p) if p.mode != mode => refuse(format!(
                        "this fleet locks in {} mode ({theirs}, as {url} says), this receiver in \
                         {} mode: make the settings agree",
                        mode.as_s3().to_lowercase(),
                        p.mode.as_s3().to_lowercase()
                    )),
                    Some(p) => {
                        if u64::from(p.days) != days {
                            tracing::warn!(
                                "this receiver locks daily points for {} days, the fleet's \
                                 settings say {days} ({url}): each receiver locks the points it \
                                 holds as its own settings say",
                                p.days
                            );
                        }
                        Ok(())
                    }
                }
            }
        }
    }

    /// `object_lock_days` and `object_lock_mode`, when set.
    pub fn lock_policy(&self) -> Option<LockPolicy> {
        self.lock
    }

    /// Makes sure each block of `needs` is locked at least until its time (unix ms): from what
    /// this receiver knows, else by reading its lock (HEAD); those locked too briefly are
    /// extended (PutObjectRetention) to a new block's lock from now, so each is touched about
    /// once every [`LOCK_SLACK_DAYS`]. Requests run `requests_in_flight` at a time. What this
    /// receiver knows is saved for its next run.
    pub fn keep_locked(
        &self,
        needs: &HashMap<BlockHash, u64>,
        deadline: Option<std::time::Instant>,
    ) -> Result<LockReport, StoreError> {
        let Some(policy) = self.lock else {
            return Ok(LockReport::default());
        };
        let mut report = LockReport::default();
        let todo: Vec<(BlockHash, u64, Option<BlockLock>)> = {
            let mut locks = self.locks();
            let known = self.loaded(&mut locks);
            needs
                .iter()
                .filter_map(|(h, need)| {
                    let k = known.blocks.get(h).cloned();
                    (k.as_ref().map_or(0, |k| k.until_ms) < *need).then_some((*h, *need, k))
                })
                .collect()
        };
        let asked: Vec<BlockHash> = todo.iter().map(|(h, _, _)| *h).collect();
        let s3 = self.s3.clone();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        let mut results = self.run(async move {
            let mut set = tokio::task::JoinSet::new();
            for (hash, need, known) in todo {
                let (s3, limit) = (s3.clone(), limit.clone());
                set.spawn(async move {
                    let _slot = limit.acquire_owned().await;
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        return (
                            hash,
                            Err("out of time: checked at the next pass".to_string()),
                        );
                    }
                    (hash, keep_one(&s3, &policy, &hash, need, known).await)
                });
            }
            let mut out = HashMap::new();
            while let Some(r) = set.join_next().await {
                if let Ok((hash, r)) = r {
                    out.insert(hash, r);
                }
            }
            out
        });
        let mut locks = self.locks();
        let known = self.loaded(&mut locks);
        for hash in asked {
            // A task that panicked left no answer: not locked, as far as anyone knows.
            match results.remove(&hash) {
                Some(Ok(k)) => {
                    report.read += usize::from(k.read);
                    report.extended += usize::from(k.extended);
                    known.blocks.insert(hash, k.lock);
                    known.dirty = true;
                }
                Some(Err(why)) => report.failed.push((hash, why)),
                None => report.failed.push((hash, "its task failed".into())),
            }
        }
        // (Every pin is kept, ended locks too: the version a point names stays the one to
        // extend when a later point names the block again.)
        if known.dirty {
            let bytes = encode_locks(&self.locks_of, &known.blocks);
            known.dirty = false;
            drop(locks);
            // Written outside the lock (inserts wait on it); one writer at a time.
            let _one = self.locks_save.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = lifeboat_common::durable::write_atomic(&self.locks_path, &bytes) {
                tracing::warn!(
                    "saving what is known of the blocks' locks to {}: {e}; they are read from \
                     the bucket again next run",
                    self.locks_path.display()
                );
                self.locks()
                    .get_or_insert_with(|| LockMap {
                        blocks: HashMap::new(),
                        dirty: false,
                    })
                    .dirty = true;
            }
        }
        Ok(report)
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, Option<LockMap>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The known locks, loaded from `locks_path` at the first use (an unreadable file, or one
    /// of another bucket or prefix, is as if empty: everything is read from the bucket again).
    fn loaded<'a>(&self, locks: &'a mut Option<LockMap>) -> &'a mut LockMap {
        locks.get_or_insert_with(|| LockMap {
            blocks: load_locks(&self.locks_path, &self.locks_of),
            dirty: false,
        })
    }

    /// Makes the bucket's prefix this receiver's (`owner.json`, written only if absent), or
    /// checks it is: two receivers on one prefix would each garbage-collect the blocks only
    /// the other's points name.
    fn claim(&self, owner: &str) -> Result<(), StoreError> {
        let s3 = self.s3.clone();
        let body = serde_json::to_vec_pretty(&serde_json::json!({
            "install_id": owner,
            "claimed_unix_ms": crate::status::now_ms(),
        }))
        .unwrap_or_default();
        let url = s3.url(OWNER);
        let url2 = url.clone();
        let there = self.run(async move {
            match s3.put(OWNER, body, &Condition::Absent).await {
                Ok(_) => Ok(None),
                Err(PutError::Lost | PutError::Conflict) => match s3.get(OWNER).await {
                    Ok(Some(v)) => Ok(Some(v)),
                    // Another receiver's claim in flight: nothing is known yet.
                    Ok(None) => Err(StoreError::Remote {
                        message: format!("{url2}: another receiver is claiming this prefix now"),
                        retryable: true,
                    }),
                    Err(e) => Err(remote(e)),
                },
                Err(e) => Err(put_err(e)),
            }
        })?;
        let Some((raw, _)) = there else {
            return Ok(());
        };
        let holder = serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v["install_id"].as_str().map(str::to_string))
            .unwrap_or_else(|| "(unreadable)".into());
        if holder == owner {
            return Ok(());
        }
        if holder == FLEET || owner == FLEET {
            let (this, that) = if owner == FLEET {
                (
                    "this receiver is in a fleet ([fleet] in receiver.toml)",
                    format!("it belongs to receiver {holder} alone"),
                )
            } else {
                (
                    "this receiver is not in a fleet (no [fleet] in receiver.toml)",
                    "it is a fleet's".to_string(),
                )
            };
            return Err(StoreError::Remote {
                message: format!(
                    "{url}: {this}, but {that}: receivers that do not share leases would \
                     delete each other's blocks. Make the settings agree, or give this receiver \
                     a prefix of its own (`prefix` in [s3])"
                ),
                retryable: false,
            });
        }
        Err(StoreError::Remote {
            message: format!(
                "{url} says this prefix belongs to another receiver (install id {holder}; this \
                 one is {owner}): two receivers on one prefix would delete each other's blocks. \
                 Give this receiver a prefix of its own (`prefix` in [s3])"
            ),
            retryable: false,
        })
    }

    /// Runs `f` on the store's runtime and waits for it (from any thread).
    pub fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        // The runtime is only taken in Drop.
        #[allow(clippy::expect_used)]
        run_on(self.rt.as_ref().expect("the store's runtime is alive"), f)
    }

    /// The fence, on a descriptor of its own (flock belongs to the open file, so threads must
    /// not share one).
    fn lock_fence(&self, exclusive: bool) -> Result<std::fs::File, StoreError> {
        lock_fence_at(&self.fence, exclusive)
    }

    /// Lists the prefix's blocks into the index on a thread of its own, under the quarantine
    /// fence (no quarantine during the listing) with the mark read first (a quarantine after
    /// it is seen as a change). Thrown away if a removal or purge came meanwhile.
    fn start_loading(&self, index: &mut Index) {
        if index.loading {
            return;
        }
        let Some(rt) = self.rt.as_ref() else { return };
        index.loading = true;
        let start = index.epoch;
        let (shared, s3, fence, handle) = (
            self.index.clone(),
            self.s3.clone(),
            self.fence.clone(),
            rt.handle().clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("lifeboat-s3-index".into())
            .spawn(move || {
                let listed = (|| -> Result<(Option<Vec<u8>>, HashSet<BlockHash>), StoreError> {
                    let _fence = lock_fence_at(&fence, false)?;
                    let mark = handle.block_on(s3.get(QUARANTINE_MARK)).map_err(remote)?;
                    let objects = handle.block_on(s3.list("blocks/")).map_err(remote)?;
                    Ok((
                        mark.map(|(body, _)| body),
                        blocks_of(objects).into_iter().map(|(h, _)| h).collect(),
                    ))
                })();
                let mut index = shared.lock().unwrap_or_else(|e| e.into_inner());
                index.loading = false;
                match listed {
                    Ok((mark, blocks)) if index.epoch == start => {
                        tracing::info!(blocks = blocks.len(), "staging store index listed");
                        index.blocks = Some(blocks);
                        index.mark = mark;
                    }
                    // Something was removed or purged meanwhile: listed again at the next `has`.
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        "listing the staging store's blocks: {e}; asking the bucket block by \
                         block meanwhile"
                    ),
                }
            });
        if spawned.is_err() {
            index.loading = false;
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client, for tests and commands that inspect the bucket.
    pub fn client(&self) -> &S3 {
        &self.s3
    }

    /// How long one attempt of a request may take.
    pub fn attempt_timeout(&self) -> std::time::Duration {
        self.attempt_timeout
    }

    /// Fences the index for the fleet sweep `id` (called inside `Batches::fence`, `from`
    /// being the new generation): its candidates leave the dedupe index until
    /// [`S3Store::end_sweep`]. A fence for another sweep still in place ends first, as if
    /// what that sweep deleted were unknown.
    pub fn begin_sweep(
        &self,
        id: &str,
        candidates: HashSet<BlockHash>,
        from: u64,
        until: std::time::Instant,
    ) {
        let mut index = self.index();
        if let Some(old) = index.sweep.take() {
            if old.id == id {
                index.sweep = Some(old);
                return;
            }
            Self::unfence(&mut index, old, None);
            self.sweep_ended.notify_all();
        }
        if let Some(blocks) = index.blocks.as_mut() {
            for h in &candidates {
                blocks.remove(h);
            }
        }
        index.sweep = Some(SweepFence {
            id: id.to_string(),
            candidates,
            from,
            until,
            dropped: HashSet::new(),
        });
    }

    /// The sweep the index is fenced for, if any.
    pub fn sweep_fenced(&self) -> Option<String> {
        self.index().sweep.as_ref().map(|s| s.id.clone())
    }

    /// Ends the fence of sweep `id`: the candidates it `deleted` stay out of the index, the
    /// others are held again. `None`: what it deleted is unknown (the index is listed again).
    pub fn end_sweep(&self, id: &str, deleted: Option<&HashSet<BlockHash>>) {
        let mut index = self.index();
        if index.sweep.as_ref().is_some_and(|s| s.id == id) {
            if let Some(old) = index.sweep.take() {
                Self::unfence(&mut index, old, deleted);
            }
        }
        drop(index);
        self.sweep_ended.notify_all();
    }

    fn unfence(index: &mut Index, old: SweepFence, deleted: Option<&HashSet<BlockHash>>) {
        let Some(deleted) = deleted else {
            // Which candidates are left is unknown: listed again (a `has` asks the bucket
            // until then), so a kept one named by a batch is never taken for missing.
            index.reset();
            return;
        };
        if let Some(blocks) = index.blocks.as_mut() {
            for h in old.candidates {
                if deleted.contains(&h) || old.dropped.contains(&h) {
                    blocks.remove(&h);
                } else {
                    blocks.insert(h);
                }
            }
        }
        // A listing that spanned the sweep may name what it deleted.
        index.epoch += 1;
    }

    /// Takes blocks another receiver's sweep deleted out of the index.
    pub fn forget(&self, deleted: &HashSet<BlockHash>) {
        let mut index = self.index();
        index.drop_blocks(deleted);
        index.epoch += 1;
    }

    /// Forgets the whole index: listed again at the next `has`.
    pub fn reset_index(&self) {
        self.index().reset();
    }

    /// Waits while a sweep fenced at or before batch generation `generation` may still
    /// delete one of `hashes` (until it ends, or its deadline has passed by this clock);
    /// false if the receiver began to stop first (the batch must then fail: what it would
    /// write may yet be deleted).
    pub fn wait_for_sweep(&self, hashes: &[BlockHash], generation: u64) -> bool {
        use std::sync::atomic::Ordering;
        let mut index = self.index();
        let mut said = false;
        loop {
            let until = match index.sweep.as_ref() {
                Some(s)
                    if s.from <= generation && hashes.iter().any(|h| s.candidates.contains(h)) =>
                {
                    s.until
                }
                _ => return true,
            };
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= until {
                return true;
            }
            if !said {
                tracing::info!(
                    "a batch waits for the fleet's block sweep to end: it brings a block the \
                     sweep may delete, written again after it"
                );
                said = true;
            }
            index = self
                .sweep_ended
                .wait_timeout(index, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The receiver is stopping: batches waiting for a sweep stop waiting (and fail).
    pub fn stop_waiting(&self) {
        let index = self.index();
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(index);
        self.sweep_ended.notify_all();
    }

    /// Deletes up to 1000 blocks, sending no attempt after `send_by`. True if no attempt of
    /// this store's requests was retried meanwhile: an attempt that failed may still be
    /// carried out by the bucket later (others' retries count too, which only errs on the
    /// side of waiting).
    pub fn delete_by(
        &self,
        hashes: &[BlockHash],
        send_by: crate::lease::Moment,
    ) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        {
            let mut index = self.index();
            index.drop_blocks(hashes);
            index.epoch += 1;
        }
        let retries = self.s3.retrier.retries.load(SeqCst);
        let s3 = self.s3.with_send_by(send_by);
        let keys: Vec<String> = hashes.iter().map(block_key).collect();
        self.run(async move { s3.delete_many(&keys).await })
            .map_err(remote)?;
        Ok(self.s3.retrier.retries.load(SeqCst) == retries)
    }
}

/// Runs `f` on `rt` and waits for it, from any thread: async code included, where
/// `Runtime::block_on` would panic.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    // A task of ours only ends without sending by panicking, which the receiver's panic
    // policy already handles as a bug; say so rather than hang.
    #[allow(clippy::expect_used)]
    rx.recv().expect("an S3 request task panicked")
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl BlockStore for S3Store {
    fn insert(&self, blocks: &[VerifiedBlock]) -> Result<usize, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut bodies = Vec::new();
        for b in blocks {
            if seen.insert(b.hash) {
                let mut body = Vec::with_capacity(1 + b.data.len());
                body.push(b.codec as u8);
                body.extend_from_slice(&b.data);
                bodies.push((b.hash, body));
            }
        }
        if bodies.is_empty() {
            return Ok(0);
        }
        let epoch = self.index().epoch;
        let s3 = self.s3.clone();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        // Under Object Lock, a new block is locked from now for a point's lock and the slack.
        let lock_until = self.lock.map(|p| p.block_until_ms(crate::status::now_ms()));
        let lock = self.lock.zip(lock_until).map(|(p, u)| p.lock(u));
        let written = self.run(async move {
            let mut set = tokio::task::JoinSet::new();
            for (hash, body) in bodies {
                let s3 = s3.clone();
                let limit = limit.clone();
                set.spawn(async move {
                    let _slot = limit.acquire_owned().await;
                    let key = block_key(&hash);
                    let lock = lock.as_ref();
                    match s3
                        .put_locked(&key, body.clone(), &Condition::Absent, lock)
                        .await
                    {
                        Ok(w) => Ok(Some((hash, w.version))),
                        // There already, and durable (S3 is strongly consistent).
                        Err(PutError::Lost) => Ok(None),
                        // A concurrent write of the same key may still fail: ours goes in
                        // unconditionally (same name, same content).
                        Err(PutError::Conflict) => s3
                            .put_locked(&key, body, &Condition::None, lock)
                            .await
                            .map(|w| Some((hash, w.version)))
                            .map_err(put_err),
                        Err(e) => Err(put_err(e)),
                    }
                });
            }
            let mut written = Vec::new();
            let mut first_err = None;
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(Some(h))) => written.push(h),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(StoreError::Remote {
                            message: format!("a PUT task failed: {e}"),
                            retryable: false,
                        });
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(written),
            }
        })?;
        // Every PUT returned: each block is in the bucket, durable, unless a purge or reset
        // came meanwhile (a quarantine may have taken one of them since its PUT).
        // What this batch wrote is locked until `lock_until`; blocks that were there already
        // keep the lock they had, unknown here (the lock keeper reads it when a point names
        // them).
        if let Some(until_ms) = lock_until {
            let mut locks = self.locks();
            let known = self.loaded(&mut locks);
            for (h, version) in &written {
                let version = version.clone();
                known.blocks.insert(*h, BlockLock { until_ms, version });
            }
            known.dirty |= !written.is_empty();
        }
        let mut index = self.index();
        if index.epoch == epoch {
            if let Some(blocks) = index.blocks.as_mut() {
                blocks.extend(seen);
            }
        }
        Ok(written.len())
    }

    fn requests(&self) -> Option<super::RequestCounts> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.s3.retrier;
        Some(super::RequestCounts {
            requests: r.requests.load(Relaxed),
            retries: r.retries.load(Relaxed),
            throttles: r.throttles.load(Relaxed),
        })
    }

    /// From the index once it is listed (in the background, from the first call); a HEAD
    /// until then.
    /// call).
    fn has(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        if hash.is_zero() {
            return Ok(true);
        }
        {
            let mut index = self.index();
            if index.candidate(hash) {
                return Ok(false); // a fleet sweep may delete it: the agent sends it
            }
            if let Some(blocks) = index.blocks.as_ref() {
                return Ok(blocks.contains(hash));
            }
            self.start_loading(&mut index);
        }
        let s3 = self.s3.clone();
        let key = block_key(hash);
        self.run(async move { s3.exists(&key).await })
            .map_err(remote)
    }

    /// A sweep's candidate is asked of the bucket (it is there until the sweep deletes it,
    /// which it does only if nothing names it); the rest as `has`.
    fn holds(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        if !self.index().candidate(hash) {
            return self.has(hash);
        }
        let s3 = self.s3.clone();
        let key = block_key(hash);
        self.run(async move { s3.exists(&key).await })
            .map_err(remote)
    }

    fn read(&self, hash: &BlockHash) -> Result<Vec<u8>, StoreError> {
        let s3 = self.s3.clone();
        let key = block_key(hash);
        match self
            .run(async move { s3.get(&key).await })
            .map_err(remote)?
        {
            Some((raw, _)) => super::decode_stored(hash, &raw),
            None => Err(StoreError::Missing { hash: *hash }),
        }
    }

    fn list(&self) -> Result<Vec<(BlockHash, SystemTime)>, StoreError> {
        let s3 = self.s3.clone();
        let listed = self
            .run(async move { s3.list("blocks/").await })
            .map_err(remote)?;
        Ok(blocks_of(listed))
    }

    fn remove(&self, hash: &BlockHash) -> Result<(), StoreError> {
        self.remove_many(std::slice::from_ref(hash))
    }

    /// One DeleteObjects request per 1000 blocks, each out of the index first; the index
    /// stays locked until the deletes returned, so no listing can see a block being deleted.
    fn remove_many(&self, hashes: &[BlockHash]) -> Result<(), StoreError> {
        let mut index = self.index();
        index.drop_blocks(hashes);
        index.epoch += 1;
        for chunk in hashes.chunks(1000) {
            let s3 = self.s3.clone();
            let keys: Vec<String> = chunk.iter().map(block_key).collect();
            self.run(async move { s3.delete_many(&keys).await })
                .map_err(remote)?;
        }
        Ok(())
    }

    /// Copies the block to `quarantine/`, changes the mark, then deletes the block (the mark
    /// before the removal: if the removal then fails, sessions re-check for nothing).
    fn quarantine(&self, hash: &BlockHash) -> Result<String, StoreError> {
        let _exclusive = self.lock_fence(true)?;
        let mut index = self.index();
        index.drop_blocks(std::slice::from_ref(hash));
        index.epoch += 1;
        drop(index);
        let s3 = self.s3.clone();
        let key = block_key(hash);
        let dst = format!("quarantine/{}.{}", hash.to_hex(), crate::status::now_ms());
        let url = s3.url(&dst);
        self.run(async move {
            s3.copy(&key, &dst).await.map_err(remote)?;
            s3.put(
                QUARANTINE_MARK,
                rand::random::<[u8; 16]>().to_vec(),
                &Condition::None,
            )
            .await
            .map_err(put_err)?;
            s3.delete(&key, None).await.map_err(put_err)
        })?;
        Ok(url)
    }

    fn quarantine_fence(&self) -> Result<Fence, StoreError> {
        Ok(Fence::new(self.lock_fence(false)?))
    }

    fn quarantined(&self) -> Result<std::collections::HashSet<BlockHash>, StoreError> {
        let s3 = self.s3.clone();
        let listed = self
            .run(async move { s3.list("quarantine/").await })
            .map_err(remote)?;
        Ok(listed
            .into_iter()
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?;
                BlockHash::from_hex(name.split('.').next()?)
            })
            .collect())
    }

    /// A mark that cannot be read counts as changed (a fresh random value): the session then
    /// re-checks its disks, which costs requests but never misses a quarantine.
    fn quarantine_mark(&self) -> Option<Vec<u8>> {
        let s3 = self.s3.clone();
        let mark = match self.run(async move { s3.get(QUARANTINE_MARK).await }) {
            Ok(m) => m.map(|(body, _)| body),
            Err(e) => {
                tracing::warn!("reading the quarantine mark: {e}; re-checking as if it changed");
                // Forget the index too: it is listed again at the next `has`.
                self.index().reset();
                return Some(rand::random::<[u8; 16]>().to_vec());
            }
        };
        let mut index = self.index();
        if index.blocks.is_some() && index.mark != mark {
            // Another process (scrub) quarantined blocks: whatever it moved is not held.
            // (Every block ever quarantined, resent ones too: those are sent once more.)
            match self.quarantined() {
                Ok(gone) => {
                    index.drop_blocks(&gone);
                    index.epoch += 1;
                    index.mark = mark.clone();
                }
                Err(_) => index.reset(),
            }
        }
        drop(index);
        mark
    }
}

/// A block's lock as this receiver knows it: the version it pins (the one this receiver
/// wrote, or the one current when it first read it) and when that version's lock ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLock {
    pub until_ms: u64,
    pub version: Option<String>,
}

/// What [`S3Store`] knows of blocks' locks, and whether that changed since it was saved.
pub struct LockMap {
    blocks: HashMap<BlockHash, BlockLock>,
    dirty: bool,
}

/// What [`keep_one`] found or did.
struct Kept {
    lock: BlockLock,
    read: bool,
    extended: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes one block's lock reach `need` (unix ms), on the version this receiver knows (a
/// newer version someone else put over it is not the content points name), else the current
/// one: read first when not known, extended when short. An extension S3 refuses (another
/// receiver moved it further) is read back.
async fn keep_one(
    s3: &S3,
    policy: &LockPolicy,
    hash: &BlockHash,
    need: u64,
    known: Option<BlockLock>,
) -> Result<Kept, String> {
    let key = block_key(hash);
    let read_lock = |version: Option<String>| {
        let (s3, key) = (s3.clone(), key.clone());
        async move {
            match s3.retention(&key, version.as_deref()).await {
                Ok((Retention::Until(t), v)) => Ok(BlockLock {
                    until_ms: unix_ms(t),
                    version: v.or(version),
                }),
                Ok((Retention::Unlocked, v)) => Ok(BlockLock {
                    until_ms: 0,
                    version: v.or(version),
                }),
                Ok((Retention::Missing, _)) => Err(match &version {
                    Some(v) => format!(
                        "version {v} of {} is gone, though a point names it",
                        s3.url(&key)
                    ),
                    None => format!(
                        "{} is not in the bucket, though a point names it",
                        s3.url(&key)
                    ),
                }),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let mut kept = Kept {
        lock: BlockLock {
            until_ms: 0,
            version: None,
        },
        read: false,
        extended: false,
    };
    match known {
        Some(k) if k.version.is_some() => kept.lock = k,
        _ => {
            kept.lock = read_lock(None).await?;
            kept.read = true;
            if kept.lock.until_ms >= need {
                return Ok(kept);
            }
        }
    }
    let until = policy.block_until_ms(crate::status::now_ms()).max(need);
    let version = kept.lock.version.clone();
    match s3
        .extend_lock(&key, version.as_deref(), &policy.lock(until))
        .await
    {
        Ok(()) => {
            kept.lock.until_ms = until;
            kept.extended = true;
            Ok(kept)
        }
        Err(e) => {
            let now = read_lock(version).await?;
            kept.read = true;
            if now.until_ms >= need {
                kept.lock = now;
                Ok(kept)
            } else {
                Err(format!("extending the lock of {}: {e}", s3.url(&key)))
            }
        }
    }
}

const LOCKS_MAGIC: &[u8; 8] = b"LBLOCKS2";

/// `locks_path`: the magic, the bucket and prefix it speaks of (u16 length, UTF-8), then per
/// block its hash (32 bytes), the lock's end (unix ms, u64 LE) and the pinned version (u8
/// length, then its bytes; 0: the current one).
fn load_locks(path: &std::path::Path, of: &str) -> HashMap<BlockHash, BlockLock> {
    let Ok(raw) = std::fs::read(path) else {
        return Default::default();
    };
    let parsed = (|| {
        let body = raw.strip_prefix(LOCKS_MAGIC.as_slice())?;
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let field = body.get(at..at.checked_add(n)?)?;
            at += n;
            Some(field)
        };
        let len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        if take(len)? != of.as_bytes() {
            return None;
        }
        let mut out = HashMap::new();
        let entries_from = 2 + len;
        let mut at_entry = entries_from;
        while at_entry < body.len() {
            let mut take = |n: usize| -> Option<&[u8]> {
                let field = body.get(at_entry..at_entry.checked_add(n)?)?;
                at_entry += n;
                Some(field)
            };
            let hash = BlockHash(take(32)?.try_into().ok()?);
            let until_ms = u64::from_le_bytes(take(8)?.try_into().ok()?);
            let version = match take(1)?[0] as usize {
                0 => None,
                n => Some(String::from_utf8(take(n)?.to_vec()).ok()?),
            };
            out.insert(hash, BlockLock { until_ms, version });
        }
        Some(out)
    })();
    parsed.unwrap_or_else(|| {
        tracing::warn!(
            "{}: not a lock file of {of}; ignored (locks are read from the bucket again)",
            path.display()
        );
        Default::default()
    })
}

#[cfg(test)]
fn save_locks(
    path: &std::path::Path,
    of: &str,
    locks: &HashMap<BlockHash, BlockLock>,
) -> std::io::Result<()> {
    lifeboat_common::durable::write_atomic(path, &encode_locks(of, locks))
}

fn encode_locks(of: &str, locks: &HashMap<BlockHash, BlockLock>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + of.len() + 80 * locks.len());
    out.extend_from_slice(LOCKS_MAGIC);
    out.extend_from_slice(&(of.len() as u16).to_le_bytes());
    out.extend_from_slice(of.as_bytes());
    for (h, l) in locks {
        out.extend_from_slice(&h.0);
        out.extend_from_slice(&l.until_ms.to_le_bytes());
        // Version ids are short (S3: 32 characters); a longer one is not pinned.
        match l.version.as_deref().filter(|v| v.len() <= 255) {
            Some(v) => {
                out.push(v.len() as u8);
                out.extend_from_slice(v.as_bytes());
            }
            None => out.push(0),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_locks_survive_a_restart_and_a_bad_file_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object-locks");
        let of = "bucket/prefix/";
        assert!(load_locks(&path, of).is_empty());
        let locks: HashMap<BlockHash, BlockLock> = (0..100u8)
            .map(|i| {
                let lock = BlockLock {
                    until_ms: 1_700_000_000_000 + u64::from(i),
                    version: (i % 3 != 0).then(|| format!("v{i}-3HL4kqtJlcpXroDTDmJ")),
                };
                (BlockHash([i; 32]), lock)
            })
            .collect();
        save_locks(&path, of, &locks).unwrap();
        assert_eq!(load_locks(&path, of), locks);
        // Another bucket's or prefix's file is not this one's.
        assert!(load_locks(&path, "bucket/other/").is_empty());
        // Not ours, or cut short: what cannot be read is read from the bucket again.
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(load_locks(&path, of).is_empty());
        save_locks(&path, of, &locks).unwrap();
        let raw = std::fs::read(&path).unwrap();
        std::fs::write(&path, &raw[..raw.len() - 5]).unwrap();
        assert!(load_locks(&path, of).is_empty());
    }

    #[test]
    fn a_new_block_is_locked_past_a_daily_point_committed_within_the_slack() {
        let p = LockPolicy {
            days: 30,
            mode: LockMode::Compliance,
        };
        let written = 1_000 * DAY_MS;
        let block = p.block_until_ms(written);
        let daily = |committed: u64| committed + 30 * DAY_MS;
        assert_eq!(block, daily(written + LOCK_SLACK_DAYS * DAY_MS));
    }
}
