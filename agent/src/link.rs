//! The agent's connection to the receiver: TCP, TLS 1.3 with the pinned CA, preface, Hello.
//!
//! Frames are queued with [`Link::queue`]; [`Link::flush`] hands them, in pieces of at most
//! [`PIECE`] bytes, to a writer task that owns the socket and applies the bandwidth limit. The
//! channel to the writer is short, so `flush` waits only while the writer is behind (that wait
//! is the "held up by the network" time the compression control reads), and never for a whole
//! batch: the sender's loop keeps its ticks, progress reports and hang detection even on a
//! slow link. A reader task decodes incoming frames into a channel.

use crate::limiter::Limiter;
use lifeboat_common::config::{parse_fingerprint, AgentConfig};
use lifeboat_common::protocol::{self, decode_frame, ErrorCode, Message, PREFACE_LEN};
use rustls::pki_types::ServerName;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

/// Largest piece handed to the writer at once.
pub const PIECE: usize = 256 * 1024;
/// Pieces queued for the writer before `flush` waits.
const QUEUED_PIECES: usize = 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to receiver {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("TLS with receiver {addr}: {why}")]
    Tls { addr: String, why: String },
    #[error("the receiver refused ({code:?}): {message}")]
    Refused {
        code: ErrorCode,
        retryable: bool,
        message: String,
    },
    #[error("connection to the receiver lost: {0}")]
    Lost(String),
    #[error("receiver sent something unexpected: {0}")]
    Protocol(String),
    #[error("receiver did not answer within {0}s")]
    Timeout(u64),
    /// Another receiver of the fleet holds this server: connect to `address`.
    #[error("receiver {holder} at {address} holds this server now")]
    Redirected { address: String, holder: String },
}

impl LinkError {
    /// Retrying later can help (network trouble), or not (refused token, bad config).
    pub fn retryable(&self) -> bool {
        match self {
            LinkError::Refused { retryable, .. } => *retryable,
            LinkError::Tls { .. } => false,
            _ => true,
        }
    }
}

pub struct Link {
    inbound: mpsc::Receiver<Result<Message, String>>,
    out: Vec<u8>,
    to_writer: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    /// Why the writer stopped, when it did.
    writer_error: Arc<Mutex<Option<LinkError>>>,
    sent: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    pub bytes_sent: u64,
    /// The receiver's newest committed point for this server (0: none).
    pub receiver_last_point: u64,
    /// The receiver answers within this, or the connection is considered hung.
    pub reply_timeout: Duration,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
    }
}

/// Writes pieces to the socket, paced by the limiter, each within `timeout`.
async fn write_pieces(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut limiter: Limiter,
    timeout: Duration,
    sent: Arc<AtomicU64>,
    error: Arc<Mutex<Option<LinkError>>>,
) {
    let fail = |e: LinkError| {
        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    };
    while let Some(piece) = rx.recv().await {
        let wait = limiter.take(piece.len());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let write = async {
            wr.write_all(&piece).await?;
            wr.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => {
                sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => return fail(LinkError::Lost(e.to_string())),
            // The receiver stopped reading: as hung as one that stopped answering.
            Err(_) => return fail(LinkError::Timeout(timeout.as_secs())),
        }
    }
    // The channel closed: the link is being closed cleanly (close_notify).
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, wr.shutdown()).await;
}

/// A connection past TLS and the preface, before `Hello` or `Enrol`.
pub struct Opened {
    rd: tokio::io::ReadHalf<TlsStream<TcpStream>>,
    wr: WriteHalf<TlsStream<TcpStream>>,
}

