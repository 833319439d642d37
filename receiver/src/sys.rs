//! The few system calls std does not wrap: `syncfs`, `flock` and `geteuid`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
