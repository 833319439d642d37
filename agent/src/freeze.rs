//! Filesystem freeze for crash-consistent points (FIFREEZE / FITHAW).
//!
//! While a point's final delta is read, the mounted filesystems on the server's disks are
//! frozen: the kernel flushes them and blocks every new write, so the blocks read are the
//! disk at one instant, as after a power cut with the journal committed.
//!
//! # Thaw is guaranteed
//! - The agent thaws as soon as the delta is read, and on every error path ([`Frozen`]'s
//!   `Drop`).
//! - Before freezing, the agent starts a watchdog: its own binary as a separate process
//!   (`lifeboat-agent thaw-watchdog`), holding the mounts open and a pipe from the agent. It
//!   thaws them when the bound passes or when the pipe closes without a "done" (the agent died,
//!   even by SIGKILL). It ignores SIGTERM/SIGINT/SIGHUP, so stopping the service cannot take it
//!   down before the agent; it exits on its own within the bound.
//! - Whether the delta was read while frozen is decided by the agent's own `FITHAW`: success
//!   means the filesystems were still frozen when every read had finished; `EINVAL` means
//!   something (the watchdog, or an admin's `fsfreeze -u`) thawed them earlier, and the point is
//!   best-effort.
//!
//! # Which mounts
//! Every mount in `/proc/self/mountinfo` whose device writes to a configured disk: the disk,
//! its partitions, and whatever is stacked on them (LVM/device-mapper, md: sysfs `holders`,
//! recursively), once per device (bind mounts share the superblock). A btrfs mount shows an
//! anonymous device there; its source names the block device. Not seen: a partition or a
//! logical volume used raw (a database on a raw device) has nothing to freeze, and a point then
//! holds its blocks as read, best-effort for that data although the point is marked
//! crash-consistent for the filesystems.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The file in the state directory that records a freeze in progress.
pub const MARKER: &str = "frozen.json";

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("freezing {path}: {source}")]
    Freeze { path: PathBuf, source: io::Error },
    #[error("starting the thaw watchdog: {0}")]
    Watchdog(io::Error),
    #[error("reading {path}: {source}")]
    Mounts { path: PathBuf, source: io::Error },
}

fn ioctl(f: &File, req: libc::c_ulong) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take an int argument (unused by the kernel) on a descriptor
    // of a directory of the filesystem; `f` stays open across the call and `arg` outlives it.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn dev_of_path(path: &Path) -> io::Result<Option<(u32, u32)>> {
    let m = std::fs::metadata(path)?;
    if !m.file_type().is_block_device() {
        return Ok(None);
    }
    Ok(Some((libc::major(m.rdev()), libc::minor(m.rdev()))))
}

fn sysfs_dev(dir: &Path) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(dir.join("dev")).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Every device whose writes land on `dev`: itself, its partitions, and what is stacked on
/// any of them (device-mapper/LVM, md), recursively through sysfs `holders`.
fn devices_on(dev: (u32, u32), out: &mut Vec<(u32, u32)>) {
    if out.contains(&dev) || out.len() > 4096 {
        return;
    }
    out.push(dev);
    let Ok(dir) = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", dev.0, dev.1)) else {
        return;
    };
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Some(d) = sysfs_dev(&p) {
                    devices_on(d, out);
                }
            }
        }
    }
    if let Ok(holders) = std::fs::read_dir(dir.join("holders")) {
        for h in holders.flatten() {
            if let Some(d) = sysfs_dev(&Path::new("/sys/class/block").join(h.file_name())) {
                devices_on(d, out);
            }
        }
    }
}

