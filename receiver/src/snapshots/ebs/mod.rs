//! The EBS target: points materialized as incremental EBS snapshots through the EBS direct
//! APIs, in the background, never on the agent's commit path.
//!
//! - [`record`]: where each point stands (`staged` → `uploading` → `on_ebs` | `failed`),
//!   durable in the catalog.
//! - [`client`]: the AWS clients, their timeouts and the retry policy.
//! - [`upload`]: one disk of one point to one snapshot.
//! - This file: which points go ([`due`]), a whole point ([`Materializer::materialize`]),
//!   retention of snapshots ([`Materializer::expire`]), and the loop `serve` runs.
//!
//! A point's parent for disk `d` is the newest earlier point whose `d` is `on_ebs`; its
//! manifest gives the difference. The staging store keeps every point that is uploading or
//! has a snapshot (`EbsRecord::holds`), so that manifest is there. One upload per server at a
//! time, across processes: `servers/<s>/ebs-upload.lock`.

#[cfg(feature = "aws")]
pub mod client;
#[cfg(feature = "aws")]
pub mod read;
pub mod record;
#[cfg(feature = "aws")]
pub mod upload;
#[cfg(feature = "aws")]
mod uploader;
#[cfg(feature = "aws")]
pub use uploader::{run, Materializer, PassReport};

use crate::catalog::PointRecord;
use record::{EbsRecord, PointState};

/// The point of `points` (oldest first) that should go to EBS now, if any: a point left
/// `uploading` (a restart resumes it), else the newest committed point once the newest
/// point on EBS (or on its way) is at least `every_minutes` older than it.
pub fn due(points: &[(PointRecord, EbsRecord)], every_minutes: u64) -> Option<u64> {
    if let Some((p, _)) = points
        .iter()
        .find(|(p, r)| r.state(p) == PointState::Uploading)
    {
        return Some(p.point);
    }
    let (newest, newest_rec) = points.iter().rev().find(|(p, _)| p.damaged.is_none())?;
    if newest_rec.state(newest) != PointState::Staged {
        return None;
    }
    let last_on_ebs = points
        .iter()
        .filter(|(p, r)| matches!(r.state(p), PointState::OnEbs | PointState::Failed(_)))
        .map(|(p, _)| p.committed_unix_ms)
        .max();
    match last_on_ebs {
        Some(t) if newest.committed_unix_ms < t + every_minutes * 60_000 => None,
        _ => Some(newest.point),
    }
}
