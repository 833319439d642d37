//! The agent's Prometheus metrics and health, served by [`lifeboat_common::exporter`] on
//! `metrics_listen` (loopback by default).
//!
//! The replicator publishes a copy of its status at every progress tick (2 s) and every point,
//! and observes point and freeze durations into histograms; a scrape renders from the last
//! copy and never touches the replication path. Labels are bounded: the disk ids of the config
//! and the seven disk states, never a point number or a hash.
//!
//! Health: unhealthy when nothing was acknowledged, and no scan examined a block, for longer
//! than `health_stall_secs` (at least three point intervals): the receiver unreachable, or
//! the agent stuck. The body says which, with the last error.

use crate::state::AgentStatus;
use lifeboat_common::exporter::{seconds_histogram, unix_secs, Exporter, Families};
use lifeboat_common::protocol::{Consistency, DiskState};
use lifeboat_common::{now_ms, BLOCK_SIZE};
use std::sync::Mutex;

pub struct AgentMetrics {
    status: Mutex<AgentStatus>,
    /// When the process started (health counts from there until the first ack).
    started_unix_ms: u64,
    /// The health bound in seconds (changed by a reload).
    stall_secs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub point_seconds: prometheus::Histogram,
    pub freeze_seconds: prometheus::Histogram,
    /// Where the client certificate is (its expiry is read at each scrape).
    state_dir: std::path::PathBuf,
}

