//! The send window, sans-IO: what the agent sends for each prepared block and what becomes
//! acknowledged, decided from events (a block offered, a `HaveReply`, `Acks`, `NeedData`)
//! with no socket and no clock. `replicate.rs` feeds it from the pipeline and the link and
//! writes out what it encodes; the tests here drive it directly.
//!
//! Rules: at most [`WINDOW`] whole blocks are unacknowledged (sent, or waiting for a dedupe
//! answer), and at most [`PATCH_WINDOW`] patches ([`PATCH_WINDOW_BYTES`] of them).
//! A zero block, or content already acknowledged or sent in this session, goes as a `Ref`
//! at once. Other content is asked about in batched `Have` queries, then sent as a `Ref`
//! (the receiver has it) or a `Block`. A block is forgotten only when acknowledged; a
//! `NeedData` for a `Ref` resends its data.

use crate::link::LinkError;
use crate::pipeline::{Payload, Prepared};
use lifeboat_common::codec::Codec;
use lifeboat_common::protocol::{self, Message};
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use std::collections::{HashMap, HashSet};

/// Most whole blocks unacknowledged at once.
pub const WINDOW: usize = 64;
/// Most patches unacknowledged at once, and their most bytes: patches are small (a few pages),
/// so many more may be out at once without more memory.
pub const PATCH_WINDOW: usize = 1024;
pub const PATCH_WINDOW_BYTES: usize = 32 << 20;
/// Most hashes in one dedupe query.
pub const HAVE_BATCH: usize = 256;

/// What one disk's blocks cost on the wire, cumulative (exported as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Blocks and patches sent as data: their bytes before compression (whole blocks, or
    /// the pages of a patch) ...
    pub raw_bytes: u64,
    /// ... and as encoded on the wire.
    pub data_bytes: u64,
    /// Changed blocks whose content the receiver had already (sent as a `Ref`).
    pub dedupe_hits: u64,
    /// Blocks sent again: data for a `Ref` the receiver could not honour, or whole after a
    /// patch it could not apply or named otherwise than expected.
    pub resent: u64,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            raw_bytes: self.raw_bytes + o.raw_bytes,
            data_bytes: self.data_bytes + o.data_bytes,
            dedupe_hits: self.dedupe_hits + o.dedupe_hits,
            resent: self.resent + o.resent,
        }
    }
}

struct Entry {
    disk: usize,
    index: u64,
    hash: BlockHash,
    /// The encoded content, kept for a `NeedData` (None for the zero block).
    data: Option<(Codec, Vec<u8>)>,
    /// Sent as a `Patch`: the receiver names it (`Named`), or lacks its base (`NeedData`).
    patch: bool,
    /// A patch's encoded bytes.
    bytes: usize,
}

/// A block the receiver acknowledged: `disk`'s block `index` now durably holds `hash`.
#[derive(Debug, PartialEq, Eq)]
pub struct Acked {
    pub disk: usize,
    pub index: u64,
    pub hash: BlockHash,
}

pub struct Window {
    next_seq: u64,
    next_req: u64,
    inflight: HashMap<u64, Entry>,
    /// Blocks to ask about in the next `Have`.
    have_batch: Vec<(u64, Entry)>,
    /// Blocks asked about, by request.
    have_wait: HashMap<u64, Vec<(u64, Entry)>>,
    waiting: usize,
    /// Content the receiver acknowledged in this session.
    known: HashSet<BlockHash>,
    /// Content sent as data in this session.
    sent_data: HashSet<BlockHash>,
    /// Unacknowledged blocks per disk.
    pub outstanding: Vec<u64>,
    /// Per disk: what its blocks cost on the wire in this window's life.
    pub tally: Vec<Tally>,
    /// Blocks sent as patches, and patches the receiver could not apply (it lacked the base).
    pub patches_sent: u64,
    pub patches_refused: u64,
    /// Patches the receiver named otherwise than the agent expected (page sums that missed
    /// a change: see [`crate::pagesums`]).
    pub patches_mismatched: u64,
    /// Blocks whose patch the receiver could not apply, or named otherwise than expected: to
    /// be read whole and sent again.
    pub refused: Vec<(usize, u64)>,
    /// Patches unacknowledged, and their encoded bytes.
    patches_open: usize,
    patch_bytes_open: usize,
}

