//! Per-agent identities: one-time enrolment codes, the client certificate each server gets
//! with one, its renewal, and revocation.
//!
//! Under `<state-dir>/agents/`:
//! - `codes/<sha256 of the code>.json`: a code not used yet (its server and expiry). The code
//!   itself is shown once, by `enroll`, and never stored or logged.
//! - `codes/<sha256>.used`: the same code after its one use (when, by which host), so a second
//!   use is refused as such. Using a code is a rename: of two agents racing with one code,
//!   exactly one rename succeeds.
//! - `<server>.json`: the server's [`Record`]: the SHA-256 of its current certificate, the one
//!   renewal replaced (accepted until the new one is used), and whether it was revoked.
//!   Replaced atomically; read at every handshake, so `revoke` and a new enrolment take effect
//!   without a restart, and [`Changes`] lets live sessions see them at once.
//!
//! A server with a record authenticates with its certificate only: its tokens no longer
//! work. A server without one goes on with tokens (`auth.rs`) until its owner enrols it.

use anyhow::Context;
use lifeboat_common::durable;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

pub const AGENTS: &str = "agents";
const CODES: &str = "codes";
/// Used and expired codes are forgotten this long after they stop working.
const KEEP_SPENT_CODES: Duration = Duration::from_secs(30 * 86_400);

fn digest(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// A code as typed: case and dashes do not matter.
fn normalise(code: &str) -> String {
    code.chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

fn agents_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(AGENTS)
}

fn codes_dir(state_dir: &Path) -> PathBuf {
    agents_dir(state_dir).join(CODES)
}

/// A pending enrolment code, as stored (by digest).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingCode {
    pub server: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_host: Option<String>,
}

/// A new code for `server`, valid for `valid`: "xxxx-xxxx-…" (128 bits). Returns the code
/// (to show once) and its expiry.
pub fn new_code(
    state_dir: &Path,
    server: &str,
    valid: Duration,
    now_ms: u64,
) -> anyhow::Result<(String, u64)> {
    let dir = codes_dir(state_dir);
    durable::create_dir_all_durable(&dir).with_context(|| format!("creating {}", dir.display()))?;
    prune_codes(&dir, now_ms);
    let raw = hex::encode(rand::random::<[u8; 16]>());
    let code = raw
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("-");
    let pending = PendingCode {
        server: server.to_string(),
        created_unix_ms: now_ms,
        expires_unix_ms: now_ms.saturating_add(valid.as_millis() as u64),
        used_unix_ms: None,
        used_by_host: None,
    };
    let path = dir.join(format!("{}.json", digest(&raw)));
    durable::write_atomic(&path, &serde_json::to_vec_pretty(&pending)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((code, pending.expires_unix_ms))
}

/// Forgets codes used or expired long ago (best effort: a leftover file is harmless).
fn prune_codes(dir: &Path, now_ms: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Some(c) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<PendingCode>(&b).ok())
        else {
            continue;
        };
        let spent = c.used_unix_ms.unwrap_or(c.expires_unix_ms);
        if now_ms.saturating_sub(spent) > KEEP_SPENT_CODES.as_millis() as u64 {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Codes not used yet and not expired, oldest first.
pub fn pending_codes(state_dir: &Path, now_ms: u64) -> Vec<PendingCode> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(codes_dir(state_dir)) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            if let Some(c) = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<PendingCode>(&b).ok())
            {
                if c.expires_unix_ms > now_ms {
                    out.push(c);
                }
            }
        }
    }
    out.sort_by_key(|c| c.created_unix_ms);
    out
}

