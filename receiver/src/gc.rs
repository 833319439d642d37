//! Retention and garbage collection.
//!
//! One pass: apply the retention policy to every server's points, then, when that deleted a
//! point or `sweep_anyway` asks (the caller does so hourly), delete every stored block that no
//! listed point and no live manifest references and that is older than the grace period (a
//! block younger than that may be the subject of a dedupe answer in flight). The sweep reads
//! every listed manifest and lists the store, so it is skipped when nothing can have become
//! garbage except through rare failed batches, which the hourly sweep collects.
//!
//! Damage: a point whose manifest is gone, corrupt or does not match its record is marked
//! damaged (reported by `points` and `servers`, never restorable) and the pass goes on for
//! everything else; retention deletes a point only after the points kept in its place were
//! verified, so a damaged newest point never costs the good ones before it.
//!
//! One consistent view: inside `serve` the pass holds `Shared::gc_lock` exclusively, and
//! everything that adds or moves a reference holds it shared for its whole duration: a batch
//! that checks blocks' presence and journals them, `OpenDisk` (which may compact the live
//! manifest and marks missing blocks absent), and a commit (which writes the point and then
//! compacts: renames `live.manifest` and truncates the journal). So the pass never reads a
//! live manifest from before a compaction with a journal from after it, nor a catalog without
//! a point whose compaction it sees. Against a concurrent `restore` in another process: the
//! pass takes `gc.lock` exclusively and skips its turn when a restore holds it shared. GC runs
//! only inside `serve` (no other command deletes blocks). In a fleet the pass applies retention
//! only and holds `Shared::gc_lock` shared: its bucket requests never stall the sessions'
//! batches. The block sweep of a fleet is the fleet's (`crate::fleet::Fleet::sweep`): run by
//! `serve` after such a pass, one receiver at a time, with every other fenced.

use crate::catalog::{Catalog, ManifestState};
use crate::disk::live_references;
use crate::retention;
use crate::store::BlockStore;
use crate::sys;
use lifeboat_common::config::RetentionConfig;
use lifeboat_common::BlockHash;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub points_deleted: usize,
    pub blocks_deleted: usize,
    /// Points found damaged (their manifest unreadable) and marked so.
    pub points_damaged: usize,
    pub skipped_busy: bool,
    /// Whether the block sweep ran.
    pub swept: bool,
    /// Blocks left in the store after the sweep (when it ran).
    pub blocks_kept: Option<u64>,
}

/// Opens (creating) the lock file shared by GC and restores.
pub fn lock_file(state_dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = state_dir.join("gc.lock");
    // Never through a link: `restore` runs as root in a directory its service user owns.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    let m = f.metadata()?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(std::io::Error::other(format!(
            "{} is not a plain file of its own (a link?): refusing to use it",
            path.display()
        )));
    }
    // A lock root creates belongs to the state directory's owner all the same, so that the
    // service can take it (changed through the open file, never the path).
    if crate::sys::euid() == 0 {
        let dir = std::fs::metadata(state_dir)?;
        if dir.uid() != 0 && m.uid() != dir.uid() {
            std::os::unix::fs::fchown(&f, Some(dir.uid()), Some(dir.gid()))?;
        }
    }
    Ok(f)
}

pub fn run_pass(
    state_dir: &Path,
    store: &dyn BlockStore,
    policy: &RetentionConfig,
    sweep_anyway: bool,
) -> anyhow::Result<GcReport> {
    run_pass_in(state_dir, store, None, policy, sweep_anyway)
}

/// How long past a point's lock retention waits before deleting it: this receiver's clock
/// may run ahead of S3's.
pub const LOCK_MARGIN_MS: u64 = 3_600_000;

/// Under Object Lock, in a fleet: the lock keeper over every server this receiver holds
/// ([`crate::fleet::Fleet::keep_locks`]; retention keeps every point of the last
/// `recent_ms`). Outside the GC lock: it only reads points and manifests (one deleted
/// meanwhile is counted unreadable, and checked again next pass), and its requests must not
/// stall the sessions.
pub fn keep_locks(state_dir: &Path, fleet: &dyn crate::fleet::Fleet, recent_ms: u64) {
    let servers = match Catalog::new(state_dir).servers() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("lock keeper: listing the servers: {e}");
            return;
        }
    };
    for server in servers.iter().filter(|s| fleet.holds(s)) {
        match fleet.keep_locks(server, recent_ms, None) {
            Ok(pass) if pass.points_extended + pass.read + pass.extended + pass.failed > 0 => {
                tracing::info!(
                    server = %server,
                    points_extended = pass.points_extended,
                    blocks_read = pass.read,
                    blocks_extended = pass.extended,
                    failed = pass.failed,
                    "lock keeper: locks checked"
                )
            }
            Ok(_) | Err(crate::fleet::FleetError::NotHeld { .. }) => {}
            Err(e) => tracing::error!(server = %server, "lock keeper skipped: {e}"),
        }
    }
}

