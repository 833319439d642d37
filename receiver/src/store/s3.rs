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
//!
//! **The quarantine fence** is a `flock` on `<state-dir>/quarantine.lock`, as the directory
//! store's: `scrub` runs in another process on the same state directory (and so the same
//! machine), and the prefix belongs to this receiver alone.

use super::{BlockStore, Fence, StoreError, VerifiedBlock};
use crate::aws::retry::CallError;
use crate::aws::s3::{Condition, Lock, PutError, Retention, S3};
use lifeboat_common::config::{LockMode, S3Config};
use lifeboat_common::BlockHash;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

const QUARANTINE_MARK: &str = "quarantine/mark";
/// Which receiver the prefix belongs to (see [`S3Store::claim`]).
const OWNER: &str = "owner.json";
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

    /// When a point committed at `committed_ms` stops being locked.
    pub fn point_until_ms(&self, committed_ms: u64) -> u64 {
        committed_ms + u64::from(self.days) * DAY_MS
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
    /// When each block's lock ends (unix ms), as far as this receiver knows: set by its
    /// writes and extensions, read from the bucket when unknown; kept in `locks_path` between
    /// runs. Only ever an underestimate that costs a request, never an overestimate: S3 never
    /// brings a lock's end nearer.
    locks: std::sync::Mutex<Option<std::collections::HashMap<BlockHash, u64>>>,
    locks_path: std::path::PathBuf,
    /// Dropped with `shutdown_background` (see `Drop`): a runtime may not be dropped where
    /// blocking is not allowed, and the store's last reference may go in async code.
    rt: Option<tokio::runtime::Runtime>,
    in_flight: usize,
    /// The quarantine fence's lock file: shared by sessions, exclusive around a quarantine.
    fence: std::path::PathBuf,
    /// See [`Index`] and the module docs.
    index: Arc<std::sync::Mutex<Index>>,
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
}