/// Why an enrolment code was refused (goes back to the agent and into the log; never holds
/// the code).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodeRefusal {
    #[error("unknown enrolment code (check it, or make a new one with `lifeboat-receiver enroll --server {0}`)")]
    Unknown(String),
    #[error("this enrolment code was already used, at {at} (UTC) by host {host:?}; a code works once: make a new one with `lifeboat-receiver enroll --server {server}`")]
    Used {
        server: String,
        at: String,
        host: String,
    },
    #[error("this enrolment code expired at {at} (UTC, receiver clock); make a new one with `lifeboat-receiver enroll --server {server}`")]
    Expired { server: String, at: String },
    #[error("this enrolment code is for server {code_for}, not {asked}")]
    OtherServer { code_for: String, asked: String },
}

/// Uses `code` for `server` once. On success the code is spent, whatever happens next (an
/// agent whose enrolment then fails needs a new code: a code never works twice).
pub fn redeem(
    state_dir: &Path,
    code: &str,
    server: &str,
    host: &str,
    now_ms: u64,
) -> Result<(), CodeRefusal> {
    let dir = codes_dir(state_dir);
    let d = digest(&normalise(code));
    let pending = dir.join(format!("{d}.json"));
    let used = dir.join(format!("{d}.used"));
    let read = |p: &Path| {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<PendingCode>(&b).ok())
    };
    let spent = |c: PendingCode| CodeRefusal::Used {
        server: c.server,
        at: crate::commands::fmt_utc(c.used_unix_ms.unwrap_or(0)),
        host: c.used_by_host.unwrap_or_default(),
    };
    let Some(mut c) = read(&pending) else {
        return Err(match read(&used) {
            Some(c) => spent(c),
            None => CodeRefusal::Unknown(server.to_string()),
        });
    };
    if c.server != server {
        return Err(CodeRefusal::OtherServer {
            code_for: c.server,
            asked: server.to_string(),
        });
    }
    if c.expires_unix_ms <= now_ms {
        return Err(CodeRefusal::Expired {
            server: c.server,
            at: crate::commands::fmt_utc(c.expires_unix_ms),
        });
    }
    // The rename is the one use: a racing second use finds no file.
    if std::fs::rename(&pending, &used).is_err() {
        return Err(match read(&used) {
            Some(c) => spent(c),
            None => CodeRefusal::Unknown(server.to_string()),
        });
    }
    c.used_unix_ms = Some(now_ms);
    c.used_by_host = Some(host.to_string());
    if let Ok(b) = serde_json::to_vec_pretty(&c) {
        // Only for the message a reuse gets; the rename above already spent the code.
        let _ = durable::write_atomic(&used, &b);
    }
    Ok(())
}

/// A server's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub server: String,
    /// "sha256:<hex>" of the current certificate's DER ("" for a server revoked before it
    /// ever enrolled).
    pub certificate_sha256: String,
    pub issued_unix_ms: u64,
    pub not_after_unix_ms: u64,
    /// When the server enrolled with a code (renewals keep it).
    pub enrolled_unix_ms: u64,
    /// The certificate a renewal replaced, accepted until the agent first uses the new one
    /// (an agent that died before saving its renewed certificate is not locked out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
    pub instance: String,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
}

fn record_path(state_dir: &Path, server: &str) -> PathBuf {
    agents_dir(state_dir).join(format!("{server}.json"))
}

