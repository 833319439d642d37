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
//! Every mount in `/proc/self/mountinfo` whose device is a configured disk or a partition of
//! one, once per device (bind mounts share the superblock).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The whole disk a device belongs to (itself when it is not a partition).
fn whole_disk(dev: (u32, u32)) -> (u32, u32) {
    let dir = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    if !dir.join("partition").exists() {
        return dev;
    }
    std::fs::canonicalize(&dir)
        .ok()
        .and_then(|p| std::fs::read_to_string(p.parent()?.join("dev")).ok())
        .and_then(|s| {
            let (a, b) = s.trim().split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or(dev)
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
            wanted.push(dev);
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
        let Some(dev) = devs
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        else {
            continue;
        };
        let on_disk = wanted.contains(&dev) || wanted.contains(&whole_disk(dev));
        if on_disk && !seen.contains(&dev) {
            seen.push(dev);
            out.push(unescape(mnt));
        }
    }
    Ok(out)
}

/// Filesystems frozen by this process; thawed by [`Frozen::thaw`] or on drop.
pub struct Frozen {
    mounts: Vec<(PathBuf, File)>,
    watchdog: Option<(Child, ChildStdin)>,
    pub since: Instant,
    thawed: bool,
}

/// Freezes every mount (after starting the watchdog that thaws them after `bound`). On a
/// failure, whatever was frozen is thawed before the error returns.
pub fn freeze(mounts: &[PathBuf], bound: Duration) -> Result<Frozen, FreezeError> {
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
    let mut frozen = Frozen {
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
        let mut intact = true;
        let mut first_err = None;
        for (m, f) in &self.mounts {
            match ioctl(f, FITHAW) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => intact = false,
                Err(e) => {
                    tracing::error!("thawing {}: {e}", m.display());
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"done\n");
            drop(stdin);
            let _ = child.wait();
        }
        match first_err {
            Some(e) => Err(e),
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
    for (m, f) in &files {
        match ioctl(f, FITHAW) {
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
