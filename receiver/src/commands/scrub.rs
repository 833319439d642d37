//! `scrub`: read every block in the staging store and check it against its name.
//!
//! A corrupt block is moved to `store/quarantine/` (kept, never read again). Healing follows
//! from content addressing: at the next connection of each disk that referenced it, the
//! receiver marks the block absent in the live manifest, the agent (whose manifest then
//! differs) takes the receiver's and sends that content again, and every point that named it
//! restores again. Safe to run while `serve` runs. Exit code 65 when anything was corrupt.

use super::{fmt_bytes, parallel};
use crate::commands::restore::{progress, DataError};
use crate::store::StoreError;
use lifeboat_common::BLOCK_SIZE;
use std::path::Path;
use std::sync::Mutex;

/// The last scrub's result, `<state-dir>/scrub.json`, which `serve` exports as metrics.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    pub finished_unix_ms: u64,
    pub blocks_checked: u64,
    pub corrupt: u64,
}

impl ScrubReport {
    const FILE: &'static str = "scrub.json";

    pub fn load(state_dir: &Path) -> Option<ScrubReport> {
        serde_json::from_slice(&std::fs::read(state_dir.join(Self::FILE)).ok()?).ok()
    }

    fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        lifeboat_common::durable::write_atomic(&state_dir.join(Self::FILE), &json)
    }
}

pub fn run(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store = crate::store::open_configured(state_dir)?;
    let blocks = store.list()?;
    let pb = progress(blocks.len() as u64 * BLOCK_SIZE as u64, "scrub");
    let bad: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    parallel(blocks.len(), |i| {
        let hash = blocks[i].0;
        match store.read(&hash) {
            Ok(_) | Err(StoreError::Missing { .. }) => {}
            Err(e @ StoreError::Corrupt { .. }) => {
                let moved = store.quarantine(&hash)?;
                tracing::error!("{e}; moved to {moved}");
                bad.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((hash.to_hex(), e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        pb.inc(BLOCK_SIZE as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    // For `serve`'s metrics (scrub runs as its own process).
    let report = ScrubReport {
        finished_unix_ms: lifeboat_common::now_ms(),
        blocks_checked: blocks.len() as u64,
        corrupt: bad.len() as u64,
    };
    if let Err(e) = report.save(state_dir) {
        tracing::warn!("recording the scrub's result: {e}");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "blocks_checked": blocks.len(),
                "corrupt": bad.iter().map(|(h, why)| serde_json::json!({"hash": h, "why": why})).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "scrubbed {} blocks ({} of content): {} corrupt",
            blocks.len(),
            fmt_bytes(blocks.len() as u64 * BLOCK_SIZE as u64),
            bad.len()
        );
        for (h, why) in &bad {
            println!("  quarantined {h}: {why}");
        }
    }
    if !bad.is_empty() {
        return Err(DataError(format!(
            "{} corrupt block(s) quarantined; each disk that needs one asks its agent to resend it at its next connection",
            bad.len()
        ))
        .into());
    }
    Ok(())
}
