//! One agent connection: TLS handshake, preface, Hello/auth, then three tasks:
//! the reader (this one) decodes frames and answers dedupe queries, the session processor
//! applies blocks, refs and commits in order (see `session.rs`), and the writer sends replies.

use super::session::{Session, SessionEnd};
use super::{HandshakeTicket, Holder, LastHolder, ServerSlot, Shared};
use crate::identities::{self, IdentityRefusal, Proof, Record};
use crate::status::{now_ms, RefusedClaim, ServerStatus};
use lifeboat_common::protocol::{
    self, decode_frame_capped, DecodeError, ErrorCode, Message, MAX_FRAME, MAX_PREAUTH_FRAME,
    PREFACE_LEN,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

/// A refusal sent during the handshake waits this long for the peer to read it.
const HANDSHAKE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An agent sends Progress every few seconds; silence this long means a dead peer.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const SLOT_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer that stops reading for this long is dropped, so it cannot pin its server's slot.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

fn error(code: ErrorCode, retryable: bool, message: impl Into<String>) -> Message {
    Message::Error {
        code,
        retryable,
        message: message.into(),
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    ticket: HandshakeTicket,
    agents: Arc<Semaphore>,
) {
    let span = tracing::info_span!("conn", %peer, server = tracing::field::Empty);
    async move {
        let r = run(&shared, acceptor, tcp, peer, stop, ticket, agents).await;
        match r {
            Ok(()) => tracing::debug!("connection closed"),
            Err(reason) => {
                let (allowed, dropped) = shared.peer_log.allow();
                if allowed {
                    tracing::warn!(dropped_similar = dropped, "connection closed: {reason}");
                }
            }
        }
    }
    .instrument(span)
    .await
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    timeout: Duration,
    cap: usize,
) -> Result<Option<Message>, String> {
    loop {
        match decode_frame_capped(buf, cap) {
            Ok(Some((m, used))) => {
                buf.drain(..used);
                return Ok(Some(m));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("malformed frame: {e}")),
        }
        // Never more than the frame being read needs (plus one read's worth).
        let want = (cap + 4).saturating_sub(buf.len()).clamp(1, 256 * 1024);
        buf.reserve(want);
        let n = match tokio::time::timeout(timeout, rd.read_buf(buf)).await {
            Err(_) => return Err(format!("no frame for {}s", timeout.as_secs())),
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(format!(
                    "peer closed mid-frame ({} bytes pending)",
                    buf.len()
                ))
            };
        }
    }
}

async fn send_now<W: AsyncWrite + Unpin>(wr: &mut W, m: &Message) {
    let mut out = Vec::new();
    m.encode(&mut out);
    let write = async {
        wr.write_all(&out).await?;
        wr.flush().await
    };
    let _ = tokio::time::timeout(HANDSHAKE_WRITE_TIMEOUT, write).await;
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

/// The agent's clock minus ours, in ms; hostile values cannot overflow (computed wide,
/// clamped), and never equal the "not measured" `i64::MIN`.
fn skew_ms(agent_unix_ms: u64, now_ms: u64) -> i64 {
    (agent_unix_ms as i128 - now_ms as i128).clamp(-(i64::MAX as i128), i64::MAX as i128) as i64
}

/// Where a handshake stands, for the message when its deadline passes.
const STAGE_TLS: u8 = 0;
const STAGE_PREFACE: u8 = 1;
const STAGE_HELLO: u8 = 2;

/// Ends a claim on the server's slot when the connection ends, however it ends.
struct Released<'a>(&'a ServerSlot, u64);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// In a fleet: takes the server's identity record from the bucket when another receiver
/// wrote a newer one (an enrolment, renewal or revocation there). An error refuses the
/// handshake: a revocation elsewhere must never be missed.
async fn pull_identity(shared: &Shared, server: &str) -> Result<(), String> {
    let Some(fleet) = shared.fleet.clone() else {
        return Ok(());
    };
    let s = server.to_string();
    match tokio::task::spawn_blocking(move || fleet.pull_identity(&s)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "server {server}: cannot read its identity from the fleet's bucket: {e}"
        )),
        Err(e) => Err(format!(
            "server {server}: reading its identity panicked: {e}"
        )),
    }
}

