//! The receiver's live view of one replicating disk: which content each block index holds,
//! as far as the receiver has acknowledged.
//!
//! On disk, under `servers/<server>/disks/<disk>/`: `live.manifest` (the state at the last
//! compaction, manifest format) and `journal`, an append-only list of records
//! `index u64 | hash 32 | check u32` written (and made durable) before the block is acked.
//! `check` is the first four bytes of blake3(index ‖ hash). Records are absolute (index →
//! hash), so replaying one twice is harmless.
//!
//! Replay applies every record that passes its check. Bad records at the tail are a write
//! torn by a crash (never acknowledged: the ack follows the sync) and are dropped quietly. A
//! bad record followed by good ones is damage: it is logged as an error and counted, the
//! records around it still apply, and the disk is compacted at once. The live manifest may
//! then lack an acknowledged update, so its digest differs from the agent's: the agent
//! adopts the receiver's manifest and verify-scans the disk (hash compare), resending what
//! differs. (A block a replayed record names but the store lacks is marked absent at open.)

use lifeboat_common::durable;
use lifeboat_common::manifest::{Manifest, ManifestError};
use lifeboat_common::BlockHash;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const RECORD: usize = 8 + 32 + 4;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {disk}: I/O on {path}: {source}")]
    Io {
        disk: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("disk {disk}: live manifest {path} is unreadable: {source}")]
    Manifest {
        disk: String,
        path: PathBuf,
        source: ManifestError,
    },
    #[error("disk {disk}: block index {index} is past the end ({blocks} blocks)")]
    OutOfRange {
        disk: String,
        index: u64,
        blocks: u64,
    },
}

/// The state of a disk before a batch: see [`LiveDisk::checkpoint`].
pub struct Checkpoint {
    records: u64,
    before: Vec<(u64, BlockHash)>,
}

pub struct LiveDisk {
    pub id: String,
    dir: PathBuf,
    pub manifest: Manifest,
    journal: File,
    journal_records: u64,
    /// Journal records found damaged when the disk was opened (see the module docs).
    pub damaged_records: u64,
}

/// The most records one append writes (a session's batch appends at most one record per
/// message; `session::BATCH` is checked against it): a bad tail longer than this cannot be
/// one torn write, so it is damage.
pub const MAX_RECORDS_PER_APPEND: u64 = 64;

/// What a journal replay found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Replay {
    /// Bytes up to the end of the last good record (what the journal keeps).
    good_len: usize,
    /// Bad records followed by good ones, or a bad tail too long to be one torn write.
    damaged: u64,
    /// Bad records at the tail, dropped as a torn write.
    torn: u64,
}

/// Applies every journal record that passes its check over `manifest` (see the module docs).
/// Records past the disk's end are ignored.
fn replay(manifest: &mut Manifest, bytes: &[u8]) -> Replay {
    let mut out = Replay::default();
    let mut bad_run = 0u64;
    for (n, rec) in bytes.chunks_exact(RECORD).enumerate() {
        let mut ib = [0u8; 8];
        ib.copy_from_slice(&rec[..8]);
        let index = u64::from_le_bytes(ib);
        let mut h = [0u8; 32];
        h.copy_from_slice(&rec[8..40]);
        let hash = BlockHash(h);
        if rec[40..44] != check(index, &hash) {
            bad_run += 1;
            continue;
        }
        out.damaged += bad_run;
        bad_run = 0;
        if let Some(slot) = manifest.hashes.get_mut(index as usize) {
            *slot = hash;
        }
        out.good_len = (n + 1) * RECORD;
    }
    if bad_run > MAX_RECORDS_PER_APPEND {
        out.damaged += bad_run;
    } else {
        out.torn = bad_run;
    }
    out
}

fn check(index: u64, hash: &BlockHash) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&hash.0);
    let out = h.finalize();
    let b = out.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

