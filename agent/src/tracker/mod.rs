//! Change tracking: which blocks of a disk may have changed since the last acknowledged
//! manifest. Every tracker only proposes candidates; the pipeline reads and hashes each
//! candidate and sends it only if its hash differs from the acknowledged one, so a tracker
//! that proposes too much costs reads, never correctness.
//!
//! This build has the hash-scan tracker (every block is a candidate on every cycle). The
//! eBPF tracker on `block:block_rq_complete` comes later behind the same trait.

pub mod hashscan;

/// Proposes the block indices to examine in this cycle.
pub trait Tracker: Send {
    fn name(&self) -> &'static str;
    /// Candidates of a disk of `blocks` blocks, ascending.
    fn candidates(&mut self, blocks: u64) -> Vec<u64>;
}
