//! Enrolment tokens. `<state-dir>/tokens` holds one SHA-256 (hex) of a token per line; the
//! tokens themselves are shown once, by `init`, and never stored or logged.

use anyhow::Context;
use std::collections::HashSet;
use std::path::Path;

pub const TOKENS: &str = "tokens";

fn digest(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// A new random token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Appends a token's digest to the tokens file.
pub fn add(state_dir: &Path, token: &str) -> anyhow::Result<()> {
    let path = state_dir.join(TOKENS);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str(&digest(token));
    text.push('\n');
    lifeboat_common::durable::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub struct Tokens(HashSet<String>);

impl Tokens {
    pub fn load(state_dir: &Path) -> anyhow::Result<Tokens> {
        let path = state_dir.join(TOKENS);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Tokens(
            text.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        ))
    }

    /// Compares digests, so the comparison time does not depend on the token's bytes.
    pub fn accepts(&self, token: &str) -> bool {
        self.0.contains(&digest(token))
    }
}
