//! Fleet mode (`[fleet]`): several receivers share the bucket of `[s3]`, and each source
//! server is owned by one of them at a time.
//!
//! The bucket is the truth, each receiver's state directory a working copy:
//!
//! - **Ownership** is a lease per server ([`crate::lease`]), taken when an agent says `Hello`
//!   and renewed every third of `lease_seconds` while it is connected. An agent that reaches a
//!   receiver not holding its lease is sent to the holder (`Redirect`).
//! - **Taking a server** (a new lease, or one taken over from a receiver that died) makes the
//!   working copy the bucket's: live manifests and journal segments replayed into the local
//!   disks, points copied in, local ones the bucket no longer has removed. So the agent goes
//!   on where it was acknowledged, with no full resync.
//! - **Every acknowledgement** waits for the batch's journal segment (one object per batch,
//!   `If-None-Match`: a segment number someone else wrote means another writer, and ends the
//!   holding) and for the lease to be still valid *after* that PUT returned: a taker only
//!   takes a lease a whole period after its holder's last renewal, so whatever a holder wrote
//!   in time is in the bucket before the taker reads it. A holder whose renewal failed, or
//!   that was paused past its lease, acknowledges nothing more.
//! - **Points** are written to the bucket (manifests, then `point.json`) before the local
//!   catalog; each committed disk's manifest is then copied (server-side) as its new live
//!   base, and the journal segments it covers are deleted.
//!
//! - **The block sweep** runs in epochs that every receiver follows ([`Batches`],
//!   `bucket::sweep`): a dedupe answer one receiver gave is never for a block another
//!   receiver's sweep deletes.
//!
//! [`Fleet`] is the seam the sessions use; [`bucket::BucketFleet`] the one engine.

#[cfg(feature = "aws")]
pub mod bucket;
pub mod segment;

use crate::catalog::PointRecord;
use crate::store::{BlockStore, StoreError};
use lifeboat_common::config::ReceiverConfig;
use lifeboat_common::manifest::Manifest;
use std::path::Path;
use std::sync::Arc;

pub use segment::Records;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// This receiver no longer holds the server (renewal failed, the lease expired, another
    /// writer appeared): nothing more may be acknowledged for it.
    #[error("server {server}: this receiver no longer holds its lease ({why}); nothing more is acknowledged for it")]
    NotHeld { server: String, why: String },
    /// A request to the bucket failed.
    #[error("server {server}: {why}")]
    Bucket { server: String, why: String },
    /// The bucket holds something unreadable where the server's state should be.
    #[error("server {server}: {what} in the bucket is unreadable: {why}")]
    Corrupt {
        server: String,
        what: String,
        why: String,
    },
    #[error("server {server}: the working copy in the state directory: {why}")]
    Local { server: String, why: String },
    /// Under Object Lock until then: not deleted.
    #[error("server {server}: point {point} is under Object Lock until {until_unix_ms} (unix ms)")]
    Locked {
        server: String,
        point: u64,
        until_unix_ms: u64,
    },
}

/// What taking a server's lease came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Held by this receiver, and the working copy is the bucket's.
    Held,
    /// Another receiver holds it: agents belong at `address`.
    Elsewhere { holder: String, address: String },
}

/// In a point's catalog directory, under Object Lock: how long the point's objects in the
/// bucket are locked, and how long every block it names was last found locked (JSON).
pub const POINT_LOCK: &str = "lock";

/// A point's lock, as this receiver knows it ([`POINT_LOCK`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointLock {
    /// The point's manifests and record are locked until then (unix ms).
    pub until_unix_ms: u64,
    /// Every block the point names was found locked until at least then.
    pub blocks_until_unix_ms: u64,
    /// The versions of the point's objects (`point.json`, `<disk>.manifest`) this receiver
    /// wrote: the ones whose locks it extends. Empty when another receiver wrote them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub versions: std::collections::BTreeMap<String, String>,
}

impl PointLock {
    /// Whether every block of the point is locked as long as the point.
    pub fn blocks_locked(&self) -> bool {
        self.blocks_until_unix_ms >= self.until_unix_ms
    }
}

/// The point's lock: what the keeper recorded, or at least the first lock its record names.
pub fn point_lock(catalog: &crate::catalog::Catalog, rec: &PointRecord) -> PointLock {
    let path = catalog.point_dir(&rec.server, rec.point).join(POINT_LOCK);
    let mut l: PointLock = std::fs::read(&path)
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default();
    l.until_unix_ms = l.until_unix_ms.max(rec.locked_until_unix_ms.unwrap_or(0));
    l
}

