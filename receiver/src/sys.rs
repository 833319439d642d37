//! The few system calls std does not wrap: `syncfs`, `flock`, `geteuid`, `statvfs`,
//! `clock_gettime(CLOCK_BOOTTIME)`, and the
//! switch to the state directory's owner (`setgroups`, `setgid`, `setuid`).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The boot-time clock (`CLOCK_BOOTTIME`): monotonic, counting while suspended. Should the
/// call ever fail (it exists on every Linux since 2.6.39), the monotonic clock instead: it
/// stops during a suspend, which the next failed renewal then catches.
pub fn boottime() -> std::time::Duration {
    fn read(clock: libc::clockid_t) -> Option<std::time::Duration> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through the pointer, which is valid and
        // exclusively ours for the call.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        (r == 0).then(|| {
            std::time::Duration::new(
                ts.tv_sec.max(0) as u64,
                ts.tv_nsec.clamp(0, 999_999_999) as u32,
            )
        })
    }
    read(libc::CLOCK_BOOTTIME)
        .or_else(|| read(libc::CLOCK_MONOTONIC))
        // Both failing is impossible on Linux; std's Instant would have panicked already.
        .unwrap_or_default()
}

/// Flushes every dirty page and inode of the filesystem holding `f` (one journal commit
/// instead of one fsync per file: the staging store's group commit).
pub fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: syncfs takes a file descriptor that `f` keeps open for the call's duration.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes an advisory lock on `f`: shared or exclusive, blocking or not.
/// Returns `Ok(false)` when `nonblocking` and the lock is held elsewhere.
pub fn flock(f: &File, exclusive: bool, nonblocking: bool) -> io::Result<bool> {
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if nonblocking {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock takes a file descriptor that `f` keeps open; the lock is released when
    // the descriptor is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if nonblocking && e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The filesystem statistics of the filesystem holding `path`.
pub fn statvfs(path: &std::path::Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut out = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs(3) reads the NUL-terminated path `c` and fills `out`, both alive for the
    // call; `out` is only read after it succeeded.
    let r = unsafe { libc::statvfs(c.as_ptr(), out.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it initialised `out`.
    Ok(unsafe { out.assume_init() })
}

/// When run as root on a state directory that belongs to another user (the service's), become
/// that user before touching anything, so that nothing the command creates is root's (the
/// service could not write it later). Returns the uid switched to.
pub fn become_owner_of(state_dir: &std::path::Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    if euid() != 0 {
        return Ok(None);
    }
    let Ok(m) = std::fs::metadata(state_dir) else {
        return Ok(None);
    };
    if m.uid() == 0 {
        return Ok(None);
    }
    // SAFETY: plain system calls with integer arguments; setgroups gets an empty list (a
    // null pointer is allowed with size 0). Order: groups and gid first, while still root.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(m.gid()) == 0
            && libc::setuid(m.uid()) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // Its home, not root's, for what reads HOME (the AWS SDK's shared config): the user's
    // from the password database, else the state directory.
    let home = home_of(m.uid()).unwrap_or_else(|| state_dir.to_path_buf());
    // Called first thing in `run`, before any runtime or thread exists: nothing reads the
    // environment concurrently.
    std::env::set_var("HOME", home);
    Ok(Some(m.uid()))
}

fn home_of(uid: u32) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: getpwuid returns a pointer into static storage (or null), read at once, while
    // the process is single-threaded.
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null entry; pw_dir is a NUL-terminated string it owns.
    let dir = unsafe { std::ffi::CStr::from_ptr((*pw).pw_dir) };
    Some(std::ffi::OsStr::from_bytes(dir.to_bytes()).into())
}