/// Unescapes the octal escapes of a mountinfo path (`\040` for a space).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount points of filesystems on these disks (block devices; files are ignored), one per
/// device.
pub fn mounts_on(disks: &[PathBuf]) -> Result<Vec<PathBuf>, FreezeError> {
    let mut wanted = Vec::new();
    for d in disks {
        if let Ok(Some(dev)) = dev_of_path(d) {
            devices_on(dev, &mut wanted);
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let path = PathBuf::from("/proc/self/mountinfo");
    let f = File::open(&path).map_err(|source| FreezeError::Mounts {
        path: path.clone(),
        source,
    })?;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for line in io::BufReader::new(f).lines() {
        let line = line.map_err(|source| FreezeError::Mounts {
            path: path.clone(),
            source,
        })?;
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(devs), Some(mnt)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some(mut dev) = devs
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        else {
            continue;
        };
        if dev.0 == 0 {
            // An anonymous device (btrfs): the mount's source names the block device.
            let source = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|i| fields.get(i + 2));
            match source.map(|s| dev_of_path(&unescape(s))) {
                Some(Ok(Some(d))) => dev = d,
                _ => continue,
            }
        }
        if wanted.contains(&dev) && !seen.contains(&dev) {
            seen.push(dev);
            out.push(unescape(mnt));
        }
    }
    Ok(out)
}

/// Filesystems frozen by this process; thawed by [`Frozen::thaw`] or on drop.
pub struct Frozen {
    mounts: Vec<(PathBuf, File)>,
    /// The record of this freeze, removed once every mount is thawed.
    marker: Option<PathBuf>,
    watchdog: Option<(Child, ChildStdin)>,
    pub since: Instant,
    thawed: bool,
}

/// Freezes every mount (after starting the watchdog that thaws them after `bound`). On a
/// failure, whatever was frozen is thawed before the error returns.
///
/// `marker` (a file in the agent's state directory) records the mounts before any is frozen
/// and is removed once all are thawed: if both the agent and its watchdog die during a freeze
/// (a SIGKILL of the whole service), the next start finds it and thaws them
/// ([`thaw_leftovers`]).
pub fn freeze(mounts: &[PathBuf], bound: Duration, marker: &Path) -> Result<Frozen, FreezeError> {
    let exe = std::env::current_exe().map_err(FreezeError::Watchdog)?;
    let mut child = Command::new(exe)
        .arg("thaw-watchdog")
        .arg("--deadline-ms")
        .arg(bound.as_millis().to_string())
        .args(mounts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(FreezeError::Watchdog)?;
    // The watchdog says "ready" once it holds every mount open.
    let mut line = [0u8; 6];
    let ready = child
        .stdout
        .take()
        .map(|mut o| o.read_exact(&mut line).is_ok() && &line == b"ready\n")
        .unwrap_or(false);
    let stdin = child.stdin.take();
    let (true, Some(stdin)) = (ready, stdin) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(FreezeError::Watchdog(io::Error::other(
            "it did not report ready (see its message above)",
        )));
    };
    let list: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
    let json = serde_json::to_vec(&list).map_err(|e| FreezeError::Watchdog(io::Error::other(e)))?;
    if let Err(e) = lifeboat_common::durable::write_atomic(marker, &json) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(FreezeError::Mounts {
            path: marker.to_path_buf(),
            source: e,
        });
    }
    let mut frozen = Frozen {
        marker: Some(marker.to_path_buf()),
        mounts: Vec::new(),
        watchdog: Some((child, stdin)),
        since: Instant::now(),
        thawed: false,
    };
    for m in mounts {
        let f = File::open(m).map_err(|source| FreezeError::Freeze {
            path: m.clone(),
            source,
        })?;
        ioctl(&f, FIFREEZE).map_err(|source| FreezeError::Freeze {
            path: m.clone(),
            source,
        })?;
        frozen.mounts.push((m.clone(), f));
    }
    frozen.since = Instant::now();
    Ok(frozen)
}

impl Frozen {
    /// Thaws every mount. `Ok(true)`: all were still frozen (every read made while frozen
    /// saw one instant); `Ok(false)`: some had been thawed already.
    pub fn thaw(mut self) -> io::Result<bool> {
        self.thaw_all()
    }