impl LiveDisk {
    /// Loads (or creates) the live state of disk `id` under `dir`, sized to `size` bytes.
    pub fn open(dir: &Path, id: &str, size: u64) -> Result<LiveDisk, DiskError> {
        let ioe = |path: &Path| {
            let path = path.to_path_buf();
            let disk = id.to_string();
            move |source| DiskError::Io { disk, path, source }
        };
        durable::create_dir_all_durable(dir).map_err(ioe(dir))?;
        let mpath = dir.join("live.manifest");
        let mut manifest = match fs::read(&mpath) {
            Ok(bytes) => Manifest::decode(&bytes).map_err(|source| DiskError::Manifest {
                disk: id.to_string(),
                path: mpath.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Manifest::zeroed(size),
            Err(e) => return Err(ioe(&mpath)(e)),
        };
        let jpath = dir.join("journal");
        let bytes = match fs::read(&jpath) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ioe(&jpath)(e)),
        };
        let replayed = replay(&mut manifest, &bytes);
        let good = replayed.good_len;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jpath)
            .map_err(ioe(&jpath))?;
        if good != bytes.len() {
            // Drop a torn tail so that later appends follow the last good record.
            journal.set_len(good as u64).map_err(ioe(&jpath))?;
        }
        let mut d = LiveDisk {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            manifest,
            journal,
            journal_records: (good / RECORD) as u64,
            damaged_records: replayed.damaged,
        };
        if replayed.torn > 0 {
            tracing::warn!(
                disk = id,
                records = replayed.torn,
                "journal {}: dropped {} unacknowledged record(s) torn by a crash",
                jpath.display(),
                replayed.torn
            );
        }
        if replayed.damaged > 0 {
            tracing::error!(
                disk = id,
                records = replayed.damaged,
                "journal {} is damaged: {} record(s) fail their check (between good ones, or \
                 more at the tail than one write holds); \
                 the disk's acknowledged state may lack them, so its agent will verify-scan it",
                jpath.display(),
                replayed.damaged
            );
        }
        // A new disk's all-zero manifest is first written at its first point (it can be
        // gigabytes); until then the journal alone holds its state.
        if replayed.damaged > 0 || (d.manifest.disk_size != size && mpath.exists()) {
            d.manifest.resize(size);
            d.compact()?;
        }
        d.manifest.resize(size);
        Ok(d)
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Io {
            disk: self.id.clone(),
            path,
            source,
        }
    }

    /// Appends index → hash records; they are durable once [`LiveDisk::sync`] returns.
    pub fn record(&mut self, entries: &[(u64, BlockHash)]) -> Result<(), DiskError> {
        let blocks = self.manifest.hashes.len() as u64;
        let mut buf = Vec::with_capacity(entries.len() * RECORD);
        for (index, hash) in entries {
            if *index >= blocks {
                return Err(DiskError::OutOfRange {
                    disk: self.id.clone(),
                    index: *index,
                    blocks,
                });
            }
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&hash.0);
            buf.extend_from_slice(&check(*index, hash));
        }
        let jpath = self.dir.join("journal");
        if let Err(e) = self.journal.write_all(&buf) {
            // All or nothing: a partial record would end every later replay early.
            let _ = self.journal.set_len(self.journal_records * RECORD as u64);
            return Err(self.io(jpath)(e));
        }
        for (index, hash) in entries {
            self.manifest.hashes[*index as usize] = *hash;
        }
        self.journal_records += entries.len() as u64;
        Ok(())
    }

    /// Makes every record appended so far durable (`fdatasync` of the journal).
    pub fn sync(&mut self) -> Result<(), DiskError> {
        let jpath = self.dir.join("journal");
        self.journal.sync_data().map_err(self.io(jpath))
    }

    /// Where the journal and manifest stand now, to undo a batch with [`LiveDisk::rollback`].
    pub fn checkpoint(&self, entries: &[(u64, BlockHash)]) -> Checkpoint {
        Checkpoint {
            records: self.journal_records,
            before: entries
                .iter()
                .filter_map(|(i, _)| self.manifest.hashes.get(*i as usize).map(|h| (*i, *h)))
                .collect(),
        }
    }

    /// Undoes what was recorded since `cp` (a batch that could not be made durable).
    pub fn rollback(&mut self, cp: Checkpoint) {
        let _ = self.journal.set_len(cp.records * RECORD as u64);
        self.journal_records = cp.records;
        for (i, h) in cp.before.into_iter().rev() {
            self.manifest.hashes[i as usize] = h;
        }
    }

    /// Writes the live manifest durably and empties the journal.
    pub fn compact(&mut self) -> Result<(), DiskError> {
        let mpath = self.dir.join("live.manifest");
        durable::write_atomic(&mpath, &self.manifest.encode()).map_err(self.io(mpath.clone()))?;
        let jpath = self.dir.join("journal");
        self.journal.set_len(0).map_err(self.io(jpath.clone()))?;
        self.journal.sync_all().map_err(self.io(jpath))?;
        self.journal_records = 0;
        Ok(())
    }

    pub fn journal_records(&self) -> u64 {
        self.journal_records
    }
}

