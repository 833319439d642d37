//! Change tracking: which blocks of a disk may have changed since the last acknowledged
//! manifest. A tracker only proposes candidates; the pipeline reads and hashes each one and
//! sends it only if its hash differs from the acknowledged one, so a tracker that proposes
//! too much costs reads, never correctness. Proposing too little loses data: that is what
//! the rules below are for.
//!
//! Two trackers:
//! - [`ebpf`]: a BPF program on the block layer's request completion marks the blocks that
//!   writes, discards and write-zeroes touch. A cycle reads only those.
//! - [`hashscan`]: every block is a candidate on every cycle (any kernel, any file).
//!
//! # Lifecycle and invariant
//! A cycle [`Tracker::take`]s the dirty set, which clears the marks *before* any of those
//! blocks is read: a write that completes during or after the read marks its block again, so
//! nothing that completed after a point's read of a block can be missing from the next one.
//! A cycle that fails [`Tracker::give_back`]s what it took (the blocks may not have been
//! acknowledged). When a tracker cannot vouch for its set (lost events, a fresh start, a
//! detached program), `take` answers [`Take::All`] with the reason: the cycle becomes a verify
//! scan (every block hashed, only differences sent) and the disk's state is `rescan`.

pub mod dirty;
pub mod ebpf;
pub mod hashscan;

pub use dirty::{DirtySet, Taken};

/// What a cycle must examine.
#[derive(Debug)]
pub enum Take {
    /// Every block (a scan), and why.
    All { reason: String },
    /// These blocks, ascending (with the pages written, where known).
    Blocks(Taken),
}

impl Take {
    /// The pages written, for the blocks only partly written.
    pub fn pages(&self) -> std::collections::HashMap<u64, u128> {
        match self {
            Take::All { .. } => Default::default(),
            Take::Blocks(b) => b.pages.clone(),
        }
    }

    pub fn candidates(&self, blocks: u64) -> Vec<u64> {
        match self {
            Take::All { .. } => (0..blocks).collect(),
            Take::Blocks(b) => b.blocks.clone(),
        }
    }

    pub fn len(&self, blocks: u64) -> u64 {
        match self {
            Take::All { .. } => blocks,
            Take::Blocks(b) => b.blocks.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Take::Blocks(b) if b.blocks.is_empty())
    }
}

/// One disk's change tracker.
pub trait Tracker: Send {
    fn name(&self) -> &'static str;
    /// Takes the dirty set of a disk of `blocks` blocks, clearing its marks.
    fn take(&mut self, blocks: u64) -> Take;
    /// Puts back what a failed cycle took (every pass of it since the last point).
    fn give_back(&mut self, taken: Take);
    /// Marks these blocks to be examined again: the receiver's manifest was adopted and
    /// differs from the one this tracker's marks are relative to at exactly these blocks.
    fn mark(&mut self, blocks: &[u64]);
    /// The point is committed: what was taken for it is acknowledged for good.
    fn settle(&mut self) {}
    /// The disk at `path` changed size (or was repartitioned): find its range again and
    /// verify-scan it.
    fn resized(&mut self, _path: &std::path::Path) {}
    /// Blocks marked now (without taking them); `None` when the tracker cannot tell (a scan).
    fn pending(&self) -> Option<u64>;
    /// What reading the marked blocks costs, in bytes (the pages of partly written blocks,
    /// the rest whole); `None` when the tracker cannot tell.
    fn pending_bytes(&self) -> Option<u64> {
        self.pending()
            .map(|b| b * lifeboat_common::BLOCK_SIZE as u64)
    }
    /// Whether this tracker sees every write, so a freeze can make a point crash-consistent.
    fn sees_writes(&self) -> bool;
    /// Why this tracker was chosen (for a scan: why not eBPF).
    fn note(&self) -> String {
        String::new()
    }
}
