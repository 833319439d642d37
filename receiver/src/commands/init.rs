//! `init`: create a state directory, TLS material and an agent token.

use anyhow::{bail, Context};
use lifeboat_common::config::ReceiverConfig;
use std::path::Path;

pub fn run(
    state_dir: &Path,
    listen: &str,
    extra_names: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let cfg_path = state_dir.join("receiver.toml");
    if cfg_path.exists() {
        bail!(
            "{} is already initialised ({} exists); nothing was changed",
            state_dir.display(),
            cfg_path.display()
        );
    }
    let config = ReceiverConfig {
        listen: listen.to_string(),
        ..ReceiverConfig::default()
    };
    config.validate(&cfg_path)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
    }
    let mut names = vec![
        lifeboat_common::config::default_server_name(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && lifeboat_common::config::valid_name(h) {
            names.push(h.to_string());
        }
    }
    names.extend(extra_names.iter().cloned());
    names.dedup();
    let fingerprint = crate::tls::create(state_dir, &names)?;
    let token = crate::auth::new_token();
    crate::auth::add(state_dir, &token, None)?;
    let text = format!(
        "# Lifeboat receiver configuration (reference: docs/configuration.md)\n\
         listen = \"{listen}\"\n\
         max_connections = {}\n\n\
         [retention]\n\
         # Every point of the last N minutes is kept.\n\
         recent_minutes = {}\n\
         # Then one point per 10 min for 1 h, hourly for 24 h, daily for this many days (1-365).\n\
         daily_days = {}\n\
         # Unreferenced blocks younger than this are never deleted.\n\
         gc_grace_minutes = {}\n",
        config.max_connections,
        config.retention.recent_minutes,
        config.retention.daily_days,
        config.retention.gc_grace_minutes
    );
    lifeboat_common::durable::write_atomic(&cfg_path, text.as_bytes())?;

    let port = listen.rsplit(':').next().unwrap_or("7443");
    if json {
        println!(
            "{}",
            serde_json::json!({
                "state_dir": state_dir,
                "listen": listen,
                "server_name": lifeboat_common::config::default_server_name(),
                "ca_fingerprint": fingerprint,
                "token": token,
            })
        );
    } else {
        println!("Receiver initialised in {}", state_dir.display());
        println!("The token is shown only now; keep it like a password.\n");
        println!("Put this into /etc/lifeboat/agent.toml on each protected server:\n");
        println!("[receiver]");
        println!("address = \"<this receiver's address>:{port}\"");
        println!("ca_fingerprint = \"{fingerprint}\"");
        println!("token = \"{token}\"");
        println!(
            "\nThen start the receiver: lifeboat-receiver --state-dir {} serve",
            state_dir.display()
        );
    }
    Ok(())
}