/// In a fleet: writes the server's identity record (as just saved here) to the bucket.
async fn push_identity(shared: &Shared, server: &str) -> Result<(), String> {
    let Some(fleet) = shared.fleet.clone() else {
        return Ok(());
    };
    let s = server.to_string();
    match tokio::task::spawn_blocking(move || fleet.push_identity(&s)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Retention keeps every point this young (as configured now).
fn retention_recent_ms(shared: &Shared) -> u64 {
    let r = shared.retention.read().unwrap_or_else(|e| e.into_inner());
    r.recent_minutes.saturating_mul(60_000)
}

/// In a fleet: gives the server's lease up (its agent is gone), while the server's slot is
/// still this connection's. Under Object Lock the lock keeper checks the server's newest
/// points first, for 10 seconds at most (the agent may be reconnecting): no receiver runs it
/// for a server none holds.
async fn release_lease(shared: &Arc<Shared>, server: &str) {
    if let Some(fleet) = shared.fleet.clone() {
        let s = server.to_string();
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let recent_ms = retention_recent_ms(&shared);
            match fleet.keep_locks(&s, recent_ms, Some(deadline)) {
                Ok(pass) if pass.failed > 0 => tracing::warn!(
                    server = %s,
                    failed = pass.failed,
                    "lock keeper: blocks not locked as long as their points (tried again when \
                     the server is next held)"
                ),
                Ok(_) | Err(crate::fleet::FleetError::NotHeld { .. }) => {}
                Err(e) => tracing::warn!(server = %s, "lock keeper: {e}"),
            }
            fleet.release(&s)
        })
        .await;
    }
}

/// A peer that completed the handshake: TLS, preface and an accepted `Hello`.
struct Authenticated {
    rd: ReadHalf<Tls>,
    wr: WriteHalf<Tls>,
    /// Bytes read past the `Hello`.
    buf: Vec<u8>,
    server: String,
    agent_version: String,
    instance: String,
    hostname: String,
    /// The client certificate's "sha256:…", when one was presented.
    presented: Option<String>,
}

/// Checks the names a `Hello` or `Enrol` carries; the message says which is wrong.
fn check_names(server_id: &str, instance: &str, hostname: &str) -> Result<(), String> {
    if !lifeboat_common::config::valid_name(server_id) {
        return Err(format!(
            "server id {server_id:?} must be 1-64 of [A-Za-z0-9._-]"
        ));
    }
    let valid_instance = instance.len() == 16 && instance.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid_instance
        || hostname.is_empty()
        || hostname.len() > 255
        || hostname.chars().any(char::is_control)
    {
        return Err(format!(
            "server {server_id}: names instance {instance:?} on host {hostname:?}: an instance \
             is 16 hex digits, a host name 1-255 printable characters"
        ));
    }
    Ok(())
}

/// What a refused identity counts as.
fn refusal_kind(r: &IdentityRefusal) -> crate::metrics::Refusal {
    match r {
        IdentityRefusal::Revoked { .. } => crate::metrics::Refusal::Revoked,
        _ => crate::metrics::Refusal::Certificate,
    }
}

