//! The directory backend of the staging store (the default).
//!
//! Layout: `store/blocks/<2 hex>/<64 hex>`, each file `codec u8 | encoded bytes` (zstd as the
//! agent sent it, or raw); `store/tmp/` for staging; `store/quarantine/` for corrupt blocks.
//!
//! [`BlockStore::insert`] is a group commit: the batch's temp files are written, `syncfs`
//! makes their content durable, they are renamed to their final names, and a second
//! `syncfs` makes the names durable. So a final name only ever points at durable, verified
//! content, and when `insert` returns every block of the batch survives a crash. `syncfs`
//! reports writeback errors of the filesystem since the descriptor was opened on Linux 5.8
//! and later, which `serve` requires (see `crate::durability`).

use super::{io_err, BlockStore, Fence, StoreError, VerifiedBlock};
use crate::sys;
use lifeboat_common::BlockHash;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Under `quarantine/`: see [`BlockStore::quarantine_mark`].
const QUARANTINE_MARK: &str = "mark";

/// Counts staged files, for unique temp names.
static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct DirStore {
    root: PathBuf,
    blocks: PathBuf,
    tmp: PathBuf,
    /// Set by a failed `syncfs`: see [`DirStore::sync_on`].
    poisoned: std::sync::atomic::AtomicBool,
    /// Blocks renamed to their names whose names are not durable yet (a batch between its
    /// rename and its last `syncfs`).
    unsynced: std::sync::Mutex<std::collections::HashSet<BlockHash>>,
}

impl DirStore {
    /// Opens (creating if needed) the store under `root`. Leaves `tmp/` alone: a running
    /// `serve` may have a batch in flight there (see [`DirStore::clear_tmp`]).
    pub fn open(root: &Path) -> Result<DirStore, StoreError> {
        let blocks = root.join("blocks");
        let tmp = root.join("tmp");
        for d in [&blocks, &tmp] {
            lifeboat_common::durable::create_dir_all_durable(d).map_err(io_err(d))?;
        }

        Ok(DirStore {
            root: root.to_path_buf(),
            blocks,
            tmp,
            poisoned: Default::default(),
            unsynced: Default::default(),
        })
    }

    /// Removes temp files a crashed `serve` left behind. Only the holder of the serve lock
    /// (the one process that writes the store) may call it, which the argument proves.
    pub fn clear_tmp(&self, _serve: &lifeboat_common::lock::DirLock) -> Result<(), StoreError> {
        for e in fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
            let e = e.map_err(io_err(&self.tmp))?;
            let _ = fs::remove_file(e.path());
        }
        Ok(())
    }

    pub fn path_of(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.blocks.join(&hex[..2]).join(hex)
    }

    /// Writes and renames the blocks not yet present; returns those present that another
    /// batch published and has not synced yet (so this one must sync too).
    fn stage_and_publish(
        &self,
        fs: &File,
        blocks: &[VerifiedBlock],
        staged: &mut Vec<(PathBuf, PathBuf)>,
    ) -> Result<Vec<BlockHash>, StoreError> {
        let mut others_unsynced = Vec::new();
        for b in blocks {
            let dst = self.path_of(&b.hash);
            if staged.iter().any(|(_, d)| *d == dst) {
                continue;
            }
            if dst.is_file() {
                if self.unsynced().contains(&b.hash) {
                    others_unsynced.push(b.hash);
                }
                continue;
            }
            // Unique per staged file: sessions of different servers may store the same content
            // at the same moment, and must never share a temp file.
            let n = STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self
                .tmp
                .join(format!("{}.{}.{n}", b.hash.to_hex(), std::process::id()));
            staged.push((tmp.clone(), dst));
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&[b.codec as u8]).map_err(io_err(&tmp))?;
            f.write_all(&b.data).map_err(io_err(&tmp))?;
        }
        if staged.is_empty() {
            return Ok(others_unsynced);
        }
        self.sync_on(fs)?;
        // Listed before renamed: whoever sees a name also sees that it is not durable yet.
        self.unsynced()
            .extend(staged.iter().filter_map(|(_, dst)| name_of(dst)));
        for (tmp, dst) in staged.iter() {
            if let Some(dir) = dst.parent() {
                if !dir.is_dir() {
                    fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
            }
            fs::rename(tmp, dst).map_err(io_err(dst))?;
        }
        Ok(others_unsynced)
    }

    fn unsynced(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<BlockHash>> {
        self.unsynced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The quarantine fence: a `flock` on `store/quarantine.lock`, on a descriptor of its own
    /// (flock belongs to the open file, so threads must not share one).
    fn fence(&self, exclusive: bool) -> Result<File, StoreError> {
        let path = self.root.join("quarantine.lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sys::flock(&f, exclusive, false).map_err(io_err(&path))?;
        Ok(f)
    }

    /// `syncfs` through `fs` (this batch's descriptor). A failure poisons the store: the
    /// page cache may have dropped the failed pages and later syncs would report success, so
    /// nothing written before can be trusted durable until `serve` restarts.
    fn sync_on(&self, fs: &File) -> Result<(), StoreError> {
        sys::syncfs(fs).map_err(|e| {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(
                "staging store {}: syncfs failed ({e}); refusing every write until the \
                 receiver is restarted (check the disk first: nothing is acknowledged meanwhile)",
                self.root.display()
            );
            io_err(&self.root)(e)
        })
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: self.root.clone(),
                source: io::Error::other(
                    "an earlier syncfs failed: restart the receiver after checking the disk",
                ),
            });
        }
        Ok(())
    }

    /// Makes the store's whole filesystem durable through a fresh descriptor (quarantine).
    fn sync(&self) -> Result<(), StoreError> {
        let fs = File::open(&self.root).map_err(io_err(&self.root))?;
        self.sync_on(&fs)
    }
}

