//! Journal segments: the records of one acknowledged batch of one server, as one object.
//!
//! Format (little-endian): `magic "LBJSEG01" | disks u32 | per disk: id length u8 | id |
//! records u32 | records × (index u64 | hash 32) | blake3 of all preceding bytes (32)`.
//! An object is written whole or not at all, so there are no torn tails; the trailing blake3
//! catches anything else (a truncated download, a foreign object under the key).

use lifeboat_common::BlockHash;

const MAGIC: &[u8; 8] = b"LBJSEG01";

/// The records of one batch: per disk id, index → content, in the order they apply.
pub type Records = Vec<(String, Vec<(u64, BlockHash)>)>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("not a journal segment (bad magic)")]
    Magic,
    #[error("journal segment is truncated")]
    Truncated,
    #[error("journal segment fails its checksum")]
    Checksum,
    #[error("journal segment names a disk id that is not valid UTF-8")]
    DiskId,
}

pub fn encode(records: &Records) -> Vec<u8> {
    let n: usize = records.iter().map(|(_, r)| r.len()).sum();
    let mut out = Vec::with_capacity(8 + 4 + records.len() * 70 + n * 40 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for (id, recs) in records {
        // Disk ids are 1-64 characters (config::valid_name): the length fits a byte.
        out.push(id.len().min(255) as u8);
        out.extend_from_slice(&id.as_bytes()[..id.len().min(255)]);
        out.extend_from_slice(&(recs.len() as u32).to_le_bytes());
        for (index, hash) in recs {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&hash.0);
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SegmentError> {
        if self.0.len() < n {
            return Err(SegmentError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, SegmentError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Records, SegmentError> {
    if bytes.len() < 8 + 4 + 32 {
        return Err(if bytes.starts_with(MAGIC) || bytes.len() < 8 {
            SegmentError::Truncated
        } else {
            SegmentError::Magic
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(SegmentError::Magic);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(SegmentError::Checksum);
    }
    let mut r = Reader(&body[8..]);
    let disks = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..disks {
        let len = r.take(1)?[0] as usize;
        let id = std::str::from_utf8(r.take(len)?)
            .map_err(|_| SegmentError::DiskId)?
            .to_string();
        let n = r.u32()? as usize;
        // Never trust a count for an allocation: each record is 40 bytes of what is left.
        if n > r.0.len() / 40 {
            return Err(SegmentError::Truncated);
        }
        let mut recs = Vec::with_capacity(n);
        for _ in 0..n {
            let rec = r.take(40)?;
            let mut ib = [0u8; 8];
            ib.copy_from_slice(&rec[..8]);
            let mut h = [0u8; 32];
            h.copy_from_slice(&rec[8..]);
            recs.push((u64::from_le_bytes(ib), BlockHash(h)));
        }
        out.push((id, recs));
    }
    if !r.0.is_empty() {
        return Err(SegmentError::Truncated);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn segments_round_trip_and_any_damage_is_refused(
            disks in proptest::collection::vec(
                ("[a-z0-9_.-]{1,64}", proptest::collection::vec((any::<u64>(), any::<[u8; 32]>()), 0..20)),
                0..4,
            ),
            flip in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let records: Records = disks
                .into_iter()
                .map(|(id, r)| (id, r.into_iter().map(|(i, h)| (i, BlockHash(h))).collect()))
                .collect();
            let bytes = encode(&records);
            prop_assert_eq!(decode(&bytes).unwrap(), records);
            let mut bad = bytes.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x40;
            prop_assert!(decode(&bad).is_err());
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(decode(short).is_err());
        }
    }
}
