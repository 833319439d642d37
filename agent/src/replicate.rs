//! One connection's replication: open the disks (adopting the receiver's manifest when the
//! digests differ, and examining again the blocks where they do), then cycles of scan → send → ack → commit.
//!
//! Sending follows the rules of [`crate::window`] (sans-IO): zero blocks and content known
//! to the receiver go as `Ref`s, the rest is asked about in batched `Have` queries (up to 256
//! hashes, or whatever queued within 2 ms) and sent as data only when the receiver lacks it.
//! At most [`WINDOW`] blocks are unacknowledged at once: that bounds memory and is the
//! backpressure on the scan. An acknowledged block updates the acknowledged manifest; nothing
//! is forgotten before its ack. After a cycle has every block acked, a `Commit` cuts the point.

use crate::link::{Link, LinkError};
use crate::pagesums::PageSums;
use crate::pipeline::Loaded;
use crate::pipeline::{self, Prepared, ScanInput, ScanProgress};
use crate::state::{AgentState, AgentStatus, DiskStatus, StateDir};
use crate::tracker::{ebpf, hashscan::HashScan, Take, Tracker};
pub use crate::window::WINDOW;
use crate::window::{Tally, Window};
use lifeboat_common::block::{block_count, BlockHash};
use lifeboat_common::config::AgentConfig;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::now_ms;
use lifeboat_common::protocol::{Consistency, DiskProgress, DiskState, ErrorCode, Message};
use lifeboat_common::BLOCK_SIZE;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const HAVE_DELAY: Duration = Duration::from_millis(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Persist the acknowledged manifests at least this often during a long cycle.
const PERSIST_EVERY: Duration = Duration::from_secs(10);
/// Silence from the receiver, with blocks outstanding, after which a disk is `stalled` (or a
/// quarter of `[receiver] timeout_secs`, when the connection is dropped, if that is sooner).
const STALLED_AFTER: Duration = Duration::from_secs(15);
/// Most pre-copy passes before a point is cut whatever the dirty set.
const MAX_PRECOPY_PASSES: u32 = 4;

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
    #[error("tracker = \"ebpf\" but {0} (use tracker = \"auto\" to fall back to the hash scan)")]
    Tracker(String),
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
            ReplicateError::Locked(_) | ReplicateError::Tracker(_) => false,
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
    /// The eBPF program behind the trackers, when there is one.
    hub: Option<Arc<ebpf::Hub>>,
    /// Per disk: this cycle's pass examines every block to verify (state `rescan`).
    verifying: Vec<bool>,
    /// Per disk: blocks the current pass examines; and when it began.
    pass_total: Vec<u64>,
    pass_started: Instant,
    pub status: AgentStatus,
    committed_once: Vec<bool>,
    connected_cycle: bool,
    /// Set when a connection got as far as opening the disks.
    pub connected_since: Option<Instant>,
    level: crate::adapt::LevelControl,
    cpu: crate::adapt::CpuSampler,
    /// Per disk: its page sums (`page_sums = true`), see [`crate::pagesums`].
    sums: Vec<Option<Arc<PageSums>>>,
    /// What `/metrics` and `/healthz` render (see [`crate::metrics`]).
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// What a reload (SIGHUP) changes while running (see [`crate::reload`]).
    pub live: Arc<crate::reload::Live>,
    /// Bytes written to earlier connections (the current one counts in its `Link`).
    net_base: u64,
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
        let state_dir_path = cfg.state_dir.clone();
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
        let sums = cfg
            .disks
            .iter()
            .map(|d| {
                cfg.page_sums
                    .then(|| PageSums::open(&cfg.state_dir, &d.id))
                    .and_then(|r| {
                        r.inspect_err(|e| {
                            tracing::warn!(disk = %d.id, "page sums unavailable ({e}): changed blocks a scan finds go whole")
                        })
                        .ok()
                    })
                    .map(Arc::new)
            })
            .collect();
        let (trackers, hub) = make_trackers(&cfg)?;
        for ((d, t), st) in cfg.disks.iter().zip(&trackers).zip(&mut disks) {
            st.tracker = t.name().to_string();
            tracing::info!(disk = %d.id, tracker = t.name(), "tracking {}", d.path.display());
        }
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
        let live = Arc::new(crate::reload::Live::new(&cfg));
        let status_copy = status.clone();
        Ok(Replicator {
            trackers,
            hub,
            verifying: vec![false; n],
            pass_total: vec![0; n],
            pass_started: Instant::now(),
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
            level: crate::adapt::LevelControl::with_bounds(
                live.level_min.clone(),
                live.level_max.clone(),
            ),
            cpu: crate::adapt::CpuSampler::new(),
            sums,
            metrics: Arc::new(crate::metrics::AgentMetrics::new(
                status_copy,
                live.stall_secs.clone(),
                state_dir_path,
            )),
            live,
            net_base: 0,
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
        self.metrics.publish(&self.status);
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
        } else if self.connected_cycle || self.verifying[i] {
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
            if info.size != self.sizes[i] {
                tracing::info!(disk = %d.id, old = self.sizes[i], new = info.size, "the disk changed size");
                self.trackers[i].resized(&d.path);
            }
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
            let theirs = fetch_manifest(link, i as u32, self.sizes[i]).await?;
            // The tracker's marks are relative to what we thought was acknowledged: a block
            // whose hash differs there carries no mark, so it is marked now. (A clean stop
            // with blocks in flight ends here: the receiver journaled some whose acks the
            // agent never read.) A tracker that cannot vouch for its marks verify-scans
            // anyway.
            let differing = differing_blocks(&self.acked[i], &theirs);
            tracing::info!(disk = %self.cfg.disks[i].id, blocks = differing.len(), "receiver's manifest differs from ours; adopting the receiver's and examining those blocks again");
            self.trackers[i].mark(&differing);
            self.acked[i] = theirs;
        }
        self.status.connected = true;
        self.status.last_error = None;
        self.connected_since = Some(Instant::now());
        self.net_base = self.status.network_bytes_sent;
        self.connected_cycle = self.committed_once.iter().all(|c| *c);
        self.persist()?;
        Ok(())
    }

    fn progress_message(
        &mut self,
        outstanding: &[u64],
        progress: &[Arc<ScanProgress>],
        started: Instant,
        stalled: bool,
    ) -> Message {
        let mut disks = Vec::new();
        for i in 0..self.cfg.disks.len() {
            let state = if stalled && outstanding[i] > 0 {
                DiskState::Stalled
            } else {
                self.disk_state(i, started)
            };
            // Dirty and not yet acknowledged: sent and unacknowledged, still to examine in
            // this pass, and marked by the tracker since the pass began.
            let examined = progress[i].examined.load(Ordering::Relaxed);
            let to_examine = self.pass_total[i].saturating_sub(examined);
            let pending = self.trackers.get(i).and_then(|t| t.pending()).unwrap_or(0);
            let backlog = outstanding[i] + to_examine + pending;
            // At the rate this pass examines blocks.
            let secs = self.pass_started.elapsed().as_secs_f64();
            let eta = (examined > 0 && secs > 0.5)
                .then(|| (backlog as f64 * secs / examined as f64).ceil() as u64);
            self.status.disks[i].state = Some(state);
            self.status.disks[i].backlog_blocks = backlog;
            self.status.disks[i].eta_secs = eta;
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

    /// One cycle: pre-copy what changed until the dirty set is small, cut the point (see
    /// [`Replicator::cut`]), send the final delta, commit. With a disk that only a hash scan
    /// tracks, one scan pass and a best-effort point.
    pub async fn cycle(&mut self, link: &mut Link) -> Result<u64, ReplicateError> {
        let started = Instant::now();
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let info = inspect(d)?;
            if info.size != self.sizes[i] {
                return Err(ReplicateError::Resized {
                    disk: d.id.clone(),
                    old: self.sizes[i],
                    new: info.size,
                });
            }
        }
        let tracked = self.trackers.iter().all(|t| t.sees_writes());
        let max_final = self.cfg.freeze_max_delta_mib << 20;
        let mut changed = 0;
        let mut passes = 0;
        // Small enough to read under a freeze already: no pre-copy (it would read the same
        // blocks twice in a cycle).
        let pending_bytes: Option<u64> = self.trackers.iter().map(|t| t.pending_bytes()).sum();
        let precopy = !tracked || pending_bytes.is_none_or(|p| p > max_final);
        if precopy {
            loop {
                let pass_ms = now_ms();
                let takes: Vec<Take> = (0..self.trackers.len())
                    .map(|i| self.trackers[i].take(block_count(self.sizes[i])))
                    .collect();
                for (i, t) in takes.iter().enumerate() {
                    self.verifying[i] =
                        matches!(t, Take::All { .. }) && self.trackers[i].sees_writes();
                    if let (true, Take::All { reason }) = (self.verifying[i], t) {
                        tracing::info!(disk = %self.cfg.disks[i].id, "verify scan: {reason}");
                        self.status.disks[i].verify_scans += 1;
                    }
                }
                let work = PassWork {
                    candidates: self.candidates(&takes),
                    pages: takes.iter().map(Take::pages).collect(),
                    preloaded: Vec::new(),
                };
                match self.pass_all(link, work, started).await {
                    Ok((c, _)) => changed += c,
                    Err(e) => {
                        self.give_back(takes);
                        return Err(e);
                    }
                }
                passes += 1;
                if !tracked {
                    let why = self
                        .trackers
                        .iter()
                        .zip(&self.cfg.disks)
                        .find(|(t, _)| !t.sees_writes())
                        .map(|(t, d)| format!("disk {} is hash-scanned: {}", d.id, t.note()))
                        .unwrap_or_default();
                    self.commit(link, pass_ms, Consistency::BestEffort, why)
                        .await?;
                    self.log_committed(changed, started);
                    return Ok(changed);
                }
                // Pre-copy again while the dirty set is too big to read under a freeze, within
                // the point interval.
                // A verify scan still pending right after one (the tracker keeps losing events,
                // or it stopped) is not converging: cut, best-effort, and say why.
                let pending: Option<u64> = self.trackers.iter().map(|t| t.pending()).sum();
                let pending_bytes: Option<u64> =
                    self.trackers.iter().map(|t| t.pending_bytes()).sum();
                let small = pending_bytes.is_some_and(|p| p <= max_final);
                let stuck = pending.is_none() && self.verifying.iter().any(|v| *v);
                if stuck {
                    // Freezing would only lead to another whole read.
                    let why =
                        "the tracker keeps losing events: verify-scanning every cycle".to_string();
                    self.commit(link, pass_ms, Consistency::BestEffort, why)
                        .await?;
                    self.log_committed(changed, started);
                    return Ok(changed);
                }
                if small || passes >= MAX_PRECOPY_PASSES || started.elapsed() >= self.interval() {
                    break;
                }
            }
        }
        let (takes, cut) = self.cut().await;
        let cut = match cut {
            Ok(c) => c,
            Err(e) => {
                self.give_back(takes);
                return Err(e.into());
            }
        };
        let mut candidates = self.candidates(&takes);
        for (c, l) in candidates.iter_mut().zip(&cut.loaded) {
            // What was read already is a prefix of the take.
            c.drain(..l.len());
        }
        let final_blocks: u64 = takes
            .iter()
            .zip(&self.sizes)
            .map(|(t, s)| t.len(block_count(*s)))
            .sum();
        let (mut consistency, mut why) = (cut.consistency, cut.why);
        let work = PassWork {
            candidates,
            pages: takes.iter().map(Take::pages).collect(),
            preloaded: cut.loaded,
        };
        match self.pass_all(link, work, started).await {
            Ok((c, again)) => {
                changed += c;
                if again > 0 && consistency == Consistency::CrashConsistent {
                    consistency = Consistency::BestEffort;
                    why = format!("{again} blocks of the final delta had to be read again after the thaw (the receiver lacked their base, or named a patch otherwise than expected)");
                }
            }
            Err(e) => {
                self.give_back(takes);
                return Err(e);
            }
        }
        self.status.last_freeze_ms = cut.freeze_ms;
        if let Some(ms) = cut.freeze_ms {
            self.metrics.freeze_seconds.observe(ms as f64 / 1000.0);
        }
        tracing::debug!(final_blocks, passes, "final delta sent");
        self.commit(link, cut.instant_ms, consistency, why).await?;
        self.log_committed(changed, started);
        Ok(changed)
    }

    fn log_committed(&mut self, changed: u64, started: Instant) {
        self.metrics
            .point_seconds
            .observe(started.elapsed().as_secs_f64());
        self.connected_cycle = false;
        self.verifying.iter_mut().for_each(|v| *v = false);
        tracing::info!(
            point = self.agent.last_point.unwrap_or(0),
            changed_blocks = changed,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "point committed"
        );
    }

    fn candidates(&self, takes: &[Take]) -> Vec<Vec<u64>> {
        takes
            .iter()
            .zip(&self.sizes)
            .map(|(t, s)| t.candidates(block_count(*s)))
            .collect()
    }

    fn give_back(&mut self, takes: Vec<Take>) {
        for (t, taken) in self.trackers.iter_mut().zip(takes) {
            t.give_back(taken);
        }
    }

    /// The consistency cut: freeze the mounted filesystems on the disks (unless `freeze` is
    /// off or there are none), note the instant, take every disk's dirty set, read it into
    /// memory, thaw. The point is crash-consistent only if every block of the final delta was
    /// read while every filesystem was still frozen. Returns the takes (to give back if the
    /// cycle fails) and the cut.
    async fn cut(&mut self) -> (Vec<Take>, Result<Cut, pipeline::ScanError>) {
        let mut trackers = std::mem::take(&mut self.trackers);
        let disks: Vec<(String, std::path::PathBuf, u64)> = self
            .cfg
            .disks
            .iter()
            .zip(&self.sizes)
            .map(|(d, s)| (d.id.clone(), d.path.clone(), *s))
            .collect();
        let opts = CutOptions {
            freeze: self.cfg.freeze,
            marker: self.cfg.state_dir.join(crate::freeze::MARKER),
            bound: Duration::from_millis(self.cfg.freeze_timeout_ms),
            max_bytes: self.cfg.freeze_max_delta_mib << 20,
            engine: self.cfg.reader,
            depth: self.cfg.reader_queue_depth,
        };
        let joined = tokio::task::spawn_blocking(move || {
            let r = cut_blocking(&mut trackers, &disks, &opts);
            (trackers, r)
        })
        .await;
        match joined {
            Ok((trackers, (takes, r))) => {
                self.trackers = trackers;
                (takes, r)
            }
            // The agent aborts on any panic (lib.rs): a join error cannot be seen here.
            Err(e) => {
                tracing::error!("the cut task failed: {e}");
                std::process::abort();
            }
        }
    }

    /// One pass: read `candidates` (after `preloaded`) of every disk, in parallel, send what
    /// differs from the acknowledged manifests, and wait until all of it is acknowledged.
    async fn pass(
        &mut self,
        link: &mut Link,
        work: PassWork,
        started: Instant,
    ) -> Result<(u64, Vec<(usize, u64)>), ReplicateError> {
        let PassWork {
            candidates,
            pages,
            preloaded,
        } = work;
        let n = self.cfg.disks.len();
        let workers = if self.cfg.workers == 0 {
            std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(2)
        } else {
            self.cfg.workers
        };
        for (i, (c, p)) in candidates.iter().zip(&preloaded).enumerate() {
            self.pass_total[i] = (c.len() + p.len()) as u64;
        }
        for (i, c) in candidates.iter().enumerate().skip(preloaded.len()) {
            self.pass_total[i] = c.len() as u64;
        }
        self.pass_started = Instant::now();
        let mut preloaded = preloaded.into_iter();
        let mut pages = pages.into_iter();
        let mut inputs = Vec::new();
        for ((i, d), candidates) in self.cfg.disks.iter().enumerate().zip(candidates) {
            let blocks = block_count(self.sizes[i]);
            // Holes of a sparse file are known zero unread (a block device has none).
            let maybe_data = if candidates.is_empty() {
                Vec::new()
            } else {
                inspect(d)?.maybe_data(blocks)
            };
            inputs.push(ScanInput {
                disk: i,
                disk_id: d.id.clone(),
                path: d.path.clone(),
                size: self.sizes[i],
                acked: Arc::new(self.acked[i].clone()),
                candidates,
                pages: pages.next().unwrap_or_default(),
                preloaded: preloaded.next().unwrap_or_default(),
                maybe_data,
                engine: self.cfg.reader,
                depth: self.cfg.reader_queue_depth,
                level: self.level.shared(),
                // Disks are read in parallel: the workers are shared out among them.
                workers: (workers / n).max(1),
                sums: self.sums[i].clone(),
            });
        }
        let progress: Vec<Arc<ScanProgress>> =
            (0..n).map(|_| Arc::new(ScanProgress::default())).collect();
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<Prepared>(WINDOW);
        // (Patches are small: the window holds many more of them than of whole blocks.)
        let driver = {
            let progress = progress.clone();
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = inputs
                        .iter_mut()
                        .map(|input| {
                            let tx = tx.clone();
                            let progress = &progress[input.disk];
                            let cancel = &cancel;
                            s.spawn(move || {
                                let r = pipeline::scan(input, &tx, progress, cancel);
                                if r.is_err() {
                                    cancel.store(true, Ordering::Relaxed);
                                }
                                r
                            })
                        })
                        .collect();
                    drop(tx);
                    let mut stats = Vec::new();
                    let mut first_err = None;
                    for h in handles {
                        match h.join() {
                            Ok(Ok(s)) => stats.push(s),
                            Ok(Err(e)) => {
                                // A cancelled scan is the echo of another's error.
                                if first_err.is_none()
                                    || matches!(first_err, Some(pipeline::ScanError::Cancelled))
                                {
                                    first_err = Some(e);
                                }
                            }
                            Err(_) => first_err = Some(pipeline::ScanError::Cancelled),
                        }
                    }
                    match first_err {
                        Some(e) => Err(e),
                        None => Ok(stats),
                    }
                })
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
        let refused = result?;
        let stats = scanned?;
        for (i, s) in stats.iter().enumerate() {
            self.status.disks[i].reader = s.engine.to_string();
            self.status.disks[i].bytes_read += s.bytes_read;
            self.status.disks[i].fixed_reads += s.fixed_reads;
        }
        Ok((stats.iter().map(|s| s.changed).sum(), refused))
    }

    /// A pass, then the blocks whose patches the receiver could not apply (it lacked their
    /// base), read whole. Returns the blocks changed and how many were read again.
    async fn pass_all(
        &mut self,
        link: &mut Link,
        work: PassWork,
        started: Instant,
    ) -> Result<(u64, usize), ReplicateError> {
        let n = self.cfg.disks.len();
        let (mut changed, mut refused) = self.pass(link, work, started).await?;
        let mut again = 0;
        for _ in 0..3 {
            if refused.is_empty() {
                return Ok((changed, again));
            }
            again += refused.len();
            tracing::info!(
                blocks = refused.len(),
                "some patches went unapplied (the receiver lacked their base) or were named \
                 otherwise than expected (page sums missed a change): reading those blocks whole"
            );
            let mut whole = vec![Vec::new(); n];
            for (d, i) in refused {
                whole[d].push(i);
            }
            for w in &mut whole {
                w.sort_unstable();
                w.dedup();
            }
            let whole = PassWork {
                candidates: whole,
                pages: vec![Default::default(); n],
                preloaded: Vec::new(),
            };
            let (c, r) = self.pass(link, whole, started).await?;
            changed += c;
            refused = r;
        }
        if refused.is_empty() {
            return Ok((changed, again));
        }
        Err(LinkError::Protocol(format!(
            "the receiver refused {} blocks even whole",
            refused.len()
        ))
        .into())
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
    ) -> Result<Vec<(usize, u64)>, ReplicateError> {
        let mut window = Window::new(self.cfg.disks.len());
        // What the disks' blocks cost before this pass; the window counts this pass's.
        let tally_base: Vec<Tally> = self.status.disks.iter().map(|d| d.sent).collect();
        let mut have_deadline = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut last_persist = Instant::now();
        let mut last_heard = Instant::now();
        let mut was_stalled = false;
        let mut scans_done = false;
        let mut examined_before = 0u64;
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
                        self.status.last_ack_unix_ms = Some(now_ms());
                        for a in window.acks(&seqs)? {
                            if let Some(slot) = self.acked[a.disk].hashes.get_mut(a.index as usize) {
                                *slot = a.hash;
                            }
                        }
                    }
                    Message::Named { named } => {
                        self.status.last_ack_unix_ms = Some(now_ms());
                        for a in window.named(&named)? {
                            if let Some(slot) = self.acked[a.disk].hashes.get_mut(a.index as usize) {
                                *slot = a.hash;
                            }
                        }
                    }
                    Message::NeedData { seq } => window.need_data(seq, link.out_buf())?,
                    other => return Err(LinkError::Protocol(format!("unexpected {} while sending blocks", other.name())).into()),
                },
                _ = tick.tick() => {
                    lifeboat_common::sd_notify::watchdog();
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
                    // Blocks out with a receiver that has said nothing for a while.
                    let stalled = window.awaiting_receiver()
                        && last_heard.elapsed() > STALLED_AFTER.min(link.reply_timeout / 4);
                    if stalled && !was_stalled {
                        tracing::warn!(
                            silent_secs = last_heard.elapsed().as_secs(),
                            "the receiver is silent with blocks outstanding: stalled"
                        );
                    }
                    was_stalled = stalled;
                    // A scan that examines blocks is alive, acknowledged or not (a verify
                    // scan of a large disk that finds nothing changed sends nothing).
                    let examined: u64 = progress.iter().map(|p| p.examined.load(Ordering::Relaxed)).sum();
                    if examined > examined_before {
                        examined_before = examined;
                        self.status.last_ack_unix_ms = Some(now_ms());
                    }
                    let m = self.progress_message(&window.outstanding, progress, started, stalled);
                    link.queue(&m);
                    self.count_sent(link, &tally_base, &window);
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
                self.count_sent(link, &tally_base, &window);
                self.status.patches_sent += window.patches_sent;
                self.status.patches_mismatched += window.patches_mismatched;
                return Ok(std::mem::take(&mut window.refused));
            }
        }
    }

    /// Brings the status's wire counters up to date: `base` (before this pass) plus what
    /// `window` counted, and the connection's bytes.
    fn count_sent(&mut self, link: &Link, base: &[Tally], window: &Window) {
        for ((d, b), w) in self.status.disks.iter_mut().zip(base).zip(&window.tally) {
            d.sent = *b + *w;
        }
        self.status.bytes_sent = link.bytes_sent;
        self.status.network_bytes_sent = self.net_base + link.bytes_sent;
    }

    async fn commit(
        &mut self,
        link: &mut Link,
        created_unix_ms: u64,
        consistency: Consistency,
        why: String,
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
            consistency,
            why: why.clone(),
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
                        self.trackers[i].give_back(Take::All {
                            reason:
                                "the receiver refused a point's digests (its manifest was adopted)"
                                    .into(),
                        });
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
        for t in &mut self.trackers {
            t.settle();
        }
        self.agent.last_point = Some(point);
        self.agent.last_point_unix_ms = Some(created_unix_ms);
        self.agent.next_point = point + 1;
        for c in &mut self.committed_once {
            *c = true;
        }
        self.status.last_point = Some(point);
        self.status.last_point_unix_ms = Some(created_unix_ms);
        self.status.last_point_consistency = Some(consistency);
        self.status.last_point_why = why;
        self.status.bytes_sent = link.bytes_sent;
        self.status.network_bytes_sent = self.net_base + link.bytes_sent;
        self.status.points_committed += 1;
        self.status.last_ack_unix_ms = Some(now_ms());
        for d in &mut self.status.disks {
            d.state = Some(DiskState::Continuous);
            d.backlog_blocks = 0;
            d.eta_secs = None;
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
            lifeboat_common::sd_notify::watchdog();
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

    /// On a clean stop: hands the tracker's state to the next agent (see
    /// [`crate::tracker::ebpf::pin`]).
    pub fn stop_tracking(&mut self) {
        let Some(hub) = self.hub.take() else { return };
        match hub.stop() {
            Some(r) => match ebpf::pin::save(&self.cfg.state_dir, &r) {
                Ok(()) => tracing::info!(
                    "tracking state saved: the next start goes on without a verify scan"
                ),
                Err(e) => {
                    tracing::warn!("saving the tracking state: {e}; the next start verify-scans")
                }
            },
            None => tracing::info!("tracking not pinned: the next start verify-scans"),
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
        // A huge disk's manifest takes a while: progress keeps systemd's watchdog fed.
        lifeboat_common::sd_notify::watchdog();
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

/// The blocks whose hashes differ between two manifests of one disk (a block past the end
/// of one counts as zero there).
fn differing_blocks(ours: &Manifest, theirs: &Manifest) -> Vec<u64> {
    let n = ours.hashes.len().max(theirs.hashes.len());
    let at = |m: &Manifest, i: usize| m.hashes.get(i).copied().unwrap_or(BlockHash::ZERO);
    (0..n)
        .filter(|&i| at(ours, i) != at(theirs, i))
        .map(|i| i as u64)
        .collect()
}

/// Picks each disk's tracker as `tracker` in agent.toml asks (see [`crate::tracker`]).
#[allow(clippy::type_complexity)]
fn make_trackers(
    cfg: &AgentConfig,
) -> Result<(Vec<Box<dyn Tracker>>, Option<Arc<ebpf::Hub>>), ReplicateError> {
    use lifeboat_common::config::TrackerKind;
    let scan = |why: String| Box::new(HashScan { why }) as Box<dyn Tracker>;
    if cfg.tracker == TrackerKind::Scan {
        return Ok((
            cfg.disks
                .iter()
                .map(|_| scan("tracker = \"scan\" in agent.toml".into()))
                .collect(),
            None,
        ));
    }
    let resolved: Vec<Result<ebpf::DeviceSpan, String>> = cfg
        .disks
        .iter()
        .map(|d| ebpf::resolve(&d.path).map_err(|e| e.to_string()))
        .collect();
    if cfg.tracker == TrackerKind::Ebpf {
        if let Some(Err(e)) = resolved.iter().find(|r| r.is_err()) {
            return Err(ReplicateError::Tracker(e.clone()));
        }
    }
    let spans: Vec<(String, ebpf::DeviceSpan)> = cfg
        .disks
        .iter()
        .zip(&resolved)
        .filter_map(|(d, r)| Some((d.id.clone(), r.clone().ok()?)))
        .collect();
    // Pinned, tracking goes on across a restart of the agent (see `ebpf::pin`).
    let pin_dir = match ebpf::pin::ensure_bpffs() {
        Ok(()) => Some(ebpf::pin::dir_for(&cfg.state_dir)),
        Err(e) => {
            tracing::warn!("bpffs is not mounted at /sys/fs/bpf and cannot be ({e}): every restart of the agent will verify-scan its disks");
            None
        }
    };
    let resume = ebpf::pin::take_saved(&cfg.state_dir);
    let hub = if spans.is_empty() {
        Err("no disk is a block device the tracker can see".to_string())
    } else {
        ebpf::Hub::start(&spans, cfg.ebpf_ring_buffer_kib, pin_dir, resume)
            .map_err(|e| e.to_string())
    };
    if let (TrackerKind::Ebpf, Err(e)) = (cfg.tracker, &hub) {
        return Err(ReplicateError::Tracker(e.clone()));
    }
    let mut slot = 0;
    let mut out = Vec::new();
    let shared = hub.as_ref().ok().cloned();
    for (d, r) in cfg.disks.iter().zip(resolved) {
        let t = match (&hub, r) {
            (Ok(hub), Ok(_)) => {
                slot += 1;
                Box::new(ebpf::EbpfTracker::new(hub.clone(), slot - 1)) as Box<dyn Tracker>
            }
            (hub, r) => {
                let why = match (r, hub) {
                    (Err(why), _) => why,
                    (_, Err(why)) => why.clone(),
                    (Ok(_), Ok(_)) => String::new(),
                };
                tracing::warn!(disk = %d.id, "no eBPF tracking ({why}): hash scan instead, points are best-effort");
                scan(why)
            }
        };
        out.push(t);
    }
    Ok((out, shared))
}

/// What a pass reads, per disk: the blocks, the pages written of the partly written ones,
/// and what was read already (the final delta, under a freeze).
struct PassWork {
    candidates: Vec<Vec<u64>>,
    pages: Vec<std::collections::HashMap<u64, u128>>,
    preloaded: Vec<Vec<Loaded>>,
}

/// How to cut a point.
struct CutOptions {
    freeze: bool,
    /// Records a freeze in progress (see `freeze::freeze`).
    marker: std::path::PathBuf,
    bound: Duration,
    max_bytes: u64,
    engine: lifeboat_common::config::ReaderEngine,
    depth: usize,
}

/// A cut: the point's instant, its final delta (read, as far as it was), and its consistency.
struct Cut {
    instant_ms: u64,
    loaded: Vec<Vec<Loaded>>,
    consistency: Consistency,
    why: String,
    freeze_ms: Option<u64>,
}

fn cut_blocking(
    trackers: &mut [Box<dyn Tracker>],
    disks: &[(String, std::path::PathBuf, u64)],
    opts: &CutOptions,
) -> (Vec<Take>, Result<Cut, pipeline::ScanError>) {
    let mut why = String::new();
    let mut frozen = None;
    if !opts.freeze {
        why = "freeze = false in agent.toml".into();
    } else {
        let paths: Vec<std::path::PathBuf> = disks.iter().map(|d| d.1.clone()).collect();
        match crate::freeze::mounts_on(&paths) {
            Ok(m) if m.is_empty() => why = "no mounted filesystem on the disks to freeze".into(),
            Ok(m) => match crate::freeze::freeze(&m, opts.bound, &opts.marker) {
                Ok(f) => {
                    // For the tests of thawing (an agent killed, or too slow, while frozen).
                    if let Some(ms) = std::env::var("LIFEBOAT_TEST_HOLD_FREEZE_MS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                    {
                        tracing::warn!("test hook: holding the freeze of {m:?} for {ms} ms");
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    frozen = Some(f)
                }
                Err(e) => {
                    tracing::warn!("{e}; this point is best-effort");
                    why = e.to_string();
                }
            },
            Err(e) => why = e.to_string(),
        }
    }
    let instant_ms = now_ms();
    let deadline = Instant::now() + opts.bound;
    let takes: Vec<Take> = trackers
        .iter_mut()
        .zip(disks)
        .map(|(t, d)| t.take(block_count(d.2)))
        .collect();
    let total: u64 = takes
        .iter()
        .zip(disks)
        .map(|(t, d)| t.len(block_count(d.2)))
        .sum();
    // What the final read costs: whole blocks, or the pages of partly written ones and a
    // fixed cost per read (`tracker::dirty::read_cost`).
    let total_bytes: u64 = takes
        .iter()
        .zip(disks)
        .map(|(t, d)| match t {
            Take::All { .. } => d.2,
            Take::Blocks(b) => b
                .blocks
                .iter()
                .map(|&i| match pipeline::patch_runs(&b.pages, i, d.2) {
                    Some((mask, _)) => crate::tracker::dirty::read_cost(mask),
                    None => BLOCK_SIZE as u64,
                })
                .sum(),
        })
        .sum();
    let best_effort = |why: String, loaded| Cut {
        instant_ms,
        loaded,
        consistency: Consistency::BestEffort,
        why,
        freeze_ms: None,
    };
    let verify = takes.iter().zip(disks).find_map(|(t, d)| match t {
        Take::All { reason } => Some(format!("disk {} needs a verify scan ({reason})", d.0)),
        Take::Blocks(_) => None,
    });
    if let Some(why) = verify {
        drop(frozen);
        return (takes, Ok(best_effort(why, Vec::new())));
    }
    if total_bytes > opts.max_bytes {
        drop(frozen);
        return (takes, Ok(best_effort(format!(
            "writes outpaced pre-copy: the final delta of {} MiB is over freeze_max_delta_mib ({} MiB)",
            total_bytes >> 20,
            opts.max_bytes >> 20
        ), Vec::new())));
    }
    // Read every disk's final delta at once, each disk on its own thread.
    let reads: Vec<Result<Vec<Loaded>, pipeline::ScanError>> = std::thread::scope(|s| {
        let handles: Vec<_> = takes
            .iter()
            .zip(disks)
            .map(|(t, d)| {
                s.spawn(move || match t {
                    Take::Blocks(b) => {
                        let disk = pipeline::DiskRead {
                            disk_id: &d.0,
                            path: &d.1,
                            engine: opts.engine,
                            depth: opts.depth,
                            size: d.2,
                        };
                        pipeline::read_blocks(&disk, &b.blocks, &b.pages, deadline)
                    }
                    Take::All { .. } => Ok(Vec::new()),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(pipeline::ScanError::Cancelled)))
            .collect()
    });
    let mut loaded = Vec::new();
    for r in reads {
        match r {
            Ok(l) => loaded.push(l),
            Err(e) => {
                drop(frozen);
                return (takes, Err(e));
            }
        }
    }
    let read_all = loaded.iter().map(|l| l.len() as u64).sum::<u64>() == total;
    let Some(f) = frozen else {
        return (takes, Ok(best_effort(why, loaded)));
    };
    let held = f.since.elapsed();
    let freeze_ms = Some(held.as_millis() as u64);
    let (consistency, why) = match f.thaw() {
        Ok(true) if read_all => (
            Consistency::CrashConsistent,
            format!("filesystems frozen for {} ms while {total} blocks were read", held.as_millis()),
        ),
        Ok(true) => (
            Consistency::BestEffort,
            format!("the final delta was not read within freeze_timeout_ms ({} ms)", opts.bound.as_millis()),
        ),
        Ok(false) => (
            Consistency::BestEffort,
            "the filesystems were thawed before the final delta was read (the freeze bound passed, or someone thawed them)".into(),
        ),
        Err(e) => (Consistency::BestEffort, format!("thawing: {e}")),
    };
    if consistency == Consistency::BestEffort {
        tracing::warn!("{why}; this point is best-effort");
    }
    (
        takes,
        Ok(Cut {
            instant_ms,
            loaded,
            consistency,
            why,
            freeze_ms,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocks_that_differ_are_exactly_those_whose_hashes_differ() {
        let mut ours = Manifest::zeroed(4 * BLOCK_SIZE as u64);
        let mut theirs = ours.clone();
        ours.hashes[1] = BlockHash([1; 32]);
        theirs.hashes[1] = BlockHash([1; 32]);
        theirs.hashes[2] = BlockHash([2; 32]);
        assert_eq!(differing_blocks(&ours, &theirs), vec![2]);
        // Longer on their side: a block past our end counts as zero.
        theirs.resize(6 * BLOCK_SIZE as u64);
        theirs.hashes[5] = BlockHash([5; 32]);
        assert_eq!(differing_blocks(&ours, &theirs), vec![2, 5]);
        assert_eq!(differing_blocks(&theirs, &ours), vec![2, 5]);
        assert!(differing_blocks(&ours, &ours).is_empty());
    }
}