impl Index {
    fn reset(&mut self) {
        self.blocks = None;
        self.epoch += 1;
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

fn block_key(hash: &BlockHash) -> String {
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
            rt: Some(rt),
            in_flight: cfg.requests_in_flight.max(1),
            fence: state_dir.join("quarantine.lock"),
            index: Default::default(),
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
        Ok(store)
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
        needs: &std::collections::HashMap<BlockHash, u64>,
    ) -> Result<LockReport, StoreError> {
        let Some(policy) = self.lock else {
            return Ok(LockReport::default());
        };
        let mut report = LockReport::default();
        let todo: Vec<(BlockHash, u64, Option<u64>)> = {
            let mut locks = self.locks();
            let known = self.loaded(&mut locks);
            needs
                .iter()
                .filter_map(|(h, need)| {
                    let k = known.get(h).copied();
                    (k.unwrap_or(0) < *need).then_some((*h, *need, k))
                })
                .collect()
        };
        if todo.is_empty() {
            return Ok(report);
        }
        let s3 = self.s3.clone();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        let results = self.run(async move {
            let mut set = tokio::task::JoinSet::new();
            for (hash, need, known) in todo {
                let (s3, limit) = (s3.clone(), limit.clone());
                set.spawn(async move {
                    let _slot = limit.acquire_owned().await;
                    (hash, keep_one(&s3, &policy, &hash, need, known).await)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    out.push(r);
                }
            }
            out
        });
        {
            let mut locks = self.locks();
            let known = self.loaded(&mut locks);
            for (hash, r) in results {
                match r {
                    Ok(Kept {
                        until_ms,
                        read,
                        extended,
                    }) => {
                        report.read += usize::from(read);
                        report.extended += usize::from(extended);
                        known.insert(hash, until_ms);
                    }
                    Err(why) => report.failed.push((hash, why)),
                }
            }
            let now = crate::status::now_ms();
            known.retain(|_, until| *until > now);
            if let Err(e) = save_locks(&self.locks_path, known) {
                tracing::warn!(
                    "saving what is known of the blocks' locks to {}: {e}; they are read from \
                     the bucket again next run",
                    self.locks_path.display()
                );
            }
        }
        Ok(report)
    }

    fn locks(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<std::collections::HashMap<BlockHash, u64>>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The known locks, loaded from `locks_path` at the first use (an unreadable file is
    /// as if empty: everything is read from the bucket again).
    fn loaded<'a>(
        &self,
        locks: &'a mut Option<std::collections::HashMap<BlockHash, u64>>,
    ) -> &'a mut std::collections::HashMap<BlockHash, u64> {
        locks.get_or_insert_with(|| load_locks(&self.locks_path))
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
                        Ok(_) => Ok(Some(hash)),
                        // There already, and durable (S3 is strongly consistent).
                        Err(PutError::Lost) => Ok(None),
                        // A concurrent write of the same key may still fail: ours goes in
                        // unconditionally (same name, same content).
                        Err(PutError::Conflict) => s3
                            .put_locked(&key, body, &Condition::None, lock)
                            .await
                            .map(|_| Some(hash))
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
        if let Some(until) = lock_until {
            let mut locks = self.locks();
            let known = self.loaded(&mut locks);
            for h in &written {
                known.insert(*h, until);
            }
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
        if let Some(blocks) = index.blocks.as_mut() {
            for h in hashes {
                blocks.remove(h);
            }
        }
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
        if let Some(blocks) = index.blocks.as_mut() {
            blocks.remove(hash);
        }
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
                    if let Some(blocks) = index.blocks.as_mut() {
                        blocks.retain(|h| !gone.contains(h));
                    }
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

/// What [`keep_one`] found or did: the block's lock now ends at `until_ms`.
struct Kept {
    until_ms: u64,
    read: bool,
    extended: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes one block's lock reach `need` (unix ms): read first when `known` is not, extended
/// when short. An extension S3 refuses (another receiver moved it further) is read back.
async fn keep_one(
    s3: &S3,
    policy: &LockPolicy,
    hash: &BlockHash,
    need: u64,
    known: Option<u64>,
) -> Result<Kept, String> {
    let key = block_key(hash);
    let read_lock = || async {
        match s3.retention(&key).await {
            Ok(Retention::Until(t)) => Ok(unix_ms(t)),
            Ok(Retention::Unlocked) => Ok(0),
            Ok(Retention::Missing) => Err(format!(
                "{} is not in the bucket, though a point names it",
                s3.url(&key)
            )),
            Err(e) => Err(e.to_string()),
        }
    };
    let mut kept = Kept {
        until_ms: known.unwrap_or(0),
        read: false,
        extended: false,
    };
    if known.is_none() {
        kept.until_ms = read_lock().await?;
        kept.read = true;
        if kept.until_ms >= need {
            return Ok(kept);
        }
    }
    let until = policy.block_until_ms(crate::status::now_ms()).max(need);
    match s3.extend_lock(&key, &policy.lock(until)).await {
        Ok(()) => {
            kept.until_ms = until;
            kept.extended = true;
            Ok(kept)
        }
        Err(e) => {
            let now = read_lock().await?;
            if now >= need {
                kept.until_ms = now;
                kept.read = true;
                Ok(kept)
            } else {
                Err(format!("extending the lock of {}: {e}", s3.url(&key)))
            }
        }
    }
}

const LOCKS_MAGIC: &[u8; 8] = b"LBLOCKS1";

/// `locks_path`: the magic, then per block its hash (32 bytes) and lock end (unix ms, u64 LE).
fn load_locks(path: &std::path::Path) -> std::collections::HashMap<BlockHash, u64> {
    let Ok(raw) = std::fs::read(path) else {
        return Default::default();
    };
    let Some(body) = raw.strip_prefix(LOCKS_MAGIC.as_slice()) else {
        tracing::warn!("{}: not a lock file; ignored", path.display());
        return Default::default();
    };
    body.chunks_exact(40)
        .filter_map(|c| {
            let hash = BlockHash(c[..32].try_into().ok()?);
            Some((hash, u64::from_le_bytes(c[32..].try_into().ok()?)))
        })
        .collect()
}

fn save_locks(
    path: &std::path::Path,
    locks: &std::collections::HashMap<BlockHash, u64>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(8 + 40 * locks.len());
    out.extend_from_slice(LOCKS_MAGIC);
    for (h, until) in locks {
        out.extend_from_slice(&h.0);
        out.extend_from_slice(&until.to_le_bytes());
    }
    lifeboat_common::durable::write_atomic(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_locks_survive_a_restart_and_a_bad_file_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object-locks");
        assert!(load_locks(&path).is_empty());
        let locks: std::collections::HashMap<BlockHash, u64> = (0..100u8)
            .map(|i| (BlockHash([i; 32]), 1_700_000_000_000 + u64::from(i)))
            .collect();
        save_locks(&path, &locks).unwrap();
        assert_eq!(load_locks(&path), locks);
        // Not ours, or cut short: what cannot be read is read from the bucket again.
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(load_locks(&path).is_empty());
        let mut cut = LOCKS_MAGIC.to_vec();
        cut.extend_from_slice(&[7; 39]);
        std::fs::write(&path, cut).unwrap();
        assert!(load_locks(&path).is_empty());
    }

    #[test]
    fn a_block_is_locked_past_any_point_committed_within_the_slack() {
        let p = LockPolicy {
            days: 30,
            mode: LockMode::Compliance,
        };
        let written = 1_000 * DAY_MS;
        let block = p.block_until_ms(written);
        assert!(block >= p.point_until_ms(written + LOCK_SLACK_DAYS * DAY_MS));
        assert!(block < p.point_until_ms(written + LOCK_SLACK_DAYS * DAY_MS + 1));
    }
}