pub fn save_point_lock(
    catalog: &crate::catalog::Catalog,
    rec: &PointRecord,
    lock: &PointLock,
) -> std::io::Result<()> {
    let path = catalog.point_dir(&rec.server, rec.point).join(POINT_LOCK);
    let json = serde_json::to_vec(lock).map_err(std::io::Error::other)?;
    lifeboat_common::durable::write_atomic(&path, &json)
}

/// What one lock keeper's pass over a server did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LockPass {
    /// Points whose lock was extended (retention keeps them longer now).
    pub points_extended: usize,
    /// Blocks whose lock was read from the bucket, then extended.
    pub read: usize,
    pub extended: usize,
    /// Points and blocks it could not lock long enough (tried again next pass).
    pub failed: usize,
}

/// What `/metrics` shows of the fleet.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Servers whose lease is held now.
    pub held: u64,
    /// Leases lost while held.
    pub lost: u64,
    /// Servers taken since the start.
    pub taken: u64,
    /// Under Object Lock: points and blocks the lock keeper could not lock as long as they
    /// must be (each tried again at the next pass).
    pub lock_failures: u64,
}

/// The fleet as a session sees it. Every call blocks (sessions run on blocking threads).
pub trait Fleet: Send + Sync {
    /// Takes (or keeps) the server's lease and makes the working copy the bucket's.
    fn take(&self, server: &str) -> Result<Taken, FleetError>;
    /// Gives the lease up (the agent disconnected); never fails loudly.
    fn release(&self, server: &str);
    /// Whether this receiver holds the server's lease now (no request).
    fn holds(&self, server: &str) -> bool;
    /// Makes a batch's journal records durable in the bucket; `Ok` only while the lease
    /// still holds after they are.
    fn journal(&self, server: &str, records: &Records) -> Result<(), FleetError>;
    /// Writes a point to the bucket (manifests, then `point.json`); `Ok` only while the lease
    /// still holds after it is.
    fn write_point(
        &self,
        rec: &PointRecord,
        manifests: &[(String, Manifest)],
    ) -> Result<(), FleetError>;
    /// Unlists a point in the bucket (`point.json` first), then deletes its manifests; only
    /// while holding the server. Under Object Lock, a point whose record is still locked in
    /// the bucket (another receiver extended it) is left, [`FleetError::Locked`].
    fn delete_point(&self, server: &str, point: u64) -> Result<(), FleetError>;
    /// After a point: its manifests become the disks' live bases in the bucket, and the
    /// journal segments they cover go. Best effort (failures are logged): the bucket's live
    /// state is whole either way.
    fn compacted(&self, server: &str, point: u64, disks: &[String]);
    /// Renews every held lease; those that fail are dropped (their sessions then end).
    /// Returns whether the identity record of a held server changed in the bucket (another
    /// receiver revoked or enrolled it): live sessions must check theirs again.
    fn renew(&self) -> bool;
    /// Brings the server's identity record from the bucket into the state directory when the
    /// bucket's is newer (an enrolment, renewal or revocation at another receiver).
    fn pull_identity(&self, server: &str) -> Result<bool, FleetError>;
    /// Writes the server's identity record, as the state directory has it, to the bucket for
    /// the fleet's other receivers.
    fn push_identity(&self, server: &str) -> Result<(), FleetError>;
    /// Under Object Lock (`[s3] object_lock_days`): when a point committed at `committed_ms`
    /// stops being locked. `None` without it.
    /// (Retention keeps every point of the last `recent_ms`.)
    fn point_lock_until(&self, committed_ms: u64, recent_ms: u64) -> Option<u64>;
    /// `object_lock_days`, under Object Lock.
    fn lock_days(&self) -> Option<u64>;
    /// Under Object Lock: extends the locks of the points retention keeps as long as it keeps
    /// them ([`crate::retention::lock_horizons`]), then makes every block a locked point names
    /// locked at least as long as the point (blocks are shared by dedupe, so one written long
    /// ago may be named by today's point), recording each in the point's [`POINT_LOCK`]. Only
    /// while holding the server; a no-op without Object Lock.
    /// `recent_ms`: retention keeps every point that young. `at_release`: the agent is gone
    /// (its newest point is locked as if final), and what is left at that deadline is left
    /// for the next pass.
    fn keep_locks(
        &self,
        server: &str,
        recent_ms: u64,
        at_release: Option<std::time::Instant>,
    ) -> Result<LockPass, FleetError>;
    /// Releases every held lease (serve is stopping).
    fn release_all(&self);
    /// Seconds between renewals.
    fn renew_every(&self) -> std::time::Duration;
    /// For `/metrics`.
    fn counts(&self) -> Counts;
    /// Follows the fleet's block sweep: reads its epoch and, when a sweep is open, fences
    /// this receiver ([`Batches::fence`]: its candidates leave the dedupe index); with
    /// `barrier`, then waits for the batches from before the fence and acknowledges the
    /// epoch to the sweeper. A closed sweep's deleted blocks leave the index. Called every
    /// renewal round (with `barrier`) and after every take, before the first answer.
    fn follow_sweep(&self, batches: &Batches, barrier: bool) -> Result<(), FleetError>;
    /// Runs a block sweep of the whole bucket if none ran for a while and none is running:
    /// see `bucket::sweep`. Blocks younger than `grace` are never candidates.
    fn sweep(
        &self,
        grace: std::time::Duration,
        batches: &Batches,
    ) -> Result<SweepReport, FleetError>;
    /// Before a batch of `generation` inserts `hashes`: waits while a sweep fenced at or
    /// before that generation may still delete one of them (the insert then writes it
    /// again, after the sweep). False if the receiver began to stop first: the batch fails.
    fn wait_for_sweep(&self, hashes: &[lifeboat_common::BlockHash], generation: u64) -> bool;
    /// The receiver is stopping: a sweep it runs deletes nothing more and closes, and no
    /// batch waits for a sweep any more.
    fn stop_sweeping(&self);
}

