//! `points`: a server's points in time.

use super::{fmt_bytes, fmt_utc, print_table};
use crate::catalog::Catalog;
use lifeboat_common::protocol::Consistency;
use lifeboat_common::BLOCK_SIZE;
use std::path::Path;

pub fn run(state_dir: &Path, server: &str, json: bool) -> anyhow::Result<()> {
    let catalog = Catalog::new(state_dir);
    let points = catalog.points(server)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&points)?);
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
        .map(|p| {
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
                p.target.clone(),
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
            "TARGET",
        ],
        &rows,
    );
    for d in &damaged {
        println!("{d}");
    }
    if let Some(p) = points.iter().max_by_key(|p| p.point) {
        if p.consistency == Consistency::BestEffort && !p.consistency_why.is_empty() {
            println!("point {} is best-effort: {}", p.point, p.consistency_why);
        }
    }
    Ok(())
}