impl Window {
    pub fn new(disks: usize) -> Window {
        Window {
            next_seq: 1,
            next_req: 1,
            inflight: HashMap::new(),
            have_batch: Vec::new(),
            have_wait: HashMap::new(),
            waiting: 0,
            known: HashSet::new(),
            sent_data: HashSet::new(),
            outstanding: vec![0; disks],
            tally: vec![Tally::default(); disks],
            patches_sent: 0,
            patches_refused: 0,
            patches_mismatched: 0,
            refused: Vec::new(),
            patches_open: 0,
            patch_bytes_open: 0,
        }
    }

    fn open(&self) -> usize {
        self.inflight.len() + self.waiting + self.have_batch.len()
    }

    /// Whether another block may be taken: room for a whole block, and for a patch.
    pub fn has_room(&self) -> bool {
        self.open() - self.patches_open < WINDOW
            && self.patches_open < PATCH_WINDOW
            && self.patch_bytes_open < PATCH_WINDOW_BYTES
    }

    /// Whether blocks are out with the receiver (sent, or asked about).
    pub fn awaiting_receiver(&self) -> bool {
        !self.inflight.is_empty() || self.waiting > 0
    }

    /// Nothing unacknowledged and nothing queued.
    pub fn is_empty(&self) -> bool {
        self.open() == 0
    }

    /// Blocks queued for the next `Have` (0: none).
    pub fn pending_queries(&self) -> usize {
        self.have_batch.len()
    }

    /// Takes a prepared block: a `Ref` is encoded into `out` at once, or the block waits for
    /// a dedupe query. Returns true when it started a new query batch (the caller's cue to
    /// start the batching delay).
    pub fn offer(&mut self, p: Prepared, out: &mut Vec<u8>) -> bool {
        self.outstanding[p.disk] += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        let handle = p.disk as u32;
        if let Some(patch) = p.patch {
            // No name to ask about: the pages go at once.
            let bytes = patch.bytes.len();
            self.patches_open += 1;
            self.patch_bytes_open += bytes;
            let t = &mut self.tally[p.disk];
            t.raw_bytes +=
                patch.pages.iter().map(|r| r.1 as u64).sum::<u64>() * protocol::PAGE_SIZE as u64;
            t.data_bytes += bytes as u64;
            Message::Patch {
                seq,
                handle,
                index: p.index,
                base: patch.base,
                pages: patch.pages,
                codec: patch.codec,
                data: patch.bytes,
            }
            .encode(out);
            self.patches_sent += 1;
            self.inflight.insert(
                seq,
                Entry {
                    disk: p.disk,
                    index: p.index,
                    // The name the agent expects the receiver to give the block, if it knows.
                    hash: p.hash,
                    data: None,
                    patch: true,
                    bytes,
                },
            );
            return false;
        }
        match p.payload {
            Payload::Zero => {
                Message::Ref {
                    seq,
                    handle,
                    index: p.index,
                    hash: BlockHash::ZERO,
                }
                .encode(out);
                self.inflight.insert(
                    seq,
                    Entry {
                        disk: p.disk,
                        index: p.index,
                        hash: BlockHash::ZERO,
                        data: None,
                        patch: false,
                        bytes: 0,
                    },
                );
                false
            }
            Payload::Data { codec, bytes } => {
                let e = Entry {
                    disk: p.disk,
                    index: p.index,
                    hash: p.hash,
                    data: Some((codec, bytes)),
                    patch: false,
                    bytes: 0,
                };
                if self.known.contains(&p.hash) || self.sent_data.contains(&p.hash) {
                    self.tally[p.disk].dedupe_hits += 1;
                    Message::Ref {
                        seq,
                        handle,
                        index: p.index,
                        hash: p.hash,
                    }
                    .encode(out);
                    self.inflight.insert(seq, e);
                    false
                } else {
                    let first = self.have_batch.is_empty();
                    self.have_batch.push((seq, e));
                    first
                }
            }
        }
    }

