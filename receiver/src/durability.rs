//! What the state directory must offer for "nothing is acknowledged before it is durable" to
//! hold, checked by `serve` before it accepts anything (docs/formats.md, "Durability"):
//!
//! - Linux 5.8 or later: `syncfs`, the staging store's group commit, reports writeback errors
//!   only from 5.8 on; before, a failed write could be acknowledged.
//! - A filesystem that survives a reboot: not tmpfs or ramfs.
//! - `store/tmp` and `store/blocks` on one filesystem: publishing a block is a rename.
//!
//! The journals are made durable by their own `fdatasync`, so `servers/` may live elsewhere.
//!
//! Warned about, not refused: ext4 without its journal (`journal_task` is `<none>` in
//! `/sys/fs/ext4/<device>/`). There a failed or torn write can destroy directory blocks
//! that were already durable, so names acknowledged earlier can be lost (seen in
//! `tests/integration/power_cut.rs`); but some machines' only disk is formatted that way.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    #[error(
        "Linux {found} is too old: the receiver needs 5.8 or later, where syncfs reports \
         writeback errors (before, a failed write could be acknowledged as durable)"
    )]
    Kernel { found: String },
    #[error(
        "{path} is on {fs}, which does not survive a reboot: put the receiver's state \
         directory on a disk filesystem"
    )]
    Volatile { path: PathBuf, fs: &'static str },
    #[error(
        "{tmp} and {blocks} are on different filesystems: blocks are published by rename, so \
         the staging store must be one filesystem"
    )]
    Split { tmp: PathBuf, blocks: PathBuf },
    #[error("checking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses "6.1.0-18-amd64" into (6, 1).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The filesystem type's name when it is one that does not survive a reboot.
/// The filesystem type of `path` (statfs `f_type`).
fn fs_type(path: &Path) -> Result<i64, DurabilityError> {
    let io = |source| DurabilityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io(std::io::Error::other(e)))?;
    // SAFETY: statfs(2) reads the NUL-terminated path `c` and writes one `statfs` struct into
    // `buf`, which is zero-initialised and lives across the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if r != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(buf.f_type as i64)
}

/// A warning when `path` is on ext4 without a journal (see the module docs), else `None`.
pub fn journal_warning(path: &Path) -> Option<String> {
    const EXT4_MAGIC: i64 = 0xEF53;
    if fs_type(path).ok()? != EXT4_MAGIC {
        return None;
    }
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = link.file_name()?.to_str()?.to_string();
    let task = std::fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")).ok()?;
    (task.trim() == "<none>").then(|| {
        format!(
            "{} is on ext4 without a journal ({name}): a failed or torn write there can lose \
             blocks acknowledged earlier; put the receiver's state on a journaling filesystem \
             (ext4 with its journal, XFS, btrfs)",
            path.display()
        )
    })
}

fn volatile_fs(path: &Path) -> Result<Option<&'static str>, DurabilityError> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    Ok(match fs_type(path)? {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    })
}

/// Checks the kernel and the state directory (which must exist, with `store/` in it).
pub fn check(state_dir: &Path) -> Result<(), DurabilityError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|source| {
        DurabilityError::Io {
            path: "/proc/sys/kernel/osrelease".into(),
            source,
        }
    })?;
    match kernel_version(&release) {
        Some(v) if v >= (5, 8) => {}
        _ => {
            return Err(DurabilityError::Kernel {
                found: release.trim().to_string(),
            })
        }
    }
    if let Some(fs) = volatile_fs(state_dir)? {
        return Err(DurabilityError::Volatile {
            path: state_dir.to_path_buf(),
            fs,
        });
    }
    let store = state_dir.join("store");
    let (tmp, blocks) = (store.join("tmp"), store.join("blocks"));
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|source| DurabilityError::Io {
                path: p.to_path_buf(),
                source,
            })
    };
    if tmp.exists() && blocks.exists() && dev(&tmp)? != dev(&blocks)? {
        return Err(DurabilityError::Split { tmp, blocks });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(kernel_version("4.19.0-18-amd64\n"), Some((4, 19)));
        assert!(kernel_version("4.19.0") < Some((5, 8)));
        assert_eq!(kernel_version("garbage"), None);
    }

    /// ext4 without its journal is named; with its journal it is not. Root needed (loop
    /// mounts); skipped loudly otherwise, an error under CI.
    #[test]
    fn ext4_without_a_journal_is_warned_about() {
        use std::process::Command;
        let base = tempfile::tempdir_in(".").unwrap();
        for (features, journaled) in [("^has_journal", false), ("has_journal", true)] {
            let img = base.path().join(format!("{journaled}.img"));
            let mnt = base.path().join(format!("{journaled}.mnt"));
            std::fs::create_dir_all(&mnt).unwrap();
            let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
            let mounted = std::fs::File::create(&img)
                .and_then(|f| f.set_len(64 << 20))
                .is_ok()
                && ok(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-O", features])
                    .arg(&img))
                && ok(Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&img)
                    .arg(&mnt));
            if !mounted {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "loop mounts are needed in CI"
                );
                eprintln!("SKIPPED (loudly): cannot loop-mount ext4 here");
                return;
            }
            let w = journal_warning(&mnt);
            let _ = Command::new("umount").arg(&mnt).output();
            if journaled {
                assert_eq!(w, None);
            } else {
                let w = w.expect("no warning for ext4 without a journal");
                assert!(w.contains("without a journal"), "{w}");
            }
        }
    }

    #[test]
    fn tmpfs_is_refused_and_a_disk_filesystem_is_not() {
        let d = tempfile::tempdir().unwrap();
        // /dev/shm is tmpfs on Linux.
        if Path::new("/dev/shm").is_dir() {
            assert!(matches!(
                check(Path::new("/dev/shm")),
                Err(DurabilityError::Volatile { fs: "tmpfs", .. })
            ));
        }
        // Wherever the test runs from (target/) is a disk filesystem.
        let here = std::env::current_exe().unwrap();
        let dir = here.parent().unwrap();
        assert!(check(dir).is_ok(), "{:?}", check(dir));
        drop(d);
    }
}
