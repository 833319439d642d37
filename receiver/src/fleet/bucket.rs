//! The fleet over an S3 bucket (see the module docs of [`crate::fleet`]).
//!
//! Layout, under the `[s3]` prefix, per server:
//!
//! ```text
//! leases/<server>.json                              the lease (crate::lease)
//! servers/<server>/journal/<seq:020>               a journal segment (super::segment)
//! servers/<server>/disks/<disk>/live/<seq:020>     a disk's live base: its manifest as of
//!                                                   every segment up to <seq>
//! servers/<server>/points/<point:016>/<disk>.manifest
//! servers/<server>/points/<point:016>/point.json   written last: a point is listed iff it exists
//! ```
//!
//! A disk's live state is its newest live base with every later segment's records for it
//! applied in order. Segment numbers grow across holders: a new holder starts past the
//! highest it listed, and writes each with `If-None-Match`, so two writers never share one.

mod sweep;

use super::{Fleet, FleetError, Records, Taken};
use crate::aws::s3::{Condition, Lock, PutError, Retention, S3};
use crate::catalog::{Catalog, PointRecord};
use crate::lease::Moment;
use crate::lease::{Acquired, Current, Held, Leases};
use crate::store::s3::S3Store;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::BlockHash;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A server this receiver holds.
struct Holding {
    held: Held,
    /// The next journal segment's number.
    next_seq: u64,
    /// Per disk known to the bucket: the segment its live base is current with (0: none).
    through: BTreeMap<String, u64>,
    /// Journal segments known to be in the bucket (listed at the take, or written since).
    segments: std::collections::BTreeSet<u64>,
    /// Objects found superseded at the take (older live bases), deleted at the next point.
    garbage: Vec<String>,
    /// Which take this holding is of: a compaction queued under an earlier one is dropped.
    generation: u64,
}

/// A compaction asked for at a point, run off the session's thread.
struct Compaction {
    point: u64,
    disks: Vec<String>,
    /// The last journal segment the point covers (taken when it was committed).
    through: u64,
    generation: u64,
}

/// Compactions waiting per server (only the newest: it supersedes the others), and the
/// servers whose worker runs.
#[derive(Default)]
struct Compactions {
    pending: HashMap<String, Compaction>,
    running: std::collections::HashSet<String>,
}

pub struct BucketFleet {
    store: Arc<S3Store>,
    s3: S3,
    leases: Arc<Leases>,
    catalog: Catalog,
    period: Duration,
    held: Mutex<HashMap<String, Holding>>,
    lost: std::sync::atomic::AtomicU64,
    taken: std::sync::atomic::AtomicU64,
    state_dir: std::path::PathBuf,
    /// The identity generation object as last read (see [`BucketFleet::renew`]).
    identities_seen: Mutex<Option<Vec<u8>>>,
    /// Per server, the ETag of its identity record in the bucket as this receiver last read
    /// or wrote it (`None`: there was none). A write goes only over exactly that version.
    identity_etags: Mutex<HashMap<String, Option<String>>>,
    /// Under Object Lock: the versions of each point's objects this receiver wrote, until the
    /// lock keeper records them with the point ([`super::PointLock::versions`]).
    point_versions: Mutex<HashMap<(String, u64), BTreeMap<String, String>>>,
    /// Servers whose lock keeper is running.
    keeping: Mutex<std::collections::HashSet<String>>,
    /// See [`super::Counts::lock_failures`].
    lock_failures: std::sync::atomic::AtomicU64,
    /// Numbers the takes ([`Holding::generation`]).
    generations: std::sync::atomic::AtomicU64,
    compactions: Mutex<Compactions>,
    /// This fleet, for the compaction workers (empty for the commands' fleet, which never
    /// compacts: then compactions run on the caller's thread).
    me: std::sync::Weak<BucketFleet>,
    /// The fleet's block sweeps, as this receiver follows them ([`sweep`]).
    following: Mutex<sweep::Following>,
    /// Tests only: run by a sweep between its second reading of references and its deletes.
    before_deletes: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The receiver is stopping ([`Fleet::stop_sweeping`]).
    stopping: std::sync::atomic::AtomicBool,
}

/// Bumped (rewritten with random bytes) after every identity record written to the bucket:
/// one GET per renewal round tells a receiver whether to read its servers' records again.
const IDENTITY_GENERATION: &str = "identities/generation";

fn identity_key(server: &str) -> String {
    format!("identities/{server}.json")
}

fn journal_key(server: &str, seq: u64) -> String {
    format!("servers/{server}/journal/{seq:020}")
}

fn live_key(server: &str, disk: &str, seq: u64) -> String {
    format!("servers/{server}/disks/{disk}/live/{seq:020}")
}

fn point_dir_key(server: &str, point: u64) -> String {
    format!("servers/{server}/points/{point:016}/")
}

/// What the bucket holds for one server, as listed.
#[derive(Default, Debug)]
struct Listing {
    segments: Vec<(u64, String)>,
    /// disk → its live bases (seq, key), ascending.
    live: BTreeMap<String, Vec<(u64, String)>>,
    /// point → its objects' keys, and whether `point.json` is among them.
    points: BTreeMap<u64, (Vec<String>, bool)>,
}

fn parse_listing(server: &str, keys: impl IntoIterator<Item = String>) -> Listing {
    let base = format!("servers/{server}/");
    let mut out = Listing::default();
    for key in keys {
        let Some(rest) = key.strip_prefix(&base) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["journal", n] => {
                if let Ok(seq) = n.parse::<u64>() {
                    out.segments.push((seq, key.clone()));
                }
            }
            ["disks", disk, "live", n] if lifeboat_common::config::valid_name(disk) => {
                if let Ok(seq) = n.parse::<u64>() {
                    out.live
                        .entry(disk.to_string())
                        .or_default()
                        .push((seq, key.clone()));
                }
            }
            ["points", p, file] => {
                if let Ok(point) = p.parse::<u64>() {
                    let e = out.points.entry(point).or_default();
                    e.1 |= *file == "point.json";
                    e.0.push(key.clone());
                }
            }
            _ => {}
        }
    }
    out.segments.sort();
    for v in out.live.values_mut() {
        v.sort();
    }
    out
}

