//! `snapshot`: put one point on EBS now, whatever the policy (and try a failed one again).

use std::path::Path;

#[cfg(not(feature = "aws"))]
pub fn run(_: &Path, _: &str, _: &str, _: bool) -> anyhow::Result<()> {
    anyhow::bail!("this lifeboat-receiver was built without AWS support (the `aws` feature)")
}

#[cfg(feature = "aws")]
pub fn run(state_dir: &Path, server: &str, point: &str, json: bool) -> anyhow::Result<()> {
    use crate::catalog::Catalog;
    use crate::snapshots::ebs::record::EbsRecord;
    use crate::snapshots::ebs::{client::Aws, Materializer};
    use anyhow::{bail, Context};
    let cfg_path = state_dir.join("receiver.toml");
    let config = lifeboat_common::config::ReceiverConfig::load(&cfg_path)?;
    let Some(ebs) = config.ebs.clone() else {
        bail!(
            "{} has no [ebs] section: add one (region, and endpoint_url for a test server) to \
             put points on EBS",
            cfg_path.display()
        );
    };
    let catalog = Catalog::new(state_dir);
    // Shared lock: retention and GC wait while the blocks are read.
    let lock = crate::gc::lock_file(state_dir)
        .with_context(|| format!("opening the lock in {}", state_dir.display()))?;
    crate::sys::flock(&lock, false, false)?;
    let rec = catalog.find(server, point)?;
    let store = crate::store::open(state_dir, &config)?;
    let started = std::time::Instant::now();
    let install = crate::snapshots::ebs::install_id(state_dir)
        .with_context(|| format!("reading the install id in {}", state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let m = Materializer {
            aws: Aws::connect(&ebs).await,
            catalog: Catalog::new(state_dir),
            store,
            install,
            metrics: None,
        };
        m.materialize(server, rec.point, true).await
    });
    let record = EbsRecord::load(&catalog, server, rec.point)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "server": server, "point": rec.point,
                "state": record.state(&rec).label(),
                "error": result.as_ref().err().map(|e| e.to_string()),
                "seconds": started.elapsed().as_secs_f64(),
                "disks": record.disks,
            })
        );
    } else {
        for (disk, u) in &record.disks {
            println!(
                "point {} disk {disk}: {} {} ({} blocks put{})",
                rec.point,
                format!("{:?}", u.state).to_lowercase(),
                u.snapshot_id.as_deref().unwrap_or("-"),
                u.changed_blocks,
                u.parent
                    .as_ref()
                    .map(|p| format!(" over {} of point {}", p.snapshot_id, p.point))
                    .unwrap_or_else(|| ", no parent".into()),
            );
        }
    }
    result.with_context(|| format!("point {} of server {server} is not on EBS", rec.point))?;
    if !json {
        println!(
            "point {} of server {server} is on EBS ({:.1} s)",
            rec.point,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
