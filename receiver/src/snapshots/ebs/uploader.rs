//! The uploader: a whole point to EBS, retention of snapshots, and the loop `serve` runs (see
//! the parent module for the rules).

use super::client::{Aws, EbsError};
use super::due;
use super::record::{DiskState, DiskUpload, EbsRecord, ParentRef};
use super::upload;
use crate::catalog::{Catalog, PointRecord};
use crate::status::now_ms;
use crate::store::BlockStore;
use std::sync::Arc;
use std::time::Duration;

pub struct Materializer {
    pub aws: Aws,
    pub catalog: Catalog,
    pub store: Arc<dyn BlockStore>,
    /// This receiver's install id (see [`super::install_id`]), in every ClientToken.
    pub install: String,
    /// Where upload times and failures are counted (inside `serve`).
    pub metrics: Option<Arc<crate::metrics::ReceiverMetrics>>,
}

/// Passes in a row that may end in an error that may pass before a disk goes `failed`.
const MAX_PASS_FAILURES: u32 = 6;

/// What a pass of the uploader did, for logs and tests.
#[derive(Debug, Default)]
pub struct PassReport {
    pub uploaded: Vec<(String, u64)>,
    pub failed: Vec<(String, u64, String)>,
    pub deleted_snapshots: usize,
}

impl Materializer {
    fn load_all(&self, server: &str) -> Result<Vec<(PointRecord, EbsRecord)>, EbsError> {
        let points = self
            .catalog
            .points(server)
            .map_err(|e| EbsError::Local(e.to_string()))?;
        points
            .into_iter()
            .map(|p| {
                let r = EbsRecord::load(&self.catalog, server, p.point)
                    .map_err(|e| EbsError::Local(e.to_string()))?;
                Ok((p, r))
            })
            .collect()
    }

    fn save(&self, server: &str, point: u64, rec: &EbsRecord) -> Result<(), EbsError> {
        rec.save(&self.catalog, server, point)
            .map_err(|e| EbsError::Local(format!("recording the EBS state of point {point}: {e}")))
    }

    /// Changes one disk's entry of a point's record, durably.
    fn update(
        &self,
        server: &str,
        point: u64,
        disk: &str,
        f: impl FnOnce(&mut DiskUpload),
    ) -> Result<DiskUpload, EbsError> {
        let mut rec = EbsRecord::load(&self.catalog, server, point)
            .map_err(|e| EbsError::Local(e.to_string()))?;
        let u = rec.disks.get_mut(disk).ok_or_else(|| {
            EbsError::Local(format!("point {point} has no EBS entry for disk {disk}"))
        })?;
        f(u);
        u.updated_unix_ms = now_ms();
        let out = u.clone();
        self.save(server, point, &rec)?;
        Ok(out)
    }