/// A disk's state as the bucket has it: its live base and the records after it.
struct DiskState {
    base: Option<Manifest>,
    through: u64,
    records: Vec<(u64, BlockHash)>,
}

impl BucketFleet {
    pub fn new(
        store: Arc<S3Store>,
        state_dir: &std::path::Path,
        me: &str,
        address: &str,
        period: Duration,
    ) -> BucketFleet {
        let s3 = store.client().clone();
        BucketFleet {
            leases: Arc::new(Leases::new(s3.clone(), me, address, period)),
            s3,
            store,
            catalog: Catalog::new(state_dir),
            period,
            held: Mutex::new(HashMap::new()),
            lost: Default::default(),
            taken: Default::default(),
            state_dir: state_dir.to_path_buf(),
            identities_seen: Mutex::new(None),
            identity_etags: Mutex::new(HashMap::new()),
            point_versions: Mutex::new(HashMap::new()),
            keeping: Mutex::new(Default::default()),
            lock_failures: Default::default(),
            generations: Default::default(),
            compactions: Default::default(),
            me: std::sync::Weak::new(),
            following: Default::default(),
            before_deletes: Default::default(),
            stopping: Default::default(),
        }
    }

    /// As [`BucketFleet::new`], shared: compactions then run on threads of their own.
    pub fn new_shared(
        store: Arc<S3Store>,
        state_dir: &std::path::Path,
        me: &str,
        address: &str,
        period: Duration,
    ) -> Arc<BucketFleet> {
        Arc::new_cyclic(|weak| BucketFleet {
            me: weak.clone(),
            ..BucketFleet::new(store, state_dir, me, address, period)
        })
    }

    /// The staging store in the fleet's bucket.
    pub fn store(&self) -> &Arc<S3Store> {
        &self.store
    }

