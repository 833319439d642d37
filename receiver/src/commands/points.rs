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
    // Under Object Lock: each point's lock as this receiver knows it (the holder's keeper
    // extends the locks of the points retention keeps; another receiver may know less).
    let lock_of = |p: &crate::catalog::PointRecord| {
        p.locked_until_unix_ms
            .map(|_| crate::fleet::point_lock(&catalog, p))
    };
    let now = crate::status::now_ms();
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
            if let Some(l) = lock_of(p) {
                v["lock"] = serde_json::json!({
                    "until_unix_ms": l.until_unix_ms,
                    "ended": l.until_unix_ms <= now,
                    "blocks_locked": l.blocks_locked(),
                });
            }
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
    let any_lock = points.iter().any(|p| p.locked_until_unix_ms.is_some());
    let rows: Vec<Vec<String>> = points
        .iter()
        .zip(&ebs)
        .map(|(p, r)| {
            let data: u64 = p.disks.iter().map(|d| d.data_blocks).sum();
            let changed: u64 = p.disks.iter().map(|d| d.changed_blocks).sum();
            let mut row = vec![
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
            ];
            if any_lock {
                row.push(match lock_of(p) {
                    None => "-".into(),
                    Some(l) if l.until_unix_ms <= now => "ended".into(),
                    Some(l) if l.blocks_locked() => fmt_utc(l.until_unix_ms),
                    Some(l) => format!("{} (blocks unchecked)", fmt_utc(l.until_unix_ms)),
                });
            }
            row
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
    let mut header = vec![
        "POINT",
        "COMMITTED (UTC)",
        "CONSISTENCY",
        "DISKS",
        "DATA",
        "CHANGED",
        "EBS",
    ];
    if any_lock {
        header.push("LOCKED UNTIL (UTC)");
    }
    print_table(&header, &rows);
    if points
        .iter()
        .any(|p| lock_of(p).is_some_and(|l| l.until_unix_ms > now && !l.blocks_locked()))
    {
        println!(
            "blocks unchecked: the point and its manifests are locked, but the lock keeper (each \
             GC pass of the receiver holding the server) has not yet seen every block it names \
             locked as long"
        );
    }
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