/// The batches of every session of this receiver, each counted from the dedupe answers it
/// relies on (`has`) until its journal records are durable (in a fleet: in the bucket), with
/// the generation it entered in.
///
/// A fleet's block sweep fences the receiver ([`Batches::fence`]): the sweep's candidates
/// leave the dedupe index and the generation goes up, so every batch that may have been told
/// "held" for a candidate is of an earlier generation; [`Batches::wait_below`] then waits for
/// those batches to end (their references are in the bucket, where the sweeper reads them
/// again) without stopping the batches of the new generation.
#[derive(Default)]
pub struct Batches {
    state: std::sync::Mutex<BatchState>,
    ended: std::sync::Condvar,
}

#[derive(Default)]
struct BatchState {
    generation: u64,
    /// Batches in flight, per generation they entered in.
    in_flight: std::collections::BTreeMap<u64, usize>,
}

/// One batch in flight ([`Batches::enter`]); it ends when dropped.
pub struct InFlight<'a> {
    batches: &'a Batches,
    generation: u64,
}

impl InFlight<'_> {
    /// The generation the batch entered in.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.batches.lock();
        if let Some(n) = s.in_flight.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.generation);
            }
        }
        drop(s);
        self.batches.ended.notify_all();
    }
}

impl Batches {
    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch starts (before its first dedupe answer).
    pub fn enter(&self) -> InFlight<'_> {
        let mut s = self.lock();
        let generation = s.generation;
        *s.in_flight.entry(generation).or_default() += 1;
        InFlight {
            batches: self,
            generation,
        }
    }

    /// Runs `install` (which changes what dedupe answers), then starts a new generation;
    /// `install` is given that generation (the first whose batches see the change), which
    /// is returned too. No batch enters while it runs.
    pub fn fence(&self, install: impl FnOnce(u64)) -> u64 {
        let mut s = self.lock();
        let next = s.generation + 1;
        install(next);
        s.generation = next;
        next
    }

    /// Waits until no batch of a generation below `generation` is in flight; false if
    /// `timeout` passed first.
    pub fn wait_below(&self, generation: u64, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.in_flight.range(..generation).next().is_none() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .ended
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What one block sweep of the fleet did ([`Fleet::sweep`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether this receiver ran a sweep (another may be sweeping, or one ran recently).
    pub ran: bool,
    /// Unreferenced blocks past the grace when the sweep began.
    pub candidates: usize,
    /// Blocks deleted.
    pub deleted: usize,
    /// Candidates kept: named again by the time of the deletion, or left when the
    /// deadline came (locked blocks are never candidates).
    pub kept: usize,
    /// Blocks in the bucket when the sweep began.
    pub blocks: usize,
}

/// A staging store and, in a fleet, the fleet over its bucket.
pub type Opened = (Arc<dyn BlockStore>, Option<Arc<dyn Fleet>>);

/// The staging store `config` names and, with `[fleet]`, the fleet over its bucket.
pub fn open(state_dir: &Path, config: &ReceiverConfig) -> Result<Opened, StoreError> {
    match (&config.fleet, &config.s3) {
        #[cfg(feature = "aws")]
        (Some(f), Some(c)) => {
            let store = crate::store::open_s3(state_dir, config, c)?;
            let me =
                crate::snapshots::ebs::install_id(state_dir).map_err(|source| StoreError::Io {
                    path: state_dir.join("install-id"),
                    source,
                })?;
            let fleet = bucket::BucketFleet::new_shared(
                store.clone(),
                state_dir,
                &me,
                &f.address,
                std::time::Duration::from_secs(f.lease_seconds),
            );
            Ok((store, Some(fleet)))
        }
        _ => Ok((crate::store::open(state_dir, config)?, None)),
    }
}

/// With `[fleet]` in `<state_dir>/receiver.toml`: copies every server's points from the
/// fleet's bucket into the local catalog, so that the commands reading it (`points`,
/// `restore`, `servers`) see what every receiver of the fleet committed.
pub fn sync_catalog(state_dir: &Path) -> anyhow::Result<()> {
    #[cfg(feature = "aws")]
    if let Some(fleet) = for_commands(state_dir)? {
        fleet.sync_catalog()?;
    }
    Ok(())
}

/// With `[fleet]` in `<state_dir>/receiver.toml`: the fleet, for a command (it holds no
/// lease); `None` outside a fleet.
#[cfg(feature = "aws")]
pub fn for_commands(state_dir: &Path) -> anyhow::Result<Option<bucket::BucketFleet>> {
    let path = state_dir.join("receiver.toml");
    if !path.exists() {
        return Ok(None); // not a receiver's state directory: the commands say so themselves
    }
    let config = ReceiverConfig::load(&path)?;
    let (Some(f), Some(c)) = (&config.fleet, &config.s3) else {
        return Ok(None);
    };
    let store = crate::store::open_s3(state_dir, &config, c)?;
    let me = crate::snapshots::ebs::install_id(state_dir)?;
    Ok(Some(bucket::BucketFleet::new(
        store,
        state_dir,
        &me,
        &f.address,
        std::time::Duration::from_secs(f.lease_seconds),
    )))
}

/// Revokes the server's identity. With `[fleet]`, over the bucket's record: read first (an
/// enrolment at another receiver gets a revocation of its own), written back only over the
/// version read, tried again if another receiver wrote meanwhile; every receiver of the fleet
/// then refuses the agent.
pub fn revoke(
    state_dir: &Path,
    server: &str,
    now_ms: u64,
) -> anyhow::Result<crate::identities::Record> {
    #[cfg(feature = "aws")]
    if let Some(fleet) = for_commands(state_dir)? {
        let mut attempts = 0;
        loop {
            attempts += 1;
            Fleet::pull_identity(&fleet, server)?;
            let r = crate::identities::revoke(state_dir, server, now_ms)?;
            match Fleet::push_identity(&fleet, server) {
                Ok(()) => return Ok(r),
                Err(FleetError::Bucket { .. }) if attempts < 3 => continue,
                Err(e) => anyhow::bail!(
                    "server {server} is revoked at this receiver, but writing that to the \
                     fleet's bucket failed ({e}): the other receivers still accept it; run \
                     revoke again"
                ),
            }
        }
    }
    crate::identities::revoke(state_dir, server, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_waits_for_earlier_batches_only() {
        let b = Batches::default();
        let old = b.enter();
        assert_eq!(old.generation(), 0);
        let mut seen = None;
        let g = b.fence(|g| seen = Some(g));
        assert_eq!((g, seen), (1, Some(1)));
        let new = b.enter();
        assert_eq!(new.generation(), 1);
        assert!(
            !b.wait_below(g, Duration::from_millis(50)),
            "an earlier batch is in flight"
        );
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.wait_below(g, Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(50));
            drop(old);
            assert!(waiter.join().unwrap());
        });
        // A batch of the new generation holds no fence at it up; a later fence waits for it.
        assert!(b.wait_below(g, Duration::ZERO));
        let g2 = b.fence(|_| {});
        assert!(!b.wait_below(g2, Duration::from_millis(10)));
        drop(new);
        assert!(b.wait_below(g2, Duration::ZERO));
    }
}