/// An `Enrol`: a client certificate for a one-time code, or a renewal over a connection that
/// presents the server's certificate. Answers `Enrolled` or an `Error`; either way the
/// connection then ends. The code is never logged.
#[allow(clippy::too_many_arguments)]
async fn enrol<W: AsyncWrite + Unpin>(
    shared: &Shared,
    wr: &mut W,
    presented: Option<&str>,
    server_id: String,
    code: String,
    public_key: Vec<u8>,
    instance: String,
    hostname: String,
) -> Result<(), String> {
    /// A refusal: what it counts as, whether retrying can help, and the message.
    type Refused = (crate::metrics::Refusal, bool, String);
    let refuse = |kind: crate::metrics::Refusal, retryable: bool, msg: String| -> Refused {
        (kind, retryable, msg)
    };
    if let Err(msg) = pull_identity(shared, &server_id).await {
        shared.metrics.refused(crate::metrics::Refusal::Enrolment);
        send_now(wr, &error(ErrorCode::Auth, true, msg.clone())).await;
        return Err(msg);
    }
    let now = now_ms();
    let state_dir = shared.state_dir.clone();
    let valid = Duration::from_secs(shared.config.agent_certificate_days * 86_400);
    let outcome = (|| {
        check_names(&server_id, &instance, &hostname)
            .map_err(|m| refuse(crate::metrics::Refusal::Protocol, false, m))?;
        let record = Record::load(&state_dir, &server_id).map_err(|e| {
            refuse(
                crate::metrics::Refusal::Enrolment,
                true,
                format!("server {server_id}: reading its identity: {e:#}"),
            )
        })?;
        let renewing = code.is_empty();
        let previous = if renewing {
            match identities::check(&server_id, record.as_ref(), presented) {
                Ok(Proof::Certificate(fp)) => Some(fp),
                Ok(Proof::Token) => {
                    return Err(refuse(
                        crate::metrics::Refusal::Enrolment,
                        false,
                        format!(
                            "server {server_id}: an enrolment without a code renews a \
                             certificate, and this connection presented none; enrol with a \
                             code from `lifeboat-receiver enroll --server {server_id}`"
                        ),
                    ))
                }
                Err(r) => return Err(refuse(refusal_kind(&r), false, r.to_string())),
            }
        } else {
            None
        };
        let issued =
            crate::tls::issue_client_certificate(&state_dir, &server_id, &public_key, valid, now)
                .map_err(|e| {
                refuse(
                    crate::metrics::Refusal::Enrolment,
                    false,
                    format!("server {server_id}: no certificate issued: {e:#}"),
                )
            })?;
        // The code is spent only once everything before could be done.
        if !renewing {
            identities::redeem(&state_dir, &code, &server_id, &hostname, now).map_err(|r| {
                refuse(
                    crate::metrics::Refusal::Enrolment,
                    false,
                    format!("server {server_id}: {r}"),
                )
            })?;
        }
        let enrolled_unix_ms = match (&record, renewing) {
            (Some(r), true) => r.enrolled_unix_ms,
            _ => now,
        };
        let new = Record {
            server: server_id.clone(),
            certificate_sha256: issued.sha256.clone(),
            issued_unix_ms: issued.issued_unix_ms,
            not_after_unix_ms: issued.not_after_unix_ms,
            enrolled_unix_ms,
            previous_sha256: previous,
            instance: instance.clone(),
            hostname: hostname.clone(),
            revoked_unix_ms: None,
        };
        new.save(&state_dir).map_err(|e| {
            refuse(
                crate::metrics::Refusal::Enrolment,
                !renewing,
                format!(
                    "server {server_id}: recording its identity failed: {e:#}{}",
                    if renewing {
                        ""
                    } else {
                        " (the code is spent: make a new one)"
                    }
                ),
            )
        })?;
        Ok((issued, renewing))
    })();
    // In a fleet, every receiver must know the new certificate before the agent has it.
    let outcome = match outcome {
        Ok((issued, renewing)) => match push_identity(shared, &server_id).await {
            Ok(()) => Ok((issued, renewing)),
            Err(why) => Err((
                crate::metrics::Refusal::Enrolment,
                true,
                format!(
                    "server {server_id}: its identity is recorded here but not in the fleet's \
                     bucket ({why}); {}",
                    if renewing {
                        "renew again later"
                    } else {
                        "the code is spent: make a new one"
                    }
                ),
            )),
        },
        Err(e) => Err(e),
    };
    match outcome {
        Ok((issued, renewing)) => {
            shared.identities.bump();
            tracing::info!(
                server = %server_id,
                %hostname,
                certificate = %issued.sha256,
                valid_until = %crate::commands::fmt_utc(issued.not_after_unix_ms),
                "{}",
                if renewing { "agent certificate renewed" } else { "agent enrolled" }
            );
            send_now(
                wr,
                &Message::Enrolled {
                    certificate: issued.der,
                    not_after_unix_ms: issued.not_after_unix_ms,
                },
            )
            .await;
            Ok(())
        }
        Err((kind, retryable, msg)) => {
            shared.metrics.refused(kind);
            send_now(wr, &error(ErrorCode::Auth, retryable, msg.clone())).await;
            Err(msg)
        }
    }
}

