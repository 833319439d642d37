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
    #[arg(long, global = true, env = "LIFEBOAT_LOG")]
    pub log: Option<String>,
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
    /// Check a config file and this host against it: every field, every disk path (exists,
    /// readable, a block device or a regular file) and the state directory (writable). Exit
    /// 64 naming the first problem. The systemd unit runs it before each start.
    Validate {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        /// Check the file alone, not this host's disks and state directory (for a config
        /// written for another machine).
        #[arg(long)]
        file_only: bool,
    },
    /// Get this agent's client certificate from the receiver with a one-time code (made on
    /// the receiver by `lifeboat-receiver enroll --server <server_id>`). From then on agent
    /// and receiver authenticate each other with it (mutual TLS) and the token is not used.
    #[command(
        after_help = "The key is made here and never leaves this machine; the certificate \
        is kept in <state_dir>/certificate.json (mode 0600) and renewed by the running agent \
        once two thirds of its life have passed. The code is checked against the receiver \
        whose CA agent.toml pins, so it cannot be sent to an impostor. A running agent picks \
        the certificate up by itself; nothing is resent."
    )]
    Enroll {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        /// The enrolment code; read from stdin when left out (keeps it out of the shell's
        /// history and the process list).
        #[arg(long)]
        code: Option<String>,
        /// Renew the current certificate now, with no code (the running agent does this by
        /// itself when it is due).
        #[arg(long, conflicts_with = "code")]
        renew: bool,
    },
    /// Show the state of the agent that uses this config (from its state directory).
    Status {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Detach the eBPF tracker this config's agent left pinned (it keeps tracking writes
    /// while the agent is stopped, until a reboot). For uninstalling; the next start of the
    /// agent then verify-scans its disks.
    Untrack {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
    },
    /// (Internal) Started by the agent before each freeze: thaws MOUNTS when the deadline
    /// passes or the agent dies first. Not for use by hand.
    #[command(hide = true)]
    ThawWatchdog {
        #[arg(long)]
        deadline_ms: u64,
        mounts: Vec<PathBuf>,
    },
    /// (Packaging) Write the man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig::load(path)?)
}

/// Where the shipped systemd unit lets the agent write (`StateDirectory=lifeboat`).
const UNIT_STATE_DIR: &str = "/var/lib/lifeboat";

/// Checks this host against `cfg`: each disk can be read, the state directory written.
/// Returns warnings; a problem that stops the agent is a [`ConfigError`] (exit 64).
fn check_host(path: &Path, cfg: &AgentConfig) -> Result<Vec<String>, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        field,
        message,
    };
    let mut warnings = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        crate::source::inspect(&d.path).map_err(|e| {
            invalid(
                format!("disks[{i}].path"),
                format!("disk {}: {} cannot be used: {e}", d.id, d.path.display()),
            )
        })?;
        // Which tracker the disk would get (the program itself loads only in `run`).
        use lifeboat_common::config::TrackerKind;
        match (cfg.tracker, crate::tracker::ebpf::resolve(&d.path)) {
            (TrackerKind::Scan, _) | (_, Ok(_)) => {}
            (TrackerKind::Ebpf, Err(e)) => {
                return Err(invalid(
                    format!("disks[{i}].path"),
                    format!("disk {}: tracker = \"ebpf\" cannot track it: {e}", d.id),
                ))
            }
            (TrackerKind::Auto, Err(e)) => warnings.push(format!(
                "disk {}: no eBPF tracking ({e}): it will be hash-scanned every cycle and its points are best-effort",
                d.id
            )),
        }
    }
    crate::state::check_writable(&cfg.state_dir).map_err(|e| {
        invalid(
            "state_dir".into(),
            format!("{}: {e}", cfg.state_dir.display()),
        )
    })?;
    let server_id = cfg.server_id();
    match crate::certificate::Credentials::load(&cfg.state_dir) {
        Err(e) => return Err(invalid("state_dir".into(), e)),
        Ok(Some(c)) => {
            if let Err(e) = c.usable(&server_id, &cfg.state_dir, lifeboat_common::now_ms()) {
                return Err(invalid("server_id".into(), e));
            }
        }
        Ok(None) if cfg.receiver.token.trim().is_empty() => {
            return Err(invalid(
                "receiver.token".into(),
                format!(
                    "is empty, and this agent has no certificate ({} is missing): enrol it \
                     (lifeboat-receiver enroll --server {server_id}, then lifeboat-agent \
                     enroll) or set the token",
                    crate::certificate::path(&cfg.state_dir).display()
                ),
            ))
        }
        Ok(None) => {}
    }
    if !cfg.state_dir.starts_with(UNIT_STATE_DIR) {
        warnings.push(format!(
            "state_dir {} is outside {UNIT_STATE_DIR}, the only directory the shipped \
             lifeboat-agent.service may write (ProtectSystem=strict): under that unit the \
             agent cannot keep its state; add ReadWritePaths={} to the unit, or move it",
            cfg.state_dir.display(),
            cfg.state_dir.display()
        ));
    }
    Ok(warnings)
}

pub fn run(cli: Cli) -> u8 {
    lifeboat_common::logging::init(cli.log.as_deref().unwrap_or("info"));
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
                crate::run::RunOptions {
                    config_path: config.clone(),
                    cli_log: cli.log.clone(),
                    once,
                    give_up_after: Duration::from_secs(give_up_after_secs),
                },
            ))?;
            Ok(())
        }),
        Command::Validate { config, file_only } => load(&config).and_then(|cfg| {
            if !file_only {
                for w in check_host(&config, &cfg)? {
                    println!("warning: {w}");
                }
            }
            println!("{}: ok ({} disk(s), receiver {})", config.display(), cfg.disks.len(), cfg.receiver.address);
            Ok(())
        }),
        Command::Enroll { config, code, renew } => {
            load(&config).and_then(|cfg| crate::certificate::enroll_command(&cfg, code, renew))
        }
        Command::Status { config, json } => load(&config).and_then(|cfg| crate::status::show(&cfg, json)),
        Command::Untrack { config } => load(&config).map(|cfg| {
            let dir = crate::tracker::ebpf::pin::dir_for(&cfg.state_dir);
            crate::tracker::ebpf::pin::unpin(&dir);
            let _ = std::fs::remove_file(cfg.state_dir.join("tracker.json"));
            println!("untracked: {} removed (the program is detached once no agent holds it)", dir.display());
        }),
        Command::ThawWatchdog { deadline_ms, mounts } => {
            return crate::freeze::watchdog(&mounts, Duration::from_millis(deadline_ms))
        }
        Command::GenerateDocs { dir } => {
            lifeboat_common::docgen::write_all(<Cli as clap::CommandFactory>::command(), &dir)
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("writing the docs into {}: {e}", dir.display()))
        }
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
