//! The agent's persistent state under `state_dir`:
//! - `disks/<id>.manifest`: the last manifest the receiver acknowledged, per disk;
//! - `agent.json`: the next point number and the last committed point;
//! - `status.json`: what `lifeboat-agent status` shows (not needed for recovery).
//!
//! Every file is replaced with tmp + fsync + rename + dir fsync. The receiver's live manifest
//! is the authority on what it holds: at each connection the agent compares digests and adopts
//! the receiver's manifest when they differ, so a stale local file costs a rescan, not data.

use lifeboat_common::durable;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::protocol::DiskState;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub next_point: u64,
    pub last_point: Option<u64>,
    pub last_point_unix_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    pub state: Option<DiskState>,
    pub backlog_blocks: u64,
    pub reader: String,
    /// "ebpf" or "hash_scan".
    #[serde(default)]
    pub tracker: String,
    /// Bytes read from the disk since the agent started.
    #[serde(default)]
    pub bytes_read: u64,
    /// Reads into io_uring registered buffers since the agent started.
    #[serde(default)]
    pub fixed_reads: u64,
    /// What this disk's blocks cost on the wire since the agent started.
    #[serde(default)]
    pub sent: crate::window::Tally,
    /// Verify scans (every block hashed) since the agent started.
    #[serde(default)]
    pub verify_scans: u64,
    /// Seconds until the backlog is examined, at the current pass's rate.
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub server_id: String,
    /// This machine's instance id, as the receiver knows it.
    #[serde(default)]
    pub instance: String,
    pub receiver: String,
    pub connected: bool,
    pub pid: u32,
    pub updated_unix_ms: u64,
    pub last_point: Option<u64>,
    pub last_point_unix_ms: Option<u64>,
    #[serde(default)]
    pub last_point_consistency: Option<lifeboat_common::protocol::Consistency>,
    /// Why the last point is best-effort, or how long its freeze took.
    #[serde(default)]
    pub last_point_why: String,
    /// How long the filesystems were frozen for the last point, in milliseconds.
    #[serde(default)]
    pub last_freeze_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Bytes written to the current connection.
    pub bytes_sent: u64,
    /// Bytes written to every connection since the agent started.
    #[serde(default)]
    pub network_bytes_sent: u64,
    /// Connections that ended in an error since the agent started.
    #[serde(default)]
    pub reconnects: u64,
    /// Points committed since the agent started.
    #[serde(default)]
    pub points_committed: u64,
    /// When the receiver last acknowledged something (a block, a patch, a point).
    #[serde(default)]
    pub last_ack_unix_ms: Option<u64>,
    /// Blocks sent as their written pages (patches) since the agent started.
    #[serde(default)]
    pub patches_sent: u64,
    /// Patches made from page sums that the receiver named otherwise than expected (each
    /// block was then sent whole).
    #[serde(default)]
    pub patches_mismatched: u64,
    /// The zstd level in use (it adapts between the configured floor and ceiling).
    pub compression_level: i32,
    pub disks: Vec<DiskStatus>,
}

pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> io::Result<StateDir> {
        durable::create_dir_all_durable(&root.join("disks"))?;
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn load_agent(&self) -> AgentState {
        std::fs::read(self.root.join("agent.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(AgentState {
                next_point: 1,
                ..Default::default()
            })
    }

    pub fn save_agent(&self, s: &AgentState) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
        durable::write_atomic(&self.root.join("agent.json"), &json)
    }

    /// The acknowledged manifest of a disk, or an all-zero one (nothing acknowledged).
    pub fn load_manifest(&self, disk: &str, size: u64) -> Manifest {
        let p = self.root.join("disks").join(format!("{disk}.manifest"));
        let mut m = match std::fs::read(&p).map(|b| Manifest::decode(&b)) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(
                    disk,
                    "acknowledged manifest {} unreadable ({e}); the receiver's will be used",
                    p.display()
                );
                Manifest::zeroed(size)
            }
            Err(_) => Manifest::zeroed(size),
        };
        m.resize(size);
        m
    }

    pub fn save_manifest(&self, disk: &str, m: &Manifest) -> io::Result<()> {
        durable::write_atomic(
            &self.root.join("disks").join(format!("{disk}.manifest")),
            &m.encode(),
        )
    }

    pub fn save_status(&self, s: &AgentStatus) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
        durable::write_atomic(&self.root.join("status.json"), &json)
    }

    pub fn load_status(root: &Path) -> Option<AgentStatus> {
        serde_json::from_slice(&std::fs::read(root.join("status.json")).ok()?).ok()
    }
}

/// Whether the agent could keep its state in `dir`: `dir` (or, before it exists, its nearest
/// existing ancestor) is a directory this process may write, on a writable filesystem.
#[allow(unsafe_code)]
pub fn check_writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = dir;
    while !p.exists() {
        p = p
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no existing ancestor"))?;
    }
    if !p.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            p.display()
        )));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: access(2) reads the NUL-terminated path `c`, which lives across the call.
    let r = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("{} is not writable: {e}", p.display()),
        ));
    }
    Ok(())
}
