//! Per-server replication status, `servers/<server>/status.json`, written by `serve` and read
//! by the `servers` command (which may run in another process).

use lifeboat_common::protocol::DiskState;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Encoded block bytes received in Block frames.
    pub data_bytes_received: u64,
    /// Block frames received.
    pub blocks_received: u64,
    /// Blocks that were new to the store.
    pub blocks_stored: u64,
    /// Ref frames received (dedupe hits and zeroed blocks).
    pub refs_received: u64,
    /// Blocks rejected because their data did not match their hash.
    pub blocks_rejected: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskStatus {
    pub id: String,
    pub size: u64,
    pub state: DiskState,
    pub backlog_blocks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerStatus {
    pub server: String,
    pub connected: bool,
    pub peer: String,
    pub agent_version: String,
    pub last_seen_unix_ms: u64,
    pub last_point: Option<u64>,
    pub last_point_created_unix_ms: Option<u64>,
    pub disks: Vec<DiskStatus>,
    /// Cumulative over the receiver's life for this server.
    pub counters: Counters,
}

impl ServerStatus {
    pub fn load(server_dir: &Path) -> Option<ServerStatus> {
        serde_json::from_slice(&std::fs::read(server_dir.join("status.json")).ok()?).ok()
    }

    pub fn save(&self, server_dir: &Path) -> std::io::Result<()> {
        lifeboat_common::durable::create_dir_all_durable(server_dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        lifeboat_common::durable::write_atomic(&server_dir.join("status.json"), &json)
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
