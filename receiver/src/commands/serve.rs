//! `serve`: the TLS listener, until SIGTERM (SIGHUP reloads the log filter and retention).

use crate::server::{serve, ServeOptions};
use std::path::Path;
use std::time::Duration;

pub fn run(
    state_dir: &Path,
    listen: Option<String>,
    gc_interval_secs: u64,
    ebs_interval_secs: u64,
    cli_log: Option<String>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(ServeOptions {
        state_dir: state_dir.to_path_buf(),
        listen,
        gc_interval: Duration::from_secs(gc_interval_secs.max(1)),
        grace: Duration::from_secs(10),
        ebs_interval: Duration::from_secs(ebs_interval_secs.max(1)),
        cli_log,
    }))
}