    /// Puts every disk of a point on EBS (those not there yet). `again`: a `failed` disk is
    /// tried again, with a new ClientToken (on demand only; the loop leaves failures for an
    /// operator to see).
    pub async fn materialize(&self, server: &str, point: u64, again: bool) -> Result<(), EbsError> {
        let server_dir = self.catalog.server_dir(server);
        let _lock = lifeboat_common::lock::lock_dir(&server_dir, "ebs-upload").map_err(|e| {
            EbsError::Local(format!("an upload for server {server} is under way: {e}"))
        })?;
        let all = self.load_all(server)?;
        let Some((rec, _)) = all.iter().find(|(p, _)| p.point == point) else {
            return Err(EbsError::Local(format!(
                "server {server} has no point {point}; `lifeboat-receiver points --server {server}` lists them"
            )));
        };
        if let Some(why) = &rec.damaged {
            return Err(EbsError::Local(format!(
                "point {point} of server {server} is damaged and cannot go to EBS: {why}"
            )));
        }
        let rec = rec.clone();
        for d in &rec.disks {
            let what = format!("server {server} point {point} disk {}", d.id);
            let prior = EbsRecord::load(&self.catalog, server, point)
                .map_err(|e| EbsError::Local(e.to_string()))?
                .disks
                .get(&d.id)
                .cloned();
            let mut attempt = match &prior {
                Some(u) if u.state == DiskState::OnEbs => continue,
                Some(u) if u.state == DiskState::Failed && !again => {
                    return Err(EbsError::Local(format!(
                        "point {point} disk {} failed on EBS before ({}); `lifeboat-receiver \
                         snapshot --server {server} --point {point}` tries again",
                        d.id,
                        u.reason.as_deref().unwrap_or("no reason recorded")
                    )))
                }
                Some(u) if u.state == DiskState::Failed || u.state == DiskState::Deleted => {
                    u.attempt + 1
                }
                Some(u) => u.attempt,
                None => 0,
            };
            let manifest = self
                .catalog
                .manifest(&rec, &d.id)
                .map_err(|e| EbsError::Local(e.to_string()))?;
            let size_gib = upload::volume_size_gib(manifest.disk_size);
            // A resumed upload: where does its snapshot stand?
            let mut resume_parent = None;
            if let Some(u) = prior.as_ref().filter(|u| u.state == DiskState::Uploading) {
                let mut fresh = false;
                if let Some(id) = &u.snapshot_id {
                    match upload::snapshot_state(&self.aws, id, &what)
                        .await?
                        .as_deref()
                    {
                        Some("completed") => {
                            self.update(server, point, &d.id, |e| {
                                e.state = DiskState::OnEbs;
                                e.reason = None;
                                e.failures = 0;
                            })?;
                            tracing::info!(server, point, disk = %d.id, snapshot = %id, "EBS: found completed on resume");
                            continue;
                        }
                        Some("pending") if u.completing => {
                            // CompleteSnapshot was sent: only the wait remains.
                            let r = upload::wait_completed(&self.aws, id, &what).await;
                            self.finish(server, point, &d.id, r.map(|()| None))?;
                            continue;
                        }
                        Some("pending") => {}
                        // In error, expired or gone: start a new snapshot.
                        _ => fresh = true,
                    }
                }
                // Resumed with the parent it started on, if that parent's manifest is still
                // here; else a new attempt on a new parent.
                if let Some(p) = &u.parent {
                    let m = all
                        .iter()
                        .find(|(r, _)| r.point == p.point)
                        .map(|(r, _)| self.catalog.manifest(r, &d.id));
                    match m {
                        Some(Ok(m)) => resume_parent = Some(Some((p.clone(), m))),
                        _ => fresh = true,
                    }
                } else {
                    resume_parent = Some(None);
                }
                if fresh {
                    attempt = u.attempt + 1;
                    resume_parent = None;
                    if let Some(old) = &u.snapshot_id {
                        self.delete_quietly(old, &what).await;
                    }
                }
            }
            let parent = match resume_parent {
                Some(p) => p,
                None => self.parent_for(&all, point, &d.id, size_gib).and_then(|p| {
                    let prec = all.iter().find(|(r, _)| r.point == p.point)?;
                    let m = self.catalog.manifest(&prec.0, &d.id).ok()?;
                    Some((p, m))
                }),
            };
            let resumed_id = prior
                .as_ref()
                .filter(|u| u.state == DiskState::Uploading && u.attempt == attempt)
                .and_then(|u| u.snapshot_id.clone());
            let entry = DiskUpload {
                state: DiskState::Uploading,
                snapshot_id: resumed_id,
                parent: parent.as_ref().map(|(p, _)| p.clone()),
                volume_size_gib: size_gib,
                changed_blocks: 0,
                attempt,
                reason: prior.as_ref().and_then(|u| u.reason.clone()),
                updated_unix_ms: now_ms(),
                completing: false,
                failures: prior.as_ref().map_or(0, |u| u.failures),
                retry_after_unix_ms: 0,
            };
            let mut ebs = EbsRecord::load(&self.catalog, server, point)
                .map_err(|e| EbsError::Local(e.to_string()))?;
            ebs.disks.insert(d.id.clone(), entry.clone());
            self.save(server, point, &ebs)?;
            tracing::info!(
                server, point, disk = %d.id, attempt,
                parent = ?entry.parent.as_ref().map(|p| &p.snapshot_id),
                "EBS: uploading"
            );
            let job = upload::DiskJob {
                install: &self.install,
                server,
                point,
                disk: &d.id,
                manifest: &manifest,
                parent,
                attempt,
            };
            let started = |id: &str| {
                self.update(server, point, &d.id, |e| {
                    e.snapshot_id = Some(id.to_string())
                })
                .map(|_| ())
            };
            let completing = |changed: u64| {
                self.update(server, point, &d.id, |e| {
                    e.completing = true;
                    e.changed_blocks = changed;
                })
                .map(|_| ())
            };
            let began = std::time::Instant::now();
            let result =
                upload::upload_disk(&self.aws, self.store.clone(), job, started, completing).await;
            if let (Some(m), Ok(_)) = (&self.metrics, &result) {
                m.ebs_upload_seconds.observe(began.elapsed().as_secs_f64());
            }
            self.finish(server, point, &d.id, result.map(Some))?;
        }
        Ok(())
    }