/// The block a path under `blocks/` names.
fn name_of(path: &Path) -> Option<BlockHash> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(BlockHash::from_hex)
}

impl BlockStore for DirStore {
    fn unhealthy(&self) -> Option<String> {
        self.check_poisoned().err().map(|e| e.to_string())
    }

    fn insert(&self, blocks: &[VerifiedBlock]) -> Result<usize, StoreError> {
        self.check_poisoned()?;
        // A descriptor of this batch's own, opened before it writes anything: `syncfs`
        // reports a writeback error once per descriptor, so on a shared one another batch's
        // sync could consume the error of this batch's pages.
        let fs = File::open(&self.root).map_err(io_err(&self.root))?;
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
        let result = self.stage_and_publish(&fs, blocks, &mut staged);
        if result.is_err() {
            // Leave nothing behind in tmp/ (a full disk must not stay full).
            for (tmp, _) in &staged {
                let _ = fs::remove_file(tmp);
            }
        }
        let others_unsynced = result?;
        if !staged.is_empty() || !others_unsynced.is_empty() {
            // The names, durable (ours, and any another batch renamed and has not synced).
            // Once any sync after a block's rename returns, its name is durable (a later
            // rename over it replaces one durable inode with another). After a failed sync
            // the names stay listed as not durable until an insert of the same block syncs.
            self.sync_on(&fs)?;
            // Only what this batch published, or saw unsynced before its sync: an entry
            // another batch added since is that batch's to clear.
            let mut unsynced = self.unsynced();
            for h in staged.iter().filter_map(|(_, dst)| name_of(dst)) {
                unsynced.remove(&h);
            }
            for h in &others_unsynced {
                unsynced.remove(h);
            }
        }
        Ok(staged.len())
    }

