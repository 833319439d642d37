//! Staging store: every block the receiver has acknowledged, content-addressed.
//!
//! Layout: `store/blocks/<2 hex>/<64 hex>`, each file `codec u8 | encoded bytes` (zstd as the
//! agent sent it, or raw). A block is verified (decoded, blake3 compared to its name) before
//! it is inserted, and again every time it is read.
//!
//! Durability is a group commit ([`Store::insert_batch`]): the batch's temp files are written,
//! `syncfs` makes their content durable, they are renamed to their final names, and a second
//! `syncfs` makes the names durable. So a final name only ever points at durable, verified
//! content, and after `insert_batch` returns every block of the batch survives a crash.

use crate::sys;
use lifeboat_common::block::hash_block;
use lifeboat_common::codec::{self, Codec, CodecError};
use lifeboat_common::BlockHash;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block {hash}: data hashes to {actual}, not to its name")]
    HashMismatch { hash: BlockHash, actual: BlockHash },
    #[error("block {hash}: {source}")]
    Codec { hash: BlockHash, source: CodecError },
    #[error("block {hash} is not in the staging store")]
    Missing { hash: BlockHash },
    #[error("block {hash} in the staging store is corrupt: {why}")]
    Corrupt { hash: BlockHash, why: String },
    #[error("staging store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl StoreError {
    /// True when trying again later can help (I/O), false for bad content.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A block checked against its name, ready to insert.
pub struct VerifiedBlock {
    pub hash: BlockHash,
    pub codec: Codec,
    pub data: Vec<u8>,
}

/// Decodes `data` and checks it hashes to `hash`.
pub fn verify(hash: BlockHash, codec: Codec, data: Vec<u8>) -> Result<VerifiedBlock, StoreError> {
    let plain = codec::decode(codec, &data).map_err(|source| StoreError::Codec { hash, source })?;
    let actual = hash_block(&plain);
    if actual != hash {
        return Err(StoreError::HashMismatch { hash, actual });
    }
    Ok(VerifiedBlock { hash, codec, data })
}

/// Under `quarantine/`: see [`Store::quarantine_mark`].
const QUARANTINE_MARK: &str = "mark";

/// Counts staged files, for unique temp names.
static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Store {
    root: PathBuf,
    blocks: PathBuf,
    tmp: PathBuf,
    /// Held open for syncfs.
    root_file: File,
}

