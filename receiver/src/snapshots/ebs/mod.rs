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

/// This receiver's own random id (`<state-dir>/install-id`, made once): part of every
/// ClientToken, so two receivers (or one rebuilt with a new state directory) in one account
/// never get each other's snapshots back for the same server, disk and point.
pub fn install_id(state_dir: &std::path::Path) -> std::io::Result<String> {
    let p = state_dir.join("install-id");
    match std::fs::read_to_string(&p) {
        Ok(s) if s.trim().len() == 32 && s.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(s.trim().to_string())
        }
        Ok(s) => Err(std::io::Error::other(format!(
            "{} holds {s:?}, not a 32-digit install id",
            p.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
            let id = hex::encode(raw);
            lifeboat_common::durable::write_atomic(&p, id.as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// The point of `points` (oldest first) that should go to EBS now, if any: a point left
/// `uploading` (a restart resumes it) that is not backing off, else the newest committed
/// point once the newest point on EBS (or on its way, or failed) is at least
/// `every_minutes` older than it: a stuck upload does not stop later points for long.
pub fn due(points: &[(PointRecord, EbsRecord)], every_minutes: u64, now: u64) -> Option<u64> {
    // An unfinished upload first, unless it is backing off after a failed pass.
    let waiting = |r: &EbsRecord| r.disks.values().any(|u| u.retry_after_unix_ms > now);
    if let Some((p, _)) = points
        .iter()
        .find(|(p, r)| r.state(p) == PointState::Uploading && !waiting(r))
    {
        return Some(p.point);
    }
    let (newest, newest_rec) = points.iter().rev().find(|(p, _)| p.damaged.is_none())?;
    if newest_rec.state(newest) != PointState::Staged {
        return None;
    }
    let last_on_ebs = points
        .iter()
        .filter(|(p, r)| {
            matches!(
                r.state(p),
                PointState::OnEbs | PointState::Failed(_) | PointState::Uploading
            )
        })
        .map(|(p, _)| p.committed_unix_ms)
        .max();
    match last_on_ebs {
        Some(t) if newest.committed_unix_ms < t + every_minutes * 60_000 => None,
        _ => Some(newest.point),
    }
}
