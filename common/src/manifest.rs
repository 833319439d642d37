//! Manifest: for one disk at one point, the ordered list of block hashes.
//!
//! Binary format v1 (all integers little-endian), documented in docs/formats.md:
//!
//! ```text
//! magic "LBMANIF1" (8) | version u16 = 1 | reserved u16 = 0 | block_size u32 = 524288
//! disk_size u64 | count u64 | count × 32-byte hash | blake3 of everything before (32)
//! ```
//! `count` must equal `ceil(disk_size / block_size)`. A hash of 32 zero bytes is the zero
//! block. The trailing blake3 makes the file self-checking: a torn or bit-flipped manifest is
//! rejected, never half-trusted.

use crate::block::{block_count, BlockHash, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"LBMANIF1";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, too short for a header and checksum")]
    Truncated(usize),
    #[error("not a Lifeboat manifest (bad magic)")]
    BadMagic,
    #[error("manifest version {0} is not supported (this build reads version 1)")]
    Version(u16),
    #[error("manifest reserved field is {0}, not 0")]
    Reserved(u16),
    #[error("manifest block size {0} is not the 524288-byte block size")]
    BlockSize(u32),
    #[error("manifest claims {count} blocks for a {disk_size}-byte disk")]
    Count { count: u64, disk_size: u64 },
    #[error("manifest length {actual} does not match its {count} blocks")]
    Length { actual: usize, count: u64 },
    #[error("manifest checksum mismatch: the file is corrupt")]
    Checksum,
}

/// The ordered block hashes of one disk at one point.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Manifest {
    pub disk_size: u64,
    pub hashes: Vec<BlockHash>,
}

impl Manifest {
    /// An all-zero disk of `disk_size` bytes.
    pub fn zeroed(disk_size: u64) -> Manifest {
        Manifest {
            disk_size,
            hashes: vec![BlockHash::ZERO; block_count(disk_size) as usize],
        }
    }

    /// Changes the disk size, dropping blocks past the end or adding zero blocks.
    pub fn resize(&mut self, disk_size: u64) {
        self.disk_size = disk_size;
        self.hashes
            .resize(block_count(disk_size) as usize, BlockHash::ZERO);
    }

    /// blake3 over the size and the hashes: equal digests mean equal manifests.
    pub fn digest(&self) -> BlockHash {
        let mut h = blake3::Hasher::new();
        h.update(&self.disk_size.to_le_bytes());
        for b in &self.hashes {
            h.update(&b.0);
        }
        BlockHash(*h.finalize().as_bytes())
    }

    /// Number of non-zero blocks.
    pub fn data_blocks(&self) -> usize {
        self.hashes.iter().filter(|h| !h.is_zero()).count()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hashes.len() * 32 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(&h.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Manifest, ManifestError> {
        if buf.len() < HEADER_LEN + 32 {
            return Err(ManifestError::Truncated(buf.len()));
        }
        let (body, sum) = buf.split_at(buf.len() - 32);
        // The checksum first: a corrupt file is `Checksum`, whatever byte the damage hit, so
        // `Version` means a whole manifest written by another build (its readers must keep
        // what it references, where a corrupt one is simply damaged).
        if blake3::hash(body).as_bytes() != sum {
            return Err(ManifestError::Checksum);
        }
        if &body[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let u16_at = |o: usize| u16::from_le_bytes([body[o], body[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u16_at(8);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        if u16_at(10) != 0 {
            return Err(ManifestError::Reserved(u16_at(10)));
        }
        let block_size = u32_at(12);
        if block_size as usize != BLOCK_SIZE {
            return Err(ManifestError::BlockSize(block_size));
        }
        let disk_size = u64_at(16);
        let count = u64_at(24);
        if count != block_count(disk_size) {
            return Err(ManifestError::Count { count, disk_size });
        }
        let payload = &body[HEADER_LEN..];
        if payload.len() as u64 != count.saturating_mul(32) {
            return Err(ManifestError::Length {
                actual: buf.len(),
                count,
            });
        }
        let hashes = payload
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                BlockHash(h)
            })
            .collect();
        Ok(Manifest { disk_size, hashes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (0u64..40 * BLOCK_SIZE as u64).prop_flat_map(|size| {
            let n = block_count(size) as usize;
            proptest::collection::vec(any::<[u8; 32]>(), n).prop_map(move |hs| Manifest {
                disk_size: size,
                hashes: hs.into_iter().map(BlockHash).collect(),
            })
        })
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_manifest()) {
            let enc = m.encode();
            prop_assert_eq!(Manifest::decode(&enc).unwrap(), m);
        }

        #[test]
        fn any_bit_flip_is_caught(m in arb_manifest(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut enc = m.encode();
            let i = pos.index(enc.len());
            enc[i] ^= 1 << bit;
            prop_assert!(Manifest::decode(&enc).is_err());
        }
    }

    #[test]
    fn truncation_and_resize() {
        let mut m = Manifest::zeroed(3 * BLOCK_SIZE as u64);
        m.hashes[1] = BlockHash([7; 32]);
        let enc = m.encode();
        // Any damage is a checksum failure, whatever it hit (a cut, the version bytes) ...
        assert!(matches!(
            Manifest::decode(&enc[..enc.len() - 1]),
            Err(ManifestError::Checksum)
        ));
        let mut bad = enc.clone();
        bad[8] ^= 1;
        assert!(matches!(
            Manifest::decode(&bad),
            Err(ManifestError::Checksum)
        ));
        // ... while a whole manifest of another version says so.
        let mut newer = enc[..enc.len() - 32].to_vec();
        newer[8] = 2;
        let sum = *blake3::hash(&newer).as_bytes();
        newer.extend_from_slice(&sum);
        assert!(matches!(
            Manifest::decode(&newer),
            Err(ManifestError::Version(2))
        ));
        assert!(Manifest::decode(&enc[..10]).is_err());
        m.resize(BLOCK_SIZE as u64 + 1);
        assert_eq!(m.hashes.len(), 2);
        assert_eq!(m.data_blocks(), 1);
        assert_ne!(m.digest(), Manifest::zeroed(BLOCK_SIZE as u64 + 1).digest());
    }
}
