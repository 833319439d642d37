//! The session processor: applies one server's Block, Ref, OpenDisk, GetManifest, Commit and
//! Progress messages in arrival order.
//!
//! Messages are taken in batches (whatever has queued while the previous batch was being
//! made durable), and each batch is one group commit: verify every block, stage it, `syncfs`,
//! publish, append the disks' journals, `syncfs`, then ack. So an ack always follows
//! durability, and the fsync cost is shared by the batch.

use super::Shared;
use crate::catalog::{DiskRecord, PointRecord};
use crate::disk::LiveDisk;
use crate::status::{now_ms, ServerStatus};
use crate::store::{self, BlockStore, StoreError, VerifiedBlock};
use lifeboat_common::block::hash_block;
use lifeboat_common::codec;
use lifeboat_common::manifest::Manifest;
use lifeboat_common::protocol::{Consistency, DiskState, ErrorCode, Message, MAX_HASHES};
use lifeboat_common::BlockHash;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Most messages applied as one group commit.
pub const BATCH: usize = 64;
// One batch appends at most one journal record per message to a disk.
const _: () = assert!(BATCH as u64 <= crate::disk::MAX_RECORDS_PER_APPEND);

pub enum SessionEnd {
    Done,
    /// Refused with this error (already sent to the agent as an Error frame).
    Failed(Fail),
    /// The processor panicked (a bug): the session ends, the receiver goes on.
    Panicked(String),
}

pub struct Session {
    shared: Arc<Shared>,
    server: String,
    disks: HashMap<u32, LiveDisk>,
    /// The previous point's manifest per disk id, for changed-block counts.
    previous: HashMap<String, Manifest>,
    status: ServerStatus,
    status_saved_ms: u64,
    /// The server's newest committed point (0: none), once read from the catalog.
    last_point: Option<u64>,
    /// The store's quarantine mark when this session last checked its disks for missing
    /// blocks (see `Store::quarantine_mark`).
    quarantine_seen: Option<Vec<u8>>,
    /// Replies to send once the current step returns (see [`Session::process`]).
    outbox: Vec<Message>,
    /// The agent's clock skew, measured by the connection as each Progress arrived
    /// (`i64::MIN`: not yet).
    measured_skew: Arc<std::sync::atomic::AtomicI64>,
    /// Manifest memory held for the open disks, returned when the session ends.
    reservations: Vec<super::Reservation>,
}

