//! Keeping tracking across a restart of the agent.
//!
//! The program, its link and its maps are pinned in bpffs under
//! `/sys/fs/bpf/lifeboat/<state>-<format>/` (`state`: a hash of the agent's state directory, so
//! that agents with different configs do not share; `format`: a hash of the BPF source, so an
//! upgraded agent never adopts an older program). The pinned link keeps the program attached
//! while no agent runs, and its ring buffer keeps what completes meanwhile (or counts what does
//! not fit).
//!
//! A cleanly stopping agent drains the ring buffer, stops consuming, and saves its dirty sets
//! (`<state_dir>/tracker.json`: the marks, the lost-event counter, the boot id). The next agent
//! takes that file (removing it first, durably: it vouches for one start only), adopts the
//! pinned program, and resumes from the saved marks plus the events left in the ring buffer, with
//! no verify scan, when: the boot is the same (bpffs does not survive a reboot, and neither would
//! anything written before the program was attached at boot), the lost-event counter has not
//! moved, and the disk is the same range of the same device. Anything else verify-scans.

use super::DeviceSpan;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resume {
    pub boot_id: String,
    pub lost_counter: u64,
    pub disks: Vec<ResumeDisk>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeDisk {
    pub id: String,
    pub span: DeviceSpan,
    /// A verify scan that was still owed.
    pub verify: Option<String>,
    /// Dirty blocks as (first, count) runs.
    pub blocks: Vec<(u64, u64)>,
}

/// Ascending block numbers as (first, count) runs.
pub fn ranges(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, n)) if *first + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn state_tag(state_dir: &Path) -> String {
    let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let h = blake3::hash(canon.as_os_str().as_encoded_bytes());
    hex::encode(&h.as_bytes()[..8])
}

fn format_tag() -> String {
    let h = blake3::hash(include_bytes!("tracker.bpf.c"));
    hex::encode(&h.as_bytes()[..4])
}

/// The pin directory of the agent whose state is in `state_dir`.
pub fn dir_for(state_dir: &Path) -> PathBuf {
    Path::new(BPFFS)
        .join("lifeboat")
        .join(format!("{}-{}", state_tag(state_dir), format_tag()))
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (systemd mounts it; a bare system may not).
#[allow(unsafe_code)]
pub fn ensure_bpffs() -> io::Result<()> {
    let c = std::ffi::CString::new(BPFFS).map_err(io::Error::other)?;
    // SAFETY: statfs fills the zeroed struct we pass; `c` is NUL-terminated and outlives it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").map_err(io::Error::other)?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const PINS: [&str; 4] = ["link", "events", "counters", "devices"];

/// `dir` when a complete set of pins is there to adopt.
pub fn adoptable(dir: &Path) -> Option<PathBuf> {
    PINS.iter()
        .all(|p| dir.join(p).exists())
        .then(|| dir.to_path_buf())
}

/// Pins the link and maps under `dir`, replacing whatever was there (a partial set, or a
/// program of another format for the same state directory, is removed first).
pub fn pin_all(
    dir: &Path,
    link: &mut libbpf_rs::Link,
    maps: &mut [(&str, &libbpf_rs::MapHandle)],
) -> Result<(), String> {
    ensure_bpffs().map_err(|e| format!("mounting bpffs at {BPFFS}: {e}"))?;
    if let Some(parent) = dir.parent() {
        let mine = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let state = mine.split('-').next().unwrap_or_default().to_string();
        if let Ok(entries) = std::fs::read_dir(parent) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{state}-")) && name != mine {
                    unpin(&e.path());
                }
            }
        }
    }
    unpin(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pinned = (|| {
        for (name, m) in maps.iter() {
            // A MapHandle pins through its own fd.
            let mut h = libbpf_rs::MapHandle::try_from(*m).map_err(|e| e.to_string())?;
            h.pin(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        }
        link.pin(dir.join("link")).map_err(|e| format!("link: {e}"))
    })();
    if pinned.is_err() {
        unpin(dir);
    }
    pinned
}

/// Removes a pin directory: with its link unpinned and no agent holding it, the program is
/// detached.
pub fn unpin(dir: &Path) {
    for p in PINS {
        let _ = std::fs::remove_file(dir.join(p));
    }
    let _ = std::fs::remove_dir(dir);
}

fn saved_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tracker.json")
}

/// Saves what the next agent needs (see the module doc).
pub fn save(state_dir: &Path, r: &Resume) -> io::Result<()> {
    let json = serde_json::to_vec(r).map_err(io::Error::other)?;
    lifeboat_common::durable::write_atomic(&saved_path(state_dir), &json)
}

/// Takes the saved record, if any: it is removed (durably) before it is used, so it vouches
/// for one start only; an agent that later dies uncleanly leaves none.
pub fn take_saved(state_dir: &Path) -> Option<Resume> {
    let p = saved_path(state_dir);
    let bytes = std::fs::read(&p).ok()?;
    if let Err(e) =
        std::fs::remove_file(&p).and_then(|()| std::fs::File::open(state_dir)?.sync_all())
    {
        tracing::warn!("removing {}: {e}; verify-scanning instead", p.display());
        return None;
    }
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(
                "{} is unreadable ({e}); verify-scanning instead",
                p.display()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        assert_eq!(ranges(&[]), vec![]);
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
    }
}