    /// Records how an upload of one disk ended: `on_ebs`, `failed` for a permanent error,
    /// or still `uploading` with a backoff (and `failed` after too many passes in a row).
    fn finish(
        &self,
        server: &str,
        point: u64,
        disk: &str,
        result: Result<Option<upload::Uploaded>, EbsError>,
    ) -> Result<(), EbsError> {
        match result {
            Ok(done) => {
                let u = self.update(server, point, disk, |e| {
                    e.state = DiskState::OnEbs;
                    if let Some(done) = &done {
                        e.snapshot_id = Some(done.snapshot_id.clone());
                        e.changed_blocks = done.changed_blocks;
                    }
                    e.reason = None;
                    e.failures = 0;
                    e.retry_after_unix_ms = 0;
                })?;
                tracing::info!(
                    server, point, disk, snapshot = ?u.snapshot_id,
                    changed_blocks = u.changed_blocks,
                    "EBS: snapshot completed"
                );
                Ok(())
            }
            Err(e) => {
                let permanent = e.is_permanent();
                let u = self.update(server, point, disk, |u| {
                    u.failures += 1;
                    u.reason = Some(e.to_string());
                    if permanent {
                        u.state = DiskState::Failed;
                    } else if u.failures >= MAX_PASS_FAILURES {
                        u.state = DiskState::Failed;
                        u.reason = Some(format!(
                            "gave up after {} passes in a row failed; the last: {e}",
                            u.failures
                        ));
                    } else {
                        let backoff = (10_000u64 << u.failures.min(8)).min(30 * 60_000);
                        u.retry_after_unix_ms = now_ms() + backoff;
                    }
                })?;
                if u.state == DiskState::Failed {
                    if let Some(m) = &self.metrics {
                        m.ebs_uploads_failed.inc();
                    }
                }
                if u.state == DiskState::Failed && !permanent {
                    return Err(EbsError::Local(u.reason.unwrap_or_default()));
                }
                Err(e)
            }
        }
    }

    /// Deletes a snapshot an abandoned attempt left, if it can; logs what it could not.
    async fn delete_quietly(&self, id: &str, what: &str) {
        let r = self
            .aws
            .retry("DeleteSnapshot", what, None, || {
                self.aws.ec2.delete_snapshot().snapshot_id(id).send()
            })
            .await;
        match r {
            Ok(_) => tracing::info!("EBS: deleted snapshot {id} of an abandoned attempt ({what})"),
            Err(e) => {
                tracing::warn!("EBS: snapshot {id} of an abandoned attempt ({what}) stays: {e}")
            }
        }
    }

    /// The newest earlier point whose disk `disk` is on EBS, if its volume fits in `size_gib`.
    fn parent_for(
        &self,
        all: &[(PointRecord, EbsRecord)],
        point: u64,
        disk: &str,
        size_gib: u64,
    ) -> Option<ParentRef> {
        all.iter()
            .rev()
            .filter(|(p, _)| p.point < point)
            .find_map(|(p, r)| {
                let u = r.disks.get(disk)?;
                if u.state != DiskState::OnEbs || u.volume_size_gib > size_gib {
                    return None;
                }
                Some(ParentRef {
                    point: p.point,
                    snapshot_id: u.snapshot_id.clone()?,
                })
            })
    }

