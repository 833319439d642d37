//! `release`: forget which machine holds a server id, so that a replacement can take it.

use crate::catalog::Catalog;
use crate::status::{RefusedClaim, ServerStatus};
use anyhow::bail;
use std::path::Path;

pub fn run(state_dir: &Path, server: &str) -> anyhow::Result<()> {
    let dir = Catalog::new(state_dir).server_dir(server);
    let Some(mut st) = ServerStatus::load(&dir) else {
        bail!("server {server:?} has never connected to this receiver (see `lifeboat-receiver servers`)");
    };
    // `connected` is only true while a serve runs: after a crash it is stale.
    let serve_running = lifeboat_common::lock::lock_dir(state_dir, "serve").is_err();
    if st.connected && serve_running {
        bail!(
            "server {server} is connected now from host {} (instance {}, {}): stop that agent \
             first, or give the other machine its own server_id",
            st.hostname,
            st.instance,
            st.peer
        );
    }
    let was = format!("host {} (instance {})", st.hostname, st.instance);
    st.instance.clear();
    st.save(&dir)?;
    RefusedClaim::clear(&dir);
    println!(
        "server {server} released from {was}: the next machine that connects with this server \
         id holds it"
    );
    Ok(())
}
