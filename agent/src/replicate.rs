//! One connection's replication: open the disks (adopting the receiver's manifest when the
//! digests differ), then cycles of scan → send → ack → commit.
//!
//! Sending follows the rules of [`crate::window`] (sans-IO): zero blocks and content known
//! to the receiver go as `Ref`s, the rest is asked about in batched `Have` queries (up to 256
//! hashes, or whatever queued within 2 ms) and sent as data only when the receiver lacks it.
//! At most [`WINDOW`] blocks are unacknowledged at once: that bounds memory and is the
//! backpressure on the scan. An acknowledged block updates the acknowledged manifest; nothing
//! is forgotten before its ack. After a cycle has every block acked, a `Commit` cuts the point.

use crate::link::{Link, LinkError};
use crate::pipeline::{self, Prepared, ScanInput, ScanProgress};
use crate::state::{AgentState, AgentStatus, DiskStatus, StateDir};
use crate::tracker::{hashscan::HashScan, Tracker};
use crate::window::Window;
pub use crate::window::WINDOW;
use lifeboat_common::block::block_count;
use lifeboat_common::config::AgentConfig;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::now_ms;
use lifeboat_common::protocol::{Consistency, DiskProgress, DiskState, ErrorCode, Message};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const HAVE_DELAY: Duration = Duration::from_millis(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Persist the acknowledged manifests at least this often during a long cycle.
const PERSIST_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Scan(#[from] pipeline::ScanError),
    #[error("disk {disk}: {path}: {source}")]
    Source {
        disk: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk {disk} changed size from {old} to {new} bytes; reconnecting to describe it again"
    )]
    Resized { disk: String, old: u64, new: u64 },
    #[error(transparent)]
    Locked(#[from] lifeboat_common::lock::LockError),
    #[error("saving agent state in {path}: {source}")]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl ReplicateError {
    pub fn retryable(&self) -> bool {
        match self {
            ReplicateError::Link(l) => l.retryable(),
            ReplicateError::Locked(_) => false,
            _ => true,
        }
    }
}

pub struct Replicator {
    cfg: AgentConfig,
    pub server_id: String,
    /// Tells the receiver which machine this is (see [`crate::identity`]).
    pub identity: crate::identity::Identity,
    state: StateDir,
    pub agent: AgentState,
    pub acked: Vec<Manifest>,
    sizes: Vec<u64>,
    trackers: Vec<Box<dyn Tracker>>,
    pub status: AgentStatus,
    committed_once: Vec<bool>,
    connected_cycle: bool,
    /// Set when a connection got as far as opening the disks.
    pub connected_since: Option<Instant>,
    level: crate::adapt::LevelControl,
    cpu: crate::adapt::CpuSampler,
    _lock: lifeboat_common::lock::DirLock,
}

impl Replicator {
    pub fn new(cfg: AgentConfig) -> Result<Replicator, ReplicateError> {
        let state = StateDir::open(&cfg.state_dir).map_err(|source| ReplicateError::State {
            path: cfg.state_dir.clone(),
            source,
        })?;
        // One agent per state directory (and so per config).
        let lock = lifeboat_common::lock::lock_dir(&cfg.state_dir, "agent")?;
        let agent = state.load_agent();
        let server_id = cfg.server_id();
        let identity =
            crate::identity::load(&cfg.state_dir).map_err(|source| ReplicateError::State {
                path: cfg.state_dir.clone(),
                source,
            })?;
        let mut acked = Vec::new();
        let mut sizes = Vec::new();
        let mut disks = Vec::new();
        for d in &cfg.disks {
            let size = crate::source::inspect(&d.path).map(|i| i.size).unwrap_or(0);
            acked.push(state.load_manifest(&d.id, size));
            sizes.push(size);
            disks.push(DiskStatus {
                id: d.id.clone(),
                path: d.path.clone(),
                size,
                ..Default::default()
            });
        }
        let n = cfg.disks.len();
        let cfg_level = (cfg.compression_level, cfg.compression_level_max);
        let status = AgentStatus {
            server_id: server_id.clone(),
            instance: identity.instance.clone(),
            receiver: cfg.receiver.address.clone(),
            pid: std::process::id(),
            last_point: agent.last_point,
            last_point_unix_ms: agent.last_point_unix_ms,
            disks,
            ..Default::default()
        };
        Ok(Replicator {
            trackers: (0..n)
                .map(|_| Box::new(HashScan) as Box<dyn Tracker>)
                .collect(),
            committed_once: vec![agent.last_point.is_some(); n],
            cfg,
            server_id,
            identity,
            state,
            agent,
            acked,
            sizes,
            status,
            connected_cycle: false,
            connected_since: None,
            level: crate::adapt::LevelControl::new(cfg_level.0, cfg_level.1),
            cpu: crate::adapt::CpuSampler::new(),
            _lock: lock,
        })
    }

    fn state_err(&self, source: std::io::Error) -> ReplicateError {
        ReplicateError::State {
            path: self.state.root().to_path_buf(),
            source,
        }
    }

    /// Writes the acknowledged manifests and agent.json.
    pub fn persist(&mut self) -> Result<(), ReplicateError> {
        for (d, m) in self.cfg.disks.iter().zip(&self.acked) {
            self.state
                .save_manifest(&d.id, m)
                .map_err(|e| self.state_err(e))?;
        }
        self.state
            .save_agent(&self.agent)
            .map_err(|e| self.state_err(e))?;
        self.save_status();
        Ok(())
    }

    pub fn save_status(&mut self) {
        self.status.updated_unix_ms = now_ms();
        if let Err(e) = self.state.save_status(&self.status) {
            tracing::warn!("writing {}/status.json: {e}", self.state.root().display());
        }
    }

    pub fn set_disconnected(&mut self, error: Option<String>) {
        self.status.connected = false;
        self.status.last_error = error;
        for d in &mut self.status.disks {
            d.state = Some(DiskState::Disconnected);
        }
        self.save_status();
    }

    fn disk_state(&self, i: usize, started: Instant) -> DiskState {
        if !self.committed_once[i] {
            DiskState::InitialSync
        } else if self.connected_cycle {
            DiskState::Rescan
        } else if started.elapsed() > Duration::from_secs(self.cfg.point_interval_secs * 2) {
            DiskState::Backlog
        } else {
            DiskState::Continuous
        }
    }

    /// Describes every disk to the receiver; adopts its manifest where the digests differ.
    pub async fn open_disks(&mut self, link: &mut Link) -> Result<(), ReplicateError> {
        self.agent.next_point = self.agent.next_point.max(link.receiver_last_point + 1);
        if link.receiver_last_point > 0 {
            for c in &mut self.committed_once {
                *c = true;
            }
        }
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let info = inspect(d)?;
            self.sizes[i] = info.size;
            self.acked[i].resize(info.size);
            self.status.disks[i].size = info.size;
            link.queue(&Message::OpenDisk {
                handle: i as u32,
                disk_id: d.id.clone(),
                size: info.size,
            });
        }
        link.flush().await?;
        let mut differ = Vec::new();
        for _ in 0..self.cfg.disks.len() {
            match link.recv(link.reply_timeout).await? {
                Message::DiskOpened { handle, digest } => {
                    let i = handle as usize;
                    if i >= self.cfg.disks.len() {
                        return Err(LinkError::Protocol(format!(
                            "DiskOpened for unknown handle {handle}"
                        ))
                        .into());
                    }
                    if self.acked[i].digest() != digest {
                        differ.push(i);
                    }
                }
                other => {
                    return Err(LinkError::Protocol(format!(
                        "expected DiskOpened, got {}",
                        other.name()
                    ))
                    .into())
                }
            }
        }
        for i in differ {
            tracing::info!(disk = %self.cfg.disks[i].id, "receiver's manifest differs from ours; adopting the receiver's");
            self.acked[i] = fetch_manifest(link, i as u32, self.sizes[i]).await?;
        }
        self.status.connected = true;
        self.status.last_error = None;
        self.connected_since = Some(Instant::now());
        self.connected_cycle = self.committed_once.iter().all(|c| *c);
        self.persist()?;
        Ok(())
    }

    fn progress_message(
        &mut self,
        outstanding: &[u64],
        progress: &[Arc<ScanProgress>],
        started: Instant,
    ) -> Message {
        let mut disks = Vec::new();
        for i in 0..self.cfg.disks.len() {
            let state = self.disk_state(i, started);
            let mut backlog = outstanding[i];
            if state == DiskState::InitialSync {
                let blocks = block_count(self.sizes[i]);
                backlog += blocks.saturating_sub(progress[i].examined.load(Ordering::Relaxed));
            }
            self.status.disks[i].state = Some(state);
            self.status.disks[i].backlog_blocks = backlog;
            disks.push(DiskProgress {
                handle: i as u32,
                state,
                backlog_blocks: backlog,
            });
        }
        Message::Progress {
            agent_unix_ms: now_ms(),
            disks,
        }
    }

    /// A line per disk on long cycles, so the log shows an initial sync advancing.
    fn log_progress(&self, progress: &[Arc<ScanProgress>], bytes_sent: u64, started: Instant) {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let blocks = block_count(self.sizes[i]).max(1);
            let examined = progress[i].examined.load(Ordering::Relaxed);
            tracing::info!(
                disk = %d.id,
                state = self.status.disks[i].state.map(|s| s.as_str()).unwrap_or("-"),
                "{:.0}% examined ({examined}/{blocks} blocks), {} changed, {:.0} MiB sent at {:.0} MiB/s",
                examined as f64 * 100.0 / blocks as f64,
                progress[i].changed.load(Ordering::Relaxed),
                bytes_sent as f64 / (1 << 20) as f64,
                bytes_sent as f64 / (1 << 20) as f64 / secs,
            );
        }
    }

    /// One cycle: scan every disk, send what changed, wait for every ack, commit a point.
    pub async fn cycle(&mut self, link: &mut Link) -> Result<u64, ReplicateError> {
        let started = Instant::now();
        let started_ms = now_ms();
        let n = self.cfg.disks.len();
        let workers = if self.cfg.workers == 0 {
            std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(2)
        } else {
            self.cfg.workers
        };
        let mut inputs = Vec::new();
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let info = inspect(d)?;
            if info.size != self.sizes[i] {
                return Err(ReplicateError::Resized {
                    disk: d.id.clone(),
                    old: self.sizes[i],
                    new: info.size,
                });
            }
            let blocks = block_count(info.size);
            inputs.push(ScanInput {
                disk: i,
                disk_id: d.id.clone(),
                path: d.path.clone(),
                size: info.size,
                acked: Arc::new(self.acked[i].clone()),
                candidates: self.trackers[i].candidates(blocks),
                maybe_data: info.maybe_data(blocks),
                engine: self.cfg.reader,
                level: self.level.shared(),
                workers,
            });
        }
        let progress: Vec<Arc<ScanProgress>> =
            (0..n).map(|_| Arc::new(ScanProgress::default())).collect();
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<Prepared>(WINDOW);
        let driver = {
            let progress = progress.clone();
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || {
                let mut stats = Vec::new();
                for input in &inputs {
                    let s = pipeline::scan(input, &tx, &progress[input.disk], &cancel)?;
                    tracing::debug!(disk = %input.disk_id, ?s, "scan done");
                    stats.push(s);
                }
                Ok::<_, pipeline::ScanError>(stats)
            })
        };
        let result = self.send_loop(link, &mut rx, &progress, started).await;
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        drop(rx);
        let scanned = driver
            .await
            .map_err(|e| LinkError::Protocol(format!("scan task failed: {e}")))?;
        result?;
        let stats = scanned?;
        let changed: u64 = stats.iter().map(|s| s.changed).sum();
        for (i, s) in stats.iter().enumerate() {
            self.status.disks[i].reader = s.engine.to_string();
        }
        self.commit(link, started_ms).await?;
        self.connected_cycle = false;
        tracing::info!(
            point = self.agent.last_point.unwrap_or(0),
            changed_blocks = changed,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "point committed"
        );
        Ok(changed)
    }

    /// Feeds the send window ([`crate::window`]) from the pipeline and the link until every
    /// prepared block is acknowledged. The decisions are the window's; this loop does the
    /// I/O, the timers, progress and the compression level.
    async fn send_loop(
        &mut self,
        link: &mut Link,
        rx: &mut mpsc::Receiver<Prepared>,
        progress: &[Arc<ScanProgress>],
        started: Instant,
    ) -> Result<(), ReplicateError> {
        let mut window = Window::new(self.cfg.disks.len());
        let mut have_deadline = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut last_persist = Instant::now();
        let mut last_heard = Instant::now();
        let mut scans_done = false;
        // For the compression level: how long, in this period, the sender was held up by the
        // network (window full, or writing).
        let mut period_start = Instant::now();
        let mut full_since: Option<Instant> = None;
        let mut full_time = Duration::ZERO;

        loop {
            tokio::select! {
                p = rx.recv(), if window.has_room() && !scans_done => match p {
                    None => scans_done = true,
                    Some(p) => {
                        if window.offer(p, link.out_buf()) {
                            have_deadline = tokio::time::Instant::now() + HAVE_DELAY;
                        }
                    }
                },
                _ = tokio::time::sleep_until(have_deadline), if window.pending_queries() > 0 => {}
                m = link.recv(link.reply_timeout) => match m.inspect(|_| last_heard = Instant::now())? {
                    Message::HaveReply { req, present } => window.have_reply(req, &present, link.out_buf())?,
                    Message::Acks { seqs } => {
                        for a in window.acks(&seqs) {
                            if let Some(slot) = self.acked[a.disk].hashes.get_mut(a.index as usize) {
                                *slot = a.hash;
                            }
                        }
                    }
                    Message::NeedData { seq } => window.need_data(seq, link.out_buf())?,
                    other => return Err(LinkError::Protocol(format!("unexpected {} while sending blocks", other.name())).into()),
                },
                _ = tick.tick() => {
                    // The other branches keep re-arming the receive timeout; this catches a
                    // receiver that has gone silent with blocks outstanding.
                    if window.awaiting_receiver() && last_heard.elapsed() > link.reply_timeout {
                        return Err(LinkError::Timeout(link.reply_timeout.as_secs()).into());
                    }
                    // `full_since` is kept current at the end of every turn of the loop.
                    let now = Instant::now();
                    if let Some(t) = full_since {
                        full_time += now - t;
                        full_since = Some(now);
                    }
                    let idle = self.cpu.idle_share();
                    let period = now - period_start;
                    let changed = self.level.period(full_time, period, !scans_done, idle);
                    tracing::debug!(
                        network_share = format!("{:.2}", full_time.as_secs_f64() / period.as_secs_f64().max(1e-9)),
                        cpu_idle = format!("{:.2}", idle.unwrap_or(-1.0)),
                        producing = !scans_done,
                        level = self.level.level(),
                        changed = changed.is_some(),
                        "compression period"
                    );
                    self.status.compression_level = self.level.level();
                    period_start = now;
                    full_time = Duration::ZERO;
                    let m = self.progress_message(&window.outstanding, progress, started);
                    link.queue(&m);
                    self.status.bytes_sent = link.bytes_sent;
                    if last_persist.elapsed() >= PERSIST_EVERY {
                        last_persist = Instant::now();
                        self.persist()?;
                        self.log_progress(progress, link.bytes_sent, started);
                    } else {
                        self.save_status();
                    }
                }
            }
            let due = tokio::time::Instant::now() >= have_deadline || scans_done;
            window.query(due, link.out_buf());
            // Time spent writing (and in the bandwidth limiter) is network-bound time.
            let writing = Instant::now();
            link.flush().await?;
            full_time += writing.elapsed();
            match (!window.has_room(), full_since) {
                (true, None) => full_since = Some(Instant::now()),
                (false, Some(t)) => {
                    full_time += t.elapsed();
                    full_since = None;
                }
                _ => {}
            }
            if scans_done && window.is_empty() {
                return Ok(());
            }
        }
    }

    async fn commit(
        &mut self,
        link: &mut Link,
        created_unix_ms: u64,
    ) -> Result<(), ReplicateError> {
        let point = self.agent.next_point;
        let disks = self
            .acked
            .iter()
            .enumerate()
            .map(|(i, m)| (i as u32, m.digest()))
            .collect();
        link.queue(&Message::Commit {
            point,
            created_unix_ms,
            consistency: Consistency::BestEffort,
            disks,
        });
        link.flush().await?;
        loop {
            match link.recv(link.reply_timeout).await {
                Ok(Message::Committed { point: p }) if p == point => break,
                Ok(Message::Acks { .. }) => {}
                Ok(other) => {
                    return Err(LinkError::Protocol(format!(
                        "expected Committed {point}, got {}",
                        other.name()
                    ))
                    .into())
                }
                Err(LinkError::Refused {
                    code: ErrorCode::DigestMismatch,
                    message,
                    ..
                }) => {
                    // Our view differs from the receiver's: take its manifests, rescan.
                    tracing::warn!("point {point} not committed: {message}; re-reading the receiver's manifests");
                    for i in 0..self.acked.len() {
                        self.acked[i] = fetch_manifest(link, i as u32, self.sizes[i]).await?;
                    }
                    self.persist()?;
                    return Err(LinkError::Refused {
                        code: ErrorCode::DigestMismatch,
                        retryable: true,
                        message,
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.agent.last_point = Some(point);
        self.agent.last_point_unix_ms = Some(created_unix_ms);
        self.agent.next_point = point + 1;
        for c in &mut self.committed_once {
            *c = true;
        }
        self.status.last_point = Some(point);
        self.status.last_point_unix_ms = Some(created_unix_ms);
        self.status.bytes_sent = link.bytes_sent;
        for d in &mut self.status.disks {
            d.state = Some(DiskState::Continuous);
            d.backlog_blocks = 0;
        }
        link.queue(&self.idle_progress());
        link.flush().await?;
        self.persist()
    }

    /// Progress between cycles: every disk is caught up.
    fn idle_progress(&self) -> Message {
        let disks = (0..self.cfg.disks.len())
            .map(|i| DiskProgress {
                handle: i as u32,
                state: DiskState::Continuous,
                backlog_blocks: 0,
            })
            .collect();
        Message::Progress {
            agent_unix_ms: now_ms(),
            disks,
        }
    }

    /// Waits until `deadline`, keeping the connection alive with Progress messages.
    pub async fn idle(&mut self, link: &mut Link, deadline: Instant) -> Result<(), ReplicateError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let wait = (deadline - now).min(PROGRESS_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    link.queue(&self.idle_progress());
                    link.flush().await?;
                }
                m = link.recv(Duration::from_secs(3600)) => {
                    let m = m?;
                    return Err(LinkError::Protocol(format!("unexpected {} while idle", m.name())).into());
                }
            }
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.cfg.point_interval_secs)
    }
}

fn inspect(
    d: &lifeboat_common::config::DiskConfig,
) -> Result<crate::source::SourceInfo, ReplicateError> {
    crate::source::inspect(&d.path).map_err(|source| ReplicateError::Source {
        disk: d.id.clone(),
        path: d.path.clone(),
        source,
    })
}

async fn fetch_manifest(
    link: &mut Link,
    handle: u32,
    size: u64,
) -> Result<Manifest, ReplicateError> {
    link.queue(&Message::GetManifest { handle });
    link.flush().await?;
    let mut m = Manifest::zeroed(size);
    let total = m.hashes.len() as u64;
    let mut got = 0u64;
    while got < total {
        match link.recv(link.reply_timeout).await? {
            Message::ManifestChunk {
                handle: h,
                start,
                total: t,
                hashes,
            } if h == handle && t == total => {
                let end = start as usize + hashes.len();
                if start != got || end as u64 > total {
                    return Err(LinkError::Protocol(format!(
                        "manifest chunk {start}..{end} out of order (expected from {got})"
                    ))
                    .into());
                }
                m.hashes[start as usize..end].copy_from_slice(&hashes);
                got = end as u64;
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected ManifestChunk for handle {handle}, got {}",
                    other.name()
                ))
                .into())
            }
        }
    }
    if total == 0 {
        // An empty disk still gets one (empty) chunk.
        let _ = link.recv(link.reply_timeout).await?;
    }
    Ok(m)
}
