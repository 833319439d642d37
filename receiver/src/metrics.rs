//! The receiver's Prometheus metrics and health, served by `serve` through
//! [`lifeboat_common::exporter`] on `metrics_listen` (loopback by default).
//!
//! A scrape renders from what is on disk and in memory at that moment: each server's
//! `status.json` (written by its session: connection, disks, backlog, newest point), the
//! store's filesystem, and counters the listener, the sessions, GC and the EBS uploader
//! increment as they go. Nothing here takes a lock a session holds. Lag is measured on the
//! receiver's clock (now minus the newest point's commit time), never the agent's. Labels are
//! bounded: server and disk ids, disk states, refusal reasons from a fixed list.
//!
//! Health: unhealthy when the store cannot take blocks (a failed `syncfs` poisoned it, its
//! filesystem is read-only or full), with the reason.

use crate::catalog::Catalog;
use crate::status::ServerStatus;
use crate::store::BlockStore;
use lifeboat_common::exporter::{seconds_histogram, unix_secs, Exporter, Families};
use lifeboat_common::protocol::DiskState;
use lifeboat_common::{now_ms, BLOCK_SIZE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a connection was refused (the label values of `connections_refused_total`).
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    /// Too many peers in their handshake (from one address, or in all).
    HandshakeLimit,
    /// The handshake did not finish within `handshake_timeout_secs`.
    HandshakeTimeout,
    /// TLS failed (not our CA, not TLS at all).
    Tls,
    /// A malformed preface or Hello.
    Protocol,
    /// A wrong, unknown or another server's token.
    Token,
    /// `max_connections` agents are connected already.
    MaxConnections,
    /// Another machine holds the server id.
    Identity,
    /// The server is still replicating on another connection.
    Busy,
    /// A client certificate not enrolled for the server, or none from a server that has one.
    Certificate,
    /// The server's identity was revoked.
    Revoked,
    /// An enrolment or renewal refused (unknown, used, expired or another server's code).
    Enrolment,
}

impl Refusal {
    const ALL: [Refusal; 11] = [
        Refusal::HandshakeLimit,
        Refusal::HandshakeTimeout,
        Refusal::Tls,
        Refusal::Protocol,
        Refusal::Token,
        Refusal::MaxConnections,
        Refusal::Identity,
        Refusal::Busy,
        Refusal::Certificate,
        Refusal::Revoked,
        Refusal::Enrolment,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::HandshakeLimit => "handshake_limit",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::Tls => "tls",
            Refusal::Protocol => "protocol",
            Refusal::Token => "token",
            Refusal::MaxConnections => "max_connections",
            Refusal::Identity => "identity",
            Refusal::Busy => "busy",
            Refusal::Certificate => "certificate",
            Refusal::Revoked => "revoked",
            Refusal::Enrolment => "enrolment",
        }
    }
}

/// What `serve` counts as it goes.
pub struct ReceiverMetrics {
    state_dir: PathBuf,
    store: Arc<dyn BlockStore>,
    refused: [AtomicU64; 11],
    points_committed: prometheus::IntCounterVec,
    commits_refused: prometheus::IntCounterVec,
    pub gc_runs: prometheus::IntCounter,
    pub gc_failures: prometheus::IntCounter,
    pub gc_points_deleted: prometheus::IntCounter,
    pub gc_blocks_deleted: prometheus::IntCounter,
    /// Blocks in the store after the last sweep (None before one).
    pub store_blocks: AtomicU64,
    pub gc_last_success_unix_ms: AtomicU64,
    /// Time from StartSnapshot to `completed`, per disk and point uploaded to EBS.
    pub ebs_upload_seconds: prometheus::Histogram,
    pub ebs_uploads_failed: prometheus::IntCounter,
    /// The EBS client's throttles and retried attempts, when the EBS target is on.
    pub ebs_client: std::sync::Mutex<Option<(Arc<AtomicU64>, Arc<AtomicU64>)>>,
    /// The fleet, in fleet mode (its leases held and lost).
    pub fleet: std::sync::Mutex<Option<Arc<dyn crate::fleet::Fleet>>>,
}

fn counter(name: &str, help: &str) -> prometheus::IntCounter {
    prometheus::IntCounter::new(name, help).unwrap_or_else(|e| panic!("counter {name}: {e}"))
}

