//! `servers`: each server's disks with state, lag, backlog and last point.

use super::{fmt_age, fmt_bytes, print_table};
use crate::catalog::Catalog;
use crate::status::{now_ms, ServerStatus};
use lifeboat_common::protocol::DiskState;
use std::path::Path;

/// A connected agent reports at least every few seconds; past this it is `stalled`.
const STALL_MS: u64 = 60_000;

pub fn run(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let catalog = Catalog::new(state_dir);
    let now = now_ms();
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for server in catalog.servers()? {
        let Some(st) = ServerStatus::load(&catalog.server_dir(&server)) else {
            continue;
        };
        let lag_ms = st.last_point_created_unix_ms.map(|t| now.saturating_sub(t));
        let stale = st.connected && now.saturating_sub(st.last_seen_unix_ms) > STALL_MS;
        for d in &st.disks {
            let state = if !st.connected {
                DiskState::Disconnected
            } else if stale {
                DiskState::Stalled
            } else {
                d.state
            };
            rows.push(vec![
                server.clone(),
                d.id.clone(),
                state.as_str().to_string(),
                lag_ms.map(fmt_age).unwrap_or_else(|| "-".into()),
                format!("{} blocks", d.backlog_blocks),
                fmt_bytes(d.size),
                st.last_point
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]);
            out.push(serde_json::json!({
                "server": server,
                "disk": d.id,
                "state": state,
                "lag_seconds": lag_ms.map(|l| l as f64 / 1000.0),
                "backlog_blocks": d.backlog_blocks,
                "size_bytes": d.size,
                "last_point": st.last_point,
                "connected": st.connected,
                "peer": st.peer,
                "counters": st.counters,
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if rows.is_empty() {
        println!("No server has connected yet.");
    } else {
        print_table(
            &[
                "SERVER",
                "DISK",
                "STATE",
                "LAG",
                "BACKLOG",
                "SIZE",
                "LAST POINT",
            ],
            &rows,
        );
    }
    Ok(())
}
