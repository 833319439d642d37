//! `token-add`: a new agent token, optionally scoped to one server.

use anyhow::bail;
use std::path::Path;

pub fn add(state_dir: &Path, server: Option<&str>, json: bool) -> anyhow::Result<()> {
    if !state_dir.join(crate::auth::TOKENS).exists() {
        bail!(
            "{} is not initialised (run `lifeboat-receiver --state-dir {} init`)",
            state_dir.display(),
            state_dir.display()
        );
    }
    if let Some(s) = server {
        if !lifeboat_common::config::valid_name(s) {
            bail!("server id {s:?} must be 1-64 of [A-Za-z0-9._-]");
        }
    }
    let token = crate::auth::new_token();
    crate::auth::add(state_dir, &token, server)?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "token": token, "server": server })
        );
    } else {
        match server {
            Some(s) => println!(
                "token for server {s} (shown once; the enrolment token no longer works for {s}):\n{token}"
            ),
            None => println!("token for any server without its own (shown once):\n{token}"),
        }
    }
    Ok(())
}