impl ReceiverMetrics {
    pub fn new(state_dir: &Path, store: Arc<dyn BlockStore>) -> ReceiverMetrics {
        ReceiverMetrics {
            state_dir: state_dir.to_path_buf(),
            store,
            refused: Default::default(),
            points_committed: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lifeboat_receiver_points_committed_total",
                    "Points committed since the receiver started.",
                ),
                &["server"],
            )
            .unwrap_or_else(|e| panic!("points_committed: {e}")),
            commits_refused: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lifeboat_receiver_commits_refused_total",
                    "Points the receiver did not commit: the agent's digests differed from its \
                     (the agent rescans), or the commit failed (the log says why).",
                ),
                &["server", "reason"],
            )
            .unwrap_or_else(|e| panic!("commits_refused: {e}")),
            gc_runs: counter("lifeboat_receiver_gc_runs_total", "GC passes run."),
            gc_failures: counter(
                "lifeboat_receiver_gc_failures_total",
                "GC passes that failed (the log says why).",
            ),
            gc_points_deleted: counter(
                "lifeboat_receiver_gc_points_deleted_total",
                "Points retention deleted.",
            ),
            gc_blocks_deleted: counter(
                "lifeboat_receiver_gc_blocks_deleted_total",
                "Blocks GC deleted from the store (no point or live disk named them).",
            ),
            store_blocks: AtomicU64::new(u64::MAX),
            gc_last_success_unix_ms: AtomicU64::new(0),
            ebs_upload_seconds: seconds_histogram(
                "lifeboat_receiver_ebs_upload_seconds",
                "Time to put one disk of one point on EBS (StartSnapshot to completed).",
                &[
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
                ],
            ),
            ebs_uploads_failed: counter(
                "lifeboat_receiver_ebs_uploads_failed_total",
                "Disk uploads to EBS that failed for good (the point shows `failed` and why).",
            ),
            ebs_client: std::sync::Mutex::new(None),
            fleet: std::sync::Mutex::new(None),
        }
    }

    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn committed(&self, server: &str) {
        self.points_committed.with_label_values(&[server]).inc();
    }

    /// A point not committed; `reason` is "digest_mismatch" or "error".
    pub fn commit_refused(&self, server: &str, reason: &'static str) {
        self.commits_refused
            .with_label_values(&[server, reason])
            .inc();
    }

    fn render(&self) -> String {
        let now = now_ms();
        let f = Families::new();
        f.add(self.points_committed.clone());
        f.add(self.commits_refused.clone());
        for c in [
            &self.gc_runs,
            &self.gc_failures,
            &self.gc_points_deleted,
            &self.gc_blocks_deleted,
            &self.ebs_uploads_failed,
        ] {
            f.add(c.clone());
        }
        f.add(self.ebs_upload_seconds.clone());
        f.gauge(
            "lifeboat_receiver_build_info",
            "The receiver's version (always 1).",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1.0);
        let refused = f.counter(
            "lifeboat_receiver_connections_refused_total",
            "Connections refused, by reason.",
            &["reason"],
        );
        for r in Refusal::ALL {
            refused
                .with_label_values(&[r.as_str()])
                .inc_by(self.refused[r as usize].load(Ordering::Relaxed));
        }
        let lag = f.gauge(
            "lifeboat_receiver_replication_lag_seconds",
            "Now minus the commit time of the server's newest point (receiver clock); absent \
             before its first point.",
            &["server", "disk"],
        );
        let backlog = f.gauge(
            "lifeboat_receiver_backlog_bytes",
            "Changed data the agent has not had acknowledged, as it last reported.",
            &["server", "disk"],
        );
        let state = f.gauge(
            "lifeboat_receiver_disk_state",
            "1 for the disk's current state, 0 for the others.",
            &["server", "disk", "state"],
        );
        let connected = f.gauge(
            "lifeboat_receiver_agent_connected",
            "1 while the server's agent is connected.",
            &["server"],
        );
        let skew = f.gauge(
            "lifeboat_receiver_agent_clock_skew_seconds",
            "The agent's clock minus the receiver's, as last measured.",
            &["server"],
        );
        let last_point = f.gauge(
            "lifeboat_receiver_last_point_timestamp_seconds",
            "When the server's newest point was committed (receiver clock).",
            &["server"],
        );
        let per_server = [
            (
                "lifeboat_receiver_received_bytes_total",
                "Encoded block and patch bytes received.",
            ),
            (
                "lifeboat_receiver_blocks_received_total",
                "Whole blocks received.",
            ),
            (
                "lifeboat_receiver_blocks_stored_total",
                "Blocks new to the store.",
            ),
            (
                "lifeboat_receiver_refs_received_total",
                "References received (content the store held: dedupe hits and zero blocks).",
            ),
            (
                "lifeboat_receiver_blocks_rejected_total",
                "Blocks refused because their data did not match their name.",
            ),
            (
                "lifeboat_receiver_patches_applied_total",
                "Patches applied (pages over a block's previous content).",
            ),
            (
                "lifeboat_receiver_patches_refused_total",
                "Patches answered with NeedData (the base was missing).",
            ),
        ]
        .map(|(name, help)| f.counter(name, help, &["server"]));
        let mut agents = 0u64;
        let catalog = Catalog::new(&self.state_dir);
        for server in catalog.servers().unwrap_or_default() {
            let Some(st) = ServerStatus::load(&catalog.server_dir(&server)) else {
                continue;
            };
            let s = server.as_str();
            // Every known server has the series, at 0 until its first commit since the
            // start (so `increase` sees a server that never commits).
            self.points_committed.with_label_values(&[s]);
            agents += u64::from(st.connected);
            connected
                .with_label_values(&[s])
                .set(f64::from(u8::from(st.connected)));
            if let Some(ms) = st.clock_skew_ms {
                skew.with_label_values(&[s]).set(ms as f64 / 1000.0);
            }
            if let Some(t) = st.last_point_committed_unix_ms {
                last_point.with_label_values(&[s]).set(unix_secs(t));
            }
            for d in &st.disks {
                let id = d.id.as_str();
                if let Some(t) = st.last_point_committed_unix_ms {
                    lag.with_label_values(&[s, id])
                        .set(unix_secs(now.saturating_sub(t)));
                }
                backlog
                    .with_label_values(&[s, id])
                    .set((d.backlog_blocks * BLOCK_SIZE as u64) as f64);
                for k in DiskState::ALL {
                    state
                        .with_label_values(&[s, id, k.as_str()])
                        .set(f64::from(u8::from(d.state == k)));
                }
            }
            let c = &st.counters;
            let totals = [
                c.data_bytes_received + c.delta_bytes_received,
                c.blocks_received,
                c.blocks_stored,
                c.refs_received,
                c.blocks_rejected,
                c.deltas_applied,
                c.deltas_refused,
            ];
            for (family, v) in per_server.iter().zip(totals) {
                family.with_label_values(&[s]).inc_by(v);
            }
        }
        let expiry = f.gauge(
            "lifeboat_receiver_agent_certificate_expiry_timestamp_seconds",
            "When the server's client certificate expires (its agent renews it after two \
             thirds of its life); absent for servers on tokens and revoked ones.",
            &["server"],
        );
        for r in crate::identities::Record::all(&self.state_dir).unwrap_or_default() {
            if r.revoked_unix_ms.is_none() && !r.certificate_sha256.is_empty() {
                expiry
                    .with_label_values(&[&r.server])
                    .set(unix_secs(r.not_after_unix_ms));
            }
        }
        f.gauge_value(
            "lifeboat_receiver_agents_connected",
            "Agents connected now.",
            agents as f64,
        );
        if let Some((avail, size)) = fs_space(&self.local_store()) {
            f.gauge_value(
                "lifeboat_receiver_store_filesystem_avail_bytes",
                "Space left for the store on its filesystem (for unprivileged use).",
                avail as f64,
            );
            f.gauge_value(
                "lifeboat_receiver_store_filesystem_size_bytes",
                "Size of the store's filesystem.",
                size as f64,
            );
        }
        let blocks = self.store_blocks.load(Ordering::Relaxed);
        if blocks != u64::MAX {
            f.gauge_value(
                "lifeboat_receiver_store_blocks",
                "Blocks in the store, as of the last GC sweep.",
                blocks as f64,
            );
        }
        if let Some(r) = crate::commands::scrub::ScrubReport::load(&self.state_dir) {
            f.gauge_value(
                "lifeboat_receiver_scrub_last_timestamp_seconds",
                "When the last scrub (lifeboat-receiver scrub) finished.",
                unix_secs(r.finished_unix_ms),
            );
            f.gauge_value(
                "lifeboat_receiver_scrub_last_checked_blocks",
                "Blocks the last scrub read and checked against their names.",
                r.blocks_checked as f64,
            );
            f.gauge_value(
                "lifeboat_receiver_scrub_last_corrupt_blocks",
                "Blocks the last scrub found corrupt and quarantined (agents resend them).",
                r.corrupt as f64,
            );
        }
        let gc_ok = self.gc_last_success_unix_ms.load(Ordering::Relaxed);
        if gc_ok > 0 {
            f.gauge_value(
                "lifeboat_receiver_gc_last_success_timestamp_seconds",
                "When a GC pass last succeeded.",
                unix_secs(gc_ok),
            );
        }
        if let Some((throttles, retries)) =
            &*self.ebs_client.lock().unwrap_or_else(|e| e.into_inner())
        {
            f.counter_value(
                "lifeboat_receiver_ebs_throttles_total",
                "EBS and EC2 requests refused as throttled (each slows the pace, then retried).",
                throttles.load(Ordering::Relaxed),
            );
            f.counter_value(
                "lifeboat_receiver_ebs_retries_total",
                "EBS and EC2 requests tried again (throttling, 5xx, timeouts).",
                retries.load(Ordering::Relaxed),
            );
        }
        if let Some(fleet) = &*self.fleet.lock().unwrap_or_else(|e| e.into_inner()) {
            let c = fleet.counts();
            f.gauge_value(
                "lifeboat_receiver_fleet_servers_held",
                "Servers whose lease this receiver of a fleet holds now.",
                c.held as f64,
            );
            f.counter_value(
                "lifeboat_receiver_fleet_leases_lost_total",
                "Leases this receiver lost while holding them (a renewal failed, the lease ran \
                 out, another writer appeared): each stops the server's acknowledgements here.",
                c.lost,
            );
            f.counter_value(
                "lifeboat_receiver_fleet_takes_total",
                "Servers taken (their state read from the bucket) since the receiver started.",
                c.taken,
            );
            f.counter_value(
                "lifeboat_receiver_fleet_lock_failures_total",
                "Under S3 Object Lock: points and blocks the lock keeper could not lock as long \
                 as they must be (tried again at each pass).",
                c.lock_failures,
            );
        }
        if let Some(c) = self.store.requests() {
            f.counter_value(
                "lifeboat_receiver_store_requests_total",
                "Requests the staging store sent to S3 (every attempt counts).",
                c.requests,
            );
            f.counter_value(
                "lifeboat_receiver_store_retries_total",
                "S3 requests of the staging store tried again (throttling, 5xx, timeouts).",
                c.retries,
            );
            f.counter_value(
                "lifeboat_receiver_store_throttles_total",
                "S3 requests of the staging store refused as throttled (SlowDown, 503).",
                c.throttles,
            );
        }
        f.render()
    }

    /// Where the store's local files are: `store/`, or with the store in S3 the state
    /// directory (journals and manifests, which fill a disk too).
    fn local_store(&self) -> std::path::PathBuf {
        let store = self.state_dir.join("store");
        if store.is_dir() {
            store
        } else {
            self.state_dir.clone()
        }
    }

    fn check(&self) -> Result<(), String> {
        let store = self.local_store();
        if let Some(why) = self.store.unhealthy() {
            return Err(why);
        }
        let vfs = crate::sys::statvfs(&store)
            .map_err(|e| format!("the store {}: {e}", store.display()))?;
        if vfs.f_flag & libc::ST_RDONLY != 0 {
            return Err(format!(
                "the store's filesystem ({}) is read-only",
                store.display()
            ));
        }
        // A few blocks' room: below it the next batch fails with ENOSPC.
        let avail = vfs.f_bavail as u64 * vfs.f_frsize as u64;
        if avail < 4 * BLOCK_SIZE as u64 {
            return Err(format!(
                "the store's filesystem ({}) is full: {avail} bytes left",
                store.display()
            ));
        }
        Ok(())
    }
}

impl Exporter for ReceiverMetrics {
    fn metrics(&self) -> String {
        self.render()
    }

    fn health(&self) -> Result<(), String> {
        self.check()
    }
}

/// (available, size) in bytes of the filesystem holding `path`.
fn fs_space(path: &Path) -> Option<(u64, u64)> {
    let v = crate::sys::statvfs(path).ok()?;
    let unit = v.f_frsize as u64;
    Some((v.f_bavail as u64 * unit, v.f_blocks as u64 * unit))
}
