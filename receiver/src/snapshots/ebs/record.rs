//! Where each point stands on EBS, per disk: `ebs.json` in the point's catalog directory,
//! written atomically and durably at every change of state, so a restarted receiver resumes
//! where it was.
//!
//! A disk goes `uploading` (durably, before StartSnapshot) → `on_ebs` (after EC2 says
//! `completed`) or `failed` (with the AWS error); `deleted` once retention removed the
//! snapshot. A point is `on_ebs` only when every one of its disks is; it is `staged` when it
//! has no record (it lives in the staging store only).

use crate::catalog::{Catalog, CatalogError, PointRecord};
use lifeboat_common::durable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;

pub const FILE: &str = "ebs.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    Uploading,
    OnEbs,
    Failed,
    Deleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub point: u64,
    pub snapshot_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUpload {
    pub state: DiskState,
    /// Known once StartSnapshot answered.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub parent: Option<ParentRef>,
    pub volume_size_gib: u64,
    /// Blocks put (those that differ from the parent).
    #[serde(default)]
    pub changed_blocks: u64,
    /// Bumped when a failed upload is tried again, so its ClientToken is new.
    #[serde(default)]
    pub attempt: u32,
    /// Why it failed (the AWS error text), or why it was deleted; for an upload still
    /// `uploading`, the last error that stopped a pass.
    #[serde(default)]
    pub reason: Option<String>,
    pub updated_unix_ms: u64,
    /// Set (durably) just before CompleteSnapshot: a resumed upload then only waits.
    #[serde(default)]
    pub completing: bool,
    /// Passes in a row that ended in an error that may pass; past a limit the disk goes
    /// `failed`.
    #[serde(default)]
    pub failures: u32,
    /// The uploader leaves the disk alone until then (backoff after a failed pass).
    #[serde(default)]
    pub retry_after_unix_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsRecord {
    pub disks: BTreeMap<String, DiskUpload>,
}

/// A point's state on EBS, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointState {
    Staged,
    Uploading,
    OnEbs,
    Failed(String),
    Deleted,
}

impl PointState {
    pub fn label(&self) -> &'static str {
        match self {
            PointState::Staged => "staged",
            PointState::Uploading => "uploading",
            PointState::OnEbs => "on_ebs",
            PointState::Failed(_) => "failed",
            PointState::Deleted => "deleted",
        }
    }
}

impl EbsRecord {
    /// The point's record; an empty one when it has none. An unreadable record is an error
    /// (callers that delete must then keep the point).
    pub fn load(catalog: &Catalog, server: &str, point: u64) -> Result<EbsRecord, CatalogError> {
        let path = catalog.point_dir(server, point).join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CatalogError::BadRecord {
                path,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(EbsRecord::default()),
            Err(source) => Err(CatalogError::Io { path, source }),
        }
    }

    pub fn save(&self, catalog: &Catalog, server: &str, point: u64) -> Result<(), CatalogError> {
        let path = catalog.point_dir(server, point).join(FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| CatalogError::BadRecord {
            path: path.clone(),
            why: e.to_string(),
        })?;
        durable::write_atomic(&path, &json).map_err(|source| CatalogError::Io { path, source })
    }

    /// The point's state over all of its disks.
    pub fn state(&self, rec: &PointRecord) -> PointState {
        let of = |d: &str| self.disks.get(d);
        if let Some(f) = rec
            .disks
            .iter()
            .filter_map(|d| of(&d.id))
            .find(|u| u.state == DiskState::Failed)
        {
            return PointState::Failed(f.reason.clone().unwrap_or_default());
        }
        let states: Vec<Option<DiskState>> = rec
            .disks
            .iter()
            .map(|d| of(&d.id).map(|u| u.state))
            .collect();
        if states.iter().all(|s| *s == Some(DiskState::OnEbs)) && !states.is_empty() {
            PointState::OnEbs
        } else if states.contains(&Some(DiskState::Uploading)) {
            PointState::Uploading
        } else if states.contains(&Some(DiskState::Deleted)) {
            PointState::Deleted
        } else if states.iter().any(Option::is_some) {
            // Some disks on EBS, others not yet started: still on its way.
            PointState::Uploading
        } else {
            PointState::Staged
        }
    }

    /// Whether the staging store must keep the point: an upload is under way, or a snapshot
    /// of it exists (later uploads take their differences from its manifest).
    pub fn holds(&self) -> bool {
        self.disks
            .values()
            .any(|u| matches!(u.state, DiskState::Uploading | DiskState::OnEbs))
    }

    /// The points whose snapshots this point's unfinished uploads are built on.
    pub fn parents_in_use(&self) -> impl Iterator<Item = u64> + '_ {
        self.disks
            .values()
            .filter(|u| u.state == DiskState::Uploading)
            .filter_map(|u| u.parent.as_ref().map(|p| p.point))
    }
}

/// The points of `server` (of `points`) that the staging store must keep for EBS: those
/// that hold (uploading, or on EBS), the parents of unfinished uploads, those a recovery has
/// pinned, and any whose record cannot be read (it cannot be judged).
pub fn held_points(
    catalog: &Catalog,
    server: &str,
    points: &[PointRecord],
) -> std::collections::HashSet<u64> {
    let mut held = std::collections::HashSet::new();
    for p in points {
        match EbsRecord::load(catalog, server, p.point) {
            Ok(r) => {
                if r.holds() {
                    held.insert(p.point);
                }
                held.extend(r.parents_in_use());
            }
            Err(e) => {
                tracing::warn!(server, point = p.point, "kept: {e}");
                held.insert(p.point);
            }
        }
        if crate::recovery::pinned(catalog, server, p.point) {
            held.insert(p.point);
        }
    }
    held
}