    /// Deletes the snapshots of points the EBS policy no longer keeps (never the newest on
    /// EBS); their points go back to `staged` for the staging store's own retention.
    pub async fn expire(&self, server: &str, now: u64) -> Result<usize, EbsError> {
        // Not while an upload of this server (here or in a `snapshot` or `recover` command)
        // may be building on one of these snapshots: the next pass will do.
        let server_dir = self.catalog.server_dir(server);
        let Ok(_lock) = lifeboat_common::lock::lock_dir(&server_dir, "ebs-upload") else {
            return Ok(0);
        };
        let all = self.load_all(server)?;
        // Points with any snapshot left (one kept back by an image counts too).
        let on_ebs: Vec<(u64, u64)> = all
            .iter()
            .filter(|(_, r)| r.disks.values().any(|u| u.state == DiskState::OnEbs))
            .map(|(p, _)| (p.point, p.committed_unix_ms))
            .collect();
        let policy = lifeboat_common::config::RetentionConfig {
            recent_minutes: 0,
            daily_days: self.aws.config.daily_days,
            gc_grace_minutes: 0,
        };
        let keep = crate::retention::keep(&on_ebs, now, &policy);
        // Parents of unfinished uploads stay: a resumed upload builds on them.
        let parents: std::collections::HashSet<u64> =
            all.iter().flat_map(|(_, r)| r.parents_in_use()).collect();
        let mut deleted = 0;
        for (p, r) in &all {
            if !on_ebs.iter().any(|(n, _)| *n == p.point)
                || keep.contains(&p.point)
                || parents.contains(&p.point)
            {
                continue;
            }
            if crate::recovery::pinned(&self.catalog, server, p.point) {
                tracing::info!(
                    server,
                    point = p.point,
                    "EBS retention: kept, a recovery is using it"
                );
                continue;
            }
            for (disk, u) in &r.disks {
                if u.state != DiskState::OnEbs {
                    continue;
                }
                let Some(id) = u.snapshot_id.clone() else {
                    continue;
                };
                let what = format!("server {server} point {} disk {disk}", p.point);
                let r = self
                    .aws
                    .retry("DeleteSnapshot", &what, None, || {
                        self.aws.ec2.delete_snapshot().snapshot_id(&id).send()
                    })
                    .await;
                match r {
                    Ok(_) => {}
                    // Already gone: what we wanted.
                    Err(EbsError::Permanent { message, .. })
                        if message.contains("InvalidSnapshot.NotFound") => {}
                    // An image (a recovery or a drill) uses it: kept until that image goes.
                    Err(EbsError::Permanent { message, .. })
                        if message.contains("InvalidSnapshot.InUse") =>
                    {
                        tracing::info!(
                            server, point = p.point, disk = %disk, snapshot = %id,
                            "EBS retention: kept, an image uses it ({message})"
                        );
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                // Recorded at once, disk by disk: a later error must not leave a deleted
                // snapshot listed as a parent candidate.
                self.update(server, p.point, disk, |u| {
                    u.state = DiskState::Deleted;
                    u.reason = Some("expired by the EBS retention policy".into());
                })?;
                deleted += 1;
                tracing::info!(server, point = p.point, disk = %disk, snapshot = %id, "EBS: snapshot deleted (retention)");
            }
        }
        Ok(deleted)
    }

    /// One pass over every server: resume or start what is due, then expire.
    pub async fn pass(&self) -> PassReport {
        let mut report = PassReport::default();
        let servers = match self.catalog.servers() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("EBS: listing servers: {e}");
                return report;
            }
        };
        for server in servers {
            let all = match self.load_all(&server) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("EBS: server {server}: {e}");
                    continue;
                }
            };
            if let Some(point) = due(&all, self.aws.config.every_minutes, now_ms()) {
                match self.materialize(&server, point, false).await {
                    Ok(()) => report.uploaded.push((server.clone(), point)),
                    Err(e) => {
                        tracing::error!(server = %server, point, "EBS: {e}");
                        report.failed.push((server.clone(), point, e.to_string()));
                    }
                }
            }
            match self.expire(&server, now_ms()).await {
                Ok(n) => report.deleted_snapshots += n,
                Err(e) => tracing::error!(server = %server, "EBS retention: {e}"),
            }
        }
        report
    }
}

/// `serve`'s uploader: a pass every `interval` until `stop`.
pub async fn run(
    m: Arc<Materializer>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let pass = m.pass();
        tokio::select! {
            _ = pass => {}
            // Stopping mid-upload is safe: the disk stays `uploading` and the next start
            // resumes it with the same ClientToken.
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}
