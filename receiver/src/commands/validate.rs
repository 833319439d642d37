//! `validate`: check a receiver.toml.

use lifeboat_common::config::ReceiverConfig;
use std::path::{Path, PathBuf};

pub fn run(state_dir: &Path, config: Option<PathBuf>) -> anyhow::Result<()> {
    let path = config.unwrap_or_else(|| state_dir.join("receiver.toml"));
    ReceiverConfig::load(&path)?;
    println!("{}: ok", path.display());
    Ok(())
}