/// TLS, preface and `Hello`, all within one deadline (not one per read, which a peer
/// trickling a byte at a time could stretch forever), with frames capped at
/// [`MAX_PREAUTH_FRAME`]. `Ok(None)`: the peer closed before saying anything (a port probe).
async fn handshake(
    shared: &Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    stage: &AtomicU8,
) -> Result<Option<Authenticated>, String> {
    let tls = match acceptor.accept(tcp).await {
        // A port probe (load balancer, monitoring) connects and closes without a word.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!("closed before the TLS handshake");
            return Ok(None);
        }
        Err(e) => {
            shared.metrics.refused(crate::metrics::Refusal::Tls);
            return Err(format!("TLS handshake failed: {e}"));
        }
        Ok(tls) => tls,
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::tls::fingerprint(c));
    let (mut rd, mut wr) = tokio::io::split(tls);
    stage.store(STAGE_PREFACE, Ordering::Relaxed);

    let mut pre = [0u8; PREFACE_LEN];
    rd.read_exact(&mut pre)
        .await
        .map_err(|e| format!("reading preface: {e}"))?;
    wr.write_all(&protocol::preface(protocol::PROTOCOL_VERSION))
        .await
        .map_err(|e| format!("writing preface: {e}"))?;
    if let Err(e) = protocol::check_preface(&pre) {
        let code = if matches!(e, DecodeError::Version(_)) {
            ErrorCode::Version
        } else {
            ErrorCode::Protocol
        };
        shared.metrics.refused(crate::metrics::Refusal::Protocol);
        send_now(&mut wr, &error(code, false, e.to_string())).await;
        return Err(e.to_string());
    }

    let mut buf = Vec::new();
    stage.store(STAGE_HELLO, Ordering::Relaxed);
    // The caller's deadline bounds the whole handshake; this one never fires first.
    let per_read = Duration::from_secs(shared.config.handshake_timeout_secs + 1);
    let hello = match read_frame(&mut rd, &mut buf, per_read, MAX_PREAUTH_FRAME).await {
        Ok(h) => h,
        Err(e) => {
            shared.metrics.refused(crate::metrics::Refusal::Protocol);
            send_now(&mut wr, &error(ErrorCode::Protocol, false, e.clone())).await;
            return Err(e);
        }
    };
    match hello {
        Some(Message::Hello {
            server_id,
            token,
            agent_version,
            instance,
            hostname,
        }) => {
            if let Err(msg) = check_names(&server_id, &instance, &hostname) {
                shared.metrics.refused(crate::metrics::Refusal::Protocol);
                send_now(&mut wr, &error(ErrorCode::Protocol, false, msg.clone())).await;
                return Err(msg);
            }
            if let Err(msg) = pull_identity(shared, &server_id).await {
                send_now(&mut wr, &error(ErrorCode::Internal, true, msg.clone())).await;
                return Err(msg);
            }
            let record = match Record::load(&shared.state_dir, &server_id) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("server {server_id}: reading its identity: {e:#}");
                    send_now(&mut wr, &error(ErrorCode::Internal, true, msg.clone())).await;
                    return Err(msg);
                }
            };
            let proof = match identities::check(&server_id, record.as_ref(), presented.as_deref()) {
                Ok(p) => p,
                Err(r) => {
                    let msg = format!("identity refused: {r}");
                    shared.metrics.refused(refusal_kind(&r));
                    send_now(&mut wr, &error(ErrorCode::Auth, false, msg.clone())).await;
                    return Err(msg);
                }
            };
            if let (Proof::Certificate(fp), Some(r)) = (&proof, &record) {
                // The agent uses its renewed certificate: the one before is done with.
                if r.previous_sha256.is_some() && &r.certificate_sha256 == fp {
                    let mut r = r.clone();
                    r.previous_sha256 = None;
                    if let Err(e) = r.save(&shared.state_dir) {
                        tracing::warn!("server {server_id}: forgetting its old certificate: {e:#}");
                    } else if let Err(why) = push_identity(shared, &server_id).await {
                        // The fleet's other receivers accept the old one a while longer.
                        tracing::warn!("server {server_id}: forgetting its old certificate in the fleet's bucket: {why}");
                    }
                }
            }
            if proof != Proof::Token {
                // Authenticated by its certificate: the token is not looked at.
            } else if let Err(why) = shared.tokens.check(&token, &server_id) {
                let msg = format!("token refused for server {server_id}: {why}");
                shared.metrics.refused(crate::metrics::Refusal::Token);
                send_now(
                    &mut wr,
                    &error(
                        ErrorCode::Auth,
                        false,
                        format!("{msg}; check receiver.token in agent.toml"),
                    ),
                )
                .await;
                return Err(msg);
            }
            Ok(Some(Authenticated {
                rd,
                wr,
                buf,
                server: server_id,
                agent_version,
                instance,
                hostname,
                presented,
            }))
        }
        Some(Message::Enrol {
            server_id,
            code,
            public_key,
            instance,
            hostname,
        }) => {
            enrol(
                shared,
                &mut wr,
                presented.as_deref(),
                server_id,
                code,
                public_key,
                instance,
                hostname,
            )
            .await?;
            Ok(None)
        }
        Some(other) => {
            let msg = format!("expected Hello or Enrol first, got {}", other.name());
            shared.metrics.refused(crate::metrics::Refusal::Protocol);
            send_now(&mut wr, &error(ErrorCode::Protocol, false, msg.clone())).await;
            Err(msg)
        }
        None => Err("closed before Hello".into()),
    }
}

