//! `recover`: launch a point as an EC2 instance (or a drill), in the manner of DRS.

use std::path::Path;

pub struct Request {
    pub server: String,
    pub point: String,
    pub drill: bool,
    pub dry_run: bool,
    pub json: bool,
}

#[cfg(not(feature = "aws"))]
pub fn run(_: &Path, _: &Request) -> anyhow::Result<()> {
    anyhow::bail!("this lifeboat-receiver was built without AWS support (the `aws` feature)")
}

#[cfg(feature = "aws")]
pub fn run(state_dir: &Path, req: &Request) -> anyhow::Result<()> {
    use crate::catalog::Catalog;
    use crate::recovery::launch::{self, Mapping};
    use crate::snapshots::ebs::record::{DiskState, EbsRecord};
    use crate::snapshots::ebs::{client::Aws, Materializer};
    use anyhow::{bail, Context};
    use std::time::{Duration, Instant};

    let started = Instant::now();
    let cfg_path = state_dir.join("receiver.toml");
    let config = lifeboat_common::config::ReceiverConfig::load(&cfg_path)?;
    let Some(ebs) = config.ebs.clone() else {
        bail!(
            "{} has no [ebs] section: recovery launches from EBS snapshots; add [ebs] (region) \
             and [recovery.default] (instance_type, subnet_id, security_group_ids)",
            cfg_path.display()
        );
    };
    let base = config.recovery.get("default").cloned().unwrap_or_default();
    let launch_cfg = config
        .recovery
        .get(&req.server)
        .map(|l| l.over(&base))
        .unwrap_or(base);
    let catalog = Catalog::new(state_dir);
    // Shared lock: local retention and GC wait while the point's blocks may be read.
    let lock = crate::gc::lock_file(state_dir)
        .with_context(|| format!("opening the lock in {}", state_dir.display()))?;
    crate::sys::flock(&lock, false, false)?;
    let rec = catalog.find(&req.server, &req.point)?;
    if let Some(why) = &rec.damaged {
        bail!(
            "point {} of server {} is damaged: {why}",
            rec.point,
            rec.server
        );
    }
    let boot = launch::boot_disk(&rec, &launch_cfg);
    let devices = launch::devices(&rec, &boot).map_err(anyhow::Error::msg)?;
    let _pin = crate::recovery::Pin::take(&catalog, &rec.server, rec.point)
        .with_context(|| format!("pinning point {} for the recovery", rec.point))?;
    let say = |m: String| {
        if !req.json {
            eprintln!("{m}");
        }
    };
    let kind = if req.drill { "drill" } else { "recovery" };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let store = crate::store::open(state_dir, &config)?;
    let outcome = rt.block_on(async {
        let aws = Aws::connect(&ebs).await;
        let m = Materializer {
            aws: aws.clone(),
            catalog: Catalog::new(state_dir),
            store,
            install: crate::snapshots::ebs::install_id(state_dir)?,
            metrics: None,
        };
        let mappings = |r: &EbsRecord| -> Vec<Mapping> {
            devices
                .iter()
                .filter_map(|(disk, device)| {
                    let u = r.disks.get(disk)?;
                    (u.state == DiskState::OnEbs).then(|| Mapping {
                        disk: disk.clone(),
                        device: device.clone(),
                        snapshot_id: u.snapshot_id.clone().unwrap_or_default(),
                    })
                })
                .collect()
        };
        if req.dry_run {
            let r = EbsRecord::load(&catalog, &rec.server, rec.point)?;
            let on = mappings(&r);
            let missing: Vec<&str> = devices
                .iter()
                .filter(|(d, _)| !on.iter().any(|m| &m.disk == d))
                .map(|(d, _)| d.as_str())
                .collect();
            let register = if missing.is_empty() {
                launch::register_image(&aws, &rec, &launch_cfg, &on, req.drill, true)
                    .await
                    .map(|_| "allowed".to_string())
                    .unwrap_or_else(|e| format!("refused: {e}"))
            } else {
                "not tried: the point is not on EBS yet".to_string()
            };
            return anyhow::Ok(serde_json::json!({
                "dry_run": true, "kind": kind, "server": rec.server, "point": rec.point,
                "point_committed_unix_ms": rec.committed_unix_ms,
                "consistency": rec.consistency, "boot_disk": boot,
                "on_ebs": on, "to_upload_first": missing,
                "register_image_dry_run": register,
                "launch": launch_cfg,
            }));
        }
        say(format!(
            "{kind}: server {} point {}: putting the point on EBS (incremental where a parent exists)",
            rec.server, rec.point
        ));
        m.materialize(&rec.server, rec.point, true).await?;
        let r = EbsRecord::load(&catalog, &rec.server, rec.point)?;
        let maps = mappings(&r);
        if maps.len() != devices.len() {
            bail!("point {} is not on EBS for every disk", rec.point);
        }
        say(format!("{kind}: registering an image from {} snapshot(s)", maps.len()));
        let image = launch::register_image(&aws, &rec, &launch_cfg, &maps, req.drill, false)
            .await?
            .unwrap_or_default();
        say(format!("{kind}: launching an instance from {image}"));
        let token = format!("lifeboat-{}-{}-{}", rec.server, rec.point, image);
        let request_secs = started.elapsed().as_secs_f64();
        let id = launch::run_instance(&aws, &rec, &launch_cfg, &image, req.drill, false, &token)
            .await?
            .unwrap_or_default();
        say(format!("{kind}: waiting for {id} to run"));
        let inst = launch::wait_running(&aws, &id, Duration::from_secs(600)).await?;
        anyhow::Ok(serde_json::json!({
            "kind": kind, "server": rec.server, "point": rec.point,
            "point_committed_unix_ms": rec.committed_unix_ms,
            "consistency": rec.consistency, "image_id": image,
            "instance_id": inst.instance_id, "private_ip": inst.private_ip,
            "state": inst.state, "snapshots": maps,
            "seconds_to_launch_request": request_secs,
            "seconds_to_running": started.elapsed().as_secs_f64(),
        }))
    })?;
    if req.json {
        println!("{outcome}");
        return Ok(());
    }
    let when = super::fmt_utc(rec.committed_unix_ms);
    if req.dry_run {
        println!(
            "dry run: a {kind} of server {} from point {} ({when} UTC, {:?})",
            rec.server, rec.point, rec.consistency
        );
        println!("  boot disk {boot}; on EBS: {}", outcome["on_ebs"]);
        println!("  to put on EBS first: {}", outcome["to_upload_first"]);
        println!(
            "  RegisterImage (DryRun): {}",
            outcome["register_image_dry_run"]
        );
        println!("  launch settings: {}", outcome["launch"]);
        return Ok(());
    }
    println!(
        "{kind} of server {} launched: instance {} ({}), private IP {}",
        rec.server,
        outcome["instance_id"].as_str().unwrap_or(""),
        outcome["state"].as_str().unwrap_or(""),
        outcome["private_ip"].as_str().unwrap_or("none")
    );
    println!(
        "point {} of {when} UTC ({:?}), image {}",
        rec.point,
        rec.consistency,
        outcome["image_id"].as_str().unwrap_or("")
    );
    println!(
        "{:.1} s from this command to the launch request (our share of the RTO), {:.1} s to running",
        outcome["seconds_to_launch_request"].as_f64().unwrap_or(0.0),
        outcome["seconds_to_running"].as_f64().unwrap_or(0.0)
    );
    if req.drill {
        println!("clean up with: lifeboat-receiver drills --terminate");
    }
    Ok(())
}
