//! Per-server replication status, `servers/<server>/status.json`, written by `serve` and read
//! by the `servers` command (which may run in another process).

pub use lifeboat_common::now_ms;
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
    /// Journal records found damaged (failing their check between good ones) at disk open.
    #[serde(default)]
    pub journal_records_damaged: u64,
    /// Patch frames applied (pages written over the block's previous content, named here),
    /// and their encoded bytes.
    #[serde(default)]
    pub deltas_applied: u64,
    #[serde(default)]
    pub delta_bytes_received: u64,
    /// Patch frames answered with NeedData (the base was missing).
    #[serde(default)]
    pub deltas_refused: u64,
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
    /// When the agent cut the newest point (its clock).
    pub last_point_created_unix_ms: Option<u64>,
    /// When this receiver committed the newest point (its clock: lag and retention use it).
    #[serde(default)]
    pub last_point_committed_unix_ms: Option<u64>,
    /// The machine that holds this server id (see `server::ServerSlot::claim`).
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub hostname: String,
    /// The agent's clock minus ours, measured on its Progress messages (one-way latency
    /// included); `None` until measured.
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
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

/// The last claim refused for a server (another machine with the same server id), kept in
/// `servers/<server>/refused.json` so that `servers` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedClaim {
    pub instance: String,
    pub hostname: String,
    pub peer: String,
    pub at_unix_ms: u64,
    pub reason: String,
}

impl RefusedClaim {
    const FILE: &'static str = "refused.json";

    pub fn load(server_dir: &Path) -> Option<RefusedClaim> {
        serde_json::from_slice(&std::fs::read(server_dir.join(Self::FILE)).ok()?).ok()
    }

    pub fn save(&self, server_dir: &Path) -> std::io::Result<()> {
        lifeboat_common::durable::create_dir_all_durable(server_dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        lifeboat_common::durable::write_atomic(&server_dir.join(Self::FILE), &json)
    }

    /// Forgets the refusal (the holder's next session, or `release`).
    pub fn clear(server_dir: &Path) {
        let _ = std::fs::remove_file(server_dir.join(Self::FILE));
    }
}
