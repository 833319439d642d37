//! Block codec: zstd, or raw when compression does not pay.
//!
//! Used on the wire (agent → receiver) and at rest in the staging store, so a block is
//! compressed once, by the agent, and stored as received after verification.

use crate::block::BLOCK_SIZE;

/// How a block's bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zstd compression failed: {0}")]
    Compress(std::io::Error),
    #[error("zstd data is corrupt: {0}")]
    Corrupt(std::io::Error),
    #[error("decoded block is {0} bytes, more than the {BLOCK_SIZE}-byte block size")]
    TooLarge(usize),
}

/// Compresses `data` at `level`; returns raw bytes when zstd would not save at least 1/32.
pub fn encode(data: &[u8], level: i32) -> Result<(Codec, Vec<u8>), CodecError> {
    let compressed = compress(data, level).map_err(CodecError::Compress)?;
    if compressed.len() + data.len() / 32 < data.len() {
        Ok((Codec::Zstd, compressed))
    } else {
        Ok((Codec::Raw, data.to_vec()))
    }
}

/// As [`encode`], but first tries three 16 KiB samples (start, middle, end): when none of
/// them compresses, the block is kept raw without compressing all of it (for blocks made from
/// random or encrypted data, the whole attempt costs about ten times the samples').
pub fn encode_sampled(data: &[u8], level: i32) -> Result<(Codec, Vec<u8>), CodecError> {
    const SAMPLE: usize = 16 * 1024;
    if data.len() > 8 * SAMPLE {
        // Start, middle and end: a block random in one part and zeros elsewhere compresses.
        let last = data.len() - SAMPLE;
        let incompressible = [0, last / 2, last].into_iter().all(|at| {
            compress(&data[at..at + SAMPLE], level).is_ok_and(|c| c.len() + SAMPLE / 32 >= SAMPLE)
        });
        if incompressible {
            return Ok((Codec::Raw, data.to_vec()));
        }
    }
    encode(data, level)
}

/// Decodes a block, refusing anything that would decode past [`BLOCK_SIZE`].
pub fn decode(codec: Codec, data: &[u8]) -> Result<Vec<u8>, CodecError> {
    match codec {
        Codec::Raw if data.len() > BLOCK_SIZE => Err(CodecError::TooLarge(data.len())),
        Codec::Raw => Ok(data.to_vec()),
        Codec::Zstd => decompress(data).map_err(CodecError::Corrupt),
    }
}

thread_local! {
    // One zstd context per thread, reused: making one costs about as much as compressing a
    // small block (it showed as 2-3 % of the receiver's CPU when each block made its own).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let d = match d.as_mut() {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(data, BLOCK_SIZE)
    })
}

fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match c.as_mut() {
            Some(c) => {
                c.set_compression_level(level)?;
                c
            }
            None => c.insert(zstd::bulk::Compressor::new(level)?),
        };
        c.compress(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of xorshift output: does not compress.
    fn noise() -> Vec<u8> {
        let mut x = 0x9E3779B97F4A7C15u64;
        (0..BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_sample_spares_compressing_noise() {
        let noise = noise();
        assert_eq!(encode_sampled(&noise, 1).unwrap().0, Codec::Raw);
        let text = b"lifeboat ".repeat(BLOCK_SIZE / 9);
        let (c, enc) = encode_sampled(&text, 1).unwrap();
        assert_eq!(c, Codec::Zstd);
        assert_eq!(decode(c, &enc).unwrap(), text);
    }

    #[test]
    fn compressible_and_incompressible() {
        let text = b"lifeboat ".repeat(BLOCK_SIZE / 9);
        let (c, enc) = encode(&text, 1).unwrap();
        assert_eq!(c, Codec::Zstd);
        assert!(enc.len() < text.len() / 10);
        assert_eq!(decode(c, &enc).unwrap(), text);

        let noise = noise();
        let (c, enc) = encode(&noise, 1).unwrap();
        assert_eq!(c, Codec::Raw);
        assert_eq!(decode(c, &enc).unwrap(), noise);
    }

    #[test]
    fn refuses_corrupt_and_oversized() {
        assert!(matches!(
            decode(Codec::Zstd, b"not zstd"),
            Err(CodecError::Corrupt(_))
        ));
        let big = vec![0u8; BLOCK_SIZE + 1];
        assert!(matches!(
            decode(Codec::Raw, &big),
            Err(CodecError::TooLarge(_))
        ));
        let bomb = zstd::bulk::compress(&vec![7u8; BLOCK_SIZE * 2], 1).unwrap();
        assert!(decode(Codec::Zstd, &bomb).is_err());
    }

    /// The thread's reused contexts: a refused frame, half a frame, or a change of level
    /// leaves nothing behind that changes the next block's result.
    #[test]
    fn reused_contexts_start_clean() {
        let text = b"lifeboat ".repeat(BLOCK_SIZE / 9);
        let (_, good) = encode(&text, 1).unwrap();
        for bad in [&b"not zstd"[..], &good[..good.len() / 2]] {
            assert!(decode(Codec::Zstd, bad).is_err());
            assert_eq!(decode(Codec::Zstd, &good).unwrap(), text);
        }
        let (_, at_19) = encode(&text, 19).unwrap();
        let (_, at_1) = encode(&text, 1).unwrap();
        assert_eq!(at_1, good, "level 1 again after level 19");
        assert_ne!(at_19, good);
        assert_eq!(decode(Codec::Zstd, &at_19).unwrap(), text);
    }
}