impl Opened {
    /// Sends one message and reads the one reply (an `Error` becomes [`LinkError::Refused`]).
    pub async fn exchange(&mut self, m: &Message) -> Result<Message, LinkError> {
        let mut out = Vec::new();
        m.encode(&mut out);
        let write = async {
            self.wr.write_all(&out).await?;
            self.wr.flush().await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, write)
            .await
            .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        let mut buf = Vec::new();
        loop {
            match decode_frame(&buf) {
                Ok(Some((
                    Message::Error {
                        code,
                        retryable,
                        message,
                    },
                    _,
                ))) => {
                    return Err(LinkError::Refused {
                        code,
                        retryable,
                        message,
                    })
                }
                Ok(Some((m, _))) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    return Err(LinkError::Protocol(format!(
                        "malformed frame from receiver: {e}"
                    )))
                }
            }
            let n = tokio::time::timeout(CONNECT_TIMEOUT, self.rd.read_buf(&mut buf))
                .await
                .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT.as_secs()))?
                .map_err(|e| LinkError::Lost(e.to_string()))?;
            if n == 0 {
                return Err(LinkError::Lost("receiver closed the connection".into()));
            }
        }
    }
}

impl Link {
    /// TCP, TLS 1.3 with the pinned CA (presenting `client` as this agent's certificate, when
    /// given), and the preface both ways.
    pub async fn open(
        cfg: &AgentConfig,
        addr: &str,
        client: Option<&crate::certificate::Credentials>,
    ) -> Result<Opened, LinkError> {
        let addr = addr.to_string();
        let connect_err = |why: String| LinkError::Connect {
            addr: addr.clone(),
            why,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| connect_err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let pin =
            parse_fingerprint(&cfg.receiver.ca_fingerprint).ok_or_else(|| LinkError::Tls {
                addr: addr.clone(),
                why: "receiver.ca_fingerprint is malformed".into(),
            })?;
        let tls_err = |why: String| LinkError::Tls {
            addr: addr.clone(),
            why,
        };
        let tls_cfg = crate::tls::client_config(pin, client.map(|c| c.client_auth()))
            .map_err(|e| tls_err(e.to_string()))?;
        let name = ServerName::try_from(cfg.receiver.server_name.clone())
            .map_err(|e| tls_err(format!("server_name {:?}: {e}", cfg.receiver.server_name)))?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls_cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| tls_err("handshake timed out".into()))?
        .map_err(|e| {
            // Certificate problems are permanent; a reset mid-handshake is not.
            if e.kind() == std::io::ErrorKind::InvalidData {
                tls_err(e.to_string())
            } else {
                connect_err(format!("TLS handshake: {e}"))
            }
        })?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        wr.write_all(&protocol::preface(protocol::PROTOCOL_VERSION))
            .await
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        let mut pre = [0u8; PREFACE_LEN];
        tokio::time::timeout(CONNECT_TIMEOUT, rd.read_exact(&mut pre))
            .await
            .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| LinkError::Lost(format!("reading preface: {e}")))?;
        protocol::check_preface(&pre).map_err(|e| LinkError::Protocol(e.to_string()))?;
        Ok(Opened { rd, wr })
    }

    /// Opens a connection to `addr` (with this agent's certificate once it enrolled, else its
    /// token) and says `Hello`; returns once the receiver answered `Welcome`
    /// ([`LinkError::Redirected`] when it answered that another receiver holds the server).
    pub async fn connect(
        cfg: &AgentConfig,
        addr: &str,
        server_id: &str,
        identity: &crate::identity::Identity,
        bandwidth_mbps: Arc<AtomicU64>,
    ) -> Result<Link, LinkError> {
        let creds = crate::certificate::Credentials::load(&cfg.state_dir).map_err(|why| {
            LinkError::Tls {
                addr: addr.to_string(),
                why,
            }
        })?;
        if let Some(c) = &creds {
            c.usable(server_id, &cfg.state_dir, lifeboat_common::now_ms())
                .map_err(|why| LinkError::Tls {
                    addr: addr.to_string(),
                    why,
                })?;
        } else if cfg.receiver.token.trim().is_empty() {
            return Err(LinkError::Tls {
                addr: addr.to_string(),
                why: format!(
                    "this agent has neither a certificate ({} is missing) nor a token \
                     (receiver.token is empty): enrol it (lifeboat-receiver enroll --server \
                     {server_id}, then lifeboat-agent enroll)",
                    crate::certificate::path(&cfg.state_dir).display()
                ),
            });
        }
        let Opened { mut rd, wr } = Link::open(cfg, addr, creds.as_ref()).await?;
        let reply_timeout = Duration::from_secs(cfg.receiver.timeout_secs);

        let (tx, inbound) = mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(256 * 1024);
            loop {
                loop {
                    match decode_frame(&buf) {
                        Ok(Some((m, used))) => {
                            buf.drain(..used);
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(format!("malformed frame from receiver: {e}")))
                                .await;
                            return;
                        }
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = tx.send(Err("receiver closed the connection".into())).await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        let (to_writer, pieces) = mpsc::channel(QUEUED_PIECES);
        let sent = Arc::new(AtomicU64::new(0));
        let writer_error = Arc::new(Mutex::new(None));
        let writer = tokio::spawn(write_pieces(
            wr,
            pieces,
            Limiter::shared(bandwidth_mbps),
            reply_timeout,
            sent.clone(),
            writer_error.clone(),
        ));
        let mut link = Link {
            inbound,
            out: Vec::with_capacity(1024 * 1024),
            to_writer: Some(to_writer),
            writer: Some(writer),
            writer_error,
            sent,
            reader,
            bytes_sent: 0,
            receiver_last_point: 0,
            reply_timeout,
        };
        link.queue(&Message::Hello {
            server_id: server_id.to_string(),
            // With a certificate the receiver does not look at the token: none is sent.
            token: if creds.is_some() {
                String::new()
            } else {
                cfg.receiver.token.clone()
            },
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            instance: identity.instance.clone(),
            hostname: identity.hostname.clone(),
        });
        link.flush().await?;
        match link.recv(CONNECT_TIMEOUT).await? {
            Message::Welcome { last_point, .. } => link.receiver_last_point = last_point,
            Message::Redirect { address, holder } => {
                return Err(LinkError::Redirected { address, holder })
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected Welcome, got {}",
                    other.name()
                )))
            }
        }
        Ok(link)
    }

    pub fn queue(&mut self, m: &Message) {
        m.encode(&mut self.out);
    }

    /// The output buffer, for encoders that borrow their data (`protocol::encode_block`).
    pub fn out_buf(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Hands everything queued to the writer; waits only while the writer is behind.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(tx) = &self.to_writer else {
            return Err(LinkError::Lost("link closed".into()));
        };
        for piece in self.out.chunks(PIECE) {
            if tx.send(piece.to_vec()).await.is_err() {
                let why = self
                    .writer_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Err(why.unwrap_or_else(|| LinkError::Lost("writer stopped".into())));
            }
        }
        self.out.clear();
        self.bytes_sent = self.sent.load(Ordering::Relaxed);
        Ok(())
    }

    /// Ends the TLS session cleanly (close_notify) after everything queued is written.
    pub async fn close(mut self) {
        let _ = self.flush().await;
        self.to_writer = None;
        if let Some(w) = self.writer.take() {
            let _ = tokio::time::timeout(self.reply_timeout, w).await;
        }
        self.bytes_sent = self.sent.load(Ordering::Relaxed);
    }

    /// The next frame; an Error frame becomes [`LinkError::Refused`].
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message, LinkError> {
        let m = tokio::time::timeout(timeout, self.inbound.recv())
            .await
            .map_err(|_| LinkError::Timeout(timeout.as_secs()))?;
        match m {
            Some(Ok(Message::Error {
                code,
                retryable,
                message,
            })) => Err(LinkError::Refused {
                code,
                retryable,
                message,
            }),
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(LinkError::Lost(e)),
            None => Err(LinkError::Lost("reader stopped".into())),
        }
    }
}
