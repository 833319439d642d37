//! The agent's connection to the receiver: TCP, TLS 1.3 with the pinned CA, preface, Hello.
//! Frames are queued with [`Link::queue`] and written by [`Link::flush`] (which applies the
//! bandwidth limit); a reader task decodes incoming frames into a channel.

use crate::limiter::Limiter;
use lifeboat_common::config::{parse_fingerprint, AgentConfig};
use lifeboat_common::protocol::{self, decode_frame, ErrorCode, Message, PREFACE_LEN};
use rustls::pki_types::ServerName;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
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
    wr: WriteHalf<TlsStream<TcpStream>>,
    out: Vec<u8>,
    limiter: Option<Limiter>,
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
    }
}

impl Link {
    pub async fn connect(cfg: &AgentConfig, server_id: &str) -> Result<Link, LinkError> {
        let addr = cfg.receiver.address.clone();
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
        let tls_cfg = crate::tls::client_config(pin).map_err(|e| tls_err(e.to_string()))?;
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
        let mut link = Link {
            inbound,
            wr,
            out: Vec::with_capacity(1024 * 1024),
            limiter: Limiter::new(cfg.bandwidth_limit_mbps),
            reader,
            bytes_sent: 0,
            receiver_last_point: 0,
            reply_timeout: Duration::from_secs(cfg.receiver.timeout_secs),
        };
        link.queue(&Message::Hello {
            server_id: server_id.to_string(),
            token: cfg.receiver.token.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        });
        link.flush().await?;
        match link.recv(CONNECT_TIMEOUT).await? {
            Message::Welcome { last_point, .. } => link.receiver_last_point = last_point,
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

    pub fn pending_bytes(&self) -> usize {
        self.out.len()
    }

    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.out.is_empty() {
            return Ok(());
        }
        if let Some(l) = &mut self.limiter {
            let wait = l.take(self.out.len());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let write = async {
            self.wr.write_all(&self.out).await?;
            self.wr.flush().await
        };
        tokio::time::timeout(self.reply_timeout, write)
            .await
            .map_err(|_| LinkError::Timeout(self.reply_timeout.as_secs()))?
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        self.bytes_sent += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Ends the TLS session cleanly (close_notify), flushing anything queued.
    pub async fn close(mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.wr.shutdown()).await;
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
