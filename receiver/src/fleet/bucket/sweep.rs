//! The fleet's block sweep: deleting the blocks no server of the fleet names, while other
//! receivers keep answering dedupe queries.
//!
//! The danger is a dedupe answer ("held") one receiver gives for a block another receiver's
//! sweep is about to delete: the reference would be acknowledged and the block gone. So a
//! sweep runs in an epoch that every receiver follows:
//!
//! 1. **Open.** The sweeper reads every server's references in the bucket (live bases,
//!    journal segments, point manifests), lists the blocks, and takes as candidates the
//!    blocks nothing names that are older than the grace (and, under Object Lock, not
//!    locked). It writes them to `gc/sweeps/<id>/candidates`, then opens the epoch in
//!    `gc/epoch` with a conditional write over the version it read (of two sweepers, one
//!    wins).
//! 2. **Fence.** Every receiver reads the epoch each renewal round, and after every take
//!    before the take's first answer. It fences itself ([`crate::fleet::Batches::fence`]):
//!    the candidates leave its dedupe index, so agents send them; a batch that brings one
//!    waits for the sweep to end and then writes it again. It then waits for its batches
//!    from before the fence, whose journal segments are then in the bucket, and writes its
//!    acknowledgement `gc/acks/<receiver>.json` (the epoch and its incarnation).
//! 3. **Wait.** The sweeper waits until the holder of every lease has acknowledged, or
//!    released it, or another holder took it. A lease not renewed for a whole period plus a
//!    margin (its holder paused or dead) is ended: a released body written over exactly
//!    that version, so a paused holder's next renewal fails and it acknowledges nothing
//!    more.
//! 4. **Delete.** The sweeper reads the references again (only objects it has not read) and
//!    deletes the candidates still unnamed, sending no delete past the epoch's deadline.
//! 5. **Close.** It writes what it deleted to `gc/sweeps/<id>/deleted` and closes the epoch;
//!    every receiver ends its fence (the deleted blocks stay out of its index, the others
//!    are held again). A receiver that cannot read the close ends the fence at the deadline
//!    plus a margin by its own clock, and lists its index again.
//!
//! No wall clock is compared between receivers: each counts the deadline from when it first
//! read the open epoch, which is after the sweeper counted it from.

use super::{BucketFleet, FleetError};
use crate::aws::s3::{Condition, PutError, Retention};
use crate::fleet::{Batches, SweepReport};
use crate::lease::{Current, Moment};
use crate::store::BlockStore;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::BlockHash;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

const EPOCH: &str = "gc/epoch";

fn candidates_key(id: &str) -> String {
    format!("gc/sweeps/{id}/candidates")
}

fn deleted_key(id: &str) -> String {
    format!("gc/sweeps/{id}/deleted")
}

fn ack_key(receiver: &str) -> String {
    format!("gc/acks/{receiver}.json")
}

/// Longest a sweep's deadline may claim (a garbled epoch cannot fence a receiver for ever).
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// How long a renewal round's barrier waits for the batches from before a fence.
const BARRIER: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum State {
    Open,
    Closed,
}

/// `gc/epoch` (JSON): the fleet's sweep, open or the last one closed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Epoch {
    id: String,
    /// Counts the sweeps of the bucket.
    seq: u64,
    /// The receiver sweeping (install id).
    sweeper: String,
    state: State,
    candidates: u64,
    /// From its opening, the sweeper sends no delete after this long...
    duration_ms: u64,
    /// ...and one sent before then has landed within this much more.
    margin_ms: u64,
    #[serde(default)]
    deleted: u64,
    /// For people only.
    opened_unix_ms: u64,
    #[serde(default)]
    closed_unix_ms: u64,
}

impl Epoch {
    /// By the clock of a receiver that first read the open epoch `seen`: past this, the
    /// sweeper deletes nothing more.
    fn over_at(&self, seen: Instant) -> Instant {
        let d = Duration::from_millis(self.duration_ms.saturating_add(self.margin_ms));
        seen + d.min(MAX_DURATION)
    }
}

