//! `servers`: each server's disks with state, lag, backlog and last point.

use super::{fmt_age, fmt_bytes, print_table};
use crate::catalog::Catalog;
use crate::snapshots::ebs::record::{EbsRecord, PointState};
use crate::status::{now_ms, RefusedClaim, ServerStatus};
use lifeboat_common::config::ReceiverConfig;
use lifeboat_common::protocol::DiskState;
use std::path::Path;

/// A connected agent reports at least every few seconds; past this it is `stalled`.
const STALL_MS: u64 = 60_000;

pub fn run(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    crate::fleet::sync_catalog(state_dir)?;
    let catalog = Catalog::new(state_dir);
    let now = now_ms();
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let max_skew_ms = ReceiverConfig::load(&state_dir.join("receiver.toml"))
        .map(|c| c.max_clock_skew_secs)
        .unwrap_or(300)
        * 1000;
    for server in catalog.servers()? {
        let Some(st) = ServerStatus::load(&catalog.server_dir(&server)) else {
            continue;
        };
        // The receiver's clock: the agent's may be wrong.
        let lag_ms = st
            .last_point_committed_unix_ms
            .or(st.last_point_created_unix_ms)
            .map(|t| now.saturating_sub(t));
        let skew_over = st
            .clock_skew_ms
            .is_some_and(|s| s.unsigned_abs() > max_skew_ms);
        let refused = RefusedClaim::load(&catalog.server_dir(&server));
        if let Some(r) = &refused {
            notes.push(format!(
                "{server}: refused host {} (instance {}, from {}) {} ago: it claims the \
                 server id held by host {} (instance {})",
                r.hostname,
                r.instance,
                r.peer,
                fmt_age(now.saturating_sub(r.at_unix_ms)),
                st.hostname,
                st.instance
            ));
        }
        // Where the server stands on EBS: its newest point there, and every failure.
        let mut newest_on_ebs: Option<u64> = None;
        let mut ebs_failed = Vec::new();
        for p in catalog.points(&server)? {
            if let Some(why) = &p.damaged {
                notes.push(format!(
                    "{server}: point {} is damaged and cannot be restored: {}",
                    p.point,
                    why.trim().replace('\n', "; ")
                ));
            }
            match EbsRecord::load(&catalog, &server, p.point).map(|r| r.state(&p)) {
                Ok(PointState::OnEbs) => newest_on_ebs = Some(p.point),
                Ok(PointState::Failed(why)) => {
                    notes.push(format!("{server}: point {} failed on EBS: {why}", p.point));
                    ebs_failed.push(serde_json::json!({ "point": p.point, "error": why }));
                }
                _ => {}
            }
        }
        if skew_over {
            notes.push(format!(
                "{server}: the agent's clock is {} off the receiver's (max_clock_skew_secs = {})",
                fmt_skew(st.clock_skew_ms.unwrap_or(0)),
                max_skew_ms / 1000
            ));
        }
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
                st.hostname.clone(),
                d.id.clone(),
                state.as_str().to_string(),
                lag_ms.map(fmt_age).unwrap_or_else(|| "-".into()),
                format!("{} blocks", d.backlog_blocks),
                fmt_bytes(d.size),
                st.last_point
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                match st.clock_skew_ms {
                    Some(s) if skew_over => format!("{}!", fmt_skew(s)),
                    Some(s) => fmt_skew(s),
                    None => "-".into(),
                },
                newest_on_ebs
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
                "hostname": st.hostname,
                "instance": st.instance,
                "clock_skew_seconds": st.clock_skew_ms.map(|s| s as f64 / 1000.0),
                "clock_skew_exceeded": skew_over,
                "refused_claim": refused,
                "newest_point_on_ebs": newest_on_ebs,
                "ebs_failed": ebs_failed.clone(),
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
                "HOST",
                "DISK",
                "STATE",
                "LAG",
                "BACKLOG",
                "SIZE",
                "LAST POINT",
                "CLOCK SKEW",
                "ON EBS",
            ],
            &rows,
        );
        for n in &notes {
            println!("warning: {n}");
        }
    }
    Ok(())
}

/// "+3s", "-2d 4h": the agent's clock relative to ours.
fn fmt_skew(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "+" };
    format!("{sign}{}", fmt_age(ms.unsigned_abs()))
}
