//! Staging store: every block the receiver has acknowledged, content-addressed by blake3.
//!
//! One contract, several backends ([`BlockStore`]): a directory ([`dir::DirStore`], the
//! default) and an S3 bucket (`s3::S3Store`). The contract, which every acknowledgement relies on:
//!
//! - [`BlockStore::insert`] returns only when every block it was given is durable: after a
//!   crash (or power cut) at any instant after it returned, the block reads back whole.
//! - Nothing else an ack depends on hides in the store's durability: the disks' journals are
//!   made durable by their own sync ([`crate::disk::LiveDisk::sync`]), not as a side effect.
//! - A block is verified (decoded, blake3 compared to its name) before it is inserted
//!   ([`verify`]), and [`BlockStore::read`] verifies it again: data read back is never
//!   trusted.
//! - Removal (GC) and quarantine need not be durable: a block that comes back after a crash
//!   is garbage again at the next sweep, or corrupt again at the next scrub.

pub mod dir;
#[cfg(feature = "aws")]
pub mod s3;

pub use dir::DirStore;

use lifeboat_common::block::hash_block;
use lifeboat_common::codec::{self, Codec, CodecError};
use lifeboat_common::BlockHash;
use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

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
    /// A request to the bucket failed (`retryable`: it kept failing in a way that may pass).
    #[error("staging store in S3: {message}")]
    Remote { message: String, retryable: bool },
}

impl StoreError {
    /// True when trying again later can help (I/O), false for bad content.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. }
                | StoreError::Remote {
                    retryable: true,
                    ..
                }
        )
    }
}

fn io_err(path: &std::path::Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
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

/// The staging store `config` names: the bucket of `[s3]`, else `<state_dir>/store`.
pub fn open(
    state_dir: &std::path::Path,
    config: &lifeboat_common::config::ReceiverConfig,
) -> Result<std::sync::Arc<dyn BlockStore>, StoreError> {
    match &config.s3 {
        #[cfg(feature = "aws")]
        Some(c) => {
            let local = state_dir.join("store").join("blocks");
            let held = std::fs::read_dir(&local)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if held {
                return Err(StoreError::Remote {
                    message: format!(
                        "[s3] is set but {} holds blocks that this receiver's points name: \
                         moving a directory store into S3 is not supported; remove [s3], or \
                         start from a new state directory",
                        local.display()
                    ),
                    retryable: false,
                });
            }
            Ok(open_s3(state_dir, config, c)?)
        }
        #[cfg(not(feature = "aws"))]
        Some(_) => Err(StoreError::Remote {
            message: "[s3] is set but this build has no AWS support (feature `aws`)".into(),
            retryable: false,
        }),
        None => Ok(std::sync::Arc::new(DirStore::open(
            &state_dir.join("store"),
        )?)),
    }
}

/// The S3 store of `[s3]` (`c`): the prefix claimed for this receiver, or for the fleet with
/// `[fleet]`.
#[cfg(feature = "aws")]
pub fn open_s3(
    state_dir: &std::path::Path,
    config: &lifeboat_common::config::ReceiverConfig,
    c: &lifeboat_common::config::S3Config,
) -> Result<std::sync::Arc<s3::S3Store>, StoreError> {
    let owner = if config.fleet.is_some() {
        s3::FLEET.to_string()
    } else {
        crate::snapshots::ebs::install_id(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.join("install-id"),
            source,
        })?
    };
    Ok(std::sync::Arc::new(s3::S3Store::open(
        c, &owner, state_dir,
    )?))
}

