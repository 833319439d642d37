//! The TLS listener: many agents at once, one task per connection.
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, tell every connection to stop reading, let each
//! finish the batch it holds (so everything it acks is durable), wait up to the grace period.
//!
//! Panics: the receiver unwinds (release profile `panic = "unwind"`). A panic in one agent's
//! session ends that session only, logged as an error; its state is on disk and is reread at
//! the agent's next connection. Shared state survives it: every lock is taken with
//! `unwrap_or_else(into_inner)`, and what a panicked batch left half done was never acked.

mod connection;
mod session;

#[cfg(any(test, feature = "fuzzing"))]
pub use session::drive_session;

use crate::auth::Tokens;
use crate::catalog::Catalog;
use crate::snapshots::local::LocalTarget;
use crate::snapshots::SnapshotTarget;
use crate::store::{BlockStore, DirStore};
use anyhow::Context;
use lifeboat_common::config::ReceiverConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Everything connections share.
pub struct Shared {
    pub state_dir: PathBuf,
    pub store: Arc<dyn BlockStore>,
    pub catalog: Catalog,
    pub target: Box<dyn SnapshotTarget>,
    pub tokens: Tokens,
    pub config: ReceiverConfig,
    /// Batches that check presence and record blocks take it shared; GC takes it exclusive.
    pub gc_lock: RwLock<()>,
    servers: Mutex<HashMap<String, Arc<ServerSlot>>>,
    pub peer_log: RateLimit,
    /// Memory for open disks' manifests (`max_manifest_memory_mib`).
    pub manifest_memory: Arc<Budget>,
    /// What `/metrics` and `/healthz` serve.
    pub metrics: Arc<crate::metrics::ReceiverMetrics>,
    /// Retention as last loaded (SIGHUP reloads it).
    pub retention: RwLock<lifeboat_common::config::RetentionConfig>,
    /// Bumped when an identity changes (revoked, enrolled), so live sessions recheck theirs.
    pub identities: crate::identities::Changes,
    /// With `[fleet]`: the leases and the bucket's copy of every server's state.
    pub fleet: Option<Arc<dyn crate::fleet::Fleet>>,
    /// Every session's batches in flight, for the fleet's block sweep.
    pub batches: crate::fleet::Batches,
}

/// A peer's place among the pending handshakes: one of `max_pending_handshakes`, and one of
/// its source address's `max_pending_handshakes_per_source` (so one address cannot take
/// them all). Given back when dropped (the handshake ended, either way).
pub struct HandshakeTicket {
    _permit: tokio::sync::OwnedSemaphorePermit,
    sources: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl HandshakeTicket {
    fn take(
        handshakes: &Arc<Semaphore>,
        sources: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        per_source: usize,
    ) -> Result<HandshakeTicket, String> {
        let mut map = sources.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&ip).copied().unwrap_or(0) >= per_source {
            return Err(format!(
                "{per_source} connections from {ip} are still in their handshake \
                 (max_pending_handshakes_per_source)"
            ));
        }
        let permit = handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_pending_handshakes peers are still in their handshake".to_string())?;
        // Only admitted sources have an entry: refusals never grow the map.
        *map.entry(ip).or_insert(0) += 1;
        Ok(HandshakeTicket {
            _permit: permit,
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A quantity shared by every session (bytes of manifest memory), reserved before use.
pub struct Budget {
    limit: u64,
    used: Mutex<u64>,
}

/// Returned to its [`Budget`] when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    amount: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: Mutex::new(0),
        })
    }

    /// Reserves `amount`, or says how much is free.
    pub fn reserve(self: &Arc<Self>, amount: u64) -> Result<Reservation, u64> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.saturating_add(amount) > self.limit {
            return Err(self.limit.saturating_sub(*used));
        }
        *used += amount;
        Ok(Reservation {
            budget: self.clone(),
            amount,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.amount);
    }
}

