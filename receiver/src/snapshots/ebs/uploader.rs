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
}

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
            let mut ebs = EbsRecord::load(&self.catalog, server, point)
                .map_err(|e| EbsError::Local(e.to_string()))?;
            let prior = ebs.disks.get(&d.id).cloned();
            let attempt = match &prior {
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
            // A resumed upload keeps the parent it started with (its ClientToken names the
            // same snapshot, which was started on that parent).
            let parent = match prior.as_ref().filter(|u| u.state == DiskState::Uploading) {
                Some(u) => u.parent.clone(),
                None => self.parent_for(&all, point, &d.id, size_gib),
            };
            let parent = match parent {
                Some(p) => {
                    let prec = all.iter().find(|(r, _)| r.point == p.point).map(|(r, _)| r);
                    match prec.map(|r| self.catalog.manifest(r, &d.id)) {
                        Some(Ok(m)) => Some((p, m)),
                        _ => None,
                    }
                }
                None => None,
            };
            let mut entry = DiskUpload {
                state: DiskState::Uploading,
                snapshot_id: prior
                    .as_ref()
                    .filter(|u| u.state == DiskState::Uploading)
                    .and_then(|u| u.snapshot_id.clone()),
                parent: parent.as_ref().map(|(p, _)| p.clone()),
                volume_size_gib: size_gib,
                changed_blocks: 0,
                attempt,
                reason: None,
                updated_unix_ms: now_ms(),
            };
            ebs.disks.insert(d.id.clone(), entry.clone());
            self.save(server, point, &ebs)?;
            tracing::info!(
                server, point, disk = %d.id,
                parent = ?entry.parent.as_ref().map(|p| &p.snapshot_id),
                "EBS: uploading"
            );
            let job = upload::DiskJob {
                server,
                point,
                disk: &d.id,
                manifest: &manifest,
                parent,
                attempt,
            };
            let started = |id: &str| {
                let mut e = entry.clone();
                e.snapshot_id = Some(id.to_string());
                e.updated_unix_ms = now_ms();
                ebs.disks.insert(d.id.clone(), e);
                self.save(server, point, &ebs)
            };
            let result = upload::upload_disk(&self.aws, self.store.clone(), job, started).await;
            let mut ebs = EbsRecord::load(&self.catalog, server, point)
                .map_err(|e| EbsError::Local(e.to_string()))?;
            if let Some(cur) = ebs.disks.get(&d.id) {
                entry.snapshot_id = cur.snapshot_id.clone();
            }
            entry.updated_unix_ms = now_ms();
            match result {
                Ok(done) => {
                    entry.state = DiskState::OnEbs;
                    entry.snapshot_id = Some(done.snapshot_id.clone());
                    entry.changed_blocks = done.changed_blocks;
                    ebs.disks.insert(d.id.clone(), entry);
                    self.save(server, point, &ebs)?;
                    tracing::info!(
                        server, point, disk = %d.id, snapshot = %done.snapshot_id,
                        changed_blocks = done.changed_blocks,
                        "EBS: snapshot completed"
                    );
                }
                Err(e) => {
                    if e.is_permanent() {
                        entry.state = DiskState::Failed;
                    }
                    entry.reason = Some(e.to_string());
                    ebs.disks.insert(d.id.clone(), entry);
                    self.save(server, point, &ebs)?;
                    return Err(e);
                }
            }
        }
        Ok(())
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
        let mut deleted = 0;
        for (p, mut r) in all {
            if !on_ebs.iter().any(|(n, _)| *n == p.point) || keep.contains(&p.point) {
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
            let mut in_use = false;
            for (disk, u) in r.disks.iter_mut() {
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
                        in_use = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                u.state = DiskState::Deleted;
                u.reason = Some("expired by the EBS retention policy".into());
                u.updated_unix_ms = now_ms();
                deleted += 1;
                tracing::info!(server, point = p.point, disk = %disk, snapshot = %id, "EBS: snapshot deleted (retention)");
            }
            self.save(server, p.point, &r)?;
            if in_use {
                continue;
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
            if let Some(point) = due(&all, self.aws.config.every_minutes) {
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
