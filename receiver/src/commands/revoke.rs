//! `revoke`: refuse a server's agent from now on, whatever it presents.

use crate::catalog::Catalog;
use crate::identities::Record;
use crate::status::now_ms;
use anyhow::bail;
use std::path::Path;

pub fn run(state_dir: &Path, server: &str) -> anyhow::Result<()> {
    let known = Record::load(state_dir, server)?.is_some()
        || Catalog::new(state_dir)
            .servers()?
            .iter()
            .any(|s| s == server);
    if !known {
        bail!(
            "server {server:?} is neither enrolled nor known to this receiver (see \
             `lifeboat-receiver agents`)"
        );
    }
    // In a fleet, over the shared bucket's record: every receiver refuses it.
    let r = crate::fleet::revoke(state_dir, server, now_ms())?;
    let serving = lifeboat_common::lock::lock_dir(state_dir, "serve").is_err();
    println!(
        "server {server} revoked at {} UTC: its certificate{} and tokens are refused from now on{}.",
        super::fmt_utc(r.revoked_unix_ms.unwrap_or(0)),
        if r.certificate_sha256.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.certificate_sha256)
        },
        if serving {
            "; the running receiver closes its connection within a second"
        } else {
            ""
        }
    );
    println!(
        "Its replicas and points stay. To let it back: lifeboat-receiver enroll --server {server}, \
         then lifeboat-agent enroll on that machine."
    );
    Ok(())
}
