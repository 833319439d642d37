//! Agent tokens. `<state-dir>/tokens` holds one line per token: its SHA-256 (hex), then, for a
//! token scoped to one server, that server's id. The tokens themselves are shown once, when
//! made, and never stored or logged.
//!
//! - The enrolment token from `init` has no scope: any server id may use it, until that server
//!   is given a scoped token (`token add --server S`). From then on only a token scoped to S
//!   is accepted for S, so one server's token cannot be used to write another's replicas.
//! - The file is read at every `Hello`, so `token add` takes effect without a restart.

use anyhow::Context;
use std::path::{Path, PathBuf};

pub const TOKENS: &str = "tokens";

fn digest(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// A new random token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Records a token, scoped to `server` or (None) valid for any server without its own.
pub fn add(state_dir: &Path, token: &str, server: Option<&str>) -> anyhow::Result<()> {
    let path = state_dir.join(TOKENS);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str(&digest(token));
    if let Some(s) = server {
        text.push(' ');
        text.push_str(s);
    }
    text.push('\n');
    lifeboat_common::durable::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Why a token was refused (the message goes back to the agent and into the log).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    OtherServer(String),
    NeedsScoped,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown => f.write_str("unknown token"),
            Refusal::OtherServer(s) => write!(f, "the token is scoped to server {s}"),
            Refusal::NeedsScoped => f.write_str(
                "this server has its own token (lifeboat-receiver token add --server); the enrolment token no longer works for it",
            ),
        }
    }
}

pub struct Tokens {
    path: PathBuf,
}

impl Tokens {
    pub fn load(state_dir: &Path) -> anyhow::Result<Tokens> {
        let path = state_dir.join(TOKENS);
        std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Tokens { path })
    }

    /// Whether `token` may act as `server`. Compares digests, never tokens.
    pub fn check(&self, token: &str, server: &str) -> Result<(), Refusal> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let d = digest(token);
        let mut server_has_scoped = false;
        let mut found: Option<Option<&str>> = None;
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(hash), scope) = (parts.next(), parts.next()) else {
                continue;
            };
            if scope == Some(server) {
                server_has_scoped = true;
            }
            if hash == d {
                found = Some(scope);
            }
        }
        match found {
            None => Err(Refusal::Unknown),
            Some(Some(s)) if s == server => Ok(()),
            Some(Some(s)) => Err(Refusal::OtherServer(s.to_string())),
            Some(None) if server_has_scoped => Err(Refusal::NeedsScoped),
            Some(None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_tokens_bind_servers() {
        let d = tempfile::tempdir().unwrap();
        let global = new_token();
        add(d.path(), &global, None).unwrap();
        let t = Tokens::load(d.path()).unwrap();
        assert_eq!(t.check(&global, "web-01"), Ok(()));
        assert_eq!(t.check("nope", "web-01"), Err(Refusal::Unknown));

        let scoped = new_token();
        add(d.path(), &scoped, Some("web-01")).unwrap();
        // Picked up without reloading.
        assert_eq!(t.check(&scoped, "web-01"), Ok(()));
        assert_eq!(
            t.check(&scoped, "db-01"),
            Err(Refusal::OtherServer("web-01".into()))
        );
        assert_eq!(t.check(&global, "web-01"), Err(Refusal::NeedsScoped));
        assert_eq!(t.check(&global, "db-01"), Ok(()));
    }
}