    /// True only for a block whose name is durable: one another batch renamed but has not
    /// synced yet counts as absent (its Ref gets NeedData, its Have "send it").
    fn has(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        if hash.is_zero() {
            return Ok(true);
        }
        self.check_poisoned()?;
        // The file first, then the list: a batch lists a name before it renames, so a name
        // seen here was either listed already or is durable.
        let p = self.path_of(hash);
        let present = match fs::metadata(&p) {
            Ok(m) => m.is_file(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&p)(e)),
        };
        Ok(present && !self.unsynced().contains(hash))
    }

    fn quarantined(&self) -> Result<std::collections::HashSet<BlockHash>, StoreError> {
        let dir = self.root.join("quarantine");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        Ok(rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?.split('.').next()?.to_string();
                BlockHash::from_hex(&hex)
            })
            .collect())
    }

    fn quarantine_fence(&self) -> Result<Fence, StoreError> {
        Ok(Fence::new(self.fence(false)?))
    }

    fn quarantine_mark(&self) -> Option<Vec<u8>> {
        fs::read(self.root.join("quarantine").join(QUARANTINE_MARK)).ok()
    }

    /// Reads, decodes and verifies a block; returns its plain bytes (`BLOCK_SIZE` long).
    fn read(&self, hash: &BlockHash) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(hash);
        let raw = match fs::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { hash: *hash })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        super::decode_stored(hash, &raw)
    }

    /// Every block name in the store with its file's modification time.
    fn list(&self) -> Result<Vec<(BlockHash, std::time::SystemTime)>, StoreError> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.blocks).map_err(io_err(&self.blocks))? {
            let sub = sub.map_err(io_err(&self.blocks))?.path();
            let Ok(entries) = fs::read_dir(&sub) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(h) = name.to_str().and_then(BlockHash::from_hex) else {
                    continue;
                };
                let mtime = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::SystemTime::now());
                out.push((h, mtime));
            }
        }
        Ok(out)
    }

    /// Moves a block aside to `store/quarantine/` (kept for inspection, never read again),
    /// then changes the [`BlockStore::quarantine_mark`]: every live session re-checks its disks
    /// before its next point and asks its agent to resend what is missing.
    fn quarantine(&self, hash: &BlockHash) -> Result<String, StoreError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let _exclusive = self.fence(true)?;
        // The mark first: if the move then fails, sessions re-check for nothing; the other
        // way round, a block could vanish with no session told.
        let mark = dir.join(QUARANTINE_MARK);
        lifeboat_common::durable::write_atomic(&mark, &rand::random::<[u8; 16]>())
            .map_err(io_err(&mark))?;
        let dst = dir.join(format!("{}.{}", hash.to_hex(), crate::status::now_ms()));
        let src = self.path_of(hash);
        fs::rename(&src, &dst).map_err(io_err(&src))?;
        self.sync()?;
        Ok(dst.display().to_string())
    }

    /// Removes a block. Only the garbage collector calls this.
    fn remove(&self, hash: &BlockHash) -> Result<(), StoreError> {
        let p = self.path_of(hash);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::verify;
    use lifeboat_common::block::hash_block;
    use lifeboat_common::codec::{self, Codec};
    use lifeboat_common::BLOCK_SIZE;

    #[test]
    fn concurrent_inserts_of_the_same_block_stay_whole() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        let data = b"shared by many servers ".repeat(5000);
        let hash = hash_block(&data);
        let (c, enc) = codec::encode(&data, 1).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for _ in 0..20 {
                        let v = verify(hash, c, enc.clone()).unwrap();
                        s.insert(&[v]).unwrap();
                    }
                });
            }
        });
        assert_eq!(&s.read(&hash).unwrap()[..data.len()], &data[..]);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_name_not_yet_durable_is_not_held_and_a_later_insert_syncs_it() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        let data = b"published by another batch ".repeat(100);
        let hash = hash_block(&data);
        let (c, enc) = codec::encode(&data, 1).unwrap();
        s.insert(&[verify(hash, c, enc.clone()).unwrap()]).unwrap();
        assert!(s.has(&hash).unwrap());
        // As if another batch had renamed it and not synced yet.
        s.unsynced().insert(hash);
        assert!(!s.has(&hash).unwrap(), "an undurable name counted as held");
        // This batch finds the name, so it syncs, after which the name is durable.
        assert_eq!(s.insert(&[verify(hash, c, enc).unwrap()]).unwrap(), 0);
        assert!(s.has(&hash).unwrap());
    }

    /// A write that fails under the store (its filesystem's device runs out of room, so
    /// writeback fails and `syncfs` reports EIO): `insert` fails, so nothing is acknowledged,
    /// and the store refuses everything after. Real kernel, real loop device; root needed.
    #[test]
    fn a_failed_syncfs_fails_the_insert_and_poisons_the_store() {
        use std::process::Command;
        let run = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        let base = tempfile::tempdir_in(".").unwrap();
        let tiny = base.path().join("tiny");
        let mnt = base.path().join("mnt");
        fs::create_dir_all(&tiny).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let img = tiny.join("store.img");
        let ready = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&tiny))
            && File::create(&img)
                .and_then(|f| f.set_len(256 << 20))
                .is_ok()
            && run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^has_journal"])
                .arg(&img))
            && run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
        struct Unmount(Vec<PathBuf>);
        impl Drop for Unmount {
            fn drop(&mut self) {
                for p in &self.0 {
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(p)
                        .output();
                }
            }
        }
        let _cleanup = Unmount(vec![mnt.clone(), tiny.clone()]);
        if !ready {
            assert!(
                std::env::var_os("CI").is_none(),
                "root, tmpfs and loop devices needed in CI"
            );
            eprintln!("SKIPPED (loudly): cannot mount a loop filesystem here");
            return;
        }
        let s = DirStore::open(&mnt.join("store")).unwrap();
        let mut seed = 1u64;
        let mut failed = None;
        // 8 incompressible blocks (4 MiB) a batch: the 24 MiB under the image run out after a
        // few batches.
        for batch in 0..32 {
            let blocks: Vec<_> = (0..8)
                .map(|_| {
                    let mut data = vec![0u8; BLOCK_SIZE];
                    for b in data.iter_mut() {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        *b = (seed >> 56) as u8;
                    }
                    verify(hash_block(&data), Codec::Raw, data).unwrap()
                })
                .collect();
            if let Err(e) = s.insert(&blocks) {
                failed = Some((batch, e.to_string()));
                break;
            }
        }
        let (batch, e) = failed.expect("every insert succeeded: no write failed, nothing tested");
        assert!(batch > 0, "the first insert failed: {e}");
        // Any failure will do here (ENOSPC at write, EIO at sync); what matters is what follows.
        let again = s.insert(&[verify(hash_block(b"x"), Codec::Raw, b"x".to_vec()).unwrap()]);
        let e2 = again.err().map(|e| e.to_string()).unwrap_or_default();
        if e.contains("Input/output error") {
            assert!(
                e2.contains("earlier syncfs failed"),
                "not poisoned after EIO: {e2}"
            );
            assert!(s.has(&hash_block(b"x")).is_err());
        } else {
            eprintln!("NOTE: the write failed before the sync ({e}); poisoning not exercised");
        }
    }

    #[test]
    fn insert_read_and_reject() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        let data = b"block content ".repeat(1000);
        let hash = hash_block(&data);
        let (c, enc) = codec::encode(&data, 1).unwrap();
        let v = verify(hash, c, enc.clone()).unwrap();
        assert_eq!(s.insert(&[v]).unwrap(), 1);
        assert!(s.has(&hash).unwrap());
        let back = s.read(&hash).unwrap();
        assert_eq!(back.len(), BLOCK_SIZE);
        assert_eq!(&back[..data.len()], &data[..]);
        // Same block again: not new.
        assert_eq!(s.insert(&[verify(hash, c, enc).unwrap()]).unwrap(), 0);

        // Wrong content for a name is refused before it reaches the store.
        let other = hash_block(b"other");
        let (c2, enc2) = codec::encode(&data, 1).unwrap();
        assert!(matches!(
            verify(other, c2, enc2),
            Err(StoreError::HashMismatch { .. })
        ));
        assert!(!s.has(&other).unwrap());

        // Corruption on disk is caught on read, naming the block.
        let p = s.path_of(&hash);
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 0xff;
        fs::write(&p, raw).unwrap();
        let e = s.read(&hash).unwrap_err().to_string();
        assert!(e.contains(&hash.to_hex()), "{e}");
    }
}