impl Record {
    /// The server's record; `Ok(None)` when it never enrolled. A record that cannot be read
    /// is an error, never taken for "not enrolled" (which would let tokens back in).
    pub fn load(state_dir: &Path, server: &str) -> anyhow::Result<Option<Record>> {
        let path = record_path(state_dir, server);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let dir = agents_dir(state_dir);
        durable::create_dir_all_durable(&dir)?;
        let path = record_path(state_dir, &self.server);
        durable::write_atomic(&path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Every record, by server.
    pub fn all(state_dir: &Path) -> anyhow::Result<Vec<Record>> {
        let dir = agents_dir(state_dir);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for e in entries {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            out.push(
                serde_json::from_slice::<Record>(&b)
                    .with_context(|| format!("parsing {}", p.display()))?,
            );
        }
        out.sort_by(|a, b| a.server.cmp(&b.server));
        Ok(out)
    }
}

/// Why a connection's identity was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefusal {
    #[error("server {server}'s identity was revoked at {at} (UTC) with `lifeboat-receiver revoke`; to let it back, enrol it again (`lifeboat-receiver enroll --server {server}`, then `lifeboat-agent enroll`)")]
    Revoked { server: String, at: String },
    #[error("the client certificate {presented} is not server {server}'s (its certificate is {current}); was the agent enrolled again elsewhere, or is server_id wrong?")]
    NotThisServers {
        server: String,
        presented: String,
        current: String,
    },
    #[error("the client certificate {presented} is not enrolled for server {server}, which has none (enrol it: `lifeboat-receiver enroll --server {server}`)")]
    NotEnrolled { server: String, presented: String },
    #[error("server {server} authenticates with its certificate since {since} (UTC), and this connection presented none; tokens no longer work for it (the agent keeps its certificate in its state directory: was it deleted, or is this another machine?)")]
    CertificateRequired { server: String, since: String },
}

/// How a connection proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The server's current certificate (or the one its renewal just replaced).
    Certificate(String),
    /// No certificate, and the server never enrolled: the token decides.
    Token,
}

/// Whether a connection presenting `presented` (a certificate's "sha256:…", or none) may act
/// as `server`, whose record is `record`.
pub fn check(
    server: &str,
    record: Option<&Record>,
    presented: Option<&str>,
) -> Result<Proof, IdentityRefusal> {
    if let Some(at) = record.and_then(|r| r.revoked_unix_ms) {
        return Err(IdentityRefusal::Revoked {
            server: server.to_string(),
            at: crate::commands::fmt_utc(at),
        });
    }
    match (record, presented) {
        (None, None) => Ok(Proof::Token),
        (Some(r), None) => Err(IdentityRefusal::CertificateRequired {
            server: server.to_string(),
            since: crate::commands::fmt_utc(r.enrolled_unix_ms),
        }),
        (None, Some(p)) => Err(IdentityRefusal::NotEnrolled {
            server: server.to_string(),
            presented: p.to_string(),
        }),
        (Some(r), Some(p)) => {
            if r.certificate_sha256 == p || r.previous_sha256.as_deref() == Some(p) {
                Ok(Proof::Certificate(p.to_string()))
            } else {
                Err(IdentityRefusal::NotThisServers {
                    server: server.to_string(),
                    presented: p.to_string(),
                    current: r.certificate_sha256.clone(),
                })
            }
        }
    }
}

/// Marks `server` revoked (made if it never enrolled: then its tokens stop working too).
/// Returns the record as saved.
pub fn revoke(state_dir: &Path, server: &str, now_ms: u64) -> anyhow::Result<Record> {
    let mut r = Record::load(state_dir, server)?.unwrap_or_else(|| Record {
        server: server.to_string(),
        ..Record::default()
    });
    if r.revoked_unix_ms.is_none() {
        r.revoked_unix_ms = Some(now_ms);
    }
    r.previous_sha256 = None;
    r.save(state_dir)?;
    Ok(r)
}

/// Tells live sessions that identities changed (a revocation, a new enrolment), so each
/// checks its own again. `serve` polls the directory's modification time: `revoke` is
/// another process.
pub struct Changes {
    tx: watch::Sender<u64>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            tx: watch::channel(0).0,
        }
    }
}

impl Changes {
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Any change this process made itself.
    pub fn bump(&self) {
        self.tx.send_modify(|g| *g += 1);
    }

