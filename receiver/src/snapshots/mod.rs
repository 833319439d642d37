//! Snapshot targets: where a committed point is written.
//!
//! Every point commits first to the local target (a directory: the catalog itself, with
//! blocks in the staging store), synchronously, before the agent hears `Committed`: the
//! embedded default, so a receiver runs with no AWS account. With `[ebs]` in receiver.toml,
//! [`ebs`] then materializes selected points as EBS snapshots in the background; that never
//! holds a commit.

pub mod ebs;
pub mod local;

use crate::catalog::{CatalogError, PointRecord};
use lifeboat_common::manifest::Manifest;

/// Writes points. `write_point` returns only after the target has confirmed every block and
/// the point is listed; a point that fails is not listed.
pub trait SnapshotTarget: Send + Sync {
    fn name(&self) -> &'static str;
    fn write_point(
        &self,
        rec: &PointRecord,
        manifests: &[(String, Manifest)],
    ) -> Result<(), CatalogError>;
}