    /// Runs the server's queued compactions, newest only, until none is left.
    fn compaction_worker(&self, server: &str) {
        // Should the worker panic (it unwinds), the server gets a worker again at its next
        // point.
        struct OnPanic<'a>(&'a BucketFleet, &'a str);
        impl Drop for OnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .compactions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .running
                        .remove(self.1);
                }
            }
        }
        let _on_panic = OnPanic(self, server);
        loop {
            let job = {
                let mut c = self.compactions.lock().unwrap_or_else(|e| e.into_inner());
                match c.pending.remove(server) {
                    Some(j) => j,
                    // Under the same lock as the queueing: a job queued after this starts a
                    // new worker.
                    None => {
                        c.running.remove(server);
                        return;
                    }
                }
            };
            self.run_compaction(server, &job);
        }
    }

    fn run_compaction(&self, server: &str, job: &Compaction) {
        if let Err(e) = self.compact(server, job) {
            tracing::warn!(
                server,
                point = job.point,
                "making the point the live base in the bucket: {e} (the journal stays until the next point)"
            );
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holding>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease_err(server: &str) -> impl Fn(crate::lease::LeaseError) -> FleetError + '_ {
        move |e| FleetError::Bucket {
            server: server.to_string(),
            why: e.to_string(),
        }
    }

    fn bucket_err(server: &str) -> impl Fn(crate::aws::retry::CallError) -> FleetError + '_ {
        move |e| FleetError::Bucket {
            server: server.to_string(),
            why: e.to_string(),
        }
    }

    /// Fails unless the lease is still valid now (called after a write returned).
    fn still_held(&self, server: &str) -> Result<(), FleetError> {
        let mut held = self.held();
        match held.get(server) {
            Some(h) if h.held.valid(Moment::now()) => Ok(()),
            Some(_) => {
                held.remove(server);
                self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(server, "lease expired before it was renewed: no more acknowledgements for this server here");
                Err(FleetError::NotHeld {
                    server: server.into(),
                    why: "its lease expired before it was renewed".into(),
                })
            }
            None => Err(FleetError::NotHeld {
                server: server.into(),
                why: "its lease was lost (a renewal failed, or another receiver took it)".into(),
            }),
        }
    }

    /// Reads the server's state from the bucket: every disk's live base and later records,
    /// the next segment number, and the listing (for the points).
    fn read_state(
        &self,
        server: &str,
    ) -> Result<(BTreeMap<String, DiskState>, u64, Listing), FleetError> {
        let s3 = self.s3.clone();
        let prefix = format!("servers/{server}/");
        let keys = self
            .store
            .run(async move { s3.list(&prefix).await })
            .map_err(Self::bucket_err(server))?;
        let listing = parse_listing(server, keys.into_iter().map(|o| o.key));
        let mut disks: BTreeMap<String, DiskState> = BTreeMap::new();
        for (disk, bases) in &listing.live {
            let Some((seq, key)) = bases.last() else {
                continue;
            };
            let raw = self.get(server, key)?;
            let m = Manifest::decode(&raw).map_err(|e| FleetError::Corrupt {
                server: server.into(),
                what: self.s3.url(key),
                why: e.to_string(),
            })?;
            disks.insert(
                disk.clone(),
                DiskState {
                    base: Some(m),
                    through: *seq,
                    records: Vec::new(),
                },
            );
        }
        let mut next = listing
            .live
            .values()
            .flatten()
            .map(|(s, _)| s + 1)
            .max()
            .unwrap_or(1);
        // Every disk's base covers the segments up to the oldest base: an earlier holder's
        // compaction may still be deleting those (it deletes nothing past every disk's base).
        let covered = listing
            .live
            .values()
            .filter_map(|bases| bases.last().map(|(s, _)| *s))
            .min()
            .unwrap_or(0);
        for (seq, key) in &listing.segments {
            next = next.max(seq + 1);
            let (s3, k) = (self.s3.clone(), key.to_string());
            let raw = match self
                .store
                .run(async move { s3.get(&k).await })
                .map_err(Self::bucket_err(server))?
            {
                Some((raw, _)) => raw,
                None if *seq <= covered => continue,
                None => {
                    return Err(FleetError::Bucket {
                        server: server.into(),
                        why: format!("{} vanished while it was being read", self.s3.url(key)),
                    })
                }
            };
            let records = super::segment::decode(&raw).map_err(|e| FleetError::Corrupt {
                server: server.into(),
                what: self.s3.url(key),
                why: e.to_string(),
            })?;
            for (disk, recs) in records {
                if !lifeboat_common::config::valid_name(&disk) {
                    continue;
                }
                let d = disks.entry(disk).or_insert(DiskState {
                    base: None,
                    through: 0,
                    records: Vec::new(),
                });
                if *seq > d.through {
                    d.records.extend(recs);
                }
            }
        }
        Ok((disks, next, listing))
    }

    fn get(&self, server: &str, key: &str) -> Result<Vec<u8>, FleetError> {
        self.get_if(server, key)?.ok_or_else(|| FleetError::Bucket {
            server: server.into(),
            why: format!("{} vanished while it was being read", self.s3.url(key)),
        })
    }

    /// The object at `key`, or `None` if there is none.
    fn get_if(&self, server: &str, key: &str) -> Result<Option<Vec<u8>>, FleetError> {
        let s3 = self.s3.clone();
        let k = key.to_string();
        Ok(self
            .store
            .run(async move { s3.get(&k).await })
            .map_err(Self::bucket_err(server))?
            .map(|(raw, _)| raw))
    }

    /// Makes the working copy of `server` the bucket's state.
    fn hydrate(&self, server: &str) -> Result<Holding, FleetError> {
        let (disks, next_seq, listing) = self.read_state(server)?;
        let local = |why: String| FleetError::Local {
            server: server.into(),
            why,
        };
        let disks_dir = self.catalog.server_dir(server).join("disks");
        for (id, d) in &disks {
            crate::disk::replace_local(&disks_dir.join(id), id, d.base.as_ref(), &d.records)
                .map_err(|e| local(e.to_string()))?;
        }
        // A disk the bucket knows nothing of holds nothing acknowledged.
        if let Ok(rd) = std::fs::read_dir(&disks_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !disks.contains_key(&name) {
                    std::fs::remove_dir_all(e.path())
                        .map_err(|err| local(format!("{}: {err}", e.path().display())))?;
                }
            }
        }
        self.sync_points(server, &listing, true)?;
        let changed: usize = disks.values().map(|d| d.records.len()).sum();
        tracing::info!(
            server,
            disks = disks.len(),
            journal_records = changed,
            next_segment = next_seq,
            "took the server's state from the bucket"
        );
        Ok(Holding {
            held: Held {
                etag: String::new(),
                valid_until: Moment::now(),
            },
            next_seq,
            through: disks
                .iter()
                .map(|(id, d)| (id.clone(), d.through))
                .collect(),
            segments: listing.segments.iter().map(|(seq, _)| *seq).collect(),
            garbage: listing
                .live
                .values()
                .flat_map(|bases| bases.iter().rev().skip(1).map(|(_, k)| k.clone()))
                .collect(),
            generation: self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Makes the local catalog of `server` list the bucket's points. `holding`: this receiver
    /// holds the server (no point of it is being written elsewhere), so a local point the
    /// listing lacks is gone; otherwise (a command beside `serve`) it is removed only once the
    /// bucket says it has no such point now (it may have been committed after the listing).
    /// A point that cannot be read is logged and left out, never fatal.
    fn sync_points(
        &self,
        server: &str,
        listing: &Listing,
        holding: bool,
    ) -> Result<(), FleetError> {
        let local = self.catalog.points(server).map_err(|e| FleetError::Local {
            server: server.into(),
            why: e.to_string(),
        })?;
        let listed: std::collections::BTreeSet<u64> = listing
            .points
            .iter()
            .filter(|(_, (_, has_record))| *has_record)
            .map(|(p, _)| *p)
            .collect();
        for rec in &local {
            if listed.contains(&rec.point) {
                continue;
            }
            if !holding {
                let (s3, key) = (
                    self.s3.clone(),
                    format!("{}point.json", point_dir_key(server, rec.point)),
                );
                let there = self
                    .store
                    .run(async move { s3.exists(&key).await })
                    .map_err(Self::bucket_err(server))?;
                if there {
                    continue;
                }
            }
            self.catalog
                .delete(server, rec.point)
                .map_err(|e| FleetError::Local {
                    server: server.into(),
                    why: e.to_string(),
                })?;
        }
        for point in listed {
            if local.iter().any(|r| r.point == point) {
                continue;
            }
            match self.import_point(server, point) {
                Ok(true) => {}
                // Deleted since the listing (retention at its holder): gone, not listed.
                Ok(false) => tracing::debug!(server, point, "point deleted while it was read"),
                Err(e @ FleetError::Corrupt { .. }) => {
                    tracing::error!(server, point, "{e}; that point is not listed here");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Copies a listed point into the local catalog; false if it was deleted meanwhile.
    fn import_point(&self, server: &str, point: u64) -> Result<bool, FleetError> {
        let dir = point_dir_key(server, point);
        let Some(raw) = self.get_if(server, &format!("{dir}point.json"))? else {
            return Ok(false);
        };
        let rec: PointRecord = serde_json::from_slice(&raw).map_err(|e| FleetError::Corrupt {
            server: server.into(),
            what: self.s3.url(&format!("{dir}point.json")),
            why: e.to_string(),
        })?;
        if rec.server != server || rec.point != point {
            return Err(FleetError::Corrupt {
                server: server.into(),
                what: self.s3.url(&format!("{dir}point.json")),
                why: format!(
                    "it is the record of server {} point {}",
                    rec.server, rec.point
                ),
            });
        }
        let mut manifests = Vec::new();
        for d in &rec.disks {
            let Some(bytes) = self.get_if(server, &format!("{dir}{}.manifest", d.id))? else {
                // Retention deletes a point's record first, then its manifests: with the
                // record gone too, the point was being deleted while it was read.
                let there = self.get_if(server, &format!("{dir}point.json"))?.is_some();
                if there {
                    return Err(FleetError::Corrupt {
                        server: server.into(),
                        what: self.s3.url(&format!("{dir}{}.manifest", d.id)),
                        why: "missing, while the point's record is there".into(),
                    });
                }
                return Ok(false);
            };
            manifests.push((d.id.clone(), bytes));
        }
        self.catalog
            .import(&rec, &raw, &manifests)
            .map_err(|e| FleetError::Corrupt {
                server: server.into(),
                what: format!("point {point}"),
                why: e.to_string(),
            })?;
        Ok(true)
    }

    /// Copies every server's points from the bucket into the local catalog (for the
    /// commands that read it: `points`, `restore`).
    pub fn sync_catalog(&self) -> Result<(), FleetError> {
        let s3 = self.s3.clone();
        let keys = self
            .store
            .run(async move { s3.list("servers/").await })
            .map_err(Self::bucket_err("(all)"))?;
        let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in keys {
            if let Some(server) = o
                .key
                .strip_prefix("servers/")
                .and_then(|r| r.split('/').next())
            {
                if lifeboat_common::config::valid_name(server) {
                    by_server.entry(server.to_string()).or_default().push(o.key);
                }
            }
        }
        for (server, keys) in by_server {
            let listing = parse_listing(&server, keys);
            self.sync_points(&server, &listing, false)?;
        }
        Ok(())
    }

    /// Writes one object of a point only if it is absent: an earlier holder's write that
    /// lands late can then never replace ours. One already there with other content (an
    /// earlier holder's point of the same number, never acknowledged) is replaced, by a
    /// holder that still holds the server, over exactly the version it read.
    /// Returns the version written, when this call wrote one.
    fn put_point_object(
        &self,
        server: &str,
        key: &str,
        body: Vec<u8>,
        lock: Option<Lock>,
    ) -> Result<Option<String>, FleetError> {
        self.still_held(server)?;
        let (s3, k, b) = (self.s3.clone(), key.to_string(), body.clone());
        let first = self.store.run(async move {
            s3.put_locked(&k, b, &Condition::Absent, lock.as_ref())
                .await
        });
        let bucket = |why: String| FleetError::Bucket {
            server: server.into(),
            why,
        };
        match first {
            Ok(w) => return Ok(w.version),
            Err(PutError::Failed(e)) => return Err(Self::bucket_err(server)(e)),
            Err(PutError::Lost | PutError::Conflict) => {}
        }
        let (s3, k) = (self.s3.clone(), key.to_string());
        let there = self
            .store
            .run(async move { s3.get(&k).await })
            .map_err(Self::bucket_err(server))?;
        let Some((raw, etag)) = there else {
            return Err(bucket(format!(
                "{} was being written by someone else",
                self.s3.url(key)
            )));
        };
        if raw == body {
            return Ok(None);
        }
        self.still_held(server)?;
        tracing::warn!(
            server,
            object = %self.s3.url(key),
            "replacing an earlier holder's write of this point (never acknowledged)"
        );
        let (s3, k) = (self.s3.clone(), key.to_string());
        match self.store.run(async move {
            s3.put_locked(&k, body, &Condition::ETag(etag), lock.as_ref())
                .await
        }) {
            Ok(w) => Ok(w.version),
            Err(PutError::Failed(e)) => Err(Self::bucket_err(server)(e)),
            Err(other) => Err(bucket(format!("{}: {other}", self.s3.url(key)))),
        }
    }

    /// Moves the lock of a point's record, then its manifests, to `lock` (the record first:
    /// deletion asks the record's lock): the versions this receiver wrote where it knows them
    /// (a newer version someone else put over one is not what the point needs), else the
    /// current ones. An extension S3 refuses (another receiver's is longer) is read back.
    fn extend_point(
        &self,
        rec: &PointRecord,
        versions: &BTreeMap<String, String>,
        lock: &Lock,
    ) -> Result<(), FleetError> {
        let dir = point_dir_key(&rec.server, rec.point);
        let mut names = vec!["point.json".to_string()];
        names.extend(rec.disks.iter().map(|d| format!("{}.manifest", d.id)));
        let objects: Vec<(String, Option<String>)> = names
            .into_iter()
            .map(|n| (format!("{dir}{n}"), versions.get(&n).cloned()))
            .collect();
        let (s3, lock) = (self.s3.clone(), *lock);
        self.store
            .run(async move {
                for (k, v) in objects {
                    if let Err(e) = s3.extend_lock(&k, v.as_deref(), &lock).await {
                        match s3.retention(&k, v.as_deref()).await {
                            Ok((Retention::Until(t), _)) if t >= lock.until => {}
                            _ => return Err(e),
                        }
                    }
                }
                Ok(())
            })
            .map_err(Self::bucket_err(&rec.server))
    }

    /// [`Fleet::keep_locks`], once this is the server's only keeper.
    fn keep_locks_now(
        &self,
        server: &str,
        policy: &crate::store::s3::LockPolicy,
        recent_ms: u64,
        at_release: Option<std::time::Instant>,
    ) -> Result<super::LockPass, FleetError> {
        self.still_held(server)?;
        let in_time = || at_release.is_none_or(|d| std::time::Instant::now() < d);
        let now = crate::status::now_ms();
        let points: Vec<PointRecord> = self
            .catalog
            .points(server)
            .map_err(|e| FleetError::Local {
                server: server.into(),
                why: e.to_string(),
            })?
            .into_iter()
            .filter(|p| p.damaged.is_none())
            .collect();
        let pairs: Vec<(u64, u64)> = points
            .iter()
            .map(|p| (p.point, p.committed_unix_ms))
            .collect();
        // At a release the agent is gone: its newest point may be the one to recover from.
        let horizons = crate::retention::lock_horizons(
            &pairs,
            now,
            u64::from(policy.days),
            recent_ms,
            at_release.is_some(),
        );
        let mut pass = super::LockPass::default();
        let save = |p: &PointRecord, l: &super::PointLock| {
            if let Err(e) = super::save_point_lock(&self.catalog, p, l) {
                tracing::warn!(
                    server,
                    point = p.point,
                    "lock keeper: saving the point's lock: {e}"
                );
            }
        };
        // The points' own objects: locked as long as retention keeps them.
        let mut locked = Vec::new();
        for p in &points {
            let mut l = super::point_lock(&self.catalog, p);
            let before = l.clone();
            let written = self
                .point_versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(server.to_string(), p.point));
            if let Some(v) = written {
                l.versions = v;
            }
            let want = horizons.get(&p.point).copied().unwrap_or(0);
            if want > l.until_unix_ms && want > now && in_time() {
                self.still_held(server)?;
                match self.extend_point(p, &l.versions, &policy.lock(want)) {
                    Ok(()) => {
                        l.until_unix_ms = want;
                        pass.points_extended += 1;
                    }
                    Err(e) => {
                        tracing::warn!(server, point = p.point, "lock keeper: {e}");
                        pass.failed += 1;
                    }
                }
            }
            if l != before {
                save(p, &l);
            }
            if l.until_unix_ms > now && !l.blocks_locked() {
                locked.push((p, l));
            }
        }
        // Their blocks: each as long as the longest-locked point naming it. (Manifests are
        // read again below rather than held: after a takeover every kept point is here.)
        let mut needs: HashMap<BlockHash, u64> = HashMap::new();
        let mut readable = Vec::new();
        for (p, l) in locked {
            if !in_time() {
                break;
            }
            let mut whole = true;
            for d in &p.disks {
                match self.catalog.disk_manifest(p, &d.id) {
                    crate::catalog::ManifestState::Sound(m) => {
                        for h in m.hashes.iter().filter(|h| !h.is_zero()) {
                            let need = needs.entry(*h).or_insert(l.until_unix_ms);
                            *need = (*need).max(l.until_unix_ms);
                        }
                    }
                    crate::catalog::ManifestState::Damaged(why)
                    | crate::catalog::ManifestState::Unknown(why) => {
                        tracing::warn!(
                            server,
                            point = p.point,
                            "lock keeper: disk {}: {why}",
                            d.id
                        );
                        whole = false;
                    }
                }
            }
            if whole {
                readable.push((p, l));
            } else {
                pass.failed += 1;
            }
        }
        self.still_held(server)?;
        let report =
            self.store
                .keep_locked(&needs, at_release)
                .map_err(|e| FleetError::Bucket {
                    server: server.into(),
                    why: e.to_string(),
                })?;
        pass.read = report.read;
        pass.extended = report.extended;
        pass.failed += report.failed.len();
        for (h, why) in report.failed.iter().take(3) {
            tracing::warn!(server, block = %h, "lock keeper: {why}");
        }
        let failed: std::collections::HashSet<BlockHash> =
            report.failed.iter().map(|(h, _)| *h).collect();
        for (p, mut l) in readable {
            let names_failed = !failed.is_empty()
                && p.disks
                    .iter()
                    .any(|d| match self.catalog.disk_manifest(p, &d.id) {
                        crate::catalog::ManifestState::Sound(m) => {
                            m.hashes.iter().any(|h| failed.contains(h))
                        }
                        _ => true,
                    });
            if !names_failed {
                l.blocks_until_unix_ms = l.until_unix_ms;
                save(p, &l);
            }
        }
        Ok(pass)
    }

    fn delete_keys(&self, keys: Vec<String>) -> Result<(), crate::aws::retry::CallError> {
        if keys.is_empty() {
            return Ok(());
        }
        let s3 = self.s3.clone();
        self.store.run(async move {
            for chunk in keys.chunks(1000) {
                s3.delete_many(chunk).await?;
            }
            Ok(())
        })
    }

    /// Makes the point's manifests the disks' live bases and deletes what they cover: the
    /// previous bases and the segments every base is past. Only ever deletes what is older
    /// than this holder's own newest writes, and checks the lease before each step, so a
    /// holder that lost the server (paused, cut off) cannot delete a newer holder's state.
    fn compact(&self, server: &str, job: &Compaction) -> Result<(), FleetError> {
        let (point, through) = (job.point, job.through);
        // Still held, and by the same take as when the point was committed.
        let same_take = || -> Result<bool, FleetError> {
            self.still_held(server)?;
            Ok(self
                .held()
                .get(server)
                .is_some_and(|h| h.generation == job.generation))
        };
        if !same_take()? {
            return Ok(());
        }
        let err = Self::bucket_err(server);
        let mut doomed = Vec::new();
        for disk in &job.disks {
            if !same_take()? {
                return Ok(());
            }
            let (s3, from, to) = (
                self.s3.clone(),
                format!("{}{disk}.manifest", point_dir_key(server, point)),
                live_key(server, disk, through),
            );
            self.store
                .run(async move { s3.copy(&from, &to).await })
                .map_err(&err)?;
            if let Some(h) = self
                .held()
                .get_mut(server)
                .filter(|h| h.generation == job.generation)
            {
                let before = h.through.insert(disk.clone(), through);
                if let Some(b) = before.filter(|b| *b < through) {
                    doomed.push(live_key(server, disk, b));
                }
            }
        }
        {
            let mut held = self.held();
            let Some(h) = held
                .get_mut(server)
                .filter(|h| h.generation == job.generation)
            else {
                return Ok(());
            };
            let oldest = h.through.values().copied().min().unwrap_or(0);
            let covered: Vec<u64> = h.segments.range(..=oldest).copied().collect();
            for seq in covered {
                h.segments.remove(&seq);
                doomed.push(journal_key(server, seq));
            }
            doomed.append(&mut h.garbage);
        }
        if !same_take()? {
            return Ok(());
        }
        self.delete_keys(doomed).map_err(&err)
    }
}

impl Fleet for BucketFleet {
    fn take(&self, server: &str) -> Result<Taken, FleetError> {
        let leases = self.leases.clone();
        let s = server.to_string();
        let acquired = self
            .store
            .run(async move { leases.acquire(&s).await })
            .map_err(Self::lease_err(server))?;
        let held = match acquired {
            Acquired::Held(h) => h,
            Acquired::Owned {
                address,
                takeable_at,
                ..
            } if address == self.leases.address() => {
                // An earlier run of this receiver (killed, restarted) holds it until it
                // expires: sending the agent here again would only spin.
                return Err(FleetError::NotHeld {
                    server: server.into(),
                    why: format!(
                        "an earlier run of this receiver held it; free in {}s",
                        takeable_at
                            .saturating_duration_since(Moment::now())
                            .as_secs()
                            + 1
                    ),
                });
            }
            Acquired::Owned {
                holder, address, ..
            } => return Ok(Taken::Elsewhere { holder, address }),
            Acquired::Lost => {
                // Another receiver's write won just now: it is the holder.
                let leases = self.leases.clone();
                let s = server.to_string();
                let current = self
                    .store
                    .run(async move { leases.current(&s).await })
                    .map_err(Self::lease_err(server))?;
                return match current {
                    Current::Present { body, .. }
                        if !body.holder.is_empty() && body.address != self.leases.address() =>
                    {
                        Ok(Taken::Elsewhere {
                            holder: body.holder,
                            address: body.address,
                        })
                    }
                    _ => Err(FleetError::Bucket {
                        server: server.into(),
                        why: "another receiver is taking this server's lease now".into(),
                    }),
                };
            }
        };
        // Held from here: the working copy becomes the bucket's (every write of an earlier
        // holder that was acknowledged is there: it returned before that lease ran out).
        self.held().insert(
            server.to_string(),
            Holding {
                held: held.clone(),
                next_seq: 0,
                through: BTreeMap::new(),
                segments: Default::default(),
                garbage: Vec::new(),
                generation: u64::MAX,
            },
        );
        let hydrated = match self.hydrate(server) {
            Ok(h) => h,
            Err(e) => {
                self.release(server);
                return Err(e);
            }
        };
        let mut map = self.held();
        match map.get_mut(server) {
            Some(h) if h.held.valid(Moment::now()) => {
                h.next_seq = hydrated.next_seq;
                h.through = hydrated.through;
                h.segments = hydrated.segments;
                h.garbage = hydrated.garbage;
                h.generation = hydrated.generation;
                self.taken
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Taken::Held)
            }
            _ => {
                map.remove(server);
                self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(FleetError::NotHeld {
                    server: server.into(),
                    why: "its lease ran out while its state was read from the bucket".into(),
                })
            }
        }
    }

    fn release(&self, server: &str) {
        let Some(h) = self.held().remove(server) else {
            return;
        };
        self.point_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), _| s != server);
        let leases = self.leases.clone();
        let s = server.to_string();
        if let Err(e) = self
            .store
            .run(async move { leases.release(&s, &h.held).await })
        {
            tracing::warn!(server, "releasing the lease: {e} (it expires by itself)");
        }
    }

    fn holds(&self, server: &str) -> bool {
        // An expired holding is dropped (and counted lost) here too.
        self.still_held(server).is_ok()
    }

    fn journal(&self, server: &str, records: &Records) -> Result<(), FleetError> {
        // Never start a write for a server this receiver may no longer hold.
        self.still_held(server)?;
        let seq = {
            let mut held = self.held();
            let h = held.get_mut(server).ok_or_else(|| FleetError::NotHeld {
                server: server.into(),
                why: "its lease was lost (a renewal failed, or another receiver took it)".into(),
            })?;
            let seq = h.next_seq;
            h.next_seq += 1;
            // A disk journaled for the first time has no live base yet: its segments stay
            // until a point covers it (compaction deletes only up to every disk's base).
            for (disk, _) in records {
                h.through.entry(disk.clone()).or_insert(0);
            }
            seq
        };
        let (s3, key, body) = (
            self.s3.clone(),
            journal_key(server, seq),
            super::segment::encode(records),
        );
        let r = self
            .store
            .run(async move { s3.put(&key, body, &Condition::Absent).await });
        match r {
            Ok(_) => {
                if let Some(h) = self.held().get_mut(server) {
                    h.segments.insert(seq);
                }
                self.still_held(server)
            }
            Err(PutError::Lost | PutError::Conflict) => {
                self.held().remove(server);
                self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    server,
                    segment = seq,
                    "another receiver wrote this server's journal: this one stops acting for it"
                );
                Err(FleetError::NotHeld {
                    server: server.into(),
                    why: format!("another receiver wrote journal segment {seq}"),
                })
            }
            Err(PutError::Failed(e)) => Err(Self::bucket_err(server)(e)),
        }
    }

    fn write_point(
        &self,
        rec: &PointRecord,
        manifests: &[(String, Manifest)],
    ) -> Result<(), FleetError> {
        let server = rec.server.as_str();
        self.still_held(server)?;
        let dir = point_dir_key(server, rec.point);
        let mut objects: Vec<(String, Vec<u8>)> = manifests
            .iter()
            .map(|(d, m)| (format!("{dir}{d}.manifest"), m.encode()))
            .collect();
        let json = serde_json::to_vec_pretty(rec).map_err(|e| FleetError::Local {
            server: server.into(),
            why: e.to_string(),
        })?;
        // The manifests, then the record that lists the point; under Object Lock, locked as
        // long as the record says, and the versions written kept for the lock keeper.
        objects.push((format!("{dir}point.json"), json));
        let lock = rec
            .locked_until_unix_ms
            .zip(self.store.lock_policy())
            .map(|(until, p)| p.lock(until));
        let mut versions = BTreeMap::new();
        for (key, body) in objects.drain(..) {
            let name = key.rsplit('/').next().unwrap_or_default().to_string();
            if let Some(v) = self.put_point_object(server, &key, body, lock)? {
                versions.insert(name, v);
            }
        }
        if lock.is_some() {
            self.point_versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((server.to_string(), rec.point), versions);
        }
        self.still_held(server)
    }

    fn delete_point(&self, server: &str, point: u64) -> Result<(), FleetError> {
        self.still_held(server)?;
        let dir = point_dir_key(server, point);
        {
            // The bucket's word, not this receiver's: another holder may have extended it, and
            // a receiver not (yet) set to lock must not hide a locked point either.
            let (s3, record) = (self.s3.clone(), format!("{dir}point.json"));
            let lock = self
                .store
                .run(async move { s3.retention(&record, None).await })
                .map_err(Self::bucket_err(server))?;
            if let (Retention::Until(t), _) = lock {
                let until = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                // An hour's margin: this receiver's clock may run ahead of S3's, and a plain
                // DELETE of a locked point is not refused, only hidden.
                if until + crate::gc::LOCK_MARGIN_MS > crate::status::now_ms() {
                    return Err(FleetError::Locked {
                        server: server.into(),
                        point,
                        until_unix_ms: until,
                    });
                }
            }
        }
        let (s3, record) = (self.s3.clone(), format!("{dir}point.json"));
        self.store
            .run(async move { s3.delete(&record, None).await })
            .map_err(|e| FleetError::Bucket {
                server: server.into(),
                why: e.to_string(),
            })?;
        self.still_held(server)?;
        let (s3, prefix) = (self.s3.clone(), dir.clone());
        let rest: Vec<String> = self
            .store
            .run(async move { s3.list(&prefix).await })
            .map_err(Self::bucket_err(server))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        self.still_held(server)?;
        self.delete_keys(rest).map_err(Self::bucket_err(server))
    }

    fn point_lock_until(&self, committed_ms: u64, recent_ms: u64) -> Option<u64> {
        self.store
            .lock_policy()
            .map(|_| committed_ms + crate::retention::first_lock_ms(recent_ms))
    }

    fn lock_days(&self) -> Option<u64> {
        self.store.lock_policy().map(|p| u64::from(p.days))
    }

    fn keep_locks(
        &self,
        server: &str,
        recent_ms: u64,
        at_release: Option<std::time::Instant>,
    ) -> Result<super::LockPass, FleetError> {
        let Some(policy) = self.store.lock_policy() else {
            return Ok(Default::default());
        };
        // One keeper per server at a time (the GC pass's and a release's may meet): a pass
        // finding another running leaves the server to it; a release waits for it (its newest
        // point is to be locked as final), until its deadline.
        loop {
            if self
                .keeping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(server.to_string())
            {
                break;
            }
            match at_release {
                Some(d) if std::time::Instant::now() < d => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => return Ok(Default::default()),
            }
        }
        let r = self.keep_locks_now(server, &policy, recent_ms, at_release);
        if let Ok(pass) = &r {
            self.lock_failures
                .fetch_add(pass.failed as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.keeping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(server);
        r
    }

    /// Queued for the server's compaction worker (the deletes of a slow bucket must not hold
    /// the session up), with what the point covers taken now: the last segment written.
    fn compacted(&self, server: &str, point: u64, disks: &[String]) {
        let Some((through, generation)) = self
            .held()
            .get(server)
            .map(|h| (h.next_seq.saturating_sub(1), h.generation))
        else {
            return;
        };
        let job = Compaction {
            point,
            disks: disks.to_vec(),
            through,
            generation,
        };
        let Some(me) = self.me.upgrade() else {
            self.run_compaction(server, &job);
            return;
        };
        let mut c = self.compactions.lock().unwrap_or_else(|e| e.into_inner());
        c.pending.insert(server.to_string(), job);
        if c.running.insert(server.to_string()) {
            let s = server.to_string();
            let spawned = std::thread::Builder::new()
                .name("lifeboat-compact".into())
                .spawn(move || me.compaction_worker(&s));
            if let Err(e) = spawned {
                c.running.remove(server);
                tracing::warn!(
                    server,
                    "starting a compaction: {e}; tried at the next point"
                );
            }
        }
    }

    /// The bucket is the truth for identities: a record another receiver wrote (its ETag is
    /// not the one this receiver last read or wrote) replaces the local one, whatever either
    /// says. No clocks are compared, so a revocation cannot lose to a later-stamped record.
    fn pull_identity(&self, server: &str) -> Result<bool, FleetError> {
        use crate::identities::Record;
        let (s3, key) = (self.s3.clone(), identity_key(server));
        let got = self
            .store
            .run(async move { s3.get(&key).await })
            .map_err(Self::bucket_err(server))?;
        let etags = || {
            self.identity_etags
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        let Some((raw, etag)) = got else {
            etags().insert(server.to_string(), None);
            return Ok(false);
        };
        if etags().get(server) == Some(&Some(etag.clone())) {
            return Ok(false); // what this receiver last read or wrote
        }
        let theirs: Record = serde_json::from_slice(&raw).map_err(|e| FleetError::Corrupt {
            server: server.into(),
            what: self.s3.url(&identity_key(server)),
            why: e.to_string(),
        })?;
        if theirs.server != server {
            return Err(FleetError::Corrupt {
                server: server.into(),
                what: self.s3.url(&identity_key(server)),
                why: format!("it is the record of server {}", theirs.server),
            });
        }
        let local = |why: String| FleetError::Local {
            server: server.into(),
            why,
        };
        let ours = Record::load(&self.state_dir, server).map_err(|e| local(format!("{e:#}")))?;
        let changed = ours.as_ref() != Some(&theirs);
        if changed {
            theirs
                .save(&self.state_dir)
                .map_err(|e| local(format!("{e:#}")))?;
            tracing::info!(
                server,
                revoked = theirs.revoked_unix_ms.is_some(),
                "identity record taken from the bucket (written by another receiver)"
            );
        }
        etags().insert(server.to_string(), Some(etag));
        Ok(changed)
    }

    /// Writes the local record over exactly the version this receiver last read: if another
    /// receiver wrote one since (a revocation, say), this fails, and the caller refuses.
    fn push_identity(&self, server: &str) -> Result<(), FleetError> {
        let changed_elsewhere = || FleetError::Bucket {
            server: server.into(),
            why: "another receiver changed its identity record meanwhile".into(),
        };
        let known = self
            .identity_etags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(server)
            .cloned();
        let cond = match known {
            Some(Some(etag)) => Condition::ETag(etag),
            Some(None) => Condition::Absent,
            None => {
                // Never read here: read it first, and refuse if it said something else.
                if self.pull_identity(server)? {
                    return Err(changed_elsewhere());
                }
                return self.push_identity(server);
            }
        };
        let record = crate::identities::Record::load(&self.state_dir, server).map_err(|e| {
            FleetError::Local {
                server: server.into(),
                why: format!("{e:#}"),
            }
        })?;
        let Some(record) = record else {
            return Ok(());
        };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| FleetError::Local {
            server: server.into(),
            why: e.to_string(),
        })?;
        let (s3, key) = (self.s3.clone(), identity_key(server));
        let written = self
            .store
            .run(async move { s3.put(&key, body, &cond).await });
        let etag = match written {
            Ok(etag) => etag,
            Err(PutError::Lost | PutError::Conflict) => {
                // Forget what we knew: the next pull takes the other receiver's record.
                self.identity_etags
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(server);
                return Err(changed_elsewhere());
            }
            Err(PutError::Failed(e)) => return Err(Self::bucket_err(server)(e)),
        };
        self.identity_etags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(server.to_string(), Some(etag));
        let s3 = self.s3.clone();
        let generation = rand::random::<[u8; 16]>().to_vec();
        self.store
            .run(async move {
                s3.put(IDENTITY_GENERATION, generation, &Condition::None)
                    .await
            })
            .map_err(|e| FleetError::Bucket {
                server: server.into(),
                why: e.to_string(),
            })?;
        Ok(())
    }

    fn renew(&self) -> bool {
        self.renew_leases();
        // One GET a round: has any receiver written an identity record since?
        let s3 = self.s3.clone();
        let now = match self
            .store
            .run(async move { s3.get(IDENTITY_GENERATION).await })
        {
            Ok(g) => g.map(|(body, _)| body),
            Err(e) => {
                tracing::warn!("reading the fleet's identity generation: {e}");
                return false;
            }
        };
        let seen = || {
            self.identities_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        if *seen() == now {
            return false;
        }
        let servers: Vec<String> = self.held().keys().cloned().collect();
        let mut changed = false;
        let mut all_read = true;
        for server in servers {
            match self.pull_identity(&server) {
                Ok(c) => changed |= c,
                Err(e) => {
                    all_read = false;
                    tracing::warn!(
                        server,
                        "reading its identity record: {e} (again next round)"
                    );
                }
            }
        }
        // Seen only once every record was read: a failed read is tried again next round.
        if all_read {
            *seen() = now;
        }
        changed
    }

    fn release_all(&self) {
        let servers: Vec<String> = self.held().keys().cloned().collect();
        for s in servers {
            self.release(&s);
        }
    }

    fn renew_every(&self) -> Duration {
        self.period / 3
    }

    fn follow_sweep(&self, batches: &super::Batches, barrier: bool) -> Result<(), FleetError> {
        self.follow(batches, barrier)
    }

    fn sweep(
        &self,
        grace: Duration,
        batches: &super::Batches,
    ) -> Result<super::SweepReport, FleetError> {
        self.sweep_now(grace, batches)
    }

    fn wait_for_sweep(&self, hashes: &[BlockHash], generation: u64) -> bool {
        self.store.wait_for_sweep(hashes, generation)
    }

    fn stop_sweeping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.store.stop_waiting();
    }

    fn counts(&self) -> super::Counts {
        use std::sync::atomic::Ordering::Relaxed;
        super::Counts {
            held: self.held().len() as u64,
            lost: self.lost.load(Relaxed),
            taken: self.taken.load(Relaxed),
            lock_failures: self.lock_failures.load(Relaxed),
        }
    }
}

impl BucketFleet {
    /// Renews every held lease, up to 32 at once: one slow or throttled renewal does not
    /// hold up the others (each lease has only a third of its period to spare).
    fn renew_leases(&self) {
        let due: Vec<(String, Held)> = self
            .held()
            .iter()
            .map(|(s, h)| (s.clone(), h.held.clone()))
            .collect();
        let leases = self.leases.clone();
        let results = self.store.run(async move {
            let limit = Arc::new(tokio::sync::Semaphore::new(32));
            let mut set = tokio::task::JoinSet::new();
            for (server, held) in due {
                let (leases, limit) = (leases.clone(), limit.clone());
                set.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let r = leases.renew(&server, &held).await;
                    (server, held, r)
                });
            }
            let mut out = Vec::new();
            while let Some(done) = set.join_next().await {
                if let Ok(x) = done {
                    out.push(x);
                }
            }
            out
        });
        let mut map = self.held();
        for (server, held, r) in results {
            match r {
                Ok(new) => {
                    if let Some(h) = map.get_mut(&server) {
                        if h.held.etag == held.etag {
                            h.held = new;
                        }
                    }
                }
                Err(e) => {
                    if map.get(&server).is_some_and(|h| h.held.etag == held.etag) {
                        map.remove(&server);
                        self.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(
                            server,
                            "renewing the lease failed: {e}; no more acknowledgements for this server here"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_are_sorted_into_segments_bases_and_points() {
        let keys = [
            "servers/web/journal/00000000000000000003",
            "servers/web/journal/00000000000000000001",
            "servers/web/disks/root/live/00000000000000000002",
            "servers/web/disks/root/live/00000000000000000001",
            "servers/web/points/0000000000000007/root.manifest",
            "servers/web/points/0000000000000007/point.json",
            "servers/web/points/0000000000000008/root.manifest",
            "servers/web/journal/garbage",
            "servers/web/disks/../live/00000000000000000009",
            "servers/webby/journal/00000000000000000004",
        ];
        let l = parse_listing("web", keys.iter().map(|k| k.to_string()));
        assert_eq!(
            l.segments.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(
            l.live["root"].iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(l.live.len(), 1);
        assert!(l.points[&7].1, "point 7 is listed");
        assert!(!l.points[&8].1, "point 8 has no record yet");
    }
}
