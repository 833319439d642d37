//! What a running agent takes again from its config at SIGHUP, without a restart: the
//! bandwidth limit, the compression levels, the health bound and the log filter. Everything
//! else (disks, receiver, tracker, state directory, the metrics address) is read at start
//! only; a reload that changes it says so in the log.

use lifeboat_common::config::AgentConfig;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

/// The settings a reload changes, read where they are used.
pub struct Live {
    /// `bandwidth_limit_mbps` (0: none), read by the link's writer before each write.
    pub bandwidth_mbps: Arc<AtomicU64>,
    /// `compression_level` and `compression_level_max`, read at each adaptation period.
    pub level_min: Arc<AtomicI32>,
    pub level_max: Arc<AtomicI32>,
    /// `health_stall_secs` as the health check uses it (see [`crate::metrics`]).
    pub stall_secs: Arc<AtomicU64>,
}

/// The health bound a config means: at least three point intervals.
pub fn stall_secs(cfg: &AgentConfig) -> u64 {
    cfg.health_stall_secs.max(3 * cfg.point_interval_secs)
}

impl Live {
    pub fn new(cfg: &AgentConfig) -> Live {
        Live {
            bandwidth_mbps: Arc::new(AtomicU64::new(cfg.bandwidth_limit_mbps)),
            level_min: Arc::new(AtomicI32::new(cfg.compression_level)),
            level_max: Arc::new(AtomicI32::new(cfg.compression_level_max)),
            stall_secs: Arc::new(AtomicU64::new(stall_secs(cfg))),
        }
    }

    fn apply(&self, cfg: &AgentConfig) {
        self.bandwidth_mbps
            .store(cfg.bandwidth_limit_mbps, Ordering::Relaxed);
        self.level_min
            .store(cfg.compression_level, Ordering::Relaxed);
        self.level_max
            .store(cfg.compression_level_max, Ordering::Relaxed);
        self.stall_secs.store(stall_secs(cfg), Ordering::Relaxed);
    }
}

/// Applies the filter of `log` in the config, unless `--log`/`LIFEBOAT_LOG` set one.
pub fn apply_log(cfg: &AgentConfig, cli_log: Option<&str>) {
    if cli_log.is_some() {
        return;
    }
    if let Err(e) = lifeboat_common::logging::set_filter(cfg.log.as_deref().unwrap_or("info")) {
        tracing::warn!("{e}");
    }
}

/// Reads `path` again and applies what can change while running; `running` is the config
/// the agent started with. A config that does not load or validate changes nothing.
pub fn reload(path: &Path, running: &AgentConfig, live: &Live, cli_log: Option<&str>) {
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; nothing was changed");
            return;
        }
    };
    // The health bound counts the point interval the agent runs with (a new one waits for a
    // restart).
    let mut applied = cfg.clone();
    applied.point_interval_secs = running.point_interval_secs;
    live.apply(&applied);
    apply_log(&cfg, cli_log);
    let restart: Vec<&str> = [
        ("server_id", running.server_id != cfg.server_id),
        ("state_dir", running.state_dir != cfg.state_dir),
        (
            "point_interval_secs",
            running.point_interval_secs != cfg.point_interval_secs,
        ),
        ("workers", running.workers != cfg.workers),
        (
            "reader_queue_depth",
            running.reader_queue_depth != cfg.reader_queue_depth,
        ),
        ("tracker", running.tracker != cfg.tracker),
        ("freeze", running.freeze != cfg.freeze),
        (
            "metrics_listen",
            running.metrics_listen != cfg.metrics_listen,
        ),
        (
            "freeze_timeout_ms",
            running.freeze_timeout_ms != cfg.freeze_timeout_ms,
        ),
        (
            "freeze_max_delta_mib",
            running.freeze_max_delta_mib != cfg.freeze_max_delta_mib,
        ),
        (
            "ebpf_ring_buffer_kib",
            running.ebpf_ring_buffer_kib != cfg.ebpf_ring_buffer_kib,
        ),
        ("reader", running.reader != cfg.reader),
        ("page_sums", running.page_sums != cfg.page_sums),
        // (Compared, never logged: it holds the token.)
        (
            "[receiver]",
            format!("{:?}", running.receiver) != format!("{:?}", cfg.receiver),
        ),
        (
            "disks",
            running.disks.len() != cfg.disks.len()
                || running
                    .disks
                    .iter()
                    .zip(&cfg.disks)
                    .any(|(a, b)| a.id != b.id || a.path != b.path),
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(k, _)| k)
    .collect();
    tracing::info!(
        bandwidth_limit_mbps = cfg.bandwidth_limit_mbps,
        compression_level = cfg.compression_level,
        compression_level_max = cfg.compression_level_max,
        health_stall_secs = cfg.health_stall_secs,
        log = cfg.log.as_deref().unwrap_or("info"),
        "SIGHUP: configuration reloaded"
    );
    if !restart.is_empty() {
        tracing::warn!(
            "SIGHUP: {} changed in {}: that takes effect at the next restart",
            restart.join(", "),
            path.display()
        );
    }
}
