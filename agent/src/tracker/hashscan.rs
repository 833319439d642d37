//! Hash-scan tracker: every block is a candidate; the pipeline's hash compare against the
//! last acknowledged manifest finds what changed. Works on any kernel and any device, at the
//! cost of reading the whole disk each cycle (holes of sparse files are skipped unread).

use super::Tracker;

#[derive(Default)]
pub struct HashScan;

impl Tracker for HashScan {
    fn name(&self) -> &'static str {
        "hash_scan"
    }

    fn candidates(&mut self, blocks: u64) -> Vec<u64> {
        (0..blocks).collect()
    }
}