/// [`open`] with the configuration in `<state_dir>/receiver.toml` (for the commands).
pub fn open_configured(
    state_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn BlockStore>> {
    let path = state_dir.join("receiver.toml");
    let config = lifeboat_common::config::ReceiverConfig::load(&path)?;
    Ok(open(state_dir, &config)?)
}

/// Decodes a stored block (`codec u8 | encoded bytes`, as every backend keeps it) and
/// checks it against its name; returns its plain bytes, `BLOCK_SIZE` long.
pub fn decode_stored(hash: &BlockHash, raw: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { hash: *hash, why };
    let (&c, body) = raw
        .split_first()
        .ok_or_else(|| corrupt("empty object".into()))?;
    let codec = Codec::from_u8(c).ok_or_else(|| corrupt(format!("unknown codec byte {c}")))?;
    let mut plain = codec::decode(codec, body).map_err(|e| corrupt(e.to_string()))?;
    let actual = hash_block(&plain);
    if actual != *hash {
        return Err(corrupt(format!("content hashes to {actual}")));
    }
    plain.resize(lifeboat_common::BLOCK_SIZE, 0);
    Ok(plain)
}

/// What a remote store has sent so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestCounts {
    /// Every attempt of every request.
    pub requests: u64,
    /// Attempts that were tried again.
    pub retries: u64,
    /// Attempts refused as throttled.
    pub throttles: u64,
}

/// A held fence (see [`BlockStore::quarantine_fence`]); released when dropped.
pub struct Fence(#[allow(dead_code)] Box<dyn Send>);

impl Fence {
    pub fn new(guard: impl Send + 'static) -> Fence {
        Fence(Box::new(guard))
    }
}

/// What every staging-store backend provides (see the module docs for the contract).
pub trait BlockStore: Send + Sync {
    /// Durably inserts verified blocks; returns how many were new. Returns only when every
    /// block of `blocks` is durable.
    fn insert(&self, blocks: &[VerifiedBlock]) -> Result<usize, StoreError>;
    /// Why the store cannot take blocks any more (a failed flush poisoned it), if so.
    fn unhealthy(&self) -> Option<String> {
        None
    }

    /// Requests sent to a remote store (S3), for metrics and benchmarks; `None` for a local
    /// one.
    fn requests(&self) -> Option<RequestCounts> {
        None
    }

    /// Whether the store holds `hash` (the zero block always counts as held): the dedupe
    /// answer. In a fleet, no for a block a sweep may delete (the agent then sends it).
    fn has(&self, hash: &BlockHash) -> Result<bool, StoreError>;

    /// Whether the store holds `hash` now, for a block already named (a point's check of
    /// its blocks, a reconnecting agent's disk check): as `has`, but a fleet sweep's
    /// candidate is asked of the store itself.
    fn holds(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        self.has(hash)
    }

    /// Reads, decodes and verifies a block; returns its plain bytes (`BLOCK_SIZE` long).
    fn read(&self, hash: &BlockHash) -> Result<Vec<u8>, StoreError>;

    /// Every block with the time it was stored.
    fn list(&self) -> Result<Vec<(BlockHash, SystemTime)>, StoreError>;

    /// Removes a block. Only the garbage collector calls this.
    fn remove(&self, hash: &BlockHash) -> Result<(), StoreError>;

    /// Removes many blocks (the garbage collector's sweep); a backend may batch them.
    fn remove_many(&self, hashes: &[BlockHash]) -> Result<(), StoreError> {
        hashes.iter().try_for_each(|h| self.remove(h))
    }

    /// Moves a corrupt block aside (kept for inspection, never read again) and changes the
    /// [`BlockStore::quarantine_mark`]; returns where it went, for people.
    fn quarantine(&self, hash: &BlockHash) -> Result<String, StoreError>;

    /// Held shared by a session from reading the [`BlockStore::quarantine_mark`] until its
    /// point is written; [`BlockStore::quarantine`] takes it exclusively around the move and
    /// the new mark. So no point is written between a quarantine and the session noticing.
    fn quarantine_fence(&self) -> Result<Fence, StoreError>;

    /// Every block ever quarantined (it may have been stored again since).
    fn quarantined(&self) -> Result<std::collections::HashSet<BlockHash>, StoreError>;

    /// Changes after every quarantine, in any process: a session that sees it change
    /// re-checks its disks for missing blocks before its next point.
    fn quarantine_mark(&self) -> Option<Vec<u8>>;
}