async fn run(
    shared: &Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    ticket: HandshakeTicket,
    agents: Arc<Semaphore>,
) -> Result<(), String> {
    let limit = Duration::from_secs(shared.config.handshake_timeout_secs);
    let stage = AtomicU8::new(STAGE_TLS);
    let auth = match tokio::time::timeout(limit, handshake(shared, acceptor, tcp, &stage)).await {
        Err(_) => {
            shared
                .metrics
                .refused(crate::metrics::Refusal::HandshakeTimeout);
            let waiting_for = match stage.load(Ordering::Relaxed) {
                STAGE_TLS => "the TLS handshake",
                STAGE_PREFACE => "the preface",
                _ => "Hello",
            };
            return Err(format!(
                "handshake not completed within {}s (handshake_timeout_secs): still waiting \
                 for {waiting_for}",
                limit.as_secs()
            ));
        }
        Ok(r) => r?,
    };
    drop(ticket);
    let Some(Authenticated {
        mut rd,
        mut wr,
        mut buf,
        server,
        agent_version,
        instance,
        hostname,
        presented,
    }) = auth
    else {
        return Ok(());
    };
    let Ok(_agent_permit) = agents.try_acquire_owned() else {
        let msg = format!(
            "server {server} refused: the receiver already serves max_connections = {} agents",
            shared.config.max_connections
        );
        shared
            .metrics
            .refused(crate::metrics::Refusal::MaxConnections);
        send_now(&mut wr, &error(ErrorCode::Busy, true, msg.clone())).await;
        return Err(msg);
    };
    tracing::Span::current().record("server", server.as_str());

    // One machine per server id, one connection per server: claim the server (an older
    // connection of the same machine is told to go), then take the slot.
    let slot = shared.slot(&server);
    let me = Holder::new(&instance, &hostname, &peer.to_string());
    let server_dir = shared.catalog.server_dir(&server);
    let last = ServerStatus::load(&server_dir).map(|st| LastHolder {
        holder: Holder::new(&st.instance, &st.hostname, &st.peer),
        last_seen_unix_ms: st.last_seen_unix_ms,
    });
    let lease_ms = shared.config.server_lease_minutes * 60_000;
    let (generation, mut newer) = match slot.claim(&server, me, last, now_ms(), lease_ms) {
        Ok(c) => c,
        Err(msg) => {
            shared.metrics.refused(crate::metrics::Refusal::Identity);
            let refused = RefusedClaim {
                instance: instance.clone(),
                hostname: hostname.clone(),
                peer: peer.to_string(),
                at_unix_ms: now_ms(),
                reason: msg.clone(),
            };
            if let Err(e) = refused.save(&server_dir) {
                tracing::warn!("recording the refused claim on server {server}: {e}");
            }
            send_now(&mut wr, &error(ErrorCode::Auth, false, msg.clone())).await;
            return Err(msg);
        }
    };
    let _claim = Released(&slot, generation);
    let _held = match tokio::time::timeout(SLOT_TIMEOUT, slot.lock.lock()).await {
        Ok(g) => g,
        Err(_) => {
            let msg = format!("server {server} is still replicating on another connection");
            shared.metrics.refused(crate::metrics::Refusal::Busy);
            send_now(&mut wr, &error(ErrorCode::Busy, true, msg.clone())).await;
            return Err(msg);
        }
    };
    if *newer.borrow_and_update() != generation {
        return Err("replaced by a newer connection of the same server".into());
    }
    // In a fleet: this receiver must hold the server's lease (and then works on the bucket's
    // state), else the agent is sent to the receiver that does.
    if let Some(fleet) = shared.fleet.clone() {
        let s = server.clone();
        let following = fleet.clone();
        let taken = tokio::task::spawn_blocking(move || fleet.take(&s)).await;
        match taken {
            Ok(Ok(crate::fleet::Taken::Held)) => {
                // Before the first dedupe answer: fenced for a block sweep open now.
                let (f, sh) = (following, shared.clone());
                let followed =
                    tokio::task::spawn_blocking(move || f.follow_sweep(&sh.batches, false)).await;
                let failed = match followed {
                    Ok(r) => r.err().map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    release_lease(shared, &server).await;
                    let msg = format!("server {server}: reading the fleet's block sweep: {e}");
                    send_now(&mut wr, &error(ErrorCode::Busy, true, msg.clone())).await;
                    return Err(msg);
                }
            }
            Ok(Ok(crate::fleet::Taken::Elsewhere { holder, address })) => {
                tracing::info!(%holder, %address, "server held by another receiver: agent redirected");
                send_now(&mut wr, &Message::Redirect { address, holder }).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                let msg = format!("taking server {server} for this receiver: {e}");
                send_now(&mut wr, &error(ErrorCode::Busy, true, msg.clone())).await;
                return Err(msg);
            }
            Err(e) => {
                release_lease(shared, &server).await;
                return Err(format!("taking the server's lease panicked: {e}"));
            }
        }
    }
    tracing::info!(%agent_version, "agent connected");

    let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        let mut out = Vec::with_capacity(64 * 1024);
        while let Some(m) = out_rx.recv().await {
            out.clear();
            m.encode(&mut out);
            while out.len() < 64 * 1024 {
                match out_rx.try_recv() {
                    Ok(m) => m.encode(&mut out),
                    Err(_) => break,
                }
            }
            let write = async {
                wr.write_all(&out).await?;
                wr.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "agent has not read for {}s; dropping the connection",
                        WRITE_TIMEOUT.as_secs()
                    );
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(HANDSHAKE_WRITE_TIMEOUT, wr.shutdown()).await;
    });
    let last_point = shared
        .catalog
        .points(&server)
        .ok()
        .and_then(|p| p.last().map(|p| p.point))
        .unwrap_or(0);
    let _ = out_tx
        .send(Message::Welcome {
            receiver_version: env!("CARGO_PKG_VERSION").to_string(),
            last_point,
        })
        .await;

    let skew = Arc::new(AtomicI64::new(i64::MIN));
    // Off the runtime: opening reads the store's quarantine mark, which with the store in S3
    // is a request (retried for as long as the bucket throttles) that must not hold a worker
    // every other connection needs.
    let opened = {
        let (shared, server, peer, skew) = (
            shared.clone(),
            server.clone(),
            peer.to_string(),
            skew.clone(),
        );
        tokio::task::spawn_blocking(move || {
            Session::new(
                shared,
                server,
                agent_version,
                peer,
                (instance, hostname),
                skew,
            )
        })
        .await
    };
    let session = match opened {
        Ok(s) => s,
        Err(e) => {
            release_lease(shared, &server).await;
            return Err(format!("opening the session failed: {e}"));
        }
    };
    // With the batch the processor holds, at most 2 × BATCH frames of this connection are
    // in memory at once (≈ 75 MiB at the frame cap).
    let (work_tx, work_rx) = mpsc::channel::<Message>(super::session::BATCH);
    let processor = tokio::spawn(session.run(work_rx, out_tx.clone()));

    let mut identity_changes = shared.identities.subscribe();
    let reason: Result<(), String> = loop {
        let frame = tokio::select! {
            f = read_frame(&mut rd, &mut buf, IDLE_TIMEOUT, MAX_FRAME) => f,
            _ = identity_changes.changed() => {
                // Revoked, enrolled again elsewhere, or (a token session) enrolled: this
                // connection's proof no longer holds.
                let Ok(record) = Record::load(&shared.state_dir, &server) else { continue };
                match identities::check(&server, record.as_ref(), presented.as_deref()) {
                    Ok(_) => continue,
                    Err(r) => {
                        // A token session whose server just enrolled reconnects with its
                        // certificate at once; anything else is refused for good.
                        let retryable = matches!(r, IdentityRefusal::CertificateRequired { .. });
                        let msg = format!("identity refused: {r}");
                        let _ = out_tx.send(error(ErrorCode::Auth, retryable, msg.clone())).await;
                        break Err(msg);
                    }
                }
            }
            _ = newer.changed() => break Err("replaced by a newer connection of the same server".into()),
            _ = stop.changed() => break Ok(()),
            _ = work_tx.closed() => break Ok(()),
            _ = out_tx.closed() => break Err("stopped writing to the agent".into()),
        };
        let m = match frame {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => {
                let _ = out_tx
                    .send(error(ErrorCode::Protocol, false, e.clone()))
                    .await;
                break Err(e);
            }
        };
        match m {
            Message::Have { req, hashes } => {
                // One stat per hash: off the async runtime.
                let s = shared.clone();
                let present = tokio::task::spawn_blocking(move || {
                    // A lookup that fails answers "absent": the agent sends the data.
                    hashes
                        .iter()
                        .map(|h| s.store.has(h).unwrap_or(false))
                        .collect()
                })
                .await
                .unwrap_or_default();
                if out_tx
                    .send(Message::HaveReply { req, present })
                    .await
                    .is_err()
                {
                    break Err("writer closed".into());
                }
            }
            Message::OpenDisk { .. }
            | Message::GetManifest { .. }
            | Message::Block { .. }
            | Message::Ref { .. }
            | Message::Patch { .. }
            | Message::Commit { .. }
            | Message::Progress { .. } => {
                if let Message::Progress { agent_unix_ms, .. } = &m {
                    // Measured as the frame arrives, not after the blocks queued before it.
                    skew.store(skew_ms(*agent_unix_ms, now_ms()), Ordering::Relaxed);
                }
                if work_tx.send(m).await.is_err() {
                    break Err("session ended".into());
                }
            }
            Message::Error { code, message, .. } => {
                break Err(format!("agent reported {code:?}: {message}"));
            }
            other => {
                let e = format!("unexpected {} from an agent", other.name());
                let _ = out_tx
                    .send(error(ErrorCode::Protocol, false, e.clone()))
                    .await;
                break Err(e);
            }
        }
    };
    drop(work_tx);
    let end = processor
        .await
        .unwrap_or_else(|e| SessionEnd::Panicked(e.to_string()));
    drop(out_tx);
    let _ = writer.await;
    release_lease(shared, &server).await;
    tracing::info!("agent disconnected");
    match (reason, end) {
        (_, SessionEnd::Panicked(e)) => {
            // A bug, never a peer's doing alone: logged in full, not rate-limited. Only this
            // session ended; its state is reread from disk at the next connection.
            tracing::error!("server {server}: session panicked and was ended: {e}");
            Err(format!("session panicked: {e}"))
        }
        (_, SessionEnd::Failed(f)) => Err(format!(
            "{} ({:?}, {}): {}",
            if f.retryable {
                "refused for now"
            } else {
                "refused"
            },
            f.code,
            if f.retryable {
                "the agent will retry"
            } else {
                "retrying will not help"
            },
            f.message
        )),
        (r, SessionEnd::Done) => r,
    }
}
