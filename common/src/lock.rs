//! One process per state directory: an exclusive `flock` on `<dir>/<name>.lock`, held for the
//! life of the returned guard, with the holder's pid written inside for the error message.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Held while the process runs; the kernel releases the lock when the process dies.
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path} is in use by another process (pid {pid}); stop it first")]
    Busy { path: String, pid: String },
    #[error("locking {path}: {source}")]
    Io { path: String, source: io::Error },
}

pub fn lock_dir(dir: &Path, name: &str) -> Result<DirLock, LockError> {
    let path = dir.join(format!("{name}.lock"));
    let shown = dir.display().to_string();
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor `f` keeps open; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(LockError::Busy {
                path: shown,
                pid: pid.trim().to_string(),
            });
        }
        return Err(io(e));
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    write!(f, "{}", std::process::id()).map_err(io)?;
    Ok(DirLock { _file: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_dir(d.path(), "serve").unwrap();
        // flock locks belong to the open file description: a second open conflicts even
        // within one process.
        let e = lock_dir(d.path(), "serve").err().unwrap().to_string();
        assert!(
            e.contains("in use") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(held);
        assert!(lock_dir(d.path(), "serve").is_ok());
    }
}
