//! The agent's client certificate: obtained once with a one-time code (`lifeboat-agent
//! enroll`), presented at every connection (mutual TLS), renewed by the agent itself once two
//! thirds of its life have passed.
//!
//! `<state-dir>/certificate.json` (mode 0600) holds the P-256 private key (PKCS#8), the
//! certificate (DER), the server id it was issued for and its validity. One file, replaced
//! atomically: a renewal interrupted at any instant leaves the old pair or the new one, never
//! a key with another key's certificate. The key never leaves this machine: the receiver
//! signs its public half. Neither the key nor a code is ever logged.

use crate::link::LinkError;
use lifeboat_common::config::AgentConfig;
use lifeboat_common::protocol::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const FILE: &str = "certificate.json";
/// How often the running agent checks whether its certificate is due for renewal (and
/// retries a renewal that failed).
const RENEW_CHECK: Duration = Duration::from_secs(3600);

#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// The server id the certificate was issued for.
    pub server: String,
    /// "sha256:<hex>" of the certificate's DER, as the receiver's `agents` lists it.
    pub sha256: String,
    pub issued_unix_ms: u64,
    pub not_after_unix_ms: u64,
    /// The certificate, DER, hex.
    certificate: String,
    /// The private key, PKCS#8 DER, hex.
    key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("sha256", &self.sha256)
            .field("not_after_unix_ms", &self.not_after_unix_ms)
            .finish_non_exhaustive()
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

impl Credentials {
    /// This agent's certificate, if it enrolled. A file that exists but cannot be used is an
    /// error (falling back to the token would hide it).
    pub fn load(state_dir: &Path) -> Result<Option<Credentials>, String> {
        let p = path(state_dir);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", p.display())),
        };
        let c: Credentials = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is damaged ({e}); enrol again", p.display()))?;
        if hex::decode(&c.certificate).is_err() || hex::decode(&c.key).is_err() {
            return Err(format!("{} is damaged (not hex); enrol again", p.display()));
        }
        Ok(Some(c))
    }

    fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        lifeboat_common::durable::write_atomic_mode(&path(state_dir), &bytes, 0o600)
    }

    /// The certificate and key for rustls.
    pub fn client_auth(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let cert = hex::decode(&self.certificate).unwrap_or_default();
        let key = hex::decode(&self.key).unwrap_or_default();
        (
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
    }

    /// Two thirds of the certificate's life have passed.
    pub fn renewal_due(&self, now_ms: u64) -> bool {
        let life = self.not_after_unix_ms.saturating_sub(self.issued_unix_ms);
        now_ms >= self.issued_unix_ms + life / 3 * 2
    }

    /// Whether this certificate can be used by `server_id` now; the error says what to do.
    pub fn usable(&self, server_id: &str, state_dir: &Path, now_ms: u64) -> Result<(), String> {
        if self.server != server_id {
            return Err(format!(
                "the certificate in {} was issued for server {}, but server_id is {server_id}: \
                 enrol this server (lifeboat-receiver enroll --server {server_id}, then \
                 lifeboat-agent enroll), or set server_id back",
                path(state_dir).display(),
                self.server
            ));
        }
        if self.not_after_unix_ms <= now_ms {
            return Err(format!(
                "this agent's certificate ({}) expired at {} UTC (by this machine's clock): \
                 enrol again (lifeboat-receiver enroll --server {server_id}, then \
                 lifeboat-agent enroll); if the clock is wrong, fix it first",
                self.sha256,
                lifeboat_common::fmt_utc(self.not_after_unix_ms)
            ));
        }
        Ok(())
    }
}

/// A new P-256 key: (PKCS#8 DER, uncompressed public point).
fn new_key() -> Result<(Vec<u8>, Vec<u8>), String> {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| "generating a P-256 key failed".to_string())?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| "reading back the new key failed".to_string())?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