/// One slot per server id: a single connection replicates a server at a time, and a
/// server id belongs to one machine (instance) at a time.
pub struct ServerSlot {
    pub lock: tokio::sync::Mutex<()>,
    /// Bumped by every accepted claim: a holder whose generation is no longer the newest
    /// leaves. (A watch, unlike a notification, is never lost when nobody is waiting.)
    generation: watch::Sender<u64>,
    holder: Mutex<Option<Holder>>,
    /// Recent takeovers of a live claim by the same instance from another address:
    /// (when, from where).
    moves: Mutex<Vec<(u64, String)>>,
}

/// Takeovers by one instance from changing addresses within this window ...
const FLAP_WINDOW_MS: u64 = 10 * 60_000;
/// ... this many times, mean two machines with one identity.
const FLAP_MOVES: usize = 3;

/// In a fleet: runs `round` on a blocking thread every renewal round until `stop`.
fn every_round(
    shared: &Shared,
    stop: &watch::Receiver<bool>,
    round: impl Fn(&dyn crate::fleet::Fleet) + Send + Sync + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let fleet = shared.fleet.clone()?;
    let (mut stop, round) = (stop.clone(), Arc::new(round));
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(fleet.renew_every()) => {}
                _ = stop.changed() => return,
            }
            let (f, r) = (fleet.clone(), round.clone());
            let _ = tokio::task::spawn_blocking(move || r(f.as_ref())).await;
        }
    }))
}

/// The address part of "ip:port" (or the whole string).
fn ip_of(peer: &str) -> &str {
    peer.rsplit_once(':').map_or(peer, |(ip, _)| ip)
}

/// The machine holding (or about to hold) a server's slot.
#[derive(Clone, Debug)]
pub struct Holder {
    pub instance: String,
    pub hostname: String,
    pub peer: String,
    generation: u64,
}

impl Holder {
    pub fn new(instance: &str, hostname: &str, peer: &str) -> Holder {
        Holder {
            instance: instance.to_string(),
            hostname: hostname.to_string(),
            peer: peer.to_string(),
            generation: 0,
        }
    }

    fn describe(&self) -> String {
        format!(
            "host {} (instance {}, from {})",
            self.hostname, self.instance, self.peer
        )
    }
}

/// What the previous session of a server left on disk: which machine it was and when it was
/// last heard from.
pub struct LastHolder {
    pub holder: Holder,
    pub last_seen_unix_ms: u64,
}

