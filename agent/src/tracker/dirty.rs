//! A disk's dirty marks: one bit per 512 KiB block.

use lifeboat_common::BLOCK_SIZE;

const SECTOR: u64 = 512;
const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE as u64 / SECTOR;

#[derive(Clone, Debug, Default)]
pub struct DirtySet {
    words: Vec<u64>,
    marked: u64,
}

impl DirtySet {
    pub fn mark(&mut self, block: u64) {
        let (w, bit) = ((block / 64) as usize, block % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & (1 << bit) == 0 {
            self.words[w] |= 1 << bit;
            self.marked += 1;
        }
    }

    /// Marks every block that sectors `[first, first + count)` (512-byte sectors, relative to
    /// the disk) touch.
    pub fn mark_sectors(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let last = first.saturating_add(count - 1);
        for b in first / SECTORS_PER_BLOCK..=last / SECTORS_PER_BLOCK {
            self.mark(b);
        }
    }

    pub fn len(&self) -> u64 {
        self.marked
    }

    pub fn is_empty(&self) -> bool {
        self.marked == 0
    }

    /// The marked blocks below `blocks`, ascending, leaving the set empty.
    pub fn take(&mut self, blocks: u64) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.marked as usize);
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = w as u64 * 64 + bits.trailing_zeros() as u64;
                if b < blocks {
                    out.push(b);
                }
                bits &= bits - 1;
            }
        }
        self.words.clear();
        self.marked = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_map_to_blocks() {
        let mut d = DirtySet::default();
        d.mark_sectors(0, 1);
        d.mark_sectors(1023, 2); // straddles blocks 0 and 1
        d.mark_sectors(64 * 1024, 1024); // exactly block 64
        d.mark_sectors(5000, 0); // nothing
        assert_eq!(d.len(), 3);
        assert_eq!(d.take(1 << 20), vec![0, 1, 64]);
        assert!(d.is_empty());
        d.mark(7);
        d.mark(7);
        d.mark(900);
        assert_eq!(d.len(), 2);
        assert_eq!(d.take(100), vec![7], "blocks past the end are dropped");
    }
}
