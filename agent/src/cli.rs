//! The command line. `main.rs` parses it and calls [`run`], which maps errors to exit codes:
//! 0 success, 1 failure, 2 bad usage, 64 bad configuration.

use clap::{Parser, Subcommand};
use lifeboat_common::config::{AgentConfig, ConfigError};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "lifeboat-agent",
    version,
    about = "Lifeboat agent: replicates this server's disks to a Lifeboat receiver",
    long_about = "Lifeboat agent: replicates this server's disks to a Lifeboat receiver.\n\n\
It reads each configured disk, sends the 512 KiB blocks that changed (deduplicated, zstd, over \
TLS 1.3 to a receiver whose CA it pins), and cuts a point in time every point_interval_secs. \
Normally run by systemd (lifeboat-agent.service); `validate` checks a config, `status` shows \
what a running agent is doing."
)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. "info" or "lifeboat_agent=debug".
    #[arg(long, global = true, env = "LIFEBOAT_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Replicate continuously (or once, with --once).
    Run {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        /// Sync, cut one point, and exit 0 (for first syncs, scripts and tests).
        #[arg(long)]
        once: bool,
        /// With --once: exit non-zero if no point is committed within this many seconds.
        #[arg(long, default_value_t = 3600)]
        give_up_after_secs: u64,
    },
    /// Check a config file; exit 64 naming the first problem.
    Validate {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
    },
    /// Show the state of the agent that uses this config (from its state directory).
    Status {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig::load(path)?)
}

pub fn run(cli: Cli) -> u8 {
    lifeboat_common::logging::init(&cli.log);
    let r = match cli.command {
        Command::Run { config, once, give_up_after_secs } => load(&config).and_then(|cfg| {
            for d in &cfg.disks {
                if let Err(e) = crate::source::inspect(&d.path) {
                    tracing::warn!(disk = %d.id, "{}: {e} (the agent will keep trying)", d.path.display());
                }
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(crate::run::run(
                cfg,
                crate::run::RunOptions { once, give_up_after: Duration::from_secs(give_up_after_secs) },
            ))?;
            Ok(())
        }),
        Command::Validate { config } => load(&config).map(|cfg| {
            println!("{}: ok ({} disk(s), receiver {})", config.display(), cfg.disks.len(), cfg.receiver.address);
            for d in &cfg.disks {
                if let Err(e) = crate::source::inspect(&d.path) {
                    println!("warning: disk {}: {}: {e}", d.id, d.path.display());
                }
            }
        }),
        Command::Status { config, json } => load(&config).and_then(|cfg| crate::status::show(&cfg, json)),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                64
            } else {
                1
            }
        }
    }
}
