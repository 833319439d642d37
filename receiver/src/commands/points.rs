//! `points`: a server's points in time.

use super::{fmt_bytes, fmt_utc, print_table};
use crate::catalog::Catalog;
use crate::snapshots::ebs::record::{DiskState, EbsRecord, PointState};
use lifeboat_common::protocol::Consistency;
use lifeboat_common::BLOCK_SIZE;
use std::path::Path;

pub fn run(state_dir: &Path, server: &str, json: bool) -> anyhow::Result<()> {
    crate::fleet::sync_catalog(state_dir)?;
    let catalog = Catalog::new(state_dir);
    let points = catalog.points(server)?;
    // Where each point stands on EBS (an unreadable record is shown as such, never fatal).
    let ebs: Vec<Result<EbsRecord, String>> = points
        .iter()
        .map(|p| EbsRecord::load(&catalog, server, p.point).map_err(|e| e.to_string()))
        .collect();
    if json {
        let mut out = Vec::new();
        for (p, r) in points.iter().zip(&ebs) {
            let mut v = serde_json::to_value(p)?;
            v["ebs"] = match r {
                Ok(r) => serde_json::json!({
                    "state": r.state(p).label(),
                    "disks": r.disks,
                }),
                Err(e) => serde_json::json!({ "state": "unknown", "error": e }),
            };
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if points.is_empty() {
        let known = catalog.servers()?;
        anyhow::bail!(
            "server {server:?} has no points (servers with state here: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let rows: Vec<Vec<String>> = points
        .iter()
        .zip(&ebs)
        .map(|(p, r)| {
            let data: u64 = p.disks.iter().map(|d| d.data_blocks).sum();
            let changed: u64 = p.disks.iter().map(|d| d.changed_blocks).sum();
            vec![
                p.point.to_string(),
                fmt_utc(p.committed_unix_ms),
                match (&p.damaged, p.consistency) {
                    (Some(_), _) => "DAMAGED".into(),
                    (None, Consistency::CrashConsistent) => "crash-consistent".into(),
                    (None, Consistency::BestEffort) => "best-effort".into(),
                },
                p.disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                fmt_bytes(data * BLOCK_SIZE as u64),
                fmt_bytes(changed * BLOCK_SIZE as u64),
                match r {
                    Ok(r) => {
                        let snaps: Vec<&str> = r
                            .disks
                            .values()
                            .filter(|u| u.state == DiskState::OnEbs)
                            .filter_map(|u| u.snapshot_id.as_deref())
                            .collect();
                        match r.state(p) {
                            PointState::OnEbs => format!("on_ebs {}", snaps.join(",")),
                            s => s.label().to_string(),
                        }
                    }
                    Err(_) => "unknown".into(),
                },
            ]
        })
        .collect();
    let damaged: Vec<String> = points
        .iter()
        .filter_map(|p| {
            p.damaged.as_ref().map(|why| {
                format!(
                    "warning: point {} is damaged and cannot be restored: {}",
                    p.point,
                    why.trim().replace('\n', "; ")
                )
            })
        })
        .collect();
    print_table(
        &[
            "POINT",
            "COMMITTED (UTC)",
            "CONSISTENCY",
            "DISKS",
            "DATA",
            "CHANGED",
            "EBS",
        ],
        &rows,
    );
    for d in &damaged {
        println!("{d}");
    }
    for (p, r) in points.iter().zip(&ebs) {
        match r {
            Ok(r) => {
                if let PointState::Failed(why) = r.state(p) {
                    println!("point {} failed on EBS: {why}", p.point);
                }
            }
            Err(e) => println!("warning: point {}: {e}", p.point),
        }
    }
    if let Some(p) = points.iter().max_by_key(|p| p.point) {
        if p.consistency == Consistency::BestEffort && !p.consistency_why.is_empty() {
            println!("point {} is best-effort: {}", p.point, p.consistency_why);
        }
    }
    Ok(())
}
