//! Hash-scan tracker: every block is a candidate; the pipeline's hash compare against the
//! last acknowledged manifest finds what changed. Works on any kernel and any device, at the
//! cost of reading the whole disk each cycle (holes of sparse files are skipped unread). It
//! cannot see writes, so a point it cuts is best-effort even under a freeze.

use super::{Take, Tracker};

pub struct HashScan {
    /// Why this disk is scanned (shown as the reason of each scan).
    pub why: String,
}

impl Tracker for HashScan {
    fn name(&self) -> &'static str {
        "hash_scan"
    }

    fn take(&mut self, _blocks: u64) -> Take {
        Take::All {
            reason: self.why.clone(),
        }
    }

    fn give_back(&mut self, _taken: Take) {}

    /// Every block is examined on every cycle already.
    fn mark(&mut self, _blocks: &[u64]) {}

    fn pending(&self) -> Option<u64> {
        None
    }

    fn sees_writes(&self) -> bool {
        false
    }

    fn note(&self) -> String {
        self.why.clone()
    }
}