impl ServerSlot {
    /// Claims the server for `me`. Refused (with a message naming both machines) while
    /// another instance is connected, or was last heard from less than `lease_ms` ago. A new
    /// connection of the same instance is granted and the older one is told to leave.
    /// Returns the claim's generation and a watch that changes when a newer claim arrives.
    pub fn claim(
        &self,
        server: &str,
        mut me: Holder,
        last: Option<LastHolder>,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<(u64, watch::Receiver<u64>), String> {
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        let other = match &*holder {
            Some(h) if h.instance != me.instance => Some((h.clone(), "is connected now".into())),
            Some(_) => None,
            None => last.and_then(|l| {
                let age = now_ms.saturating_sub(l.last_seen_unix_ms);
                (!l.holder.instance.is_empty()
                    && l.holder.instance != me.instance
                    && age < lease_ms)
                    .then(|| (l.holder, format!("was last heard from {}s ago", age / 1000)))
            }),
        };
        if let Some((h, when)) = other {
            return Err(format!(
                "server id {server} belongs to {} which {when}; refused {}. Two machines \
                 (a cloned VM?) share one server_id: give one its own server_id in \
                 agent.toml; if {} replaced the old machine, run `lifeboat-receiver release \
                 --server {server}` or wait until the old one has been silent for \
                 server_lease_minutes",
                h.describe(),
                me.describe(),
                me.hostname
            ));
        }
        // The same instance again, from another address, while connected: a reconnect after
        // an address change, or two machines that copied every part of the identity (a clone
        // without its own SMBIOS UUID). Taking over back and forth is the second.
        if let Some(h) = &*holder {
            if ip_of(&h.peer) != ip_of(&me.peer) {
                let mut moves = self.moves.lock().unwrap_or_else(|e| e.into_inner());
                moves.retain(|(t, _)| now_ms.saturating_sub(*t) < FLAP_WINDOW_MS);
                moves.push((now_ms, ip_of(&me.peer).to_string()));
                let addresses: std::collections::HashSet<&str> =
                    moves.iter().map(|(_, a)| a.as_str()).collect();
                if moves.len() >= FLAP_MOVES && addresses.len() >= 2 {
                    return Err(format!(
                        "server id {server}: instance {} connected from {} and from {} in \
                         turn, {} times in {} minutes: two machines share its whole identity \
                         (a clone of the disk, with the agent's state and /etc/machine-id); \
                         refused {}. Stop the agent on the clone, or give it its own \
                         server_id and delete its /var/lib/lifeboat/install-id",
                        me.instance,
                        ip_of(&h.peer),
                        ip_of(&me.peer),
                        moves.len(),
                        FLAP_WINDOW_MS / 60_000,
                        me.describe()
                    ));
                }
            }
        }
        self.generation.send_modify(|g| *g += 1);
        me.generation = *self.generation.borrow();
        let newer = self.generation.subscribe();
        let generation = me.generation;
        *holder = Some(me);
        Ok((generation, newer))
    }

    /// Ends the claim of `generation`, unless a newer claim replaced it.
    pub fn release(&self, generation: u64) {
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        if holder.as_ref().is_some_and(|h| h.generation == generation) {
            *holder = None;
        }
    }
}

impl Shared {
    /// What every connection of a `serve` of `state_dir` shares (the local target).
    pub fn new(
        state_dir: &std::path::Path,
        store: Arc<dyn BlockStore>,
        tokens: Tokens,
        config: ReceiverConfig,
    ) -> Shared {
        Shared {
            catalog: Catalog::new(state_dir),
            target: Box::new(LocalTarget::new(Catalog::new(state_dir))),
            state_dir: state_dir.to_path_buf(),
            metrics: Arc::new(crate::metrics::ReceiverMetrics::new(
                state_dir,
                store.clone(),
            )),
            store,
            tokens,
            gc_lock: RwLock::new(()),
            servers: Mutex::new(HashMap::new()),
            peer_log: RateLimit::new(20),
            manifest_memory: Budget::new(config.max_manifest_memory_mib << 20),
            retention: RwLock::new(config.retention.clone()),
            identities: Default::default(),
            fleet: None,
            batches: Default::default(),
            config,
        }
    }