/// A failure that ends the session, with the Error frame to send first.
#[derive(Debug)]
pub struct Fail {
    pub code: ErrorCode,
    /// Whether the agent trying again later can help.
    pub retryable: bool,
    pub message: String,
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail {
            code: ErrorCode::Storage,
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}

impl From<crate::disk::DiskError> for Fail {
    fn from(e: crate::disk::DiskError) -> Fail {
        Fail {
            code: ErrorCode::Storage,
            retryable: true,
            message: e.to_string(),
        }
    }
}

impl From<crate::fleet::FleetError> for Fail {
    fn from(e: crate::fleet::FleetError) -> Fail {
        Fail {
            // A receiver that lost the server is as busy as one at its limits: the agent
            // reconnects and is sent to the holder.
            code: match e {
                crate::fleet::FleetError::NotHeld { .. } => ErrorCode::Busy,
                _ => ErrorCode::Storage,
            },
            retryable: true,
            message: e.to_string(),
        }
    }
}

impl From<crate::catalog::CatalogError> for Fail {
    fn from(e: crate::catalog::CatalogError) -> Fail {
        Fail {
            code: ErrorCode::Storage,
            retryable: true,
            message: e.to_string(),
        }
    }
}

fn protocol(message: String) -> Fail {
    Fail {
        code: ErrorCode::Protocol,
        retryable: false,
        message,
    }
}

type Out = mpsc::Sender<Message>;

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        server: String,
        agent_version: String,
        peer: String,
        (instance, hostname): (String, String),
        measured_skew: Arc<std::sync::atomic::AtomicI64>,
    ) -> Session {
        let dir = shared.catalog.server_dir(&server);
        let mut status = ServerStatus::load(&dir).unwrap_or_default();
        if !status.instance.is_empty() && status.instance != instance {
            tracing::warn!(
                "server {server} moves from host {} (instance {}) to host {hostname} \
                 (instance {instance})",
                status.hostname,
                status.instance
            );
        }
        crate::status::RefusedClaim::clear(&dir);
        status.server = server.clone();
        status.connected = true;
        status.peer = peer;
        status.agent_version = agent_version;
        status.instance = instance;
        status.hostname = hostname;
        status.clock_skew_ms = None;
        status.last_seen_unix_ms = now_ms();
        // Read before any disk is checked, so a quarantine after it is always noticed.
        let quarantine_seen = shared.store.quarantine_mark();
        Session {
            shared,
            server,
            disks: HashMap::new(),
            previous: HashMap::new(),
            status,
            status_saved_ms: 0,
            last_point: None,
            quarantine_seen,
            outbox: Vec::new(),
            measured_skew,
            reservations: Vec::new(),
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Message>, out: Out) -> SessionEnd {
        self.save_status();
        let mut end = SessionEnd::Done;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let out2 = out.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let r = self.process(batch, &out2);
                (self, r)
            })
            .await;
            let (s, r) = match joined {
                Ok(x) => x,
                Err(e) => return SessionEnd::Panicked(e.to_string()),
            };
            self = s;
            if let Err(f) = r {
                let _ = out
                    .send(Message::Error {
                        code: f.code,
                        retryable: f.retryable,
                        message: f.message.clone(),
                    })
                    .await;
                end = SessionEnd::Failed(f);
                break;
            }
        }
        self.status.connected = false;
        for d in &mut self.status.disks {
            d.state = DiskState::Disconnected;
        }
        let this = self;
        let _ = tokio::task::spawn_blocking(move || this.save_status()).await;
        end
    }

    fn save_status(&self) {
        let dir = self.shared.catalog.server_dir(&self.server);
        if let Err(e) = self.status.save(&dir) {
            tracing::warn!("saving status of server {}: {e}", self.server);
        }
    }

    fn save_status_throttled(&mut self) {
        let now = now_ms();
        if now.saturating_sub(self.status_saved_ms) >= 2000 {
            self.status_saved_ms = now;
            self.save_status();
        }
    }

    /// Runs in a blocking thread: file I/O and hashing happen here.
    ///
    /// Replies are queued in `outbox` and sent only after each step returns, with no lock
    /// held: an agent that stops reading can stall its own session, never GC or the others.
    fn process(&mut self, batch: Vec<Message>, out: &Out) -> Result<(), Fail> {
        if let Some(f) = &self.shared.fleet {
            if !f.holds(&self.server) {
                return Err(crate::fleet::FleetError::NotHeld {
                    server: self.server.clone(),
                    why: "its lease was lost or ran out".into(),
                }
                .into());
            }
        }
        let mut pending = Vec::new();
        for m in batch {
            match m {
                Message::Block { .. } | Message::Ref { .. } | Message::Patch { .. } => {
                    pending.push(m)
                }
                Message::GetManifest { handle } => {
                    let r = self.apply(std::mem::take(&mut pending));
                    self.flush(out);
                    r?;
                    self.stream_manifest(handle, out)?;
                }
                other => {
                    let r = self
                        .apply(std::mem::take(&mut pending))
                        .and_then(|()| self.control(other));
                    self.flush(out);
                    r?;
                }
            }
        }
        let r = self.apply(pending);
        self.flush(out);
        r
    }

    /// Sends a disk's live manifest in chunks, each as it is made (no lock is held, and a
    /// copy of the whole manifest never waits in the outbox).
    fn stream_manifest(&mut self, handle: u32, out: &Out) -> Result<(), Fail> {
        let disk = self
            .disks
            .get(&handle)
            .ok_or_else(|| protocol(format!("disk handle {handle} was never opened")))?;
        let total = disk.manifest.hashes.len() as u64;
        let mut start = 0usize;
        loop {
            let end = (start + MAX_HASHES).min(disk.manifest.hashes.len());
            let chunk = Message::ManifestChunk {
                handle,
                start: start as u64,
                total,
                hashes: disk.manifest.hashes[start..end].to_vec(),
            };
            if out.blocking_send(chunk).is_err() {
                return Ok(()); // the writer is gone; the connection is ending
            }
            start = end;
            if start >= disk.manifest.hashes.len() {
                return Ok(());
            }
        }
    }

    /// Sends the queued replies (blocking while the writer's queue is full).
    fn flush(&mut self, out: &Out) {
        for m in std::mem::take(&mut self.outbox) {
            if out.blocking_send(m).is_err() {
                return; // the writer is gone; the connection is ending
            }
        }
    }

    fn disk_id(&self, handle: u32) -> Result<&str, Fail> {
        self.disks
            .get(&handle)
            .map(|d| d.id.as_str())
            .ok_or_else(|| protocol(format!("disk handle {handle} was never opened")))
    }

    /// One group commit of Block, Patch and Ref messages.
    ///
    /// The batch's CPU work is spread over the receiver's cores first: every Block decoded and
    /// checked against its name, then every Patch applied to its base and named. What is
    /// stored, journaled and acknowledged is then decided in arrival order, exactly as if the
    /// messages were taken one by one (the first bad one ends the batch, nothing of it acked).
    fn apply(&mut self, items: Vec<Message>) -> Result<(), Fail> {
        if items.is_empty() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let _shared_guard = shared.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        // Counted from its first dedupe answer until its records are durable (a fleet's
        // block sweep waits for the batches from before its fence).
        let batch = shared.batches.enter();
        let prepared = self.prepare(items);
        let mut verified: Vec<VerifiedBlock> = Vec::new();
        let mut records: HashMap<u32, Vec<(u64, BlockHash)>> = HashMap::new();
        let mut acks = Vec::new();
        let mut named = Vec::new();
        for item in prepared {
            match item {
                Prepared::Block {
                    seq,
                    handle,
                    index,
                    wire_bytes,
                    checked,
                } => {
                    let disk = self.disk_id(handle)?.to_string();
                    self.status.counters.blocks_received += 1;
                    self.status.counters.data_bytes_received += wire_bytes;
                    match checked {
                        Ok(v) => {
                            records.entry(handle).or_default().push((index, v.hash));
                            verified.push(v);
                        }
                        Err(e) => {
                            self.status.counters.blocks_rejected += 1;
                            self.save_status();
                            return Err(Fail {
                                code: ErrorCode::BadBlock,
                                retryable: true,
                                message: format!(
                                    "disk {disk} block {index}: rejected, not stored: {e}"
                                ),
                            });
                        }
                    }
                    acks.push(seq);
                }
                Prepared::Patch {
                    seq,
                    handle,
                    index,
                    wire_bytes,
                    rebuilt,
                } => {
                    let disk = self.disk_id(handle)?.to_string();
                    let rebuilt = rebuilt.map_err(|e| match e {
                        PatchError::Bad(message) => Fail {
                            code: ErrorCode::BadBlock,
                            retryable: true,
                            message: format!(
                                "disk {disk} block {index}: patch rejected, not stored: {message}"
                            ),
                        },
                        PatchError::Fail(f) => f,
                    })?;
                    self.status.counters.delta_bytes_received += wire_bytes;
                    match rebuilt {
                        Rebuilt::NoBase => {
                            // We lack the base: have the whole block instead.
                            self.status.counters.deltas_refused += 1;
                            self.outbox.push(Message::NeedData { seq });
                        }
                        Rebuilt::Named { hash, block } => {
                            if let Some(b) = block {
                                if !verified.iter().any(|v| v.hash == hash) {
                                    verified.push(b);
                                }
                            }
                            self.status.counters.deltas_applied += 1;
                            records.entry(handle).or_default().push((index, hash));
                            named.push((seq, hash));
                        }
                    }
                }
                Prepared::Other(Message::Ref {
                    seq,
                    handle,
                    index,
                    hash,
                }) => {
                    self.disk_id(handle)?;
                    self.status.counters.refs_received += 1;
                    let in_batch = verified.iter().any(|v| v.hash == hash);
                    if !in_batch && !shared.store.has(&hash)? {
                        self.outbox.push(Message::NeedData { seq });
                        continue;
                    }
                    records.entry(handle).or_default().push((index, hash));
                    acks.push(seq);
                }
                Prepared::Other(_) => {}
            }
        }
        // The blocks, durable; then the journal records that name them, durable; then acks.
        // A block an open fleet sweep may delete is written after it ends.
        if let Some(f) = &shared.fleet {
            let hashes: Vec<BlockHash> = verified.iter().map(|v| v.hash).collect();
            if !f.wait_for_sweep(&hashes, batch.generation()) {
                return Err(Fail {
                    code: ErrorCode::Busy,
                    retryable: true,
                    message: "the receiver is stopping during a block sweep: this batch is not \
                              stored (the agent sends it again)"
                        .into(),
                });
            }
        }
        let stored = shared.store.insert(&verified)?;
        let mut checkpoints = Vec::new();
        let journaled = self
            .journal(&records, &mut checkpoints)
            .and_then(|()| self.mirror(&records));
        if let Err(f) = journaled {
            // Nothing of this batch is acknowledged: forget what it recorded, so that the
            // live manifests name only durable, acknowledged content.
            for (handle, cp) in checkpoints {
                if let Some(d) = self.disks.get_mut(&handle) {
                    d.rollback(cp);
                }
            }
            return Err(f);
        }
        self.status.counters.blocks_stored += stored as u64;
        if !acks.is_empty() {
            self.outbox.push(Message::Acks { seqs: acks });
        }
        if !named.is_empty() {
            self.outbox.push(Message::Named { named });
        }
        Ok(())
    }

    /// The CPU-bound part of a batch, on rayon's pool (one per receiver, so many sessions
    /// share the cores rather than each taking them all): Blocks checked first, so that a
    /// Patch can take its base from a Block of the same batch.
    fn prepare(&self, items: Vec<Message>) -> Vec<Prepared> {
        use rayon::prelude::*;
        let checked: Vec<Prepared> = items
            .into_par_iter()
            .map(|m| match m {
                Message::Block {
                    seq,
                    handle,
                    index,
                    hash,
                    codec,
                    data,
                } => Prepared::Block {
                    seq,
                    handle,
                    index,
                    wire_bytes: data.len() as u64,
                    checked: store::verify(hash, codec, data),
                },
                other => Prepared::Other(other),
            })
            .collect();
        let batch: Vec<&VerifiedBlock> = checked
            .iter()
            .filter_map(|p| match p {
                Prepared::Block { checked: Ok(v), .. } => Some(v),
                _ => None,
            })
            .collect();
        let store = &*self.shared.store;
        let sizes: HashMap<u32, u64> = self
            .disks
            .iter()
            .map(|(h, d)| (*h, d.manifest.disk_size))
            .collect();
        let rebuilt: Vec<Option<Prepared>> = checked
            .par_iter()
            .map(|p| match p {
                Prepared::Other(Message::Patch {
                    seq,
                    handle,
                    index,
                    base,
                    pages,
                    codec,
                    data,
                }) => Some(Prepared::Patch {
                    seq: *seq,
                    handle: *handle,
                    index: *index,
                    wire_bytes: data.len() as u64,
                    rebuilt: rebuild(
                        store,
                        &batch,
                        sizes.get(handle).copied().unwrap_or(0),
                        *index,
                        base,
                        pages,
                        *codec,
                        data,
                    ),
                }),
                _ => None,
            })
            .collect();
        drop(batch);
        checked
            .into_iter()
            .zip(rebuilt)
            .map(|(p, r)| r.unwrap_or(p))
            .collect()
    }

    /// Appends the batch's records to the disks' journals and makes them durable.
    fn journal(
        &mut self,
        records: &HashMap<u32, Vec<(u64, BlockHash)>>,
        checkpoints: &mut Vec<(u32, crate::disk::Checkpoint)>,
    ) -> Result<(), Fail> {
        for (handle, entries) in records {
            if let Some(d) = self.disks.get_mut(handle) {
                checkpoints.push((*handle, d.checkpoint(entries)));
                d.record(entries)?;
            }
        }
        for handle in records.keys() {
            if let Some(d) = self.disks.get_mut(handle) {
                d.sync()?;
            }
        }
        Ok(())
    }

    /// In a fleet: the batch's records into the bucket (an ack waits for them there too).
    fn mirror(&self, records: &HashMap<u32, Vec<(u64, BlockHash)>>) -> Result<(), Fail> {
        let Some(fleet) = &self.shared.fleet else {
            return Ok(());
        };
        let by_disk: crate::fleet::Records = records
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .filter_map(|(h, r)| self.disks.get(h).map(|d| (d.id.clone(), r.clone())))
            .collect();
        if by_disk.is_empty() {
            return Ok(());
        }
        Ok(fleet.journal(&self.server, &by_disk)?)
    }

    fn control(&mut self, m: Message) -> Result<(), Fail> {
        match m {
            Message::OpenDisk {
                handle,
                disk_id,
                size,
            } => {
                // Fault injection for the panic-isolation test; compiled out of release builds.
                #[cfg(debug_assertions)]
                if std::env::var("LIFEBOAT_TEST_PANIC_ON_DISK").as_deref() == Ok(disk_id.as_str()) {
                    panic!("test-induced panic opening disk {disk_id}");
                }
                if !lifeboat_common::config::valid_name(&disk_id) {
                    return Err(protocol(format!(
                        "disk id {disk_id:?} must be 1-64 of [A-Za-z0-9._-]"
                    )));
                }
                if self.disks.values().any(|d| d.id == disk_id) || self.disks.contains_key(&handle)
                {
                    return Err(protocol(format!(
                        "disk {disk_id} (handle {handle}) opened twice"
                    )));
                }
                let cfg = &self.shared.config;
                if size > cfg.max_disk_bytes() {
                    return Err(protocol(format!(
                        "disk {disk_id}: size {size} bytes exceeds this receiver's \
                         max_disk_size_gib = {} GiB",
                        cfg.max_disk_size_gib
                    )));
                }
                // Every disk this receiver holds for the server counts, open or not.
                let disks_dir = self.shared.catalog.server_dir(&self.server).join("disks");
                let mut known: std::collections::HashSet<String> = std::fs::read_dir(&disks_dir)
                    .map(|rd| {
                        rd.flatten()
                            .filter_map(|e| e.file_name().to_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                known.extend(self.disks.values().map(|d| d.id.clone()));
                if !known.contains(&disk_id) && known.len() >= cfg.max_disks_per_server {
                    return Err(protocol(format!(
                        "disk {disk_id}: server {} already has {} disks on this receiver, its \
                         max_disks_per_server",
                        self.server,
                        known.len()
                    )));
                }
                // The live manifest and the last point's, 32 bytes a block each.
                let need = 2 * 32 * lifeboat_common::block::block_count(size);
                let reservation =
                    self.shared
                        .manifest_memory
                        .reserve(need)
                        .map_err(|free| Fail {
                            code: ErrorCode::Storage,
                            retryable: true,
                            message: format!(
                        "disk {disk_id}: its manifests need {} MiB and only {} MiB of this \
                         receiver's max_manifest_memory_mib ({}) are free",
                        need.div_ceil(1 << 20),
                        free >> 20,
                        cfg.max_manifest_memory_mib
                    ),
                        })?;
                self.reservations.push(reservation);
                let dir = self
                    .shared
                    .catalog
                    .server_dir(&self.server)
                    .join("disks")
                    .join(&disk_id);
                // Opening may compact; GC must not read the disk's live state meanwhile.
                let shared = self.shared.clone();
                let _refs = shared.gc_lock.read().unwrap_or_else(|e| e.into_inner());
                let mut disk = LiveDisk::open(&dir, &disk_id, size)?;
                self.status.counters.journal_records_damaged += disk.damaged_records;
                Self::forget_missing(
                    shared.store.as_ref(),
                    shared.fleet.as_deref(),
                    &self.server,
                    &mut disk,
                )?;
                let digest = disk.manifest.digest();
                tracing::info!(disk = %disk_id, size, blocks = disk.manifest.hashes.len(), "disk opened");
                self.disks.insert(handle, disk);
                self.status.disks.retain(|d| d.id != disk_id);
                self.status.disks.push(crate::status::DiskStatus {
                    id: disk_id,
                    size,
                    state: DiskState::Rescan,
                    backlog_blocks: 0,
                });
                self.outbox.push(Message::DiskOpened { handle, digest });
                self.save_status();
            }
            // `process` streams these itself (`stream_manifest`): never handed here.
            Message::GetManifest { .. } => {
                return Err(Fail {
                    code: ErrorCode::Internal,
                    retryable: true,
                    message: "GetManifest reached the wrong handler (a receiver bug)".into(),
                })
            }
            Message::Commit {
                point,
                created_unix_ms,
                consistency,
                why,
                disks,
            } => {
                // A commit writes a point and compacts live manifests: GC must see either
                // all of it or none of it.
                let shared = self.shared.clone();
                let _refs = shared.gc_lock.read().unwrap_or_else(|e| e.into_inner());
                self.commit(point, created_unix_ms, consistency, why, &disks)
                    .inspect_err(|_| self.shared.metrics.commit_refused(&self.server, "error"))?;
            }
            // Its clock was read by the connection as the frame arrived (`measured_skew`).
            Message::Progress { disks, .. } => {
                self.status.last_seen_unix_ms = now_ms();
                let skew = self
                    .measured_skew
                    .load(std::sync::atomic::Ordering::Relaxed);
                if skew != i64::MIN {
                    self.note_skew(skew);
                }
                for p in disks {
                    if let Some(d) = self.disks.get(&p.handle) {
                        if let Some(s) = self.status.disks.iter_mut().find(|s| s.id == d.id) {
                            s.state = p.state;
                            s.backlog_blocks = p.backlog_blocks;
                        }
                    }
                }
                self.save_status_throttled();
            }
            other => return Err(protocol(format!("unexpected {}", other.name()))),
        }
        Ok(())
    }

    /// Records the agent's clock skew; logs it (once per session) past `max_clock_skew_secs`.
    fn note_skew(&mut self, skew_ms: i64) {
        let limit = self.shared.config.max_clock_skew_secs as i64 * 1000;
        let was_over = self.status.clock_skew_ms.is_some_and(|s| s.abs() > limit);
        self.status.clock_skew_ms = Some(skew_ms);
        if skew_ms.abs() > limit && !was_over {
            tracing::warn!(
                server = %self.server,
                skew_secs = skew_ms / 1000,
                "the agent's clock is {}s {} the receiver's (max_clock_skew_secs = {}); \
                 points are timed and retained by the receiver's clock",
                skew_ms.abs() / 1000,
                if skew_ms > 0 { "ahead of" } else { "behind" },
                limit / 1000
            );
        }
    }

    /// Marks absent (zero) every block of the live manifest that the store no longer has
    /// (quarantined by `scrub`, or lost): the digest then differs from the agent's, the agent
    /// takes our manifest, and its scan sends that content again. The caller holds the GC
    /// lock shared.
    /// Returns how many blocks it marked.
    fn forget_missing(
        store: &dyn BlockStore,
        fleet: Option<&dyn crate::fleet::Fleet>,
        server: &str,
        disk: &mut LiveDisk,
    ) -> Result<usize, Fail> {
        let mut present = std::collections::HashMap::new();
        let mut missing = Vec::new();
        for (i, h) in disk.manifest.hashes.iter().enumerate() {
            if h.is_zero() {
                continue;
            }
            let held = match present.get(h) {
                Some(&p) => p,
                None => {
                    let p = store.holds(h)?;
                    present.insert(*h, p);
                    p
                }
            };
            if !held {
                missing.push((i as u64, BlockHash::ZERO));
            }
        }
        if !missing.is_empty() {
            tracing::warn!(
                disk = %disk.id,
                blocks = missing.len(),
                "blocks missing from the store; asking the agent to send them again"
            );
            disk.record(&missing)?;
            disk.sync()?;
            if let Some(f) = fleet {
                f.journal(server, &vec![(disk.id.clone(), missing.clone())])?;
            }
        }
        Ok(missing.len())
    }

    fn commit(
        &mut self,
        point: u64,
        created_unix_ms: u64,
        consistency: Consistency,
        why: String,
        disks: &[(u32, BlockHash)],
    ) -> Result<(), Fail> {
        if disks.is_empty() {
            return Err(protocol(format!("point {point}: Commit names no disk")));
        }
        // A block quarantined since the disks were checked must not be named by this point:
        // mark it absent (the digests then differ, and the agent resends it first). The
        // fence keeps any quarantine out until the point is written.
        let shared = self.shared.clone();
        let _fence = shared.store.quarantine_fence()?;
        let mark = self.shared.store.quarantine_mark();
        if mark != self.quarantine_seen {
            self.quarantine_seen = mark;
            for d in self.disks.values_mut() {
                Self::forget_missing(
                    self.shared.store.as_ref(),
                    self.shared.fleet.as_deref(),
                    &self.server,
                    d,
                )?;
            }
        }
        for (handle, digest) in disks {
            let d = self.disks.get(handle).ok_or_else(|| {
                protocol(format!(
                    "point {point}: disk handle {handle} was never opened"
                ))
            })?;
            let live = d.manifest.digest();
            if live != *digest {
                self.shared
                    .metrics
                    .commit_refused(&self.server, "digest_mismatch");
                // Not fatal: the agent re-reads our manifest and rescans.
                self.outbox.push(Message::Error {
                    code: ErrorCode::DigestMismatch,
                    retryable: true,
                    message: format!(
                        "point {point}: disk {}: agent's manifest digest {digest} differs from the receiver's {live}",
                        d.id
                    ),
                });
                return Ok(());
            }
        }
        let catalog = &self.shared.catalog;
        if self.last_point.is_none() {
            // Once per session: the newest point and its manifests (for changed-block counts).
            // Only the disks open now: their memory is reserved, a disk no longer sent is not.
            let existing = catalog.points(&self.server)?;
            if let Some(last) = existing.last() {
                for r in &last.disks {
                    if !self.disks.values().any(|d| d.id == r.id) {
                        continue;
                    }
                    if let Ok(m) = catalog.manifest(last, &r.id) {
                        self.previous.insert(r.id.clone(), m);
                    }
                }
            }
            self.last_point = Some(existing.last().map(|p| p.point).unwrap_or(0));
        }
        let last = self.last_point.unwrap_or(0);
        if point <= last {
            // A retry of a commit whose answer was lost is answered again; anything else is
            // out of order. (Rare: read the catalog.)
            let existing = catalog.points(&self.server)?;
            let same = existing.iter().find(|p| p.point == point).is_some_and(|p| {
                disks.iter().all(|(h, dg)| {
                    let id = self.disks.get(h).map(|d| d.id.as_str()).unwrap_or("");
                    p.disks
                        .iter()
                        .any(|r| r.id == id && r.digest == dg.to_hex())
                })
            });
            if same {
                self.outbox.push(Message::Committed { point });
                return Ok(());
            }
            return Err(protocol(format!(
                "point {point} is not after the last committed point {last} of server {}",
                self.server
            )));
        }
        // Every block the point names must be in the store (journaled blocks always are;
        // this guards against anything removed behind our back).
        let mut manifests = Vec::new();
        let mut records = Vec::new();
        for (handle, digest) in disks {
            let d = &self.disks[handle];
            let prev = self.previous.get(&d.id);
            let mut changed = 0u64;
            for (i, h) in d.manifest.hashes.iter().enumerate() {
                let before = prev
                    .and_then(|p| p.hashes.get(i))
                    .copied()
                    .unwrap_or(BlockHash::ZERO);
                if *h != before {
                    changed += 1;
                    if !self.shared.store.holds(h)? {
                        return Err(Fail {
                            code: ErrorCode::Storage,
                            retryable: true,
                            message: format!(
                                "point {point}: disk {} block {i} ({h}) is not in the store",
                                d.id
                            ),
                        });
                    }
                }
            }
            records.push(DiskRecord {
                id: d.id.clone(),
                size: d.manifest.disk_size,
                digest: digest.to_hex(),
                data_blocks: d.manifest.data_blocks() as u64,
                changed_blocks: changed,
            });
            manifests.push((d.id.clone(), d.manifest.clone()));
        }
        let committed_unix_ms = now_ms();
        let rec = PointRecord {
            server: self.server.clone(),
            point,
            created_unix_ms,
            committed_unix_ms,
            agent_clock_skew_ms: self.status.clock_skew_ms,
            damaged: None,
            locked_until_unix_ms: self.shared.fleet.as_ref().and_then(|f| {
                let recent = self
                    .shared
                    .retention
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .recent_minutes;
                f.point_lock_until(committed_unix_ms, recent.saturating_mul(60_000))
            }),
            consistency,
            consistency_why: why,
            target: self.shared.target.name().to_string(),
            disks: records,
        };
        // In a fleet the bucket's copy first: it is the one every receiver lists.
        if let Some(f) = &self.shared.fleet {
            f.write_point(&rec, &manifests)?;
        }
        self.shared.target.write_point(&rec, &manifests)?;
        for (handle, _) in disks {
            if let Some(d) = self.disks.get_mut(handle) {
                d.compact()?;
            }
        }
        if let Some(f) = &self.shared.fleet {
            let ids: Vec<String> = manifests.iter().map(|(id, _)| id.clone()).collect();
            f.compacted(&self.server, point, &ids);
        }
        for (id, m) in manifests {
            self.previous.insert(id, m);
        }
        self.last_point = Some(point);
        self.status.last_point = Some(point);
        self.status.last_point_created_unix_ms = Some(created_unix_ms);
        self.status.last_point_committed_unix_ms = Some(rec.committed_unix_ms);
        self.save_status();
        self.shared.metrics.committed(&self.server);
        tracing::info!(point, consistency = ?consistency, why = %rec.consistency_why, "point committed");
        self.outbox.push(Message::Committed { point });
        Ok(())
    }
}

/// A session of server "fuzz" on a fresh state directory (removed when the guard drops),
/// with a 64 MiB manifest budget: for the fuzz target and the tests.
#[cfg(any(test, feature = "fuzzing"))]
fn scratch_session() -> Option<(tempfile::TempDir, Session)> {
    let dir = tempfile::tempdir().ok()?;
    std::fs::write(dir.path().join(crate::auth::TOKENS), "").ok()?;
    let store = crate::store::DirStore::open(&dir.path().join("store")).ok()?;
    let tokens = crate::auth::Tokens::load(dir.path()).ok()?;
    let config = lifeboat_common::config::ReceiverConfig {
        max_manifest_memory_mib: 64,
        ..Default::default()
    };
    let shared = Arc::new(super::Shared::new(
        dir.path(),
        Arc::new(store),
        tokens,
        config,
    ));
    let session = Session::new(
        shared,
        "fuzz".into(),
        "fuzz".into(),
        "127.0.0.1:1".into(),
        ("0123456789abcdef".into(), "fuzz".into()),
        Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
    );
    Some((dir, session))
}

/// Drives one session as an authenticated agent would, with the frames encoded in `data`
/// (a fuzz target's input): a fresh state directory, a disk `root` of 8 blocks opened first
/// (so arbitrary input meets an open disk), then the frames, up to 4 per batch, until the
/// bytes stop decoding or the session fails, as `run` would end it. Panics only on a bug.
/// The manifest budget is 64 MiB, so an allocation past it would show (cargo-fuzz runs it
/// with a malloc limit).
#[cfg(any(test, feature = "fuzzing"))]
pub fn drive_session(data: &[u8]) {
    use lifeboat_common::protocol::decode_frame;
    let Some((_dir, mut session)) = scratch_session() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let open = Message::OpenDisk {
        handle: 0,
        disk_id: "root".into(),
        size: 8 * lifeboat_common::BLOCK_SIZE as u64,
    };
    let mut batch = vec![open];
    let mut rest = data;
    loop {
        let next = decode_frame(rest);
        let end = !matches!(next, Ok(Some(_)));
        if let Ok(Some((m, used))) = next {
            batch.push(m);
            rest = &rest[used..];
        }
        if batch.len() >= 4 || (end && !batch.is_empty()) {
            let r = session.process(std::mem::take(&mut batch), &tx);
            while rx.try_recv().is_ok() {}
            if r.is_err() {
                return;
            }
        }
        if end {
            return;
        }
    }
}

/// A batch message with its CPU work done (see [`Session::prepare`]).
enum Prepared {
    Block {
        seq: u64,
        handle: u32,
        index: u64,
        wire_bytes: u64,
        checked: Result<VerifiedBlock, StoreError>,
    },
    Patch {
        seq: u64,
        handle: u32,
        index: u64,
        wire_bytes: u64,
        rebuilt: Result<Rebuilt, PatchError>,
    },
    Other(Message),
}

enum Rebuilt {
    /// The store lacks the base: the agent is asked for the whole block.
    NoBase,
    /// The result's name, and its encoded content unless the store already holds it.
    Named {
        hash: BlockHash,
        block: Option<VerifiedBlock>,
    },
}

enum PatchError {
    /// The patch itself is wrong (named with its disk and block by the caller).
    Bad(String),
    Fail(Fail),
}

/// Applies a Patch to its verified base and names the result.
#[allow(clippy::too_many_arguments)]
fn rebuild(
    store: &dyn BlockStore,
    batch: &[&VerifiedBlock],
    disk_size: u64,
    index: u64,
    base: &BlockHash,
    pages: &[(u32, u32)],
    codec: codec::Codec,
    data: &[u8],
) -> Result<Rebuilt, PatchError> {
    let want = lifeboat_common::protocol::delta_len(pages).map_err(PatchError::Bad)?;
    if lifeboat_common::block::block_len(index, disk_size) != lifeboat_common::BLOCK_SIZE {
        // Pages past the end of the disk would become part of the named content.
        return Err(PatchError::Bad(format!(
            "block {index} is not a whole block of this disk"
        )));
    }
    let bytes = codec::decode(codec, data).map_err(|e| PatchError::Bad(e.to_string()))?;
    if bytes.len() != want {
        return Err(PatchError::Bad(format!(
            "{} bytes for {want} bytes of pages",
            bytes.len()
        )));
    }
    let Some(mut block) = delta_base(store, batch, base).map_err(PatchError::Fail)? else {
        return Ok(Rebuilt::NoBase);
    };
    lifeboat_common::protocol::apply_delta(&mut block, pages, &bytes);
    // Named here, from the verified base and the pages the agent read.
    let hash = hash_block(&block);
    let held = hash.is_zero()
        || batch.iter().any(|v| v.hash == hash)
        || store.has(&hash).map_err(|e| PatchError::Fail(e.into()))?;
    let block = if held {
        None
    } else {
        let (codec, data) = codec::encode_sampled(&block, 1)
            .map_err(|e| PatchError::Bad(format!("compressing the result: {e}")))?;
        Some(VerifiedBlock { hash, codec, data })
    };
    Ok(Rebuilt::Named { hash, block })
}

/// The plain content a `Patch` applies to: zeros, a block of this batch, or a stored block
/// (read and verified); `None` when the store lacks it.
fn delta_base(
    store: &dyn BlockStore,
    batch: &[&VerifiedBlock],
    base: &BlockHash,
) -> Result<Option<Vec<u8>>, Fail> {
    if base.is_zero() {
        return Ok(Some(vec![0u8; lifeboat_common::BLOCK_SIZE]));
    }
    if let Some(v) = batch.iter().find(|v| v.hash == *base) {
        let mut plain = codec::decode(v.codec, &v.data).map_err(|e| Fail {
            code: ErrorCode::Internal,
            retryable: true,
            message: format!("decoding block {base} of this batch: {e}"),
        })?;
        plain.resize(lifeboat_common::BLOCK_SIZE, 0);
        return Ok(Some(plain));
    }
    if !store.has(base)? {
        return Ok(None);
    }
    match store.read(base) {
        Ok(mut plain) => {
            plain.resize(lifeboat_common::BLOCK_SIZE, 0);
            Ok(Some(plain))
        }
        // Gone or damaged since `has`: the agent sends the whole block.
        Err(e) if !e.retryable() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::codec::Codec;
    use lifeboat_common::protocol::DiskProgress;
    use lifeboat_common::BLOCK_SIZE;
    use proptest::prelude::*;

    /// What an authenticated agent may send, hostile or not: handles and indexes in and out
    /// of range, sizes up to absurd, blocks that match their hash or not, commits with
    /// digests right or wrong.
    fn arb_step() -> impl Strategy<Value = Message> {
        let handle = 0u32..4;
        let index = prop_oneof![0u64..12, Just(u64::MAX), any::<u64>()];
        let content = prop_oneof![Just(0u8), 1u8..4];
        prop_oneof![
            (
                handle.clone(),
                prop_oneof![Just("root"), Just("data"), Just("../x"), Just("")],
                prop_oneof![
                    Just(0u64),
                    Just(8 * BLOCK_SIZE as u64),
                    Just(8 * BLOCK_SIZE as u64 + 7),
                    Just(u64::MAX),
                    any::<u64>()
                ]
            )
                .prop_map(|(handle, id, size)| Message::OpenDisk {
                    handle,
                    disk_id: id.into(),
                    size
                }),
            (
                any::<u64>(),
                handle.clone(),
                index.clone(),
                content.clone(),
                any::<bool>()
            )
                .prop_map(|(seq, handle, index, c, honest)| {
                    let data = vec![c; 4096];
                    let hash = if honest {
                        lifeboat_common::block::hash_block(&data)
                    } else {
                        BlockHash([c.wrapping_add(9); 32])
                    };
                    Message::Block {
                        seq,
                        handle,
                        index,
                        hash,
                        codec: Codec::Raw,
                        data,
                    }
                }),
            (any::<u64>(), handle.clone(), index, any::<[u8; 32]>()).prop_map(
                |(seq, handle, index, h)| Message::Ref {
                    seq,
                    handle,
                    index,
                    hash: BlockHash(h)
                }
            ),
            (
                0u64..5,
                proptest::collection::vec((handle.clone(), any::<[u8; 32]>()), 0..3)
            )
                .prop_map(|(point, disks)| Message::Commit {
                    point,
                    created_unix_ms: 1,
                    consistency: lifeboat_common::protocol::Consistency::BestEffort,
                    why: String::new(),
                    disks: disks.into_iter().map(|(h, d)| (h, BlockHash(d))).collect(),
                }),
            handle
                .clone()
                .prop_map(|handle| Message::GetManifest { handle }),
            (any::<u64>(), handle).prop_map(|(t, handle)| Message::Progress {
                agent_unix_ms: t,
                disks: vec![DiskProgress {
                    handle,
                    state: lifeboat_common::protocol::DiskState::Continuous,
                    backlog_blocks: u64::MAX,
                }],
            }),
            Just(Message::NeedData { seq: 1 }),
            (
                any::<u64>(),
                0u32..2,
                0u64..12,
                prop_oneof![Just(0u8), Just(1u8), Just(7u8)],
                proptest::collection::vec((0u32..130, 0u32..3), 0..4),
            )
                .prop_map(|(seq, handle, index, b, pages)| {
                    // Base: zeros, the block the start stored, or one never stored.
                    let base = match b {
                        0 => BlockHash::ZERO,
                        1 => lifeboat_common::block::hash_block(&[1u8; 4096]),
                        _ => BlockHash([7; 32]),
                    };
                    let len = lifeboat_common::protocol::delta_len(&pages).unwrap_or(4096);
                    Message::Patch {
                        seq,
                        handle,
                        index,
                        base,
                        pages,
                        codec: Codec::Raw,
                        data: vec![5u8; len],
                    }
                }),
        ]
    }

    /// A patch over a stored block, over zeros, over a block of the same batch: named here and
    /// stored; one whose base is missing gets NeedData; malformed runs are refused.
    #[test]
    fn patches_apply_over_their_base_and_are_named_here() {
        let (_dir, mut session) = scratch_session().unwrap();
        let (tx, mut rx) = mpsc::channel(1000);
        let mut base = vec![1u8; BLOCK_SIZE];
        base[..10].copy_from_slice(b"the base..");
        let base_hash = lifeboat_common::block::hash_block(&base);
        let over = |b: &[u8], pages: &[(u32, u32)], byte: u8| {
            let len = lifeboat_common::protocol::delta_len(pages).unwrap();
            let mut out = b.to_vec();
            lifeboat_common::protocol::apply_delta(&mut out, pages, &vec![byte; len]);
            (
                lifeboat_common::block::hash_block(&out),
                vec![byte; len],
                out,
            )
        };
        let (h1, d1, b1) = over(&base, &[(2, 1), (10, 3)], 9);
        let (h2, d2, _) = over(&vec![0u8; BLOCK_SIZE], &[(0, 1)], 4);
        let (h3, d3, _) = over(&base, &[(127, 1)], 6);
        let patch = |seq, index, base, pages: Vec<(u32, u32)>, data| Message::Patch {
            seq,
            handle: 0,
            index,
            base,
            pages,
            codec: Codec::Raw,
            data,
        };
        let batch = vec![
            Message::OpenDisk {
                handle: 0,
                disk_id: "root".into(),
                size: 8 * BLOCK_SIZE as u64,
            },
            Message::Block {
                seq: 1,
                handle: 0,
                index: 0,
                hash: base_hash,
                codec: Codec::Raw,
                data: base.clone(),
            },
            // Over a block of this very batch, and over zeros.
            patch(2, 1, base_hash, vec![(2, 1), (10, 3)], d1.clone()),
            patch(3, 2, BlockHash::ZERO, vec![(0, 1)], d2),
            // A base never stored.
            patch(4, 3, BlockHash([8; 32]), vec![(127, 1)], d3.clone()),
        ];
        session.process(batch, &tx).unwrap();
        let (mut acked, mut named, mut need) = (Vec::new(), Vec::new(), Vec::new());
        while let Ok(m) = rx.try_recv() {
            match m {
                Message::Acks { seqs } => acked.extend(seqs),
                Message::Named { named: n } => named.extend(n),
                Message::NeedData { seq } => need.push(seq),
                _ => {}
            }
        }
        named.sort();
        assert_eq!(acked, vec![1]);
        assert_eq!(named, vec![(2, h1), (3, h2)]);
        assert_eq!(need, vec![4]);
        let store = &session.shared.store;
        let mut got = store.read(&h1).unwrap();
        got.resize(BLOCK_SIZE, 0);
        assert!(
            got == b1,
            "the stored block is not the base with the pages written"
        );
        assert_eq!(
            session.disks[&0].manifest.hashes[1], h1,
            "the live manifest names it"
        );
        assert_eq!(session.status.counters.deltas_applied, 2);
        assert_eq!(session.status.counters.deltas_refused, 1);
        // Later, over the stored block (read back from the store).
        session
            .process(
                vec![patch(6, 5, base_hash, vec![(127, 1)], d3.clone())],
                &tx,
            )
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(Message::Named { named }) if named == vec![(6, h3)]));
        // Runs out of order, past the block, or data of the wrong length: refused.
        for (pages, len) in [
            (vec![(5, 1), (2, 1)], 8192),
            (vec![(127, 2)], 8192),
            (vec![(1, 1)], 100),
        ] {
            let e = session
                .process(
                    vec![patch(7, 6, base_hash, pages.clone(), vec![0; len])],
                    &tx,
                )
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::BadBlock, "{pages:?}: {}", e.message);
        }
        // A disk's short last block: pages past its end would be named with it.
        let (_dir, mut session) = scratch_session().unwrap();
        let open = Message::OpenDisk {
            handle: 0,
            disk_id: "short".into(),
            size: BLOCK_SIZE as u64 + 4096,
        };
        let e = session
            .process(
                vec![
                    open,
                    patch(1, 1, BlockHash::ZERO, vec![(0, 1)], vec![1; 4096]),
                ],
                &tx,
            )
            .unwrap_err();
        assert!(e.message.contains("not a whole block"), "{}", e.message);
    }

    /// The frame seeds of the fuzz corpus (every message type, one after another) through
    /// the session driver the cargo-fuzz target uses.
    #[test]
    fn the_fuzz_driver_takes_the_seed_stream() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../common/fuzz/regressions/decode_frame/seed-stream-of-all");
        drive_session(&std::fs::read(seeds).unwrap());
        drive_session(&[]);
        drive_session(&[0xff; 64]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any sequence of messages from an authenticated agent: the session never panics,
        /// and every failure is an error it sends, not a crash. Absurd sizes (up to 2^64
        /// bytes) are refused before anything is allocated: were one allocated, the test
        /// process would abort. (Peak memory is not measured here.)
        #[test]
        fn arbitrary_sessions_never_panic(
            batches in proptest::collection::vec(proptest::collection::vec(arb_step(), 1..6), 1..6)
        ) {
            let (_dir, mut session) = scratch_session().unwrap();
            let (tx, mut rx) = mpsc::channel(100_000);
            // A well-behaved start, so the arbitrary part meets an open disk with content.
            let data = vec![1u8; 4096];
            let start = vec![
                Message::OpenDisk { handle: 0, disk_id: "root".into(), size: 8 * BLOCK_SIZE as u64 },
                Message::Block {
                    seq: 0,
                    handle: 0,
                    index: 1,
                    hash: lifeboat_common::block::hash_block(&data),
                    codec: Codec::Raw,
                    data,
                },
            ];
            prop_assert!(session.process(start, &tx).is_ok());
            let mut replies = 0;
            while rx.try_recv().is_ok() {
                replies += 1;
            }
            prop_assert_eq!(replies, 2, "DiskOpened and Acks");
            for batch in batches {
                let r = session.process(batch, &tx);
                while rx.try_recv().is_ok() {}
                if r.is_err() {
                    break; // the session ends here, as `run` would end it
                }
            }
        }
    }
}
