//! Page sums: which 4 KiB pages of a block changed, when no tracker saw the writes.
//!
//! The eBPF tracker knows the pages a write touched; a hash scan (and a verify scan) only sees
//! that a block's blake3 differs from the acknowledged one. To send such a block as the pages
//! that changed (a `Patch`) rather than whole, the agent keeps, for every block it has read
//! whole, a 16-bit checksum (xxh3) of each of its 128 pages, keyed by the blake3 name of the
//! content they describe. A changed block whose acknowledged name has a record is compared
//! page by page; at most half its pages changed (in few enough runs) makes a patch.
//!
//! # Why a hint is enough
//! A record is trusted only for the content it names (its key must match the acknowledged
//! name), and a patch made from it carries the whole-block name the agent computed. The
//! receiver names what it made of the patch; a name that differs (two page contents that
//! collide in 16 bits, a record torn by a crash) sends the block again whole before the point
//! is cut (see `Window::named`). So a stale, torn or lost file costs bytes on the wire, never
//! a wrong block: the file is written without fsync and its write errors only disable it.
//!
//! # Layout
//! `disks/<id>.pagesums` in the agent's state directory: record `i` (block `i`) at byte
//! `i × RECORD`, holding the first 8 bytes of the block's name, then 128 little-endian `u16`s.
//! 264 bytes per 512 KiB block written whole: 0.05 % of the disk, sparse where no block was.

use lifeboat_common::protocol::{PAGES_PER_BLOCK, PAGE_SIZE};
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const PAGES: usize = PAGES_PER_BLOCK as usize;
const KEY: usize = 8;
/// Bytes of one block's record.
pub const RECORD: usize = KEY + 2 * PAGES;

/// One block's page checksums.
pub type Sums = [u16; PAGES];

/// The checksums of a whole block's pages.
pub fn of(block: &[u8]) -> Sums {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    let mut out = [0u16; PAGES];
    for (s, page) in out.iter_mut().zip(block.chunks_exact(PAGE_SIZE)) {
        *s = xxhash_rust::xxh3::xxh3_64(page) as u16;
    }
    out
}

/// The pages whose checksums differ, as a mask (bit `i`: page `i`).
pub fn changed(old: &Sums, new: &Sums) -> u128 {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .fold(0u128, |m, (i, _)| m | 1 << i)
}

/// One disk's page sums file.
pub struct PageSums {
    file: File,
    path: PathBuf,
    /// Set at the first write error: the file is then neither read nor written (a hint only).
    failed: AtomicBool,
}

impl PageSums {
    pub fn open(state_dir: &Path, disk_id: &str) -> io::Result<PageSums> {
        let path = state_dir.join("disks").join(format!("{disk_id}.pagesums"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(PageSums {
            file,
            path,
            failed: AtomicBool::new(false),
        })
    }

    /// The sums of block `index` when they describe the content `name`.
    pub fn load(&self, index: u64, name: &BlockHash) -> Option<Sums> {
        if self.failed.load(Ordering::Relaxed) || name.is_zero() {
            return None;
        }
        let mut rec = [0u8; RECORD];
        self.file
            .read_exact_at(&mut rec, index * RECORD as u64)
            .ok()?;
        if rec[..KEY] != name.0[..KEY] {
            return None;
        }
        let mut out = [0u16; PAGES];
        for (s, b) in out.iter_mut().zip(rec[KEY..].chunks_exact(2)) {
            *s = u16::from_le_bytes([b[0], b[1]]);
        }
        Some(out)
    }

    /// Records that block `index` holds the content `name`, whose pages sum to `sums`.
    pub fn store(&self, index: u64, name: &BlockHash, sums: &Sums) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut rec = [0u8; RECORD];
        rec[..KEY].copy_from_slice(&name.0[..KEY]);
        for (b, s) in rec[KEY..].chunks_exact_mut(2).zip(sums) {
            b.copy_from_slice(&s.to_le_bytes());
        }
        if let Err(e) = self.file.write_all_at(&rec, index * RECORD as u64) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "page sums {}: {e}; changed blocks a scan finds go whole until restart",
                    self.path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::block::hash_block;

    fn block(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[test]
    fn changed_pages_are_found() {
        let a = block(1);
        let mut b = a.clone();
        b[3 * PAGE_SIZE + 17] ^= 1;
        b[127 * PAGE_SIZE] ^= 0x80;
        assert_eq!(changed(&of(&a), &of(&b)), 1 << 3 | 1 << 127);
        assert_eq!(changed(&of(&a), &of(&a)), 0);
    }

    #[test]
    fn a_record_serves_only_the_content_it_names() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("disks")).unwrap();
        let s = PageSums::open(d.path(), "root").unwrap();
        let (a, b) = (block(1), block(2));
        let (ha, hb) = (hash_block(&a), hash_block(&b));
        assert_eq!(
            s.load(5, &ha),
            None,
            "nothing stored yet (a hole reads as zeros)"
        );
        s.store(5, &ha, &of(&a));
        assert_eq!(s.load(5, &ha), Some(of(&a)));
        assert_eq!(s.load(5, &hb), None, "another content");
        assert_eq!(s.load(4, &ha), None, "another block");
        assert_eq!(s.load(5, &BlockHash::ZERO), None);
        // Reopened (a restart): still there, and replaced by a later store.
        drop(s);
        let s = PageSums::open(d.path(), "root").unwrap();
        assert_eq!(s.load(5, &ha), Some(of(&a)));
        s.store(5, &hb, &of(&b));
        assert_eq!((s.load(5, &ha), s.load(5, &hb)), (None, Some(of(&b))));
    }
}