    pub fn slot(&self, server: &str) -> Arc<ServerSlot> {
        let mut map = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(server.to_string())
            .or_insert_with(|| {
                Arc::new(ServerSlot {
                    lock: tokio::sync::Mutex::new(()),
                    generation: watch::channel(0).0,
                    holder: Mutex::new(None),
                    moves: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }
}

/// Allows `per_sec` log lines a second and counts what it drops (log lines a peer can
/// trigger must not flood the journal).
pub struct RateLimit {
    per_sec: u64,
    window: AtomicU64,
    used: AtomicU64,
    dropped: AtomicU64,
}

impl RateLimit {
    pub const fn new(per_sec: u64) -> RateLimit {
        RateLimit {
            per_sec,
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// True when a line may be logged now; the second value is how many were dropped since
    /// the last allowed line.
    pub fn allow(&self) -> (bool, u64) {
        let now = crate::status::now_ms() / 1000;
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_sec {
            (true, self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            (false, 0)
        }
    }
}

pub struct ServeOptions {
    pub state_dir: PathBuf,
    pub listen: Option<String>,
    pub gc_interval: Duration,
    pub grace: Duration,
    /// Seconds between passes of the EBS uploader (with `[ebs]` in receiver.toml).
    pub ebs_interval: Duration,
    /// `--log`/`LIFEBOAT_LOG`, when given (it wins over `log` in receiver.toml).
    pub cli_log: Option<String>,
}

/// Runs the receiver until SIGTERM/SIGINT.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let state_dir = opts.state_dir.clone();
    let cfg_path = state_dir.join("receiver.toml");
    let mut config = ReceiverConfig::load(&cfg_path).with_context(|| {
        format!(
            "loading {} (run `lifeboat-receiver init --state-dir {}` first)",
            cfg_path.display(),
            state_dir.display()
        )
    })?;
    if let Some(l) = &opts.listen {
        config.listen = l.clone();
    }
    // One receiver per state directory.
    let _lock = lifeboat_common::lock::lock_dir(&state_dir, "serve")?;
    let tls = crate::tls::server_config(&state_dir)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    crate::durability::check(&state_dir)?;
    if let Some(w) = crate::durability::journal_warning(&state_dir) {
        tracing::warn!("{w}");
    }
    let (store, fleet): (Arc<dyn BlockStore>, _) = match &config.s3 {
        Some(s3) => {
            let (store, fleet) = crate::fleet::open(&state_dir, &config)?;
            tracing::info!(bucket = %s3.bucket, prefix = %s3.prefix, fleet = fleet.is_some(), "staging store in S3");
            (store, fleet)
        }
        None => {
            let store = DirStore::open(&state_dir.join("store"))?;
            store.clear_tmp(&_lock)?;
            (Arc::new(store), None)
        }
    };
    let tokens = Tokens::load(&state_dir)?;
    let mut shared = Shared::new(&state_dir, store, tokens, config.clone());
    *shared
        .metrics
        .fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = fleet.clone();
    shared.fleet = fleet;
    let shared = Arc::new(shared);
    mark_all_disconnected(&shared);

    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, state_dir = %state_dir.display(), "lifeboat-receiver listening");
    let (stop_tx, stop_rx) = watch::channel(false);
    let _ = std::fs::remove_file(state_dir.join("metrics.addr"));
    // Replication never stops for monitoring: a port in use is an error in the log, and the
    // receiver goes on without the endpoint.
    let bound = lifeboat_common::exporter::bind(&config.metrics_listen)
        .await
        .unwrap_or_else(|e| {
            tracing::error!(
                "metrics_listen = {:?}: cannot bind it: {e}; no /metrics or /healthz (another \
                 process on that port? set another address in {}, or \"\" for none)",
                config.metrics_listen,
                cfg_path.display()
            );
            None
        });
    let metrics_task = match bound {
        Some(l) => {
            let maddr = lifeboat_common::exporter::local_addr(&l);
            tracing::info!(addr = ?maddr, "serving /metrics and /healthz");
            if let Some(a) = maddr {
                let path = state_dir.join("metrics.addr");
                let _ = lifeboat_common::durable::write_atomic(&path, a.to_string().as_bytes());
            }
            Some(tokio::spawn(lifeboat_common::exporter::serve(
                l,
                shared.metrics.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    // Signals are ours before systemd is told we are up (a reload right after the start must
    // not find SIGHUP's default action, which ends the process).
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    apply_log(&config, opts.cli_log.as_deref());
    lifeboat_common::sd_notify::ready();

    // Two budgets: peers still in their handshake, and authenticated agents. A flood of
    // unauthenticated peers can exhaust only the first.
    let handshakes = Arc::new(Semaphore::new(config.max_pending_handshakes));
    let sources: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Default::default();
    let agents = Arc::new(Semaphore::new(config.max_connections));
    let mut tasks = tokio::task::JoinSet::new();

    // `revoke` and `enroll` are other processes: their changes reach live sessions through
    // this poll (a revoked agent is cut off within a second).
    let ident_shared = shared.clone();
    let ident_stop = stop_rx.clone();
    let identities = tokio::spawn(async move {
        ident_shared
            .identities
            .watch(
                ident_shared.state_dir.clone(),
                Duration::from_secs(1),
                ident_stop,
            )
            .await
    });

    let gc_shared = shared.clone();
    let mut gc_stop = stop_rx.clone();
    let gc_interval = opts.gc_interval;
    let gc = tokio::spawn(async move {
        // A sweep at the first pass (what a crash left behind), then at least hourly.
        let mut last_sweep: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(gc_interval) => {}
                _ = gc_stop.changed() => return,
            }
            let s = gc_shared.clone();
            let sweep_anyway = last_sweep.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
            let r = tokio::task::spawn_blocking(move || {
                // Locks first (outside the GC lock), so retention sees them extended.
                if let Some(f) = s.fleet.as_deref() {
                    let recent = s
                        .retention
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .recent_minutes;
                    crate::gc::keep_locks(&s.state_dir, f, recent.saturating_mul(60_000));
                }
                // In a fleet the pass applies retention only (no sweep), which needs no view
                // consistent with the sessions' batches: shared, so that a pass waiting on a
                // slow bucket never holds replication up.
                let (_w, _r) = if s.fleet.is_some() {
                    (
                        None,
                        Some(s.gc_lock.read().unwrap_or_else(|e| e.into_inner())),
                    )
                } else {
                    (
                        Some(s.gc_lock.write().unwrap_or_else(|e| e.into_inner())),
                        None,
                    )
                };
                let policy = s
                    .retention
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let mut report = crate::gc::run_pass_in(
                    &s.state_dir,
                    s.store.as_ref(),
                    s.fleet.as_deref(),
                    &policy,
                    sweep_anyway,
                )?;
                drop((_w, _r));
                // In a fleet the block sweep is the fleet's (one receiver at a time, every
                // other fenced): after retention deleted points here, or hourly.
                if let Some(f) = s.fleet.as_deref() {
                    if report.points_deleted > 0 || sweep_anyway {
                        let grace = Duration::from_secs(policy.gc_grace_minutes * 60);
                        match f.sweep(grace, &s.batches) {
                            Ok(swept) => {
                                // Ran here, or another receiver sweeps or swept a moment
                                // ago: either way the hour starts again.
                                report.swept = true;
                                report.blocks_deleted += swept.deleted;
                                if swept.ran {
                                    report.blocks_kept =
                                        Some((swept.blocks - swept.deleted) as u64);
                                }
                            }
                            // Retention's work stands; the sweep is tried again at a later
                            // pass (spaced: see `bucket::sweep`).
                            Err(e) => tracing::warn!("the fleet's block sweep failed: {e}"),
                        }
                    }
                }
                anyhow::Ok(report)
            })
            .await;
            let m = &gc_shared.metrics;
            m.gc_runs.inc();
            match r {
                Ok(Ok(report)) => {
                    if report.swept {
                        last_sweep = Some(std::time::Instant::now());
                    }
                    m.gc_points_deleted.inc_by(report.points_deleted as u64);
                    m.gc_blocks_deleted.inc_by(report.blocks_deleted as u64);
                    if let Some(n) = report.blocks_kept {
                        m.store_blocks.store(n, Ordering::Relaxed);
                    }
                    m.gc_last_success_unix_ms
                        .store(crate::status::now_ms(), Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    m.gc_failures.inc();
                    tracing::error!("gc pass failed: {e:#}");
                }
                Err(e) => {
                    m.gc_failures.inc();
                    tracing::error!("gc pass panicked: {e}");
                }
            }
        }
    });

    // Fleet leases, renewed every third of their period while held; one that fails is
    // dropped at once (its sessions then acknowledge nothing more).
    let renewals = {
        let s = shared.clone();
        every_round(&shared, &stop_rx, move |f| {
            // A revocation or enrolment at another receiver: live sessions check again.
            if f.renew() {
                s.identities.bump();
            }
        })
    };
    // The fleet's block sweep, followed every round on a loop of its own (its barrier may
    // wait for a slow batch; renewals never wait for it): fenced and acknowledged here.
    let following = {
        let s = shared.clone();
        every_round(&shared, &stop_rx, move |f| {
            if let Err(e) = f.follow_sweep(&s.batches, true) {
                tracing::warn!("following the fleet's block sweep: {e} (again next round)");
            }
        })
    };

    // The EBS target, in the background: points are already durable and committed.
    #[cfg(not(feature = "aws"))]
    let uploader: Option<tokio::task::JoinHandle<()>> = match &config.ebs {
        Some(_) => anyhow::bail!(
            "{} has an [ebs] section, but this lifeboat-receiver was built without AWS \
             support (the `aws` feature)",
            cfg_path.display()
        ),
        None => None,
    };
    #[cfg(feature = "aws")]
    let uploader = match &config.ebs {
        Some(ebs) => {
            let aws = crate::snapshots::ebs::client::Aws::connect(ebs).await;
            *shared
                .metrics
                .ebs_client
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                Some((aws.retrier.throttles.clone(), aws.retrier.retries.clone()));
            let m = Arc::new(crate::snapshots::ebs::Materializer {
                aws,
                metrics: Some(shared.metrics.clone()),
                catalog: Catalog::new(&state_dir),
                store: shared.store.clone(),
                install: crate::snapshots::ebs::install_id(&state_dir)?,
            });
            tracing::info!(
                region = %ebs.region,
                every_minutes = ebs.every_minutes,
                "EBS target on: points go to EBS snapshots in the background"
            );
            Some(tokio::spawn(crate::snapshots::ebs::run(
                m,
                opts.ebs_interval,
                stop_rx.clone(),
            )))
        }
        None => None,
    };

    // systemd's watchdog is fed from this loop: a runtime too stuck to accept is restarted.
    let mut alive = tokio::time::interval(
        lifeboat_common::sd_notify::watchdog_period().map_or(Duration::from_secs(1), |p| p / 4),
    );
    loop {
        tokio::select! {
            _ = alive.tick() => lifeboat_common::sd_notify::watchdog(),
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let ticket = match HandshakeTicket::take(&handshakes, &sources, peer.ip(), config.max_pending_handshakes_per_source) {
                    Ok(t) => t,
                    Err(why) => {
                        shared.metrics.refused(crate::metrics::Refusal::HandshakeLimit);
                        let (allowed, dropped) = shared.peer_log.allow();
                        if allowed {
                            tracing::warn!(%peer, dropped_similar = dropped, "connection refused: {why}");
                        }
                        continue;
                    }
                };
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                let stop = stop_rx.clone();
                let agents = agents.clone();
                tasks.spawn(connection::handle(shared, acceptor, tcp, peer, stop, ticket, agents));
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("a connection task panicked (that connection ended): {e}");
                    }
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sighup.recv() => reload(&shared, &cfg_path, opts.cli_log.as_deref(), opts.listen.as_deref()),
        }
    }
    tracing::info!(
        connections = tasks.len(),
        "shutting down: draining connections"
    );
    let _ = stop_tx.send(true);
    if let Some(f) = &shared.fleet {
        // A sweep under way here closes now (deleting nothing more), and no batch waits for
        // one: the stop is not held up to a sweep's deadline.
        f.stop_sweeping();
    }
    let drained = tokio::time::timeout(opts.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "grace period over: closing {} connection(s) unfinished",
            tasks.len()
        );
        tasks.abort_all();
    }
    let _ = gc.await;
    let _ = identities.await;
    if let Some(f) = following {
        let _ = f.await;
    }
    if let Some(r) = renewals {
        let _ = r.await;
    }
    if let Some(f) = shared.fleet.clone() {
        // Other receivers may take these servers at once rather than after the period. Not
        // before the batches still writing end (up to a period): a sweeper takes a released
        // lease for acknowledged, and must find their journal segments in the bucket.
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if !s.batches.wait_below(u64::MAX, f.renew_every() * 3) {
                tracing::warn!("releasing the leases with batches still writing");
            }
            f.release_all()
        })
        .await;
    }
    if let Some(u) = uploader {
        let _ = u.await;
    }
    if let Some(m) = metrics_task {
        let _ = m.await;
    }
    mark_all_disconnected(&shared);
    tracing::info!("lifeboat-receiver stopped");
    Ok(())
}

/// Applies `log` from receiver.toml, unless `--log`/`LIFEBOAT_LOG` set a filter.
fn apply_log(config: &ReceiverConfig, cli_log: Option<&str>) {
    if cli_log.is_none() {
        if let Err(e) =
            lifeboat_common::logging::set_filter(config.log.as_deref().unwrap_or("info"))
        {
            tracing::warn!("{e}");
        }
    }
}

/// SIGHUP: reads receiver.toml again and applies what can change while serving: the log
/// filter and retention (tokens are read at every Hello anyway). A file that does not load
/// changes nothing; other changes are named, for the next restart.
fn reload(shared: &Shared, path: &std::path::Path, cli_log: Option<&str>, listen: Option<&str>) {
    let mut new = match ReceiverConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; nothing was changed");
            return;
        }
    };
    if let Some(l) = listen {
        // `serve --listen` overrides the file, now as at the start.
        new.listen = l.to_string();
    }
    apply_log(&new, cli_log);
    *shared.retention.write().unwrap_or_else(|e| e.into_inner()) = new.retention.clone();
    let old = &shared.config;
    let restart: Vec<&str> = [
        ("listen", old.listen != new.listen),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        (
            "max_pending_handshakes",
            old.max_pending_handshakes != new.max_pending_handshakes,
        ),
        (
            "max_manifest_memory_mib",
            old.max_manifest_memory_mib != new.max_manifest_memory_mib,
        ),
        (
            "max_pending_handshakes_per_source",
            old.max_pending_handshakes_per_source != new.max_pending_handshakes_per_source,
        ),
        (
            "handshake_timeout_secs",
            old.handshake_timeout_secs != new.handshake_timeout_secs,
        ),
        (
            "max_disk_size_gib",
            old.max_disk_size_gib != new.max_disk_size_gib,
        ),
        (
            "max_disks_per_server",
            old.max_disks_per_server != new.max_disks_per_server,
        ),
        (
            "server_lease_minutes",
            old.server_lease_minutes != new.server_lease_minutes,
        ),
        ("ebs", format!("{:?}", old.ebs) != format!("{:?}", new.ebs)),
        ("s3", old.s3 != new.s3),
        (
            "recovery",
            format!("{:?}", old.recovery) != format!("{:?}", new.recovery),
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(k, _)| k)
    .collect();
    tracing::info!(
        log = new.log.as_deref().unwrap_or("info"),
        recent_minutes = new.retention.recent_minutes,
        daily_days = new.retention.daily_days,
        gc_grace_minutes = new.retention.gc_grace_minutes,
        "SIGHUP: configuration reloaded (log filter and retention)"
    );
    if !restart.is_empty() {
        tracing::warn!(
            "SIGHUP: {} changed in {}: that takes effect at the next restart",
            restart.join(", "),
            path.display()
        );
    }
}

/// After a start or a stop, no server is connected.
fn mark_all_disconnected(shared: &Shared) {
    for server in shared.catalog.servers().unwrap_or_default() {
        let dir = shared.catalog.server_dir(&server);
        if let Some(mut st) = crate::status::ServerStatus::load(&dir) {
            if st.connected {
                st.connected = false;
                let _ = st.save(&dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_every_handshake_place() {
        let handshakes = Arc::new(Semaphore::new(4));
        let sources: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Default::default();
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let take = |ip| HandshakeTicket::take(&handshakes, &sources, ip, 2);
        let a1 = take(a).unwrap();
        let _a2 = take(a).unwrap();
        let e = take(a).err().unwrap();
        assert!(e.contains("2 connections from 10.0.0.1"), "{e}");
        // Another source still gets in, up to the global budget.
        let _b1 = take(b).unwrap();
        let _b2 = take(b).unwrap();
        let e = take(b).err().unwrap();
        assert!(e.contains("from 10.0.0.2"), "{e}");
        drop(a1);
        let _a3 = take(a).unwrap();
        assert_eq!(handshakes.available_permits(), 0);
        let c: std::net::IpAddr = "10.0.0.3".parse().unwrap();
        let e = take(c).err().unwrap();
        assert!(e.contains("max_pending_handshakes"), "{e}");
        assert_eq!(
            sources.lock().unwrap().get(&c),
            None,
            "a refusal grew the map"
        );
    }

    #[test]
    fn a_second_machine_is_refused_while_the_first_holds_the_server() {
        let slot = ServerSlot {
            lock: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
            holder: Mutex::new(None),
            moves: Mutex::new(Vec::new()),
        };
        let lease = 60_000;
        let (g1, mut newer1) = slot
            .claim(
                "web",
                Holder::new("aaaa", "host-a", "1.1.1.1:1"),
                None,
                0,
                lease,
            )
            .unwrap();
        let e = slot
            .claim(
                "web",
                Holder::new("bbbb", "host-b", "2.2.2.2:2"),
                None,
                0,
                lease,
            )
            .unwrap_err();
        assert!(
            e.contains("host host-a (instance aaaa") && e.contains("host host-b (instance bbbb"),
            "{e}"
        );
        // The same machine again: granted, and the older connection is told, even though it
        // was not waiting when the newer one arrived.
        let (g2, _) = slot
            .claim(
                "web",
                Holder::new("aaaa", "host-a", "1.1.1.1:3"),
                None,
                0,
                lease,
            )
            .unwrap();
        assert!(newer1.has_changed().unwrap());
        assert_ne!(*newer1.borrow_and_update(), g1);
        // The older one leaving does not release the newer one's claim.
        slot.release(g1);
        assert!(slot
            .claim(
                "web",
                Holder::new("bbbb", "host-b", "2.2.2.2:2"),
                None,
                0,
                lease
            )
            .is_err());
        slot.release(g2);
        // Gone, but heard from within the lease: still refused; after it: granted.
        let last = || {
            Some(LastHolder {
                holder: Holder::new("aaaa", "host-a", "1.1.1.1:3"),
                last_seen_unix_ms: 1_000,
            })
        };
        assert!(slot
            .claim(
                "web",
                Holder::new("bbbb", "host-b", "2.2.2.2:2"),
                last(),
                30_000,
                lease
            )
            .is_err());
        assert!(slot
            .claim(
                "web",
                Holder::new("bbbb", "host-b", "2.2.2.2:2"),
                last(),
                61_001,
                lease
            )
            .is_ok());
    }

    #[test]
    fn one_identity_on_two_machines_is_refused_once_they_take_turns() {
        let slot = ServerSlot {
            lock: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
            holder: Mutex::new(None),
            moves: Mutex::new(Vec::new()),
        };
        let claim = |peer: &str, t: u64| {
            slot.claim("web", Holder::new("aaaa", "web", peer), None, t, 60_000)
        };
        // A reconnect from a new address (DHCP) is fine, as is one from the same address.
        claim("10.0.0.1:5", 0).unwrap();
        claim("10.0.0.1:6", 1_000).unwrap();
        claim("10.0.0.2:7", 2_000).unwrap();
        // Back and forth: the third move between addresses within 10 minutes is refused.
        claim("10.0.0.1:8", 3_000).unwrap();
        let e = claim("10.0.0.2:9", 4_000).unwrap_err();
        assert!(
            e.contains("instance aaaa connected from 10.0.0.1 and from 10.0.0.2 in turn"),
            "{e}"
        );
        // Long after, a single move is fine again.
        claim("10.0.0.2:9", 4_000 + 11 * 60_000).unwrap();
    }
}