impl AgentMetrics {
    pub fn new(
        status: AgentStatus,
        stall_secs: std::sync::Arc<std::sync::atomic::AtomicU64>,
        state_dir: std::path::PathBuf,
    ) -> AgentMetrics {
        AgentMetrics {
            state_dir,
            status: Mutex::new(status),
            started_unix_ms: now_ms(),
            stall_secs,
            point_seconds: seconds_histogram(
                "lifeboat_agent_point_duration_seconds",
                "Time from a cycle's start to its point's commit.",
                &[
                    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0,
                ],
            ),
            freeze_seconds: seconds_histogram(
                "lifeboat_agent_freeze_duration_seconds",
                "How long the filesystems were frozen for a point.",
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0],
            ),
        }
    }

    /// The replicator's status now (a copy; called where the status file is written).
    pub fn publish(&self, status: &AgentStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
    }

    fn snapshot(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Exporter for AgentMetrics {
    fn metrics(&self) -> String {
        let st = self.snapshot();
        let now = now_ms();
        let f = Families::new();
        f.add(self.point_seconds.clone());
        f.add(self.freeze_seconds.clone());
        let info = f.gauge(
            "lifeboat_agent_build_info",
            "The agent's version and server id (always 1).",
            &["version", "server"],
        );
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), &st.server_id])
            .set(1.0);
        f.gauge_value(
            "lifeboat_agent_connected",
            "1 while connected to the receiver.",
            f64::from(u8::from(st.connected)),
        );
        let lag = f.gauge(
            "lifeboat_agent_replication_lag_seconds",
            "Now minus the time of the newest point the receiver committed (agent clock); \
             absent before the first point.",
            &["disk"],
        );
        let backlog = f.gauge(
            "lifeboat_agent_backlog_bytes",
            "Changed data not yet acknowledged: dirty, unexamined and unacknowledged blocks.",
            &["disk"],
        );
        let state = f.gauge(
            "lifeboat_agent_disk_state",
            "1 for the disk's current state, 0 for the others.",
            &["disk", "state"],
        );
        let read = f.counter(
            "lifeboat_agent_read_bytes_total",
            "Bytes read from the disk.",
            &["disk"],
        );
        let raw = f.counter(
            "lifeboat_agent_sent_uncompressed_bytes_total",
            "Data sent (whole blocks, or a patch's pages), before compression.",
            &["disk"],
        );
        let wire = f.counter(
            "lifeboat_agent_sent_bytes_total",
            "Data sent, as encoded on the wire (after compression).",
            &["disk"],
        );
        let dedupe = f.counter(
            "lifeboat_agent_dedupe_hits_total",
            "Changed blocks the receiver already held (sent as references).",
            &["disk"],
        );
        let resent = f.counter(
            "lifeboat_agent_blocks_resent_total",
            "Blocks sent again (the receiver lacked a base or a referenced block, or named a \
             patch otherwise than expected).",
            &["disk"],
        );
        let scans = f.counter(
            "lifeboat_agent_verify_scans_total",
            "Verify scans (every block hashed): after a start, lost tracker events, a resize.",
            &["disk"],
        );
        let fixed = f.counter(
            "lifeboat_agent_fixed_reads_total",
            "Reads into io_uring registered buffers.",
            &["disk"],
        );
        for d in &st.disks {
            let id = d.id.as_str();
            if let Some(t) = st.last_point_unix_ms {
                lag.with_label_values(&[id])
                    .set(unix_secs(now.saturating_sub(t)));
            }
            backlog
                .with_label_values(&[id])
                .set((d.backlog_blocks * BLOCK_SIZE as u64) as f64);
            for s in DiskState::ALL {
                state
                    .with_label_values(&[id, s.as_str()])
                    .set(f64::from(u8::from(d.state == Some(s))));
            }
            read.with_label_values(&[id]).inc_by(d.bytes_read);
            raw.with_label_values(&[id]).inc_by(d.sent.raw_bytes);
            wire.with_label_values(&[id]).inc_by(d.sent.data_bytes);
            dedupe.with_label_values(&[id]).inc_by(d.sent.dedupe_hits);
            resent.with_label_values(&[id]).inc_by(d.sent.resent);
            scans.with_label_values(&[id]).inc_by(d.verify_scans);
            fixed.with_label_values(&[id]).inc_by(d.fixed_reads);
        }
        f.counter_value(
            "lifeboat_agent_network_sent_bytes_total",
            "Bytes written to the receiver's connections (frames, before TLS).",
            st.network_bytes_sent,
        );
        f.counter_value(
            "lifeboat_agent_patches_sent_total",
            "Blocks sent as the pages that changed.",
            st.patches_sent,
        );
        f.counter_value(
            "lifeboat_agent_reconnects_total",
            "Connections to the receiver that ended in an error (each is retried).",
            st.reconnects,
        );
        f.counter_value(
            "lifeboat_agent_points_committed_total",
            "Points the receiver committed.",
            st.points_committed,
        );
        if let Some(t) = st.last_point_unix_ms {
            f.gauge_value(
                "lifeboat_agent_last_point_timestamp_seconds",
                "When the newest point was cut (agent clock).",
                unix_secs(t),
            );
        }
        if let Some(c) = st.last_point_consistency {
            f.gauge_value(
                "lifeboat_agent_last_point_crash_consistent",
                "1 when the newest point is crash-consistent (frozen), 0 when best-effort.",
                f64::from(u8::from(c == Consistency::CrashConsistent)),
            );
        }
        if let Ok(Some(c)) = crate::certificate::Credentials::load(&self.state_dir) {
            f.gauge_value(
                "lifeboat_agent_certificate_expiry_timestamp_seconds",
                "When this agent's client certificate expires (it renews it after two thirds \
                 of its life); absent for an agent that uses a token.",
                unix_secs(c.not_after_unix_ms),
            );
        }
        f.gauge_value(
            "lifeboat_agent_compression_level",
            "The zstd level in use.",
            f64::from(st.compression_level),
        );
        f.render()
    }

    fn health(&self) -> Result<(), String> {
        let st = self.snapshot();
        let since = st.last_ack_unix_ms.unwrap_or(self.started_unix_ms);
        let silent = now_ms().saturating_sub(since);
        let stall_ms = self
            .stall_secs
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_mul(1000);
        if silent <= stall_ms {
            return Ok(());
        }
        let what = if st.last_ack_unix_ms.is_some() {
            "nothing acknowledged by the receiver (and no block examined)"
        } else {
            "nothing acknowledged since the agent started"
        };
        Err(format!(
            "{what} for {} s (health_stall_secs = {}){}",
            silent / 1000,
            stall_ms / 1000,
            st.last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ))
    }
}
