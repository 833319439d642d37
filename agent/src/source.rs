//! What a disk is to the agent: a block device or a regular file, its size, and for files the
//! map of data extents (SEEK_DATA/SEEK_HOLE), so that holes are known to be zero unread.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

pub struct SourceInfo {
    pub size: u64,
    pub is_block_device: bool,
    /// Byte ranges that may hold data; `None` means "all of it" (block devices, or a
    /// filesystem without SEEK_DATA).
    pub data_ranges: Option<Vec<(u64, u64)>>,
}

fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor `f` keeps open; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(e)
}

pub fn inspect(path: &Path) -> io::Result<SourceInfo> {
    let meta = std::fs::metadata(path)?;
    let mut f = File::open(path)?;
    if meta.file_type().is_block_device() {
        let size = f.seek(SeekFrom::End(0))?;
        return Ok(SourceInfo {
            size,
            is_block_device: true,
            data_ranges: None,
        });
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ));
    }
    let size = meta.len();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(&f, pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(SourceInfo {
                    size,
                    is_block_device: false,
                    data_ranges: None,
                })
            }
            Err(e) => return Err(e),
        };
        let end = lseek(&f, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        ranges.push((start, end));
        pos = end;
    }
    Ok(SourceInfo {
        size,
        is_block_device: false,
        data_ranges: Some(ranges),
    })
}

impl SourceInfo {
    /// For each block, whether it may hold data (false: wholly inside a hole).
    pub fn maybe_data(&self, blocks: u64) -> Vec<bool> {
        let Some(ranges) = &self.data_ranges else {
            return vec![true; blocks as usize];
        };
        let bs = lifeboat_common::block::BLOCK_SIZE_U64;
        let mut out = vec![false; blocks as usize];
        for &(s, e) in ranges {
            if e <= s {
                continue;
            }
            let first = s / bs;
            let last = (e - 1) / bs;
            for b in first..=last.min(blocks.saturating_sub(1)) {
                out[b as usize] = true;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::BLOCK_SIZE;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_found() {
        let d = tempfile::tempdir_in(
            std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| ".".into()),
        )
        .unwrap();
        let p = d.path().join("sparse.img");
        let f = File::create(&p).unwrap();
        f.set_len(64 * BLOCK_SIZE as u64).unwrap();
        f.write_all_at(b"x", 10 * BLOCK_SIZE as u64 + 5).unwrap();
        f.sync_all().unwrap();
        let info = inspect(&p).unwrap();
        assert_eq!(info.size, 64 * BLOCK_SIZE as u64);
        // ext4, xfs, btrfs and tmpfs all answer SEEK_DATA: no map means it is broken.
        assert!(info.data_ranges.is_some(), "no data map for a sparse file");
        let m = info.maybe_data(64);
        let data: Vec<usize> = (0..64).filter(|&i| m[i]).collect();
        assert_eq!(data, vec![10], "holes reported as data, or data as a hole");
    }
}