/// `gc/acks/<receiver>.json`: the receiver's run fenced itself for the sweep.
#[derive(Serialize, Deserialize, Debug)]
struct Ack {
    sweep: String,
    incarnation: String,
}

/// What this receiver knows of the fleet's sweeps (by its own clock).
#[derive(Default)]
pub(in crate::fleet) struct Following {
    /// The epoch's number as last read (`None`: none read yet).
    seq: Option<u64>,
    /// When the epoch last changed as seen here: sweeps are spaced from then.
    changed: Option<Instant>,
    /// When a sweep here last failed before opening: spaced from then too.
    failed: Option<Instant>,
    /// The open sweep this receiver is fenced for.
    open: Option<Fenced>,
}

struct Fenced {
    id: String,
    /// The first batch generation the fence holds for.
    generation: u64,
    /// When this receiver first read the open epoch.
    seen: Instant,
    over_at: Instant,
    acked: bool,
    /// The fence ended at its deadline (the close was not read in time).
    ended: bool,
}

/// What the sweeper needs of the time: the acknowledgements' wait, the deadline of its
/// deletes from the opening, the margin for a request sent before it.
struct Timing {
    acks: Duration,
    duration: Duration,
    margin: Duration,
}

fn decode_hashes(raw: &[u8]) -> Option<HashSet<BlockHash>> {
    if !raw.len().is_multiple_of(32) {
        return None;
    }
    Some(
        raw.chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                BlockHash(h)
            })
            .collect(),
    )
}

fn encode_hashes<'a>(hashes: impl IntoIterator<Item = &'a BlockHash>) -> Vec<u8> {
    hashes.into_iter().flat_map(|h| h.0).collect()
}

/// The server a key under `servers/` belongs to.
fn server_of(key: &str) -> Option<&str> {
    key.strip_prefix("servers/")?.split('/').next()
}

impl BucketFleet {
    fn sweep_err(&self, why: String) -> FleetError {
        FleetError::Bucket {
            server: "(block sweep)".into(),
            why,
        }
    }

    fn following(&self) -> std::sync::MutexGuard<'_, Following> {
        self.following.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn timing(&self) -> Timing {
        let acks = self.period * 2 + Duration::from_secs(30);
        Timing {
            acks,
            duration: acks + Duration::from_secs(600),
            margin: self.store.attempt_timeout() * 2 + Duration::from_secs(10),
        }
    }

