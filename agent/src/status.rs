//! `lifeboat-agent status`: what the agent last wrote to `<state_dir>/status.json`.

use crate::state::StateDir;
use lifeboat_common::config::AgentConfig;
use lifeboat_common::now_ms;
use lifeboat_common::protocol::Consistency;

pub fn show(cfg: &AgentConfig, json: bool) -> anyhow::Result<()> {
    let Some(st) = StateDir::load_status(&cfg.state_dir) else {
        anyhow::bail!(
            "no status in {}: the agent has not run with this config yet",
            cfg.state_dir.display()
        );
    };
    let running = std::path::Path::new(&format!("/proc/{}", st.pid)).exists()
        && now_ms().saturating_sub(st.updated_unix_ms) < 60_000;
    if json {
        let mut v = serde_json::to_value(&st)?;
        v["running"] = serde_json::Value::Bool(running);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("server:     {}", st.server_id);
    println!(
        "receiver:   {} ({})",
        st.receiver,
        if st.connected {
            "connected"
        } else {
            "not connected"
        }
    );
    println!(
        "agent:      {}",
        if running {
            format!("running (pid {})", st.pid)
        } else {
            "not running".to_string()
        }
    );
    match (st.last_point, st.last_point_unix_ms) {
        (Some(p), Some(t)) => println!(
            "last point: {p}, {}s ago, {}",
            now_ms().saturating_sub(t) / 1000,
            match st.last_point_consistency {
                Some(Consistency::CrashConsistent) =>
                    format!("crash-consistent ({})", st.last_point_why),
                Some(Consistency::BestEffort) => format!("best-effort: {}", st.last_point_why),
                None => "-".into(),
            }
        ),
        _ => println!("last point: none yet"),
    }
    if let Some(e) = &st.last_error {
        println!("last error: {e}");
    }
    println!(
        "sent:       {} bytes (zstd level {})",
        st.bytes_sent, st.compression_level
    );
    for d in &st.disks {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        println!(
            "disk {:<12} {:<14} backlog {:>8} blocks{}  {} ({} bytes, tracker {}, reader {}, {} MiB read)",
            d.id,
            d.state.map(|s| s.as_str()).unwrap_or("-"),
            d.backlog_blocks,
            d.eta_secs
                .filter(|_| d.backlog_blocks > 0)
                .map(|s| format!(" (ETA {}m{:02}s)", s / 60, s % 60))
                .unwrap_or_default(),
            d.path.display(),
            d.size,
            dash(&d.tracker),
            dash(&d.reader),
            d.bytes_read >> 20,
        );
    }
    Ok(())
}