    /// Sends the queued dedupe query, when there is one and `due` (the batching delay is
    /// over, the batch is full, the scan ended or the window is full).
    pub fn query(&mut self, due: bool, out: &mut Vec<u8>) {
        if self.have_batch.is_empty()
            || !(due || self.have_batch.len() >= HAVE_BATCH || !self.has_room())
        {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let hashes = self.have_batch.iter().map(|(_, e)| e.hash).collect();
        Message::Have { req, hashes }.encode(out);
        self.waiting += self.have_batch.len();
        self.have_wait
            .insert(req, std::mem::take(&mut self.have_batch));
    }

    /// The receiver's answer to a dedupe query: each block goes as a `Ref` (held) or a
    /// `Block` (not held), encoded into `out`.
    pub fn have_reply(
        &mut self,
        req: u64,
        present: &[bool],
        out: &mut Vec<u8>,
    ) -> Result<(), LinkError> {
        let batch = self
            .have_wait
            .remove(&req)
            .ok_or_else(|| LinkError::Protocol(format!("HaveReply for unknown request {req}")))?;
        if batch.len() != present.len() {
            return Err(LinkError::Protocol(format!(
                "HaveReply {req} answers {} of {} hashes",
                present.len(),
                batch.len()
            )));
        }
        self.waiting -= batch.len();
        for ((seq, e), &has) in batch.into_iter().zip(present) {
            let handle = e.disk as u32;
            if has || self.sent_data.contains(&e.hash) {
                self.tally[e.disk].dedupe_hits += 1;
                Message::Ref {
                    seq,
                    handle,
                    index: e.index,
                    hash: e.hash,
                }
                .encode(out);
            } else if let Some((codec, data)) = &e.data {
                protocol::encode_block(out, seq, handle, e.index, &e.hash, *codec, data);
                self.sent_data.insert(e.hash);
                let t = &mut self.tally[e.disk];
                t.raw_bytes += BLOCK_SIZE as u64;
                t.data_bytes += data.len() as u64;
            }
            self.inflight.insert(seq, e);
        }
        Ok(())
    }

    /// Acknowledgements: returns what became durable, for the caller to record.
    pub fn acks(&mut self, seqs: &[u64]) -> Result<Vec<Acked>, LinkError> {
        let mut done = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if self.inflight.get(seq).is_some_and(|e| e.patch) {
                return Err(LinkError::Protocol(format!(
                    "Acks for patch {seq}, which only Named answers"
                )));
            }
            if let Some(e) = self.inflight.remove(seq) {
                self.outstanding[e.disk] = self.outstanding[e.disk].saturating_sub(1);
                if !e.hash.is_zero() {
                    self.known.insert(e.hash);
                }
                done.push(Acked {
                    disk: e.disk,
                    index: e.index,
                    hash: e.hash,
                });
            }
        }
        Ok(done)
    }

    /// Patches made durable, with the names the receiver gave the blocks they made. A patch
    /// whose expected name differs is durable all the same (the receiver holds what it named),
    /// and its block goes to `refused`, to be read whole before the point is cut.
    pub fn named(&mut self, named: &[(u64, BlockHash)]) -> Result<Vec<Acked>, LinkError> {
        let mut done = Vec::with_capacity(named.len());
        for (seq, hash) in named {
            if !self.inflight.get(seq).is_some_and(|e| e.patch) {
                return Err(LinkError::Protocol(format!(
                    "Named for {seq}, which is no patch awaiting a name"
                )));
            }
            if let Some(e) = self.inflight.get(seq).filter(|e| e.patch) {
                let (disk, index) = (e.disk, e.index);
                self.patches_open -= 1;
                self.patch_bytes_open -= e.bytes;
                if !e.hash.is_zero() && e.hash != *hash {
                    self.patches_mismatched += 1;
                    self.tally[disk].resent += 1;
                    self.refused.push((disk, index));
                }
                self.inflight.remove(seq);
                self.outstanding[disk] = self.outstanding[disk].saturating_sub(1);
                if !hash.is_zero() {
                    self.known.insert(*hash);
                }
                done.push(Acked {
                    disk,
                    index,
                    hash: *hash,
                });
            }
        }
        Ok(done)
    }