/// [`run_pass`], in a fleet when `fleet` is given: retention only for the servers this
/// receiver holds (their points deleted from the bucket first), and no block sweep here (each
/// receiver sees only its own servers' references: the fleet's sweep reads them all).
pub fn run_pass_in(
    state_dir: &Path,
    store: &dyn BlockStore,
    fleet: Option<&dyn crate::fleet::Fleet>,
    policy: &RetentionConfig,
    sweep_anyway: bool,
) -> anyhow::Result<GcReport> {
    let lock = lock_file(state_dir)?;
    if !sys::flock(&lock, true, true)? {
        return Ok(GcReport {
            skipped_busy: true,
            ..Default::default()
        });
    }
    let catalog = Catalog::new(state_dir);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let mut report = GcReport::default();
    let quarantined = store.quarantined()?;
    for server in catalog.servers()? {
        if fleet.is_some_and(|f| !f.holds(&server)) {
            continue; // another receiver's, or nobody's now
        }
        // One server's trouble never stops retention for the others.
        if let Err(e) = apply_retention(
            &catalog,
            store,
            fleet,
            &quarantined,
            &server,
            now_ms,
            policy,
            &mut report,
        ) {
            tracing::error!(server = %server, "retention skipped for server {server}: {e:#}");
        }
    }
    tracing::debug!(
        points_deleted = report.points_deleted,
        "gc pass: retention applied"
    );
    if fleet.is_some() || (report.points_deleted == 0 && !sweep_anyway) {
        return Ok(report);
    }
    report.swept = true;
    let refs = catalog.referenced()?;
    for (server, point, disk, why) in &refs.damaged {
        damaged(&catalog, server, *point, disk, why, &mut report)?;
    }
    if let Some(first) = refs.unknown.first() {
        tracing::warn!(
            unreadable = refs.unknown.len(),
            "gc: not sweeping blocks this pass: {first}"
        );
        return Ok(report);
    }
    let mut referenced = refs.hashes;
    for server in catalog.servers()? {
        let disks = catalog.server_dir(&server).join("disks");
        if let Ok(rd) = std::fs::read_dir(&disks) {
            for e in rd.flatten() {
                match live_references(&e.path()) {
                    Ok(hashes) => referenced.extend(hashes),
                    Err(why) => {
                        // A disk whose live state cannot be read: keep everything this pass.
                        tracing::warn!("gc: not sweeping blocks this pass: {why}");
                        return Ok(report);
                    }
                }
            }
        }
    }
    let grace = Duration::from_secs(policy.gc_grace_minutes * 60);
    let cutoff = SystemTime::now() - grace;
    let mut kept = 0u64;
    let mut garbage = Vec::new();
    for (hash, mtime) in store.list()? {
        if !referenced.contains(&hash) && mtime < cutoff {
            garbage.push(hash);
        } else {
            kept += 1;
        }
    }
    // In batches (S3 deletes 1000 keys a request), counted as each batch is done.
    for batch in garbage.chunks(1000) {
        store.remove_many(batch)?;
        report.blocks_deleted += batch.len();
    }
    report.blocks_kept = Some(kept);
    if report.blocks_deleted > 0 || report.points_deleted > 0 {
        tracing::info!(
            points = report.points_deleted,
            blocks = report.blocks_deleted,
            "gc pass done"
        );
    }
    Ok(report)
}

