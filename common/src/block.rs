//! Block geometry and block naming.
//!
//! A disk is cut into blocks of [`BLOCK_SIZE`] bytes (the EBS direct-API block size); the last
//! block is zero-padded. A block is named by the blake3 hash of its full 512 KiB content. The
//! all-zero block is never hashed, sent or stored: it is named by [`BlockHash::ZERO`], a
//! sentinel of 32 zero bytes (no blake3 output is known to be all zeros).

use std::fmt;

/// 512 KiB: the unit of tracking, hashing, dedupe and snapshot writes.
pub const BLOCK_SIZE: usize = 512 * 1024;
/// [`BLOCK_SIZE`] as u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

/// The blake3 name of a block's content, or [`BlockHash::ZERO`] for an all-zero block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// The sentinel for an all-zero block.
    pub const ZERO: BlockHash = BlockHash([0u8; 32]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<BlockHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(BlockHash(out))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Number of blocks of a disk of `size` bytes (the last one possibly partial).
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE_U64)
}

/// Number of bytes of block `index` that lie inside a disk of `size` bytes.
pub fn block_len(index: u64, size: u64) -> usize {
    let start = index.saturating_mul(BLOCK_SIZE_U64);
    // The result is at most BLOCK_SIZE, so the cast cannot truncate.
    size.saturating_sub(start).min(BLOCK_SIZE_U64) as usize
}

/// True when every byte is zero. Word-wise, so it runs near memory bandwidth.
pub fn is_zero(data: &[u8]) -> bool {
    let lines = data.chunks_exact(64);
    let rest = lines.remainder();
    for line in lines {
        let mut acc = 0u64;
        for w in line.chunks_exact(8) {
            // chunks_exact(8) yields 8-byte slices: the conversion cannot fail.
            acc |= u64::from_ne_bytes(w.try_into().unwrap_or_default());
        }
        if acc != 0 {
            return false;
        }
    }
    rest.iter().all(|&b| b == 0)
}

/// Names a block: [`BlockHash::ZERO`] when all zero, else the blake3 of the content padded
/// with zeros to [`BLOCK_SIZE`] (so a short last block and its padded form get one name).
pub fn hash_block(data: &[u8]) -> BlockHash {
    if is_zero(data) {
        return BlockHash::ZERO;
    }
    let mut h = blake3::Hasher::new();
    h.update(data);
    if data.len() < BLOCK_SIZE {
        static PAD: [u8; 4096] = [0u8; 4096];
        let mut left = BLOCK_SIZE - data.len();
        while left > 0 {
            let n = left.min(PAD.len());
            h.update(&PAD[..n]);
            left -= n;
        }
    }
    BlockHash(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(block_count(0), 0);
        assert_eq!(block_count(1), 1);
        assert_eq!(block_count(BLOCK_SIZE_U64), 1);
        assert_eq!(block_count(BLOCK_SIZE_U64 + 1), 2);
        assert_eq!(block_len(0, 100), 100);
        assert_eq!(block_len(1, BLOCK_SIZE_U64 + 7), 7);
        assert_eq!(block_len(2, BLOCK_SIZE_U64 + 7), 0);
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&b));
        assert_eq!(hash_block(&b), BlockHash::ZERO);
        b[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&b));
        b[BLOCK_SIZE - 1] = 0;
        b[3] = 9;
        assert!(!is_zero(&b));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn short_block_hashes_as_padded() {
        let mut full = vec![0u8; BLOCK_SIZE];
        full[..5].copy_from_slice(b"hello");
        assert_eq!(hash_block(b"hello"), hash_block(&full));
        assert_ne!(hash_block(b"hello"), BlockHash::ZERO);
    }

    #[test]
    fn hex_round_trip() {
        let h = hash_block(b"x");
        assert_eq!(BlockHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(BlockHash::from_hex("zz"), None);
    }
}