    fn thaw_all(&mut self) -> io::Result<bool> {
        if self.thawed {
            return Ok(true);
        }
        self.thawed = true;
        // Every mount first, nothing logged in between: a log sink waiting on a filesystem
        // still frozen must not keep the others frozen.
        let results: Vec<io::Result<()>> =
            self.mounts.iter().map(|(_, f)| ioctl(f, FITHAW)).collect();
        let intact = !results
            .iter()
            .any(|r| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL)));
        let failed: Vec<(PathBuf, io::Error)> = self
            .mounts
            .iter()
            .zip(results)
            .filter_map(|((m, _), r)| match r {
                Err(e) if e.raw_os_error() != Some(libc::EINVAL) => Some((m.clone(), e)),
                _ => None,
            })
            .collect();
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            // "done" only when every mount is thawed: otherwise the watchdog, seeing the pipe
            // close without it, tries again.
            if failed.is_empty() {
                let _ = stdin.write_all(b"done\n");
            }
            drop(stdin);
            let _ = child.wait();
        }
        if let Some(marker) = self.marker.take() {
            if failed.is_empty() {
                let _ = std::fs::remove_file(&marker);
            }
        }
        for (m, e) in &failed {
            tracing::error!("thawing {}: {e}", m.display());
        }
        match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(intact),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_all() {
            tracing::error!("thawing after an error: {e}");
        }
    }
}

/// At start, before anything is written: thaws the mounts a previous agent recorded in
/// `marker` and never thawed (it and its watchdog were killed during a freeze). A mount that
/// is not frozen answers EINVAL and is left alone.
pub fn thaw_leftovers(marker: &Path) {
    let Ok(bytes) = std::fs::read(marker) else {
        return;
    };
    let mounts: Vec<PathBuf> = serde_json::from_slice::<Vec<String>>(&bytes)
        .unwrap_or_default()
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let thawed: Vec<&PathBuf> = mounts
        .iter()
        .filter(|m| File::open(m).and_then(|f| ioctl(&f, FITHAW)).is_ok())
        .collect();
    for m in &thawed {
        tracing::warn!(
            "thawed {}: left frozen by an agent killed during a freeze",
            m.display()
        );
    }
    let _ = std::fs::remove_file(marker);
}

/// The watchdog process (`lifeboat-agent thaw-watchdog`): holds `mounts` open, says "ready",
/// then thaws them when `deadline` passes or stdin closes without "done". Returns the exit
/// code.
pub fn watchdog(mounts: &[PathBuf], deadline: Duration) -> u8 {
    // SAFETY: setting the disposition of three signals to "ignore" touches no memory.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let started = Instant::now();
    let mut files = Vec::new();
    for m in mounts {
        match File::open(m) {
            Ok(f) => files.push((m, f)),
            Err(e) => {
                eprintln!(
                    "lifeboat-agent thaw-watchdog: cannot open {}: {e}",
                    m.display()
                );
                return 1;
            }
        }
    }
    {
        let mut out = io::stdout().lock();
        if out.write_all(b"ready\n").and_then(|_| out.flush()).is_err() {
            return 1;
        }
    }
    let stdin = io::stdin();
    let fd = stdin.as_raw_fd();
    let mut got = Vec::new();
    let why = loop {
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            break format!("the freeze bound of {} ms passed", deadline.as_millis());
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break "poll failed".into();
        }
        if r == 0 {
            continue;
        }
        let mut buf = [0u8; 16];
        match stdin.lock().read(&mut buf) {
            Ok(0) | Err(_) => break "the agent went away during a freeze".into(),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.starts_with(b"done") {
                    return 0;
                }
            }
        }
    };
    // Every mount first, retried, and only then a word on stderr (which may lead to a
    // filesystem that was still frozen).
    let mut results: Vec<io::Result<()>> = files.iter().map(|(_, f)| ioctl(f, FITHAW)).collect();
    for _ in 0..50 {
        let retry = results
            .iter()
            .any(|r| matches!(r, Err(e) if e.raw_os_error() != Some(libc::EINVAL)));
        if !retry {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        for ((_, f), r) in files.iter().zip(results.iter_mut()) {
            if matches!(r, Err(e) if e.raw_os_error() != Some(libc::EINVAL)) {
                *r = ioctl(f, FITHAW);
            }
        }
    }
    for ((m, _), r) in files.iter().zip(&results) {
        match r {
            Ok(()) => eprintln!(
                "lifeboat-agent thaw-watchdog: thawed {} ({why})",
                m.display()
            ),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => eprintln!("lifeboat-agent thaw-watchdog: thawing {}: {e}", m.display()),
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape("/end\\04"), PathBuf::from("/end\\04"));
    }
}