/// Deletes the points of `server` that the policy no longer keeps.
///
/// A point is deleted only once every point kept in its place was verified restorable: its
/// manifests sound, and none of its blocks quarantined and still missing. A damaged point
/// (marked) is neither counted nor deleted: it stays listed for the operator. A point whose
/// blocks are quarantined and not yet resent is not counted this pass (it may heal), so the
/// points it would replace stay. A manifest that cannot be judged stops retention for the
/// server this pass.
#[allow(clippy::too_many_arguments)]
fn apply_retention(
    catalog: &Catalog,
    store: &dyn BlockStore,
    fleet: Option<&dyn crate::fleet::Fleet>,
    quarantined: &std::collections::HashSet<BlockHash>,
    server: &str,
    now_ms: u64,
    policy: &RetentionConfig,
    report: &mut GcReport,
) -> anyhow::Result<()> {
    let mut unhealed = std::collections::HashSet::new();
    loop {
        let points: Vec<_> = catalog
            .points(server)?
            .into_iter()
            .filter(|p| p.damaged.is_none())
            .collect();
        let candidates: Vec<_> = points
            .iter()
            .filter(|p| !unhealed.contains(&p.point))
            .collect();
        // The receiver's clock: an agent's wrong clock must never age points.
        let pairs: Vec<(u64, u64)> = candidates
            .iter()
            .map(|p| (p.point, p.committed_unix_ms))
            .collect();
        let keep = retention::keep(&pairs, now_ms, policy);
        // Points EBS needs stay: uploading, on EBS, the parent of an unfinished upload, or
        // pinned by a recovery (later uploads take their differences from their manifests).
        let held = crate::snapshots::ebs::record::held_points(catalog, server, &points);
        // Under Object Lock a point stays while it is locked, and while the lock policy says it
        // must be (the keeper may not have extended its lock yet: after a restart, say).
        // (With an hour's margin for clocks: a plain DELETE of a locked point is not refused,
        // only hidden.)
        let recent_ms = policy.recent_minutes.saturating_mul(60_000);
        let horizons = fleet
            .and_then(|f| f.lock_days())
            .map(|days| retention::lock_horizons(&pairs, now_ms, days, recent_ms, false));
        let doomed: Vec<_> = candidates
            .iter()
            .filter(|p| !keep.contains(&p.point) && !held.contains(&p.point))
            .filter(|p| {
                crate::fleet::point_lock(catalog, p).until_unix_ms + LOCK_MARGIN_MS <= now_ms
            })
            .filter(|p| {
                horizons.as_ref().is_none_or(|h| {
                    h.get(&p.point)
                        .is_none_or(|u| *u + LOCK_MARGIN_MS <= now_ms)
                })
            })
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let mut changed = false;
        for p in candidates.iter().filter(|p| keep.contains(&p.point)) {
            for d in &p.disks {
                match catalog.disk_manifest(p, &d.id) {
                    ManifestState::Sound(m) => {
                        let missing = m
                            .hashes
                            .iter()
                            .find(|h| quarantined.contains(h) && !store.has(h).unwrap_or(false));
                        if let Some(h) = missing {
                            tracing::warn!(
                                server = %server,
                                point = p.point,
                                "retention: point {} names quarantined block {h} (disk {}), not \
                                 resent yet: the points before it stay",
                                p.point,
                                d.id
                            );
                            unhealed.insert(p.point);
                            changed = true;
                        }
                    }
                    ManifestState::Damaged(why) => {
                        damaged(catalog, server, p.point, &d.id, &why, report)?;
                        changed = true;
                    }
                    ManifestState::Unknown(why) => {
                        anyhow::bail!("cannot verify point {}: {why}", p.point)
                    }
                }
            }
        }
        if changed {
            continue; // decide again without the points that cannot be restored now
        }
        for p in doomed {
            if let Some(f) = fleet {
                match f.delete_point(server, p.point) {
                    Ok(()) => {}
                    // Locked longer than this receiver knew: kept, and known from now on.
                    Err(crate::fleet::FleetError::Locked { until_unix_ms, .. }) => {
                        let mut l = crate::fleet::point_lock(catalog, p);
                        if until_unix_ms > l.until_unix_ms {
                            l.until_unix_ms = until_unix_ms;
                            crate::fleet::save_point_lock(catalog, p, &l)?;
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            catalog.delete(server, p.point)?;
            report.points_deleted += 1;
            tracing::info!(server = %server, point = p.point, "retention: point deleted");
        }
        return Ok(());
    }
}

fn damaged(
    catalog: &Catalog,
    server: &str,
    point: u64,
    disk: &str,
    why: &str,
    report: &mut GcReport,
) -> anyhow::Result<()> {
    tracing::error!(
        server = %server,
        point,
        "point {point} of server {server} is damaged (disk {disk}) and cannot be restored: {why}"
    );
    catalog.mark_damaged(server, point, disk, why)?;
    report.points_damaged += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::verify;
    use lifeboat_common::block::hash_block;
    use lifeboat_common::codec::Codec;

    #[test]
    fn sweep_runs_only_after_deletions_or_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::store::DirStore::open(&d.path().join("store")).unwrap();
        let data = b"orphan".to_vec();
        let h = hash_block(&data);
        store
            .insert(&[verify(h, Codec::Raw, data).unwrap()])
            .unwrap();
        let policy = RetentionConfig {
            recent_minutes: 0,
            daily_days: 1,
            gc_grace_minutes: 0,
        };
        std::thread::sleep(std::time::Duration::from_millis(20));

        let r = run_pass(d.path(), &store, &policy, false).unwrap();
        assert!(
            !r.swept && store.has(&h).unwrap(),
            "swept with nothing deleted"
        );
        let r = run_pass(d.path(), &store, &policy, true).unwrap();
        assert!(r.swept && r.blocks_deleted == 1 && !store.has(&h).unwrap());
    }
}