    /// Polls `<state-dir>/agents` every `every` until `stop`.
    pub async fn watch(
        &self,
        state_dir: PathBuf,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let dir = agents_dir(&state_dir);
        let stamp = |d: &Path| std::fs::metadata(d).and_then(|m| m.modified()).ok();
        let mut last = stamp(&dir);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let now = stamp(&dir);
            if now != last {
                last = now;
                self.bump();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_for_its_server_until_it_expires() {
        let d = tempfile::tempdir().unwrap();
        let (code, exp) = new_code(d.path(), "web", Duration::from_secs(60), 1_000).unwrap();
        assert_eq!(exp, 61_000);
        assert_eq!(code.len(), 39, "{code}");
        assert!(matches!(
            redeem(d.path(), "0000", "web", "h", 2_000),
            Err(CodeRefusal::Unknown(_))
        ));
        assert_eq!(
            redeem(d.path(), &code, "db", "h", 2_000),
            Err(CodeRefusal::OtherServer {
                code_for: "web".into(),
                asked: "db".into()
            })
        );
        // Typed without dashes, in capitals: the same code.
        let typed = code.replace('-', "").to_uppercase();
        assert_eq!(redeem(d.path(), &typed, "web", "host-a", 2_000), Ok(()));
        match redeem(d.path(), &code, "web", "host-b", 3_000) {
            Err(CodeRefusal::Used { host, .. }) => assert_eq!(host, "host-a"),
            other => panic!("{other:?}"),
        }
        let (late, _) = new_code(d.path(), "web", Duration::from_secs(60), 1_000).unwrap();
        assert!(matches!(
            redeem(d.path(), &late, "web", "h", 61_000),
            Err(CodeRefusal::Expired { .. })
        ));
        // Nothing on disk holds a code.
        for e in std::fs::read_dir(codes_dir(d.path())).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            assert!(!text.contains(&code.replace('-', "")) && !text.contains(&code));
        }
    }

    #[test]
    fn racing_uses_of_one_code_let_exactly_one_through() {
        let d = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let (code, _) = new_code(d.path(), "web", Duration::from_secs(60), 1_000).unwrap();
            let wins: usize = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|i| {
                        let code = &code;
                        let p = d.path();
                        s.spawn(move || redeem(p, code, "web", &format!("h{i}"), 2_000).is_ok())
                    })
                    .collect();
                hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
            });
            assert_eq!(wins, 1);
        }
    }

    #[test]
    fn a_record_decides_between_certificate_and_token() {
        let r = Record {
            server: "web".into(),
            certificate_sha256: "sha256:new".into(),
            previous_sha256: Some("sha256:old".into()),
            enrolled_unix_ms: 5,
            ..Record::default()
        };
        assert_eq!(check("web", None, None), Ok(Proof::Token));
        assert!(matches!(
            check("web", None, Some("sha256:x")),
            Err(IdentityRefusal::NotEnrolled { .. })
        ));
        assert!(matches!(
            check("web", Some(&r), None),
            Err(IdentityRefusal::CertificateRequired { .. })
        ));
        assert_eq!(
            check("web", Some(&r), Some("sha256:new")),
            Ok(Proof::Certificate("sha256:new".into()))
        );
        assert!(check("web", Some(&r), Some("sha256:old")).is_ok());
        assert!(matches!(
            check("web", Some(&r), Some("sha256:other")),
            Err(IdentityRefusal::NotThisServers { .. })
        ));
        let revoked = Record {
            revoked_unix_ms: Some(9),
            ..r
        };
        for p in [None, Some("sha256:new")] {
            assert!(matches!(
                check("web", Some(&revoked), p),
                Err(IdentityRefusal::Revoked { .. })
            ));
        }
    }

    #[test]
    fn revoking_a_server_that_never_enrolled_shuts_out_its_tokens() {
        let d = tempfile::tempdir().unwrap();
        revoke(d.path(), "old", 7).unwrap();
        let r = Record::load(d.path(), "old").unwrap().unwrap();
        assert!(matches!(
            check("old", Some(&r), None),
            Err(IdentityRefusal::Revoked { .. })
        ));
        assert_eq!(Record::all(d.path()).unwrap().len(), 1);
    }
}
