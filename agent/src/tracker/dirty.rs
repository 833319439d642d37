//! A disk's dirty marks: one bit per 512 KiB block, and for blocks only partly written, which
//! of their 4 KiB pages (for sub-block deltas on the wire).

use lifeboat_common::protocol::{PAGES_PER_BLOCK, PAGE_SIZE};
use lifeboat_common::BLOCK_SIZE;
use std::collections::HashMap;

const SECTOR: u64 = 512;
const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE as u64 / SECTOR;
const SECTORS_PER_PAGE: u64 = PAGE_SIZE as u64 / SECTOR;
/// Every page of a block.
pub const ALL_PAGES: u128 = u128::MAX;

const _: () = assert!(PAGES_PER_BLOCK == 128, "a page mask is a u128");

/// Most separate page reads for one block: past this, the block is read whole (one large
/// read costs less than many small ones on most disks) and its pages cut out.
pub const MAX_PAGE_READS: u32 = 8;
/// What one more read costs, counted as bytes: a rough figure between SSDs (where 4 KiB
/// reads are nearly free) and IOPS-limited cloud volumes (where they are not). The freeze's
/// deadline bounds a final delta that reads slower than this suggests.
pub const READ_COST: u64 = 16 * 1024;

/// The cost of reading a block whose written pages are `mask`, as bytes: its pages plus
/// [`READ_COST`] per run when they are read alone, else the whole block.
pub fn read_cost(mask: u128) -> u64 {
    let pages = mask.count_ones();
    let runs = (mask & !(mask << 1)).count_ones();
    if pages <= PAGES_PER_BLOCK / 2 && runs <= MAX_PAGE_READS {
        pages as u64 * PAGE_SIZE as u64 + runs as u64 * READ_COST
    } else {
        BLOCK_SIZE as u64
    }
}

#[derive(Clone, Debug, Default)]
pub struct DirtySet {
    words: Vec<u64>,
    marked: u64,
    /// For marked blocks known to be only partly written: the pages written. A marked block
    /// absent here is wholly dirty (or of unknown extent).
    pages: HashMap<u64, u128>,
}

/// Taken dirty blocks, ascending, with the page masks of the partly written ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub blocks: Vec<u64>,
    pub pages: HashMap<u64, u128>,
}

impl DirtySet {
    /// Marks a whole block (its extent unknown).
    pub fn mark(&mut self, block: u64) {
        self.mark_pages(block, ALL_PAGES);
    }

    fn set_bit(&mut self, block: u64) -> bool {
        let (w, bit) = ((block / 64) as usize, block % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & (1 << bit) == 0;
        if new {
            self.words[w] |= 1 << bit;
            self.marked += 1;
        }
        new
    }

    /// Marks `mask`'s pages of a block.
    pub fn mark_pages(&mut self, block: u64, mask: u128) {
        let new = self.set_bit(block);
        if mask == ALL_PAGES {
            self.pages.remove(&block);
        } else if new {
            self.pages.insert(block, mask);
        } else if let Some(m) = self.pages.get_mut(&block) {
            *m |= mask;
            if *m == ALL_PAGES {
                self.pages.remove(&block);
            }
        }
        // Marked before and absent from `pages`: already wholly dirty.
    }

    /// Marks what sectors `[first, first + count)` (512 bytes, relative to the disk) touch.
    pub fn mark_sectors(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let last = first.saturating_add(count - 1);
        for b in first / SECTORS_PER_BLOCK..=last / SECTORS_PER_BLOCK {
            let base = b * SECTORS_PER_BLOCK;
            let lo = (first.max(base) - base) / SECTORS_PER_PAGE;
            let hi = (last.min(base + SECTORS_PER_BLOCK - 1) - base) / SECTORS_PER_PAGE;
            let width = hi - lo + 1;
            let mask = if width >= 128 {
                ALL_PAGES
            } else {
                ((1u128 << width) - 1) << lo
            };
            self.mark_pages(b, mask);
        }
    }

    pub fn len(&self) -> u64 {
        self.marked
    }

    pub fn is_empty(&self) -> bool {
        self.marked == 0
    }

    /// What reading the marked blocks costs, as bytes (see [`read_cost`]).
    pub fn bytes(&self) -> u64 {
        let partial: u64 = self.pages.values().map(|m| read_cost(*m)).sum();
        (self.marked - self.pages.len() as u64) * BLOCK_SIZE as u64 + partial
    }

    /// The marked blocks below `blocks`, leaving the set empty.
    pub fn take(&mut self, blocks: u64) -> Taken {
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
        let mut pages = std::mem::take(&mut self.pages);
        pages.retain(|b, _| *b < blocks);
        Taken { blocks: out, pages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_costs_pages_and_reads() {
        assert_eq!(read_cost(1), 4096 + READ_COST);
        assert_eq!(READ_COST, 16 * 1024);
        assert_eq!(read_cost(0b1111), 4 * 4096 + READ_COST);
        assert_eq!(read_cost(0b1010_1010), 4 * 4096 + 4 * READ_COST);
        // Nine separate pages: one whole read is cheaper.
        assert_eq!(read_cost(0x2_AAAA), BLOCK_SIZE as u64);
        assert_eq!(read_cost(ALL_PAGES), BLOCK_SIZE as u64);
    }

    #[test]
    fn sectors_map_to_blocks_and_pages() {
        let mut d = DirtySet::default();
        d.mark_sectors(0, 1); // page 0 of block 0
        d.mark_sectors(1023, 2); // page 127 of block 0, page 0 of block 1
        d.mark_sectors(64 * 1024, 1024); // all of block 64
        d.mark_sectors(5000, 0); // nothing
        d.mark_sectors(3 * 1024 + 16, 16); // pages 2 and 3 of block 3
        assert_eq!(d.len(), 4);
        let t = d.take(1 << 20);
        assert_eq!(t.blocks, vec![0, 1, 3, 64]);
        assert_eq!(t.pages[&0], 1 | 1 << 127);
        assert_eq!(t.pages[&1], 1);
        assert_eq!(t.pages[&3], 0b1100);
        assert!(
            !t.pages.contains_key(&64),
            "a wholly written block has no mask"
        );
        assert!(d.is_empty());
        d.mark_sectors(8, 8);
        d.mark(7);
        d.mark(900);
        d.mark_sectors(7 * 1024, 8); // a page of a block already wholly dirty
        d.mark(0); // a partly written block becomes whole
        assert_eq!(d.len(), 3);
        let t = d.take(100);
        assert_eq!(t.blocks, vec![0, 7], "blocks past the end are dropped");
        assert!(t.pages.is_empty());
    }
}
