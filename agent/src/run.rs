//! The agent's main loop: connect, open disks, replicate in cycles, and on any failure
//! reconnect with exponential backoff (1 s doubling to 30 s, with jitter). Acknowledged
//! blocks are never resent: the acknowledged manifests survive reconnects and restarts, and
//! unacknowledged blocks are found again by the next scan.

use crate::link::Link;
use crate::replicate::{ReplicateError, Replicator};
use lifeboat_common::config::AgentConfig;
use std::time::{Duration, Instant};

pub struct RunOptions {
    /// The config file, read again at SIGHUP.
    pub config_path: std::path::PathBuf,
    /// `--log`/`LIFEBOAT_LOG`, when given (it wins over `log` in the config).
    pub cli_log: Option<String>,
    /// Exit after the first committed point (initial sync, then one point).
    pub once: bool,
    /// With `once`: give up after this long without success.
    pub give_up_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
    #[error("gave up after {secs}s without committing a point: {last}")]
    GaveUp { secs: u64, last: String },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

enum Outcome {
    Done(Result<(), ReplicateError>),
    Signal,
}

async fn session(rep: &mut Replicator, once: bool) -> Result<(), ReplicateError> {
    let span =
        tracing::info_span!("conn", receiver = %rep.status.receiver, server = %rep.server_id);
    tracing::Instrument::instrument(session_inner(rep, once), span).await
}

/// Connects to the receiver that holds this server: the one connected last first, then each
/// configured address in turn, following a receiver's `Redirect` to the fleet's holder.
async fn connect(rep: &mut Replicator) -> Result<Link, ReplicateError> {
    let configured = rep.config().receiver.all_addresses();
    let mut queue: std::collections::VecDeque<String> =
        std::iter::once(rep.status.receiver.clone())
            .chain(configured.iter().cloned())
            .collect();
    let mut tried = Vec::new();
    let mut first_permanent = None;
    let mut last = None;
    // Each address once, plus a few redirects (a fleet mid-takeover may send us round).
    let mut redirects = 0;
    while let Some(addr) = queue.pop_front() {
        if tried.contains(&addr) {
            continue;
        }
        tried.push(addr.clone());
        let r = Link::connect(
            rep.config(),
            &addr,
            &rep.server_id,
            &rep.identity,
            rep.live.bandwidth_mbps.clone(),
        )
        .await;
        match r {
            Ok(link) => {
                rep.status.receiver = addr;
                return Ok(link);
            }
            Err(crate::link::LinkError::Redirected { address, holder }) if redirects < 3 => {
                redirects += 1;
                tracing::info!(from = %addr, to = %address, %holder, "redirected to the receiver that holds this server");
                tried.retain(|a| *a != address);
                queue.push_front(address);
            }
            Err(e) => {
                if configured.len() > 1 {
                    tracing::warn!(receiver = %addr, "{e}; trying the next receiver");
                }
                if !e.retryable() && first_permanent.is_none() {
                    first_permanent = Some(e);
                } else {
                    last = Some(e);
                }
            }
        }
    }
    // A permanent refusal (a wrong CA, a refused token) says more than a timeout elsewhere.
    Err(first_permanent
        .or(last)
        .unwrap_or_else(|| crate::link::LinkError::Lost("no receiver address".into()))
        .into())
}

async fn session_inner(rep: &mut Replicator, once: bool) -> Result<(), ReplicateError> {
    let mut link = connect(rep).await?;
    tracing::info!(receiver = %rep.status.receiver, "connected");
    rep.open_disks(&mut link).await?;
    loop {
        let started = Instant::now();
        rep.cycle(&mut link).await?;
        if once {
            link.close().await;
            return Ok(());
        }
        rep.idle(&mut link, started + rep.interval()).await?;
    }
}

/// Ends a background task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn run(cfg: AgentConfig, opts: RunOptions) -> Result<(), RunError> {
    // Before anything is written: a filesystem left frozen by a killed agent (the state
    // directory may be on it).
    crate::freeze::thaw_leftovers(&cfg.state_dir.join(crate::freeze::MARKER));
    let mut rep = Replicator::new(cfg)?;
    tracing::info!(server = %rep.server_id, disks = rep.status.disks.len(), "lifeboat-agent starting");
    // The metrics endpoint, on its own task until the agent exits.
    let (_metrics_stop, metrics_stopped) = tokio::sync::watch::channel(false);
    let listen = rep.config().metrics_listen.clone();
    let _ = std::fs::remove_file(rep.config().state_dir.join("metrics.addr"));
    // Replication never stops for monitoring: a port in use is an error in the log, and the
    // agent goes on without the endpoint.
    let metrics = lifeboat_common::exporter::bind(&listen)
        .await
        .unwrap_or_else(|e| {
            tracing::error!(
                "metrics_listen = {listen:?}: cannot bind it: {e}; no /metrics or /healthz \
                 (another process on that port? set another address, or \"\" for none)"
            );
            None
        });
    if let Some(l) = metrics {
        let addr = lifeboat_common::exporter::local_addr(&l);
        tracing::info!(addr = ?addr, "serving /metrics and /healthz");
        if let Some(a) = addr {
            let path = rep.config().state_dir.join("metrics.addr");
            let _ = lifeboat_common::durable::write_atomic(&path, a.to_string().as_bytes());
        }
        tokio::spawn(lifeboat_common::exporter::serve(
            l,
            rep.metrics.clone(),
            metrics_stopped,
        ));
    }
    if let Some(period) = lifeboat_common::sd_notify::watchdog_period() {
        // The longest wait without a ping: a receiver's silence, a freeze, the ping spacing.
        let cfg = rep.config();
        let longest = cfg.receiver.timeout_secs + cfg.freeze_timeout_ms.div_ceil(1000) + 5;
        if period.as_secs() <= longest + longest / 4 {
            tracing::warn!(
                "systemd's WatchdogSec ({} s) is not well above [receiver] timeout_secs ({} s) \
                 plus a freeze: a wait on a silent receiver would end in a watchdog restart \
                 rather than a reconnect; raise WatchdogSec in the unit",
                period.as_secs(),
                cfg.receiver.timeout_secs
            );
        }
    }
    // Signals are ours before systemd is told we are up (a reload right after the start
    // must not find SIGHUP's default action, which ends the process).
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Runtime)?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(RunError::Runtime)?;
    lifeboat_common::sd_notify::ready();
    crate::reload::apply_log(rep.config(), opts.cli_log.as_deref());
    // The client certificate (once enrolled) is renewed when due: now, then on its own task.
    crate::certificate::renew_if_due(rep.config(), &rep.server_id, &rep.identity).await;
    let renewal = tokio::spawn(crate::certificate::keep_renewed(
        rep.config().clone(),
        rep.server_id.clone(),
        rep.identity.clone(),
    ));
    let _renewal = AbortOnDrop(renewal);
    let (running, live) = (rep.config().clone(), rep.live.clone());
    let began = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        lifeboat_common::sd_notify::watchdog();
        let outcome = {
            let attempt = session(&mut rep, opts.once);
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    r = &mut attempt => break Outcome::Done(r),
                    _ = sigterm.recv() => break Outcome::Signal,
                    _ = tokio::signal::ctrl_c() => break Outcome::Signal,
                    // The session goes on: only what can change live is applied.
                    _ = sighup.recv() => crate::reload::reload(
                        &opts.config_path,
                        &running,
                        &live,
                        opts.cli_log.as_deref(),
                    ),
                }
            }
        };
        let err = match outcome {
            Outcome::Signal => {
                tracing::info!("stopping: saving state");
                lifeboat_common::sd_notify::stopping();
                rep.persist()?;
                rep.stop_tracking();
                rep.set_disconnected(None);
                return Ok(());
            }
            Outcome::Done(Ok(())) => {
                rep.stop_tracking();
                rep.set_disconnected(None);
                return Ok(());
            }
            Outcome::Done(Err(e)) => e,
        };
        // Whatever happened, keep what was acknowledged.
        if let Err(pe) = rep.persist() {
            tracing::error!("{pe}");
        }
        let msg = err.to_string();
        rep.status.reconnects += 1;
        rep.set_disconnected(Some(msg.clone()));
        if err.retryable() {
            tracing::warn!(
                "replication interrupted: {msg}; retrying in {}s",
                backoff.as_secs()
            );
        } else {
            tracing::error!(
                "{msg}; retrying in {}s (fix the cause; the agent keeps trying)",
                backoff.as_secs()
            );
        }
        if rep.connected_since.take().is_some() {
            // The last connection got through: start the backoff over.
            backoff = Duration::from_secs(1);
        }
        if opts.once && (!err.retryable() || began.elapsed() >= opts.give_up_after) {
            // A script waiting on --once gets a refusal at once, not after the backoff.
            return Err(RunError::GaveUp {
                secs: began.elapsed().as_secs(),
                last: msg,
            });
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 500);
        let mut pause = backoff + jitter;
        if opts.once {
            pause = pause.min(opts.give_up_after.saturating_sub(began.elapsed()));
        }
        lifeboat_common::sd_notify::watchdog();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = sigterm.recv() => {
                rep.stop_tracking();
                return Ok(());
            }
        }
        backoff = if err.retryable() {
            (backoff * 2).min(Duration::from_secs(30))
        } else {
            Duration::from_secs(30)
        };
    }
}