/// Replaces a disk's state on disk with `base` (none: the disk as it was before its first
/// point) and `records` after it, as the fleet's bucket has them (see `crate::fleet`).
/// Durable when it returns; the disk must not be open.
pub fn replace_local(
    dir: &Path,
    id: &str,
    base: Option<&Manifest>,
    records: &[(u64, BlockHash)],
) -> Result<(), DiskError> {
    let ioe = |path: &Path| {
        let path = path.to_path_buf();
        let disk = id.to_string();
        move |source| DiskError::Io { disk, path, source }
    };
    durable::create_dir_all_durable(dir).map_err(ioe(dir))?;
    let mut journal = Vec::with_capacity(records.len() * RECORD);
    for (index, hash) in records {
        journal.extend_from_slice(&index.to_le_bytes());
        journal.extend_from_slice(&hash.0);
        journal.extend_from_slice(&check(*index, hash));
    }
    // The journal first, empty of anything older: a crash between the two leaves an older
    // base under these records, which the next take replaces again.
    let jpath = dir.join("journal");
    durable::write_atomic(&jpath, &journal).map_err(ioe(&jpath))?;
    let mpath = dir.join("live.manifest");
    match base {
        Some(m) => durable::write_atomic(&mpath, &m.encode()).map_err(ioe(&mpath))?,
        None => match fs::remove_file(&mpath) {
            Ok(()) => durable::sync_dir(dir).map_err(ioe(dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe(&mpath)(e)),
        },
    }
    Ok(())
}

/// Reads a disk's live manifest (manifest + journal) without opening it for writing.
pub fn read_live(dir: &Path) -> Option<Manifest> {
    let mut m = Manifest::decode(&fs::read(dir.join("live.manifest")).ok()?).ok()?;
    if let Ok(bytes) = fs::read(dir.join("journal")) {
        let _ = replay(&mut m, &bytes);
    }
    Some(m)
}

/// Every block a disk's live state may reference: its live manifest's and every good
/// journal record's (a superset: superseded records count too, which only keeps more).
/// `Err` when the state exists but cannot be read: nothing may be swept then.
pub fn live_references(dir: &Path) -> Result<Vec<BlockHash>, String> {
    let mut out = Vec::new();
    let mpath = dir.join("live.manifest");
    match fs::read(&mpath) {
        Ok(bytes) => match Manifest::decode(&bytes) {
            Ok(m) => out.extend(m.hashes.into_iter().filter(|h| !h.is_zero())),
            Err(e) => return Err(format!("{}: {e}", mpath.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", mpath.display())),
    }
    let jpath = dir.join("journal");
    match fs::read(&jpath) {
        Ok(bytes) => {
            for rec in bytes.chunks_exact(RECORD) {
                let mut ib = [0u8; 8];
                ib.copy_from_slice(&rec[..8]);
                let mut h = [0u8; 32];
                h.copy_from_slice(&rec[8..40]);
                let hash = BlockHash(h);
                if rec[40..44] == check(u64::from_le_bytes(ib), &hash) && !hash.is_zero() {
                    out.push(hash);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", jpath.display())),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::BLOCK_SIZE;

    #[test]
    fn journal_replay_and_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK_SIZE as u64;
        {
            let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
            disk.record(&[(1, BlockHash([1; 32])), (3, BlockHash([3; 32]))])
                .unwrap();
            disk.journal.sync_all().unwrap();
            assert!(disk.record(&[(4, BlockHash([4; 32]))]).is_err());
        }
        // A torn record at the tail is dropped.
        let j = d.path().join("journal");
        let mut bytes = fs::read(&j).unwrap();
        bytes.extend_from_slice(&[9u8; 20]);
        fs::write(&j, bytes).unwrap();
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.manifest.hashes[1], BlockHash([1; 32]));
        assert_eq!(disk.manifest.hashes[3], BlockHash([3; 32]));
        assert_eq!(disk.journal_records(), 2);
        disk.record(&[(0, BlockHash([5; 32]))]).unwrap();
        drop(disk);
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.manifest.hashes[0], BlockHash([5; 32]));
        disk.compact().unwrap();
        assert_eq!(disk.journal_records(), 0);
        assert_eq!(read_live(d.path()).unwrap(), disk.manifest);
        // Growing the disk keeps content and adds zero blocks.
        let disk = LiveDisk::open(d.path(), "root", size * 2).unwrap();
        assert_eq!(disk.manifest.hashes.len(), 8);
        assert_eq!(disk.manifest.hashes[3], BlockHash([3; 32]));
    }

    #[test]
    fn damage_mid_journal_is_counted_and_the_records_around_it_apply() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK_SIZE as u64;
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        disk.record(&[(0, BlockHash([1; 32]))]).unwrap();
        disk.record(&[(1, BlockHash([2; 32]))]).unwrap();
        disk.record(&[(2, BlockHash([3; 32]))]).unwrap();
        drop(disk);
        let j = d.path().join("journal");
        let mut bytes = fs::read(&j).unwrap();
        bytes[RECORD + 10] ^= 0xff; // the middle record
        fs::write(&j, &bytes).unwrap();
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.damaged_records, 1);
        assert_eq!(disk.manifest.hashes[0], BlockHash([1; 32]));
        assert_eq!(
            disk.manifest.hashes[1],
            BlockHash::ZERO,
            "the damaged record applied"
        );
        assert_eq!(disk.manifest.hashes[2], BlockHash([3; 32]));
        // Compacted at once: the damage is reported once, not at every open.
        assert_eq!(disk.journal_records(), 0);
        drop(disk);
        assert_eq!(
            LiveDisk::open(d.path(), "root", size)
                .unwrap()
                .damaged_records,
            0
        );
        // A bad record at the tail is a torn write, not damage.
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        disk.record(&[(3, BlockHash([4; 32])), (0, BlockHash([5; 32]))])
            .unwrap();
        drop(disk);
        let mut bytes = fs::read(&j).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        fs::write(&j, &bytes).unwrap();
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.damaged_records, 0);
        assert_eq!(disk.journal_records(), 1);
        assert_eq!(disk.manifest.hashes[3], BlockHash([4; 32]));
        assert_eq!(disk.manifest.hashes[0], BlockHash([1; 32]));
        // A bad tail longer than one append can write is damage, not a torn write.
        drop(disk);
        let mut bytes = fs::read(&j).unwrap();
        let good = bytes.len();
        for k in 0..(MAX_RECORDS_PER_APPEND as usize + 1) {
            bytes.extend_from_slice(&(k as u64 % 4).to_le_bytes());
            bytes.extend_from_slice(&[7u8; 32]);
            bytes.extend_from_slice(&[0u8; 4]); // a check that fails
        }
        fs::write(&j, &bytes).unwrap();
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.damaged_records, MAX_RECORDS_PER_APPEND + 1);
        assert_eq!(good / RECORD, 1);
    }

    #[test]
    fn a_replaced_disk_opens_as_its_base_and_records() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK_SIZE as u64;
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        disk.record(&[(0, BlockHash([9; 32]))]).unwrap();
        disk.compact().unwrap();
        drop(disk);
        let mut base = Manifest::zeroed(size);
        base.hashes[1] = BlockHash([1; 32]);
        replace_local(d.path(), "root", Some(&base), &[(2, BlockHash([2; 32]))]).unwrap();
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(
            disk.manifest.hashes[0],
            BlockHash::ZERO,
            "the old state stayed"
        );
        assert_eq!(disk.manifest.hashes[1], BlockHash([1; 32]));
        assert_eq!(disk.manifest.hashes[2], BlockHash([2; 32]));
        drop(disk);
        replace_local(d.path(), "root", None, &[(3, BlockHash([3; 32]))]).unwrap();
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        let mut want = Manifest::zeroed(size);
        want.hashes[3] = BlockHash([3; 32]);
        assert_eq!(disk.manifest, want);
    }

    #[test]
    fn rollback_undoes_a_batch_in_memory_and_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK_SIZE as u64;
        let mut disk = LiveDisk::open(d.path(), "root", size).unwrap();
        disk.record(&[(0, BlockHash([1; 32]))]).unwrap();
        let batch = [(0, BlockHash([2; 32])), (3, BlockHash([3; 32]))];
        let cp = disk.checkpoint(&batch);
        disk.record(&batch).unwrap();
        assert_eq!(disk.manifest.hashes[3], BlockHash([3; 32]));
        disk.rollback(cp);
        assert_eq!(disk.manifest.hashes[0], BlockHash([1; 32]));
        assert_eq!(disk.manifest.hashes[3], BlockHash::ZERO);
        // Appends after a rollback replay cleanly.
        disk.record(&[(2, BlockHash([4; 32]))]).unwrap();
        drop(disk);
        let disk = LiveDisk::open(d.path(), "root", size).unwrap();
        assert_eq!(disk.journal_records(), 2);
        assert_eq!(disk.manifest.hashes[0], BlockHash([1; 32]));
        assert_eq!(disk.manifest.hashes[2], BlockHash([4; 32]));
        assert_eq!(disk.manifest.hashes[3], BlockHash::ZERO);
    }
}