    /// The receiver lacks the content of `Ref` `seq`: its data is encoded into `out`.
    pub fn need_data(&mut self, seq: u64, out: &mut Vec<u8>) -> Result<(), LinkError> {
        if self.inflight.get(&seq).is_some_and(|e| e.patch) {
            // The receiver lacks the base: the block must be read whole. Done here; the
            // caller reads it again (`refused`).
            if let Some(e) = self.inflight.remove(&seq) {
                self.outstanding[e.disk] = self.outstanding[e.disk].saturating_sub(1);
                self.patches_open -= 1;
                self.patch_bytes_open -= e.bytes;
                self.patches_refused += 1;
                self.tally[e.disk].resent += 1;
                self.refused.push((e.disk, e.index));
            }
            return Ok(());
        }
        let e = self
            .inflight
            .get(&seq)
            .ok_or_else(|| LinkError::Protocol(format!("NeedData for unknown block {seq}")))?;
        let Some((codec, data)) = &e.data else {
            return Err(LinkError::Protocol(format!(
                "NeedData for zero block {seq}"
            )));
        };
        protocol::encode_block(out, seq, e.disk as u32, e.index, &e.hash, *codec, data);
        let t = &mut self.tally[e.disk];
        t.resent += 1;
        t.raw_bytes += BLOCK_SIZE as u64;
        t.data_bytes += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::protocol::decode_frame;

    fn frames(out: &mut Vec<u8>) -> Vec<Message> {
        let mut v = Vec::new();
        let mut rest = &out[..];
        while let Ok(Some((m, used))) = decode_frame(rest) {
            v.push(m);
            rest = &rest[used..];
        }
        assert!(rest.is_empty(), "a partial frame was encoded");
        out.clear();
        v
    }

    fn data(disk: usize, index: u64, byte: u8) -> Prepared {
        let bytes = vec![byte; 100];
        Prepared {
            disk,
            index,
            hash: lifeboat_common::block::hash_block(&bytes),
            payload: Payload::Data {
                codec: Codec::Raw,
                bytes,
            },
            patch: None,
        }
    }

    #[test]
    fn a_patch_goes_at_once_and_is_named_or_refused() {
        let mut w = Window::new(1);
        let mut out = Vec::new();
        let patch = |index| Prepared {
            disk: 0,
            index,
            hash: BlockHash::ZERO,
            payload: Payload::Zero,
            patch: Some(crate::pipeline::Patch {
                base: BlockHash([1; 32]),
                pages: vec![(3, 1)],
                codec: Codec::Raw,
                bytes: vec![9; 4096],
            }),
        };
        assert!(!w.offer(patch(5), &mut out));
        assert!(!w.offer(patch(6), &mut out));
        let f = frames(&mut out);
        assert!(
            matches!(&f[..], [Message::Patch { seq: 1, index: 5, base, pages, .. }, Message::Patch { seq: 2, .. }]
                if *base == BlockHash([1; 32]) && pages == &vec![(3, 1)]),
            "{f:?}"
        );
        assert_eq!(w.pending_queries(), 0, "a patch is never asked about");
        // An Acks for a patch's seq is not its answer; nor is a Named for a block.
        assert!(w.acks(&[1]).is_err());
        assert!(w.named(&[(99, BlockHash([7; 32]))]).is_err());
        let named = w.named(&[(1, BlockHash([7; 32]))]).unwrap();
        assert_eq!(
            named,
            vec![Acked {
                disk: 0,
                index: 5,
                hash: BlockHash([7; 32])
            }]
        );
        // The receiver lacks the base of the second: it is to be read whole.
        w.need_data(2, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(w.refused, vec![(0, 6)]);
        assert!(w.is_empty());
        assert_eq!((w.patches_sent, w.patches_refused), (2, 1));
        // A patch made from page sums expects a name: another name sends the block whole.
        let expecting = |index, name| Prepared {
            hash: name,
            ..patch(index)
        };
        w.offer(expecting(7, BlockHash([7; 32])), &mut out);
        w.offer(expecting(8, BlockHash([8; 32])), &mut out);
        out.clear();
        let named = w
            .named(&[(3, BlockHash([7; 32])), (4, BlockHash([6; 32]))])
            .unwrap();
        assert_eq!(named.len(), 2, "both are durable, as named");
        assert_eq!(named[1].hash, BlockHash([6; 32]));
        assert_eq!(w.refused, vec![(0, 6), (0, 8)]);
        assert_eq!(w.patches_mismatched, 1);
        // Many more patches than whole blocks may be out at once, but not without bound.
        let mut n = 0;
        while w.has_room() {
            w.offer(patch(n), &mut out);
            n += 1;
        }
        assert_eq!(n as usize, PATCH_WINDOW);
        out.clear();
        let named: Vec<(u64, BlockHash)> = (5..5 + n).map(|s| (s, BlockHash([7; 32]))).collect();
        assert_eq!(w.named(&named).unwrap().len(), PATCH_WINDOW);
        assert!(w.has_room() && w.is_empty());
    }

    #[test]
    fn dedupe_query_then_ref_or_block_then_ack() {
        let mut w = Window::new(2);
        let mut out = Vec::new();
        // A zero block goes at once as a Ref; content waits for a query.
        assert!(!w.offer(
            Prepared {
                disk: 0,
                index: 0,
                hash: BlockHash::ZERO,
                payload: Payload::Zero,
                patch: None,
            },
            &mut out
        ));
        assert!(w.offer(data(0, 1, 1), &mut out));
        assert!(!w.offer(data(1, 2, 2), &mut out));
        let f = frames(&mut out);
        assert!(matches!(&f[..], [Message::Ref { seq: 1, hash, .. }] if hash.is_zero()));
        assert_eq!(w.pending_queries(), 2);
        w.query(false, &mut out);
        assert!(out.is_empty(), "queried before it was due");
        w.query(true, &mut out);
        let f = frames(&mut out);
        let Message::Have { req, hashes } = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!(hashes.len(), 2);
        // The receiver holds the first, not the second.
        w.have_reply(*req, &[true, false], &mut out).unwrap();
        let f = frames(&mut out);
        assert!(
            matches!(
                f[0],
                Message::Ref {
                    seq: 2,
                    index: 1,
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(
            matches!(
                f[1],
                Message::Block {
                    seq: 3,
                    index: 2,
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(w.awaiting_receiver());
        assert_eq!(w.outstanding, vec![2, 1]);
        // Acks: what they name becomes durable; unknown ones are ignored.
        let done = w.acks(&[3, 99, 1]).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].index, 2);
        assert_eq!(w.outstanding, vec![1, 0]);
        // Content acknowledged this session goes as a Ref without asking.
        w.offer(data(1, 7, 2), &mut out);
        assert!(matches!(
            frames(&mut out)[..],
            [Message::Ref { index: 7, .. }]
        ));
        // NeedData resends the data of a Ref; a zero block has none.
        w.need_data(2, &mut out).unwrap();
        assert!(matches!(
            frames(&mut out)[..],
            [Message::Block { seq: 2, .. }]
        ));
        assert!(w.acks(&[2, 4]).unwrap().len() == 2 && w.is_empty());
    }

    #[test]
    fn the_window_bounds_what_is_unacknowledged_and_replies_are_checked() {
        let mut w = Window::new(1);
        let mut out = Vec::new();
        for i in 0..WINDOW as u64 {
            assert!(w.has_room());
            w.offer(data(0, i, i as u8), &mut out);
        }
        assert!(!w.has_room());
        // A full window sends its query even before the delay is over.
        w.query(false, &mut out);
        let f = frames(&mut out);
        let Message::Have { req, .. } = f[0] else {
            panic!()
        };
        assert!(w
            .have_reply(req + 1, &[], &mut out)
            .unwrap_err()
            .to_string()
            .contains("unknown request"));
        assert!(w
            .have_reply(req, &[true], &mut out)
            .unwrap_err()
            .to_string()
            .contains("answers 1 of 64"));
        assert!(w.need_data(12345, &mut out).is_err());
    }
}