fn sha256(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// Asks the receiver for a certificate for a new key: with `code` (enrolment), or with an
/// empty code over a connection that presents `current` (renewal). Saves and returns the new
/// credentials; on any error nothing on disk changes.
pub async fn request(
    cfg: &AgentConfig,
    server_id: &str,
    identity: &crate::identity::Identity,
    code: &str,
    current: Option<&Credentials>,
) -> Result<Credentials, LinkError> {
    let (key, public_key) = new_key().map_err(LinkError::Lost)?;
    let mut link = crate::link::Link::open(cfg, &cfg.receiver.address, current).await?;
    let m = Message::Enrol {
        server_id: server_id.to_string(),
        code: code.to_string(),
        public_key,
        instance: identity.instance.clone(),
        hostname: identity.hostname.clone(),
    };
    let reply = link.exchange(&m).await?;
    let Message::Enrolled {
        certificate,
        not_after_unix_ms,
    } = reply
    else {
        return Err(LinkError::Protocol(format!(
            "expected Enrolled, got {}",
            reply.name()
        )));
    };
    let c = Credentials {
        server: server_id.to_string(),
        sha256: sha256(&certificate),
        issued_unix_ms: lifeboat_common::now_ms(),
        not_after_unix_ms,
        certificate: hex::encode(&certificate),
        key: hex::encode(&key),
    };
    lifeboat_common::durable::create_dir_all_durable(&cfg.state_dir)
        .and_then(|()| c.save(&cfg.state_dir))
        .map_err(|e| {
            LinkError::Lost(format!(
                "the receiver issued certificate {} but saving it to {} failed: {e}",
                c.sha256,
                path(&cfg.state_dir).display()
            ))
        })?;
    Ok(c)
}

/// Renews the certificate whenever it is due, checking every [`RENEW_CHECK`] (the running
/// agent's task). A failed renewal is retried at the next check; the old certificate stays
/// in use meanwhile (the receiver accepts it until the new one is used).
pub async fn keep_renewed(
    cfg: AgentConfig,
    server_id: String,
    identity: crate::identity::Identity,
) {
    loop {
        tokio::time::sleep(RENEW_CHECK).await;
        renew_if_due(&cfg, &server_id, &identity).await;
    }
}

/// Renews the certificate if two thirds of its life have passed (the agent's start does this
/// before its first connection). A failure is logged; the current certificate stays in use.
pub async fn renew_if_due(
    cfg: &AgentConfig,
    server_id: &str,
    identity: &crate::identity::Identity,
) {
    let Ok(Some(c)) = Credentials::load(&cfg.state_dir) else {
        return;
    };
    let now = lifeboat_common::now_ms();
    if c.server != server_id || !c.renewal_due(now) || c.not_after_unix_ms <= now {
        return;
    }
    match request(cfg, server_id, identity, "", Some(&c)).await {
        Ok(new) => tracing::info!(
            certificate = %new.sha256,
            replaced = %c.sha256,
            valid_until = %lifeboat_common::fmt_utc(new.not_after_unix_ms),
            "client certificate renewed"
        ),
        Err(e) => tracing::warn!(
            "renewing the client certificate {} failed: {e}; retrying in {} min (it stays \
             valid until {} UTC)",
            c.sha256,
            RENEW_CHECK.as_secs() / 60,
            lifeboat_common::fmt_utc(c.not_after_unix_ms)
        ),
    }
}

/// `lifeboat-agent enroll`: obtains (or, with `renew`, renews) this agent's certificate and
/// says what happens next.
pub fn enroll_command(cfg: &AgentConfig, code: Option<String>, renew: bool) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let server_id = cfg.server_id();
    let current = Credentials::load(&cfg.state_dir).map_err(anyhow::Error::msg)?;
    let code = if renew {
        let Some(c) = &current else {
            bail!(
                "--renew: this agent has no certificate yet ({} is missing); enrol it with a \
                 code from `lifeboat-receiver enroll --server {server_id}`",
                path(&cfg.state_dir).display()
            );
        };
        c.usable(&server_id, &cfg.state_dir, lifeboat_common::now_ms())
            .map_err(anyhow::Error::msg)?;
        String::new()
    } else {
        let code = match code {
            Some(c) => c,
            None => {
                use std::io::IsTerminal;
                if std::io::stdin().is_terminal() {
                    eprint!("enrolment code for server {server_id}: ");
                }
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the code from stdin")?;
                line
            }
        };
        let code = code.trim().to_string();
        if code.is_empty() {
            bail!(
                "no enrolment code: pass --code, or pipe it in (make one on the receiver: \
                 lifeboat-receiver enroll --server {server_id})"
            );
        }
        code
    };
    lifeboat_common::durable::create_dir_all_durable(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let identity = crate::identity::load(&cfg.state_dir).with_context(|| {
        format!(
            "reading this agent's identity in {}",
            cfg.state_dir.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let presented = if renew { current.as_ref() } else { None };
    let c = rt
        .block_on(request(cfg, &server_id, &identity, &code, presented))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{} server {server_id}: certificate {}, valid until {} UTC (the agent renews it by \
         itself); saved in {}",
        if renew { "renewed for" } else { "enrolled as" },
        c.sha256,
        lifeboat_common::fmt_utc(c.not_after_unix_ms),
        path(&cfg.state_dir).display()
    );
    if !renew {
        println!(
            "The agent uses it from its next connection (a running agent switches within \
             seconds); receiver.token is no longer used and can be removed from agent.toml."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_two_thirds_and_the_key_stays_private() {
        let (key, public) = new_key().unwrap();
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 4);
        let c = Credentials {
            server: "web".into(),
            sha256: "sha256:x".into(),
            issued_unix_ms: 0,
            not_after_unix_ms: 300,
            certificate: "00".into(),
            key: hex::encode(&key),
        };
        assert!(!c.renewal_due(199));
        assert!(c.renewal_due(200));
        assert!(!format!("{c:?}").contains(&c.key));
        let d = tempfile::tempdir().unwrap();
        c.save(d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(d.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(c.usable("web", d.path(), 299).is_ok());
        assert!(c
            .usable("db", d.path(), 1)
            .unwrap_err()
            .contains("issued for server web"));
        assert!(c
            .usable("web", d.path(), 300)
            .unwrap_err()
            .contains("expired"));
        std::fs::write(path(d.path()), "{").unwrap();
        assert!(Credentials::load(d.path()).unwrap_err().contains("damaged"));
    }
}