impl Store {
    /// Opens (creating if needed) the store under `root`. Leaves `tmp/` alone: a running
    /// `serve` may have a batch in flight there (see [`Store::clear_tmp`]).
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let blocks = root.join("blocks");
        let tmp = root.join("tmp");
        for d in [&blocks, &tmp] {
            lifeboat_common::durable::create_dir_all_durable(d).map_err(io_err(d))?;
        }
        let root_file = File::open(root).map_err(io_err(root))?;
        Ok(Store {
            root: root.to_path_buf(),
            blocks,
            tmp,
            root_file,
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

    /// Changes after every quarantine (by `scrub`, in any process): a session that sees it
    /// change re-checks its disks for missing blocks before the next point. (A fresh random
    /// value written after each move, so no two quarantines ever leave the same mark.)
    pub fn quarantine_mark(&self) -> Option<Vec<u8>> {
        fs::read(self.root.join("quarantine").join(QUARANTINE_MARK)).ok()
    }

    pub fn path_of(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.blocks.join(&hex[..2]).join(hex)
    }

    pub fn has(&self, hash: &BlockHash) -> bool {
        hash.is_zero() || self.path_of(hash).is_file()
    }

    /// Durably inserts verified blocks (group commit, see the module docs). Blocks already
    /// present are skipped. Returns how many were new.
    pub fn insert_batch(&self, blocks: &[VerifiedBlock]) -> Result<usize, StoreError> {
        self.insert_batch_then(blocks, || Ok(()))
    }

    /// As [`Store::insert_batch`], and runs `then` after the blocks have their final names
    /// and before the last `syncfs`, so what `then` writes on this filesystem (the disks'
    /// journals) is made durable by the same sync. `then` never sees a block that is not
    /// durable.
    pub fn insert_batch_then<E: From<StoreError>>(
        &self,
        blocks: &[VerifiedBlock],
        then: impl FnOnce() -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
        let result = self.stage_and_publish(blocks, &mut staged);
        if result.is_err() {
            // Leave nothing behind in tmp/ (a full disk must not stay full).
            for (tmp, _) in &staged {
                let _ = fs::remove_file(tmp);
            }
        }
        result?;
        then()?;
        self.sync()?;
        Ok(staged.len())
    }

    fn stage_and_publish(
        &self,
        blocks: &[VerifiedBlock],
        staged: &mut Vec<(PathBuf, PathBuf)>,
    ) -> Result<(), StoreError> {
        for b in blocks {
            let dst = self.path_of(&b.hash);
            if dst.is_file() || staged.iter().any(|(_, d)| *d == dst) {
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
            return Ok(());
        }
        sys::syncfs(&self.root_file).map_err(io_err(&self.root))?;
        for (tmp, dst) in staged.iter() {
            if let Some(dir) = dst.parent() {
                if !dir.is_dir() {
                    fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
            }
            fs::rename(tmp, dst).map_err(io_err(dst))?;
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        sys::syncfs(&self.root_file).map_err(io_err(&self.root))
    }

    /// Reads, decodes and verifies a block; returns its plain bytes (`BLOCK_SIZE` long).
    pub fn read(&self, hash: &BlockHash) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(hash);
        let raw = match fs::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { hash: *hash })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |why: String| StoreError::Corrupt { hash: *hash, why };
        let (&c, body) = raw
            .split_first()
            .ok_or_else(|| corrupt("empty file".into()))?;
        let codec = Codec::from_u8(c).ok_or_else(|| corrupt(format!("unknown codec byte {c}")))?;
        let mut plain = codec::decode(codec, body).map_err(|e| corrupt(e.to_string()))?;
        let actual = hash_block(&plain);
        if actual != *hash {
            return Err(corrupt(format!("content hashes to {actual}")));
        }
        plain.resize(lifeboat_common::BLOCK_SIZE, 0);
        Ok(plain)
    }

    /// Every block name in the store with its file's modification time.
    pub fn list(&self) -> Result<Vec<(BlockHash, std::time::SystemTime)>, StoreError> {
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
    /// then changes the [`Store::quarantine_mark`]: every live session re-checks its disks
    /// before its next point and asks its agent to resend what is missing.
    pub fn quarantine(&self, hash: &BlockHash) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let dst = dir.join(format!("{}.{}", hash.to_hex(), crate::status::now_ms()));
        let src = self.path_of(hash);
        fs::rename(&src, &dst).map_err(io_err(&src))?;
        let mark = dir.join(QUARANTINE_MARK);
        lifeboat_common::durable::write_atomic(&mark, &rand::random::<[u8; 16]>())
            .map_err(io_err(&mark))?;
        self.sync()?;
        Ok(dst)
    }

    /// Removes a block. Only the garbage collector calls this.
    pub fn remove(&self, hash: &BlockHash) -> Result<(), StoreError> {
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
    use lifeboat_common::BLOCK_SIZE;

    #[test]
    fn concurrent_inserts_of_the_same_block_stay_whole() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let data = b"shared by many servers ".repeat(5000);
        let hash = hash_block(&data);
        let (c, enc) = codec::encode(&data, 1).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for _ in 0..20 {
                        let v = verify(hash, c, enc.clone()).unwrap();
                        s.insert_batch(&[v]).unwrap();
                    }
                });
            }
        });
        assert_eq!(&s.read(&hash).unwrap()[..data.len()], &data[..]);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn insert_read_and_reject() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let data = b"block content ".repeat(1000);
        let hash = hash_block(&data);
        let (c, enc) = codec::encode(&data, 1).unwrap();
        let v = verify(hash, c, enc.clone()).unwrap();
        assert_eq!(s.insert_batch(&[v]).unwrap(), 1);
        assert!(s.has(&hash));
        let back = s.read(&hash).unwrap();
        assert_eq!(back.len(), BLOCK_SIZE);
        assert_eq!(&back[..data.len()], &data[..]);
        // Same block again: not new.
        assert_eq!(s.insert_batch(&[verify(hash, c, enc).unwrap()]).unwrap(), 0);

        // Wrong content for a name is refused before it reaches the store.
        let other = hash_block(b"other");
        let (c2, enc2) = codec::encode(&data, 1).unwrap();
        assert!(matches!(
            verify(other, c2, enc2),
            Err(StoreError::HashMismatch { .. })
        ));
        assert!(!s.has(&other));

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