    fn read_epoch(&self) -> Result<Option<(Epoch, String)>, FleetError> {
        let s3 = self.s3.clone();
        let got = self
            .store
            .run(async move { s3.get(EPOCH).await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        match got {
            None => Ok(None),
            Some((raw, etag)) => {
                let e: Epoch = serde_json::from_slice(&raw).map_err(|e| FleetError::Corrupt {
                    server: "(block sweep)".into(),
                    what: self.s3.url(EPOCH),
                    why: e.to_string(),
                })?;
                Ok(Some((e, etag)))
            }
        }
    }

    fn read_hashes(&self, key: String) -> Result<Option<HashSet<BlockHash>>, FleetError> {
        let s3 = self.s3.clone();
        let k = key.clone();
        let got = self
            .store
            .run(async move { s3.get(&k).await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        match got {
            None => Ok(None),
            Some((raw, _)) => decode_hashes(&raw)
                .map(Some)
                .ok_or_else(|| FleetError::Corrupt {
                    server: "(block sweep)".into(),
                    what: self.s3.url(&key),
                    why: format!("{} bytes is not a list of 32-byte hashes", raw.len()),
                }),
        }
    }

    /// See [`crate::fleet::Fleet::follow_sweep`].
    pub(super) fn follow(&self, batches: &Batches, barrier: bool) -> Result<(), FleetError> {
        let epoch = match self.read_epoch() {
            Ok(e) => e,
            Err(e) => {
                // Past its deadline the fence ends, whether the epoch can be read or not.
                self.end_overdue(&mut self.following());
                return Err(e);
            }
        };
        let ack = {
            let mut f = self.following();
            let Some((e, _)) = epoch else {
                return Ok(()); // no sweep ever
            };
            let previous = f.seq;
            if previous != Some(e.seq) {
                f.seq = Some(e.seq);
                f.changed = Some(Instant::now());
                // A sweep fenced for and now replaced by another: what it deleted is unknown.
                if let Some(old) = f.open.take_if(|o| o.id != e.id) {
                    self.store.end_sweep(&old.id, None);
                }
                // Sweeps missed whole (this receiver held nothing then, or could not read):
                // what they deleted may still be in the index.
                let missed = previous.is_some_and(|p| p + 1 < e.seq)
                    || (e.state == State::Closed
                        && previous.is_some()
                        && f.open.is_none()
                        && previous != e.seq.checked_sub(1));
                if missed {
                    tracing::info!(
                        sweep = e.seq,
                        "block sweeps ran unseen: the dedupe index is listed again"
                    );
                    self.store.reset_index();
                } else if e.state == State::Closed && f.open.is_none() {
                    // One sweep opened and closed between two reads (or this is the first):
                    // what it deleted leaves the index.
                    match self.read_hashes(deleted_key(&e.id)) {
                        Ok(Some(d)) => self.store.forget(&d),
                        _ => self.store.reset_index(),
                    }
                }
            }
            match e.state {
                State::Open => {
                    if f.open.is_none() {
                        let candidates =
                            self.read_hashes(candidates_key(&e.id))?.ok_or_else(|| {
                                self.sweep_err(format!(
                                    "sweep {} is open but {} is missing",
                                    e.id,
                                    self.s3.url(&candidates_key(&e.id))
                                ))
                            })?;
                        let seen = Instant::now();
                        let over_at = e.over_at(seen);
                        let n = candidates.len();
                        let generation = batches
                            .fence(|g| self.store.begin_sweep(&e.id, candidates, g, over_at));
                        tracing::info!(
                            sweep = e.seq,
                            sweeper = %e.sweeper,
                            candidates = n,
                            "block sweep open: its candidates are not used for dedupe until it ends"
                        );
                        f.open = Some(Fenced {
                            id: e.id.clone(),
                            generation,
                            seen,
                            over_at,
                            acked: false,
                            ended: false,
                        });
                    }
                }
                State::Closed => {
                    if let Some(o) = f.open.take() {
                        let deleted = self.read_hashes(deleted_key(&o.id)).ok().flatten();
                        self.store.end_sweep(&o.id, deleted.as_ref());
                        tracing::info!(sweep = e.seq, deleted = e.deleted, "block sweep closed");
                    }
                }
            }
            self.end_overdue(&mut f);
            match f.open.as_ref() {
                Some(o) if barrier && !o.acked && !o.ended => Some((o.id.clone(), o.generation)),
                _ => None,
            }
        };
        // Outside the lock: a take's follow never waits on a round's barrier.
        let Some((id, generation)) = ack else {
            return Ok(());
        };
        if !batches.wait_below(generation, BARRIER) {
            tracing::info!(
                "block sweep: batches from before its fence still run; acknowledging next round"
            );
            return Ok(());
        }
        let body = serde_json::to_vec(&Ack {
            sweep: id.clone(),
            incarnation: self.leases.incarnation().to_string(),
        })
        .unwrap_or_default();
        let (s3, key) = (self.s3.clone(), ack_key(self.leases.me()));
        self.store
            .run(async move { s3.put(&key, body, &Condition::None).await })
            .map_err(|e| self.sweep_err(format!("acknowledging sweep {id}: {e}")))?;
        if let Some(o) = self.following().open.as_mut().filter(|o| o.id == id) {
            o.acked = true;
        }
        Ok(())
    }

    /// Ends the fence of an open sweep past its deadline (by this receiver's clock): the
    /// sweeper deletes nothing more, and the index is listed again.
    fn end_overdue(&self, f: &mut Following) {
        if let Some(o) = f.open.as_mut() {
            if !o.ended && Instant::now() >= o.over_at {
                tracing::warn!(
                    sweep = %o.id,
                    "block sweep still open past its deadline: its fence ends here, and the \
                     dedupe index is listed again"
                );
                self.store.end_sweep(&o.id, None);
                o.ended = true;
            }
        }
    }

    /// Every block any server of the bucket names, added to `refs`; objects in `read` are
    /// not read again (they never change: a segment, base or point manifest is written once).
    /// A server whose object vanished while it was read (a compaction, retention) is listed
    /// again, so a base written meanwhile is read too.
    fn references(
        &self,
        read: &mut HashSet<String>,
        refs: &mut HashSet<BlockHash>,
    ) -> Result<(), FleetError> {
        let s3 = self.s3.clone();
        let listed = self
            .store
            .run(async move { s3.list("servers/").await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        let mut by_server: HashMap<String, Vec<String>> = HashMap::new();
        for o in listed {
            if let Some(s) = server_of(&o.key) {
                by_server
                    .entry(s.to_string())
                    .or_default()
                    .push(o.key.clone());
            }
        }
        for (server, mut keys) in by_server {
            let mut tries = 0;
            loop {
                tries += 1;
                if self.read_references(&keys, read, refs)? {
                    break;
                }
                if tries >= 5 {
                    return Err(self.sweep_err(format!(
                        "server {server}: its objects kept vanishing while they were read"
                    )));
                }
                let (s3, prefix) = (self.s3.clone(), format!("servers/{server}/"));
                keys = self
                    .store
                    .run(async move { s3.list(&prefix).await })
                    .map_err(|e| self.sweep_err(e.to_string()))?
                    .into_iter()
                    .map(|o| o.key)
                    .collect();
            }
        }
        Ok(())
    }

    /// Reads the references of `keys` not yet read; false if one had vanished.
    fn read_references(
        &self,
        keys: &[String],
        read: &mut HashSet<String>,
        refs: &mut HashSet<BlockHash>,
    ) -> Result<bool, FleetError> {
        let mut whole = true;
        for key in keys {
            // What the receivers read (`parse_listing`); a stray object is no reference.
            let rest: Vec<&str> = key.split('/').skip(2).collect();
            let numeric = |n: &str| n.parse::<u64>().is_ok();
            let kind = match rest.as_slice() {
                ["journal", n] if numeric(n) => "segment",
                ["disks", _, "live", n] if numeric(n) => "manifest",
                ["points", p, f] if numeric(p) && f.ends_with(".manifest") => "manifest",
                _ => continue,
            };
            if read.contains(key) {
                continue;
            }
            let (s3, k) = (self.s3.clone(), key.clone());
            let Some((raw, _)) = self
                .store
                .run(async move { s3.get(&k).await })
                .map_err(|e| self.sweep_err(e.to_string()))?
            else {
                whole = false;
                continue;
            };
            let corrupt = |why: String| FleetError::Corrupt {
                server: server_of(key).unwrap_or("?").to_string(),
                what: self.s3.url(key),
                why,
            };
            if kind == "segment" {
                let records =
                    crate::fleet::segment::decode(&raw).map_err(|e| corrupt(e.to_string()))?;
                refs.extend(records.into_iter().flat_map(|(_, r)| r).map(|(_, h)| h));
            } else {
                let m = Manifest::decode(&raw).map_err(|e| corrupt(e.to_string()))?;
                refs.extend(m.hashes);
            }
            read.insert(key.clone());
        }
        Ok(whole)
    }

    /// Under Object Lock: whether a block stored at `modified` may be deleted (its lock has
    /// ended, with an hour's margin for clocks). A block younger than any lock a block gets
    /// is kept without a request.
    fn unlocked(&self, hash: &BlockHash, modified: SystemTime) -> Result<bool, FleetError> {
        let Some(policy) = self.store.lock_policy() else {
            return Ok(true);
        };
        let hour = Duration::from_secs(3600);
        let longest = Duration::from_secs(
            (u64::from(policy.days) + crate::store::s3::LOCK_SLACK_DAYS) * 86_400,
        );
        let now = SystemTime::now();
        if modified + longest + hour > now {
            return Ok(false);
        }
        let (s3, key) = (self.s3.clone(), crate::store::s3::block_key(hash));
        let (r, _) = self
            .store
            .run(async move { s3.retention(&key, None).await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        Ok(match r {
            Retention::Missing => false,
            Retention::Unlocked => true,
            Retention::Until(t) => t + hour < now,
        })
    }

    /// See [`crate::fleet::Fleet::sweep`].
    pub(super) fn sweep_now(
        &self,
        grace: Duration,
        batches: &Batches,
    ) -> Result<SweepReport, FleetError> {
        let spacing = self.period * 10;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(SweepReport::default());
        }
        {
            let f = self.following();
            let recent = |t: Option<Instant>| t.is_some_and(|c| c.elapsed() < spacing);
            if recent(f.changed) || recent(f.failed) {
                return Ok(SweepReport::default()); // a sweep ran (or failed) a moment ago
            }
        }
        let r = self.sweep_once(grace, batches);
        if r.is_err() {
            self.following().failed = Some(Instant::now());
        }
        r
    }

    fn sweep_once(&self, grace: Duration, batches: &Batches) -> Result<SweepReport, FleetError> {
        let mut report = SweepReport::default();
        let t = self.timing();
        let current = self.read_epoch()?;
        {
            let f = self.following();
            if let Some((e, _)) = &current {
                // Open, and not yet past its deadline as seen here: someone sweeps now.
                if e.state == State::Open && f.seq == Some(e.seq) {
                    let seen = f.open.as_ref().map(|o| o.seen).or(f.changed);
                    if seen.is_none_or(|seen| Instant::now() < e.over_at(seen)) {
                        return Ok(report);
                    }
                } else if e.state == State::Open {
                    return Ok(report); // not followed yet: next time
                }
            }
        }
        // The references, then the blocks: a block stored after the listing of references
        // is younger than the grace, or named by a batch the fence waits for.
        let mut read = HashSet::new();
        let mut refs = HashSet::new();
        self.references(&mut read, &mut refs)?;
        let blocks = self
            .store
            .list()
            .map_err(|e| self.sweep_err(e.to_string()))?;
        report.blocks = blocks.len();
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut candidates = HashSet::new();
        for (hash, modified) in blocks {
            if modified < cutoff && !refs.contains(&hash) && self.unlocked(&hash, modified)? {
                candidates.insert(hash);
            }
        }
        report.ran = true;
        report.candidates = candidates.len();
        if candidates.is_empty() {
            self.following().changed = Some(Instant::now());
            return Ok(report);
        }
        // Publish the candidates, then open the epoch over exactly the version read.
        let id = hex::encode(rand::random::<[u8; 16]>());
        let (s3, key, body) = (
            self.s3.clone(),
            candidates_key(&id),
            encode_hashes(&candidates),
        );
        self.store
            .run(async move { s3.put(&key, body, &Condition::None).await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        let mut epoch = Epoch {
            id: id.clone(),
            seq: current.as_ref().map_or(1, |(e, _)| e.seq + 1),
            sweeper: self.leases.me().to_string(),
            state: State::Open,
            candidates: candidates.len() as u64,
            duration_ms: t.duration.as_millis() as u64,
            margin_ms: t.margin.as_millis() as u64,
            deleted: 0,
            opened_unix_ms: crate::status::now_ms(),
            closed_unix_ms: 0,
        };
        let condition = match &current {
            Some((_, etag)) => Condition::ETag(etag.clone()),
            None => Condition::Absent,
        };
        // The sweeper's deadline is on the boot-time clock: suspended past it, it deletes
        // nothing when it resumes (the receivers' fences ended meanwhile).
        let opened = Moment::now();
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            self.delete_lists(&id);
            report.ran = false;
            return Ok(report);
        }
        let etag = match self.put_epoch(&epoch, &condition) {
            Ok(etag) => etag,
            // Refused (another receiver opened a sweep first), or unknown: an attempt that
            // timed out may have landed, and its retry then found the condition false. Ours
            // only if the bucket now says so.
            Err(e) => match self.read_epoch()? {
                Some((now, etag)) if now.id == id => etag,
                _ if matches!(e, PutError::Lost | PutError::Conflict) => {
                    self.delete_lists(&id);
                    report.ran = false;
                    return Ok(report);
                }
                _ => return Err(self.sweep_err(format!("opening the sweep: {e}"))),
            },
        };
        tracing::info!(
            sweep = epoch.seq,
            candidates = candidates.len(),
            blocks = report.blocks,
            "block sweep opened"
        );
        // The previous sweep's lists: a receiver that missed it sees the number jump and
        // lists its index again, so nothing reads them any more.
        if let Some((previous, _)) = &current {
            self.delete_lists(&previous.id);
        }
        // From here the epoch is open: whatever fails, it is closed (deleting nothing more).
        let deadline = opened + t.duration;
        let mut deleted: Vec<BlockHash> = Vec::new();
        let mut unsure = false;
        let result = self.sweep_open(
            &epoch,
            &candidates,
            batches,
            opened + t.acks,
            deadline,
            &mut read,
            &mut refs,
            (&mut deleted, &mut unsure),
        );
        if unsure {
            // A delete attempt timed out or failed: the bucket may still carry it out. The
            // receivers end their fences at the close, so it waits for that attempt first.
            tracing::info!(
                "block sweep: a delete may still be under way; closing after {} s",
                t.margin.as_secs()
            );
            std::thread::sleep(t.margin);
        }
        epoch.state = State::Closed;
        epoch.deleted = deleted.len() as u64;
        epoch.closed_unix_ms = crate::status::now_ms();
        // Without the list, the receivers list their indexes again: the close goes on.
        let (s3, key, body) = (self.s3.clone(), deleted_key(&id), encode_hashes(&deleted));
        if let Err(e) = self
            .store
            .run(async move { s3.put(&key, body, &Condition::None).await })
        {
            tracing::warn!("block sweep {}: writing what it deleted: {e}", epoch.seq);
        }
        if let Err(e) = self.close(&epoch, etag) {
            tracing::warn!(
                "closing block sweep {}: {e}; the receivers end its fence at its deadline",
                epoch.seq
            );
        }
        // Our own fence ends as every receiver's does.
        if let Err(e) = self.follow(batches, false) {
            tracing::warn!("reading the closed block sweep: {e}");
        }
        report.deleted = deleted.len();
        report.kept = candidates.len() - deleted.len();
        result?;
        tracing::info!(
            sweep = epoch.seq,
            deleted = report.deleted,
            kept = report.kept,
            "block sweep closed"
        );
        Ok(report)
    }

    /// Writes the closed `epoch` over the open one (version `etag`). A refusal is read back:
    /// an attempt that timed out may have landed (then it is closed), or have landed and
    /// been followed by nothing (then it is written once more over what is there).
    fn close(&self, epoch: &Epoch, etag: String) -> Result<(), FleetError> {
        let Err(e) = self.put_epoch(epoch, &Condition::ETag(etag)) else {
            return Ok(());
        };
        match self.read_epoch()? {
            Some((now, _)) if now.id == epoch.id && now.state == State::Closed => Ok(()),
            Some((now, etag)) if now.id == epoch.id => self
                .put_epoch(epoch, &Condition::ETag(etag))
                .map(|_| ())
                .map_err(|e| self.sweep_err(e.to_string())),
            _ => Err(self.sweep_err(e.to_string())),
        }
    }

    /// Deletes a sweep's candidate and deleted lists (a failure leaves them to no harm).
    fn delete_lists(&self, id: &str) {
        let s3 = self.s3.clone();
        let keys = vec![candidates_key(id), deleted_key(id)];
        if let Err(e) = self.store.run(async move { s3.delete_many(&keys).await }) {
            tracing::info!("deleting block sweep {id}'s lists: {e} (left in the bucket)");
        }
    }

    /// Tests only: `f` runs in every sweep of this receiver between its second reading of
    /// the references and its deletes (where a batch that brings a candidate is most
    /// dangerous: its reference is read by no one).
    #[doc(hidden)]
    pub fn test_before_deletes(&self, f: impl Fn() + Send + Sync + 'static) {
        *self
            .before_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    fn put_epoch(&self, epoch: &Epoch, condition: &Condition) -> Result<String, PutError> {
        let (s3, body, c) = (
            self.s3.clone(),
            serde_json::to_vec_pretty(epoch).unwrap_or_default(),
            condition.clone(),
        );
        self.store.run(async move { s3.put(EPOCH, body, &c).await })
    }

    /// The open epoch's steps 2 to 4 (module docs); `deleted` gets every block a delete was
    /// sent for, and `unsure` is set when one may still land after this returns.
    #[allow(clippy::too_many_arguments)]
    fn sweep_open(
        &self,
        epoch: &Epoch,
        candidates: &HashSet<BlockHash>,
        batches: &Batches,
        acks_by: Moment,
        deadline: Moment,
        read: &mut HashSet<String>,
        refs: &mut HashSet<BlockHash>,
        (deleted, unsure): (&mut Vec<BlockHash>, &mut bool),
    ) -> Result<(), FleetError> {
        // This receiver follows its own sweep like any other.
        self.follow(batches, true)?;
        self.wait_for_acks(epoch, acks_by)?;
        self.references(read, refs)?;
        let mut garbage: Vec<BlockHash> = candidates.difference(refs).copied().collect();
        garbage.sort();
        if let Some(f) = self
            .before_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
        for chunk in garbage.chunks(1000) {
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!(
                    left = garbage.len() - deleted.len(),
                    "block sweep: the receiver is stopping; the rest waits for the next sweep"
                );
                break;
            }
            if Moment::now() >= deadline {
                tracing::warn!(
                    left = garbage.len() - deleted.len(),
                    "block sweep: deadline reached; the rest waits for the next sweep"
                );
                break;
            }
            // Counted before the request: a delete that failed may still have landed.
            deleted.extend_from_slice(chunk);
            let sent = Instant::now();
            let r = self.store.delete_by(chunk, deadline);
            if !matches!(r, Ok(true)) || sent.elapsed() >= self.store.attempt_timeout() {
                *unsure = true;
            }
            r.map_err(|e| self.sweep_err(format!("deleting blocks: {e}")))?;
        }
        Ok(())
    }

    /// Waits until the holder of every lease in the bucket has acknowledged `epoch`, released
    /// the lease, or lost it to another holder that has; ends a lease left unrenewed a whole
    /// period and a margin. Fails at `by`.
    fn wait_for_acks(&self, epoch: &Epoch, by: Moment) -> Result<(), FleetError> {
        let s3 = self.s3.clone();
        let servers: Vec<String> = self
            .store
            .run(async move { s3.list("leases/").await })
            .map_err(|e| self.sweep_err(e.to_string()))?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix("leases/")?
                    .strip_suffix(".json")
                    .map(str::to_string)
            })
            .collect();
        // Per server still waited for: the lease as last read (version, holder, incarnation),
        // and since when this version was seen (our clock).
        let mut waiting: HashMap<String, Option<(String, String, String, Moment)>> =
            servers.into_iter().map(|s| (s, None)).collect();
        let margin = self.period / 10 + Duration::from_secs(1);
        // About a renewal round goes by before the holders acknowledge: no need to ask more
        // often than a few times a round.
        let poll = (self.period / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let acks = self.read_acks()?;
            let acked = |holder: &str, incarnation: &str| {
                acks.get(holder)
                    .is_some_and(|a| a.sweep == epoch.id && a.incarnation == incarnation)
            };
            let mut done = Vec::new();
            for (server, seen) in waiting.iter_mut() {
                // The holder last read has acknowledged: its batches that named anything
                // are in the bucket, and a taker since was fenced at its take.
                if seen.as_ref().is_some_and(|(_, h, i, _)| acked(h, i)) {
                    done.push(server.clone());
                    continue;
                }
                let leases = self.leases.clone();
                let s = server.clone();
                let current = self
                    .store
                    .run(async move { leases.current(&s).await })
                    .map_err(|e| self.sweep_err(e.to_string()))?;
                let (etag, body) = match current {
                    Current::Absent => {
                        done.push(server.clone());
                        continue;
                    }
                    Current::Present { etag, body } => (etag, body),
                };
                if body.holder.is_empty() || acked(&body.holder, &body.incarnation) {
                    done.push(server.clone());
                    continue;
                }
                let now = Moment::now();
                let since = match seen {
                    Some((e, _, _, since)) if *e == etag => *since,
                    _ => {
                        *seen = Some((
                            etag.clone(),
                            body.holder.clone(),
                            body.incarnation.clone(),
                            now,
                        ));
                        now
                    }
                };
                let wait = self
                    .period
                    .max(Duration::from_millis(body.period_ms).min(MAX_DURATION));
                if now.duration_since(since) >= wait + margin {
                    let leases = self.leases.clone();
                    let (s, e) = (server.clone(), etag.clone());
                    if self
                        .store
                        .run(async move { leases.end_stale(&s, &e).await })
                        .map_err(|e| self.sweep_err(e.to_string()))?
                    {
                        tracing::warn!(
                            server = %server,
                            holder = %body.holder,
                            "block sweep: the lease was not renewed for a whole period; ended \
                             (its holder acknowledges nothing more for the server)"
                        );
                        done.push(server.clone());
                    }
                }
            }
            for s in done {
                waiting.remove(&s);
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(self.sweep_err(format!(
                    "the receiver is stopping: sweep {} given up, nothing deleted",
                    epoch.seq
                )));
            }
            if Moment::now() >= by {
                let mut left: Vec<&String> = waiting.keys().collect();
                left.sort();
                return Err(self.sweep_err(format!(
                    "{} lease holder(s) never acknowledged sweep {} (servers {:?}); nothing deleted",
                    left.len(),
                    epoch.seq,
                    left.iter().take(5).collect::<Vec<_>>()
                )));
            }
            std::thread::sleep(poll);
        }
    }

    fn read_acks(&self) -> Result<HashMap<String, Ack>, FleetError> {
        let s3 = self.s3.clone();
        let listed = self
            .store
            .run(async move { s3.list("gc/acks/").await })
            .map_err(|e| self.sweep_err(e.to_string()))?;
        let mut out = HashMap::new();
        for o in listed {
            let Some(receiver) = o
                .key
                .strip_prefix("gc/acks/")
                .and_then(|k| k.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            let (s3, k) = (self.s3.clone(), o.key.clone());
            if let Some((raw, _)) = self
                .store
                .run(async move { s3.get(&k).await })
                .map_err(|e| self.sweep_err(e.to_string()))?
            {
                if let Ok(a) = serde_json::from_slice::<Ack>(&raw) {
                    out.insert(receiver, a);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_lists_round_trip_and_a_torn_one_is_refused() {
        let hashes: HashSet<BlockHash> = (0u8..5).map(|i| BlockHash([i; 32])).collect();
        let raw = encode_hashes(&hashes);
        assert_eq!(decode_hashes(&raw), Some(hashes));
        assert_eq!(decode_hashes(&raw[..33]), None);
        assert_eq!(decode_hashes(&[]), Some(HashSet::new()));
    }

    #[test]
    fn an_epoch_is_over_by_its_deadline_and_margin_never_past_a_day() {
        let mut e = Epoch {
            id: "x".into(),
            seq: 1,
            sweeper: "r".into(),
            state: State::Open,
            candidates: 1,
            duration_ms: 60_000,
            margin_ms: 5_000,
            deleted: 0,
            opened_unix_ms: 0,
            closed_unix_ms: 0,
        };
        let t = Instant::now();
        assert_eq!(e.over_at(t), t + Duration::from_secs(65));
        e.duration_ms = u64::MAX;
        assert_eq!(e.over_at(t), t + MAX_DURATION);
        assert_eq!(server_of("servers/web-01/journal/1"), Some("web-01"));
        assert_eq!(server_of("leases/web-01.json"), None);
    }
}
