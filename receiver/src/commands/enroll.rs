//! `enroll`: a one-time, expiring code with which one server's agent gets its certificate.

use crate::identities;
use crate::status::now_ms;
use anyhow::bail;
use std::path::Path;
use std::time::Duration;

/// Longest a code may stay valid.
const MAX_VALID_MINUTES: u64 = 7 * 24 * 60;

pub fn run(state_dir: &Path, server: &str, valid_minutes: u64, json: bool) -> anyhow::Result<()> {
    if !state_dir.join(crate::tls::CA_KEY).exists() {
        bail!(
            "{} is not initialised (run `lifeboat-receiver --state-dir {} init`)",
            state_dir.display(),
            state_dir.display()
        );
    }
    if !lifeboat_common::config::valid_name(server) {
        bail!("server id {server:?} must be 1-64 of [A-Za-z0-9._-]");
    }
    if !(1..=MAX_VALID_MINUTES).contains(&valid_minutes) {
        bail!("--valid-minutes {valid_minutes}: must be 1-{MAX_VALID_MINUTES} (7 days)");
    }
    let record = identities::Record::load(state_dir, server)?;
    let (code, expires) = identities::new_code(
        state_dir,
        server,
        Duration::from_secs(valid_minutes * 60),
        now_ms(),
    )?;
    let until = super::fmt_utc(expires);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "server": server,
                "code": code,
                "expires_unix_ms": expires,
            })
        );
        return Ok(());
    }
    println!("enrolment code for server {server} (shown once; works once, until {until} UTC):");
    println!("{code}");
    println!();
    println!("On that server, with its agent.toml in place, run:");
    println!("  lifeboat-agent enroll --code {code}");
    println!("(or pipe the code in: the command reads it from stdin when --code is left out)");
    match record {
        Some(r) if r.revoked_unix_ms.is_some() => {
            println!("\nServer {server} is revoked: enrolling it with this code lets it back in.")
        }
        Some(r) => println!(
            "\nServer {server} is enrolled already (certificate {}): enrolling it again replaces \
             that certificate, and its current agent is cut off.",
            r.certificate_sha256
        ),
        None => println!(
            "\nOnce enrolled, server {server} authenticates with its certificate only: its \
             tokens no longer work for it."
        ),
    }
    Ok(())
}
