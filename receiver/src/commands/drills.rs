//! `drills`: list drill instances and images; `--terminate` cleans them up.

use std::path::Path;

#[cfg(not(feature = "aws"))]
pub fn run(_: &Path, _: bool, _: bool) -> anyhow::Result<()> {
    anyhow::bail!("this lifeboat-receiver was built without AWS support (the `aws` feature)")
}

#[cfg(feature = "aws")]
pub fn run(state_dir: &Path, terminate: bool, json: bool) -> anyhow::Result<()> {
    use crate::recovery::launch;
    use crate::snapshots::ebs::client::Aws;
    let cfg_path = state_dir.join("receiver.toml");
    let config = lifeboat_common::config::ReceiverConfig::load(&cfg_path)?;
    let Some(ebs) = config.ebs else {
        anyhow::bail!(
            "{} has no [ebs] section: there are no drills",
            cfg_path.display()
        );
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let drills = rt.block_on(async {
        let aws = Aws::connect(&ebs).await;
        let drills = launch::list_drills(&aws).await?;
        if terminate {
            launch::terminate(&aws, &drills).await?;
        }
        anyhow::Ok(drills)
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "drills": drills, "terminated": terminate })
        );
        return Ok(());
    }
    if drills.is_empty() {
        println!("no drill instances or images");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = drills
        .iter()
        .map(|d| {
            vec![
                d.kind.to_string(),
                d.id.clone(),
                d.server.clone(),
                d.point.clone(),
                d.state.clone(),
            ]
        })
        .collect();
    super::print_table(&["KIND", "ID", "SERVER", "POINT", "STATE"], &rows);
    if terminate {
        println!(
            "terminated {} instance(s) and deregistered {} image(s); the point snapshots stay",
            drills.iter().filter(|d| d.kind == "instance").count(),
            drills.iter().filter(|d| d.kind == "image").count()
        );
    }
    Ok(())
}
