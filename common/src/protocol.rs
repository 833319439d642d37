//! Wire protocol v2, sans-IO: encode into and decode from byte buffers; no sockets here.
//!
//! A connection starts with a 12-byte preface each way (`"LIFEBOAT"`, version u16, flags u16),
//! then carries frames: `len u32 LE | type u8 | payload`, where `len` counts the type byte and
//! the payload and never exceeds [`MAX_FRAME`]. An oversized length is refused as soon as the
//! four length bytes arrive, before any payload is buffered. Every decode failure is a
//! [`DecodeError`] value that names what was wrong. Full description: docs/protocol.md.
//!
//! Every message is declared once, in the `messages!` table below: type byte, name, fields in
//! wire order and each field's codec (capped lists, a bitmap, block data). The enum, the
//! encoder and the decoder are generated from it.

use crate::block::{BlockHash, BLOCK_SIZE};
use crate::codec::Codec;

pub const PREFACE_MAGIC: &[u8; 8] = b"LIFEBOAT";
/// Version 2: `Hello` carries the agent's instance and host name, `Progress` its clock.
pub const PROTOCOL_VERSION: u16 = 4;
pub const PREFACE_LEN: usize = 12;
/// Hard cap on `len` (type byte + payload): one compressed block plus headroom.
pub const MAX_FRAME: usize = BLOCK_SIZE + 64 * 1024;
/// Cap on a frame before the peer has authenticated: a `Hello` is three short strings.
pub const MAX_PREAUTH_FRAME: usize = 16 * 1024;
/// Most hashes in one `Have` or `ManifestChunk`.
pub const MAX_HASHES: usize = 16 * 1024;
/// Most entries in one `Acks`.
pub const MAX_ACKS: usize = 64 * 1024;
const MAX_STRING: usize = 4096;
/// Most disks one `Commit` or `Progress` names.
pub const MAX_DISKS: usize = 256;

/// The state of a replicating disk, named as DRS users know them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum DiskState {
    InitialSync = 0,
    Continuous = 1,
    Rescan = 2,
    Backlog = 3,
    Stalled = 4,
    Disconnected = 5,
    Paused = 6,
}

impl DiskState {
    /// Every state, in wire order.
    pub const ALL: [DiskState; 7] = [
        DiskState::InitialSync,
        DiskState::Continuous,
        DiskState::Rescan,
        DiskState::Backlog,
        DiskState::Stalled,
        DiskState::Disconnected,
        DiskState::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::InitialSync => "initial_sync",
            DiskState::Continuous => "continuous",
            DiskState::Rescan => "rescan",
            DiskState::Backlog => "backlog",
            DiskState::Stalled => "stalled",
            DiskState::Disconnected => "disconnected",
            DiskState::Paused => "paused",
        }
    }

    fn from_u8(v: u8) -> Option<DiskState> {
        Some(match v {
            0 => DiskState::InitialSync,
            1 => DiskState::Continuous,
            2 => DiskState::Rescan,
            3 => DiskState::Backlog,
            4 => DiskState::Stalled,
            5 => DiskState::Disconnected,
            6 => DiskState::Paused,
            _ => return None,
        })
    }
}

/// Whether a point was cut under a filesystem freeze.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Consistency {
    /// Read while the disk was live: each block is intact, the set is not one instant.
    BestEffort = 0,
    /// The final delta was read under a freeze: crash-consistent across all disks.
    CrashConsistent = 1,
}

/// Why a peer refused something; `retryable` on the error says whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    Auth = 1,
    Protocol = 2,
    Version = 3,
    BadBlock = 4,
    Storage = 5,
    DigestMismatch = 6,
    Internal = 7,
    /// The receiver is at a limit (connections, the server's slot): try again later.
    Busy = 8,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::Auth,
            2 => ErrorCode::Protocol,
            3 => ErrorCode::Version,
            4 => ErrorCode::BadBlock,
            5 => ErrorCode::Storage,
            6 => ErrorCode::DigestMismatch,
            7 => ErrorCode::Internal,
            8 => ErrorCode::Busy,
            _ => return None,
        })
    }
}

/// Progress of one disk, reported by the agent for the receiver's `servers` listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskProgress {
    pub handle: u32,
    pub state: DiskState,
    /// Blocks known dirty and not yet acknowledged.
    pub backlog_blocks: u64,
}

/// Declares every message once: its type byte, its name, its fields in wire order and how
/// each is encoded (`=> Codec`; plain [`Wire`] values by default). From the table come the
/// [`Message`] enum, `name`, the type byte, the encoder and the decoder: a new message is one
/// entry here (and its cases in the proptest strategy and the fuzz seeds).
macro_rules! messages {
    ($(
        $(#[$doc:meta])*
        $ty:literal $name:ident { $( $field:ident : $fty:ty $(=> $codec:ty)? ),* $(,)? }
    )*) => {
        /// Every message of protocol v2. Direction: A = agent → receiver, R = receiver → agent.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $( $(#[$doc])* $name { $( $field: $fty ),* }, )*
        }

        impl Message {
            /// The message's name, for logs and errors.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Message::$name { .. } => stringify!($name), )*
                }
            }

            fn type_byte(&self) -> u8 {
                match self {
                    $( Message::$name { .. } => $ty, )*
                }
            }

            fn encode_body(&self, w: &mut Writer<'_>) {
                match self {
                    $( Message::$name { $( $field ),* } => {
                        $( <field_codec!($($codec)?) as FieldCodec<$fty>>::put($field, w); )*
                    } )*
                }
            }
        }

        /// A message type's name, for decode errors ("unknown" for none).
        fn type_name(t: u8) -> &'static str {
            match t {
                $( $ty => stringify!($name), )*
                _ => "unknown",
            }
        }

        fn decode_fields(t: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
            Ok(match t {
                $( $ty => Message::$name {
                    $( $field: <field_codec!($($codec)?) as FieldCodec<$fty>>::get(
                        r,
                        stringify!($field),
                    )?, )*
                }, )*
                other => return Err(DecodeError::UnknownType(other)),
            })
        }
    };
}

/// The codec of a field: the one named, or [`Plain`].
macro_rules! field_codec {
    () => {
        Plain
    };
    ($c:ty) => {
        $c
    };
}

/// A value with one wire form.
trait Wire: Sized {
    fn put(&self, w: &mut Writer<'_>);
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

impl Wire for u32 {
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u32()
    }
}

impl Wire for u64 {
    fn put(&self, w: &mut Writer<'_>) {
        w.u64(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u64()
    }
}

impl Wire for bool {
    fn put(&self, w: &mut Writer<'_>) {
        w.0.push(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.bool()
    }
}

impl Wire for String {
    fn put(&self, w: &mut Writer<'_>) {
        w.str(self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.str()
    }
}

impl Wire for BlockHash {
    fn put(&self, w: &mut Writer<'_>) {
        w.hash(self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.hash()
    }
}

impl Wire for Codec {
    fn put(&self, w: &mut Writer<'_>) {
        w.0.push(*self as u8);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let c = r.u8()?;
        Codec::from_u8(c).ok_or_else(|| r.invalid(format!("unknown codec {c}")))
    }
}

impl Wire for Consistency {
    fn put(&self, w: &mut Writer<'_>) {
        w.0.push(*self as u8);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(Consistency::BestEffort),
            1 => Ok(Consistency::CrashConsistent),
            v => Err(r.invalid(format!("unknown consistency {v}"))),
        }
    }
}

impl Wire for ErrorCode {
    fn put(&self, w: &mut Writer<'_>) {
        w.u16(*self as u16);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let c = r.u16()?;
        ErrorCode::from_u16(c).ok_or_else(|| r.invalid(format!("unknown error code {c}")))
    }
}

impl Wire for DiskProgress {
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(self.handle);
        w.0.push(self.state as u8);
        w.u64(self.backlog_blocks);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let handle = r.u32()?;
        let s = r.u8()?;
        let state =
            DiskState::from_u8(s).ok_or_else(|| r.invalid(format!("unknown disk state {s}")))?;
        Ok(DiskProgress {
            handle,
            state,
            backlog_blocks: r.u64()?,
        })
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn put(&self, w: &mut Writer<'_>) {
        self.0.put(w);
        self.1.put(w);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok((A::get(r)?, B::get(r)?))
    }
}

/// How one field of type `T` is written and read; `what` names the field in errors.
trait FieldCodec<T> {
    fn put(v: &T, w: &mut Writer<'_>);
    fn get(r: &mut Reader<'_>, what: &'static str) -> Result<T, DecodeError>;
}

/// A [`Wire`] value as it is.
struct Plain;

impl<T: Wire> FieldCodec<T> for Plain {
    fn put(v: &T, w: &mut Writer<'_>) {
        v.put(w);
    }
    fn get(r: &mut Reader<'_>, _what: &'static str) -> Result<T, DecodeError> {
        T::get(r)
    }
}

/// A list: `u32` count, at most `CAP` (refused before anything is allocated), then the items.
struct List<const CAP: usize>;

impl<T: Wire, const CAP: usize> FieldCodec<Vec<T>> for List<CAP> {
    fn put(v: &Vec<T>, w: &mut Writer<'_>) {
        w.u32(v.len() as u32);
        for x in v {
            x.put(w);
        }
    }
    fn get(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<T>, DecodeError> {
        let n = r.count(CAP, what)?;
        (0..n).map(|_| T::get(r)).collect()
    }
}

/// Booleans as a bitmap: `u32` count (at most `CAP`), then ⌈count/8⌉ bytes, least
/// significant bit first, padding bits zero.
struct Bitmap<const CAP: usize>;

impl<const CAP: usize> FieldCodec<Vec<bool>> for Bitmap<CAP> {
    fn put(v: &Vec<bool>, w: &mut Writer<'_>) {
        w.u32(v.len() as u32);
        let mut bits = vec![0u8; v.len().div_ceil(8)];
        for (i, p) in v.iter().enumerate() {
            if *p {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        w.0.extend_from_slice(&bits);
    }
    fn get(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<bool>, DecodeError> {
        let n = r.count(CAP, what)?;
        let bits = r.take(n.div_ceil(8))?;
        if n % 8 != 0 && bits[n / 8] >> (n % 8) != 0 {
            return Err(r.invalid("bitmap padding bits are not zero"));
        }
        Ok((0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect())
    }
}

/// Bytes: `u16` length, at most `CAP`.
struct Bytes<const CAP: usize>;

impl<const CAP: usize> FieldCodec<Vec<u8>> for Bytes<CAP> {
    fn put(v: &Vec<u8>, w: &mut Writer<'_>) {
        w.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        w.0.extend_from_slice(v);
    }
    fn get(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let b = r.take(2)?;
        let n = u16::from_le_bytes([b[0], b[1]]) as usize;
        if n > CAP {
            return Err(r.invalid(format!("{what} of {n} bytes is longer than {CAP}")));
        }
        Ok(r.take(n)?.to_vec())
    }
}

/// A block's encoded bytes: `u32` length, at most one block plus zstd's worst-case growth.
struct BlockData;

impl FieldCodec<Vec<u8>> for BlockData {
    fn put(v: &Vec<u8>, w: &mut Writer<'_>) {
        w.u32(v.len() as u32);
        w.0.extend_from_slice(v);
    }
    fn get(r: &mut Reader<'_>, _what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let n = r.u32()? as usize;
        if n > BLOCK_SIZE + BLOCK_SIZE / 64 {
            return Err(r.invalid(format!("block data of {n} bytes is too large")));
        }
        Ok(r.take(n)?.to_vec())
    }
}

messages! {
    /// A: who the agent is and its token. First frame after the preface. `instance` names
    /// the machine and agent installation (stable across restarts, different on a clone with
    /// its own state); `hostname` is for people.
    1 Hello {
        server_id: String,
        token: String,
        agent_version: String,
        instance: String,
        hostname: String,
    }
    /// R: the token is accepted; `last_point` is the server's newest committed point (0: none).
    2 Welcome {
        receiver_version: String,
        last_point: u64,
    }
    /// A: describe a disk under a connection-local handle.
    3 OpenDisk {
        handle: u32,
        disk_id: String,
        size: u64,
    }
    /// R: the receiver's durable view of the disk (digest of its live manifest).
    4 DiskOpened { handle: u32, digest: BlockHash }
    /// A: send me your live manifest of this disk.
    5 GetManifest { handle: u32 }
    /// R: part of a live manifest, `start` is the first block index of `hashes`.
    6 ManifestChunk {
        handle: u32,
        start: u64,
        total: u64,
        hashes: Vec<BlockHash> => List<MAX_HASHES>,
    }
    /// A: which of these hashes do you lack? (dedupe query)
    7 Have { req: u64, hashes: Vec<BlockHash> => List<MAX_HASHES> }
    /// R: `present[i]` answers `hashes[i]` of request `req`.
    8 HaveReply { req: u64, present: Vec<bool> => Bitmap<MAX_HASHES> }
    /// A: block `index` of a disk now holds this content.
    9 Block {
        seq: u64,
        handle: u32,
        index: u64,
        hash: BlockHash,
        codec: Codec,
        data: Vec<u8> => BlockData,
    }
    /// A: block `index` now holds content the receiver already has (or zeros, with ZERO).
    10 Ref {
        seq: u64,
        handle: u32,
        index: u64,
        hash: BlockHash,
    }
    /// R: these Block/Ref sequence numbers are durable.
    11 Acks { seqs: Vec<u64> => List<MAX_ACKS> }
    /// R: the Ref `seq` named content the receiver no longer has; send the data.
    12 NeedData { seq: u64 }
    /// A: cut point `point` over these disks, whose manifests have these digests; `why`
    /// says how the point was cut (the reason it is only best-effort, or the freeze).
    13 Commit {
        point: u64,
        created_unix_ms: u64,
        consistency: Consistency,
        why: String,
        disks: Vec<(u32, BlockHash)> => List<MAX_DISKS>,
    }
    /// R: point `point` is durable and listed.
    14 Committed { point: u64 }
    /// A: replication progress, for the receiver's listing; `agent_unix_ms` is the agent's
    /// clock when it was sent (the receiver measures the skew, never trusts it).
    15 Progress {
        agent_unix_ms: u64,
        disks: Vec<DiskProgress> => List<MAX_DISKS>,
    }
    /// Either way: a refusal with a reason.
    16 Error {
        code: ErrorCode,
        retryable: bool,
        message: String,
    }
    /// A: block `index` now holds the content `base` (what the receiver acknowledged for it)
    /// with the 4 KiB pages of `pages` (runs of (first page, count), ascending, within the
    /// block) replaced by `data` (their bytes in order, encoded with `codec`). The agent read
    /// only those pages; the receiver names the result and answers `Named` once it is durable,
    /// or `NeedData` when it lacks `base` (the agent then sends the whole block).
    17 Patch {
        seq: u64,
        handle: u32,
        index: u64,
        base: BlockHash,
        pages: Vec<(u32, u32)> => List<MAX_DELTA_RUNS>,
        codec: Codec,
        data: Vec<u8> => BlockData,
    }
    /// R: these Patch sequence numbers are durable, and the blocks they made are named so.
    18 Named { named: Vec<(u64, BlockHash)> => List<MAX_ACKS> }
    /// A, instead of `Hello`: ask for a client certificate for `public_key` (an uncompressed
    /// P-256 point, 65 bytes) with the one-time `code` from `lifeboat-receiver enroll`, or,
    /// with an empty code over a connection that presents this server's current certificate,
    /// renew it. The receiver answers `Enrolled` or `Error`, then closes.
    19 Enrol {
        server_id: String,
        code: String,
        public_key: Vec<u8> => Bytes<MAX_PUBLIC_KEY>,
        instance: String,
        hostname: String,
    }
    /// R: the certificate (DER) issued for the key of `Enrol`, valid until `not_after_unix_ms`.
    20 Enrolled {
        certificate: Vec<u8> => Bytes<MAX_CERTIFICATE>,
        not_after_unix_ms: u64,
    }
    /// R, instead of `Welcome`: another receiver of the fleet (`holder`) owns this server now;
    /// connect to `address` (host:port) instead. The receiver closes after it.
    21 Redirect { address: String, holder: String }
}

/// Largest public key an `Enrol` may carry.
pub const MAX_PUBLIC_KEY: usize = 512;
/// Largest certificate an `Enrolled` may carry.
pub const MAX_CERTIFICATE: usize = 8192;

/// A sub-block page of a [`Message::Patch`].
pub const PAGE_SIZE: usize = 4096;
/// Pages in a block.
pub const PAGES_PER_BLOCK: u32 = (BLOCK_SIZE / PAGE_SIZE) as u32;
/// Most runs in one `Delta` (every other page).
pub const MAX_DELTA_RUNS: usize = PAGES_PER_BLOCK as usize / 2;

/// Checks a `Patch`'s runs: ascending, not touching, inside the block. Returns the number of
/// bytes they cover.
pub fn delta_len(pages: &[(u32, u32)]) -> Result<usize, String> {
    let mut next = 0u32;
    let mut total = 0usize;
    for (i, &(first, count)) in pages.iter().enumerate() {
        if count == 0 || (i > 0 && first <= next) || first < next {
            return Err(format!(
                "page run {i} ({first}+{count}) is empty, out of order or touches the one before"
            ));
        }
        let end = first
            .checked_add(count)
            .filter(|e| *e <= PAGES_PER_BLOCK)
            .ok_or_else(|| format!("page run {i} ({first}+{count}) ends past the block"))?;
        next = end;
        total += count as usize * PAGE_SIZE;
    }
    Ok(total)
}

/// Writes `data` (the runs' pages, in order) over `block` (a whole block).
pub fn apply_delta(block: &mut [u8], pages: &[(u32, u32)], data: &[u8]) {
    let mut at = 0;
    for &(first, count) in pages {
        let (start, len) = (first as usize * PAGE_SIZE, count as usize * PAGE_SIZE);
        block[start..start + len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad preface: expected \"LIFEBOAT\", got {0:?}")]
    BadPreface(Vec<u8>),
    #[error("unsupported protocol version {0} (this build speaks version {PROTOCOL_VERSION}: upgrade the older of agent and receiver)")]
    Version(u16),
    #[error("frame of {len} bytes exceeds the {cap}-byte cap")]
    Oversized { len: usize, cap: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("{msg} frame truncated: needed {needed} more bytes")]
    Truncated { msg: &'static str, needed: usize },
    #[error("{msg} frame has {0} trailing bytes", msg = .1)]
    Trailing(usize, &'static str),
    #[error("{msg}: {what}")]
    Invalid { msg: &'static str, what: String },
}

/// The 12-byte preface for `version`.
pub fn preface(version: u16) -> [u8; PREFACE_LEN] {
    let mut p = [0u8; PREFACE_LEN];
    p[..8].copy_from_slice(PREFACE_MAGIC);
    p[8..10].copy_from_slice(&version.to_le_bytes());
    p
}

/// Checks a peer's preface; returns its version when this build speaks it.
pub fn check_preface(p: &[u8; PREFACE_LEN]) -> Result<u16, DecodeError> {
    if &p[..8] != PREFACE_MAGIC {
        return Err(DecodeError::BadPreface(p[..8].to_vec()));
    }
    let v = u16::from_le_bytes([p[8], p[9]]);
    if v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(v));
    }
    Ok(v)
}

/// If `buf` starts with a whole frame, decodes it and says how many bytes it used.
/// `Ok(None)`: more bytes are needed. An oversized length is an error at once.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    decode_frame_capped(buf, MAX_FRAME)
}

/// As [`decode_frame`], refusing any frame longer than `cap` (at most [`MAX_FRAME`]) from
/// its length alone: before authentication only a small frame is accepted.
pub fn decode_frame_capped(
    buf: &[u8],
    cap: usize,
) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let cap = cap.min(MAX_FRAME);
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > cap {
        return Err(DecodeError::Oversized { len, cap });
    }
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = decode_body(&buf[4..4 + len])?;
    Ok(Some((msg, 4 + len)))
}

impl Message {
    /// Appends this message as one frame to `out`.
    ///
    /// The caller keeps within the caps ([`MAX_HASHES`], [`MAX_ACKS`], one block of data);
    /// the peer's decoder refuses anything past them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        framed(out, self.type_byte(), |w| self.encode_body(w));
    }
}

/// Appends one frame: a length placeholder, the type byte, the body, then the real length.
fn framed(out: &mut Vec<u8>, type_byte: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.push(type_byte);
    body(&mut Writer(out));
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a `Block` frame whose data is borrowed (the sender keeps its copy for resends).
pub fn encode_block(
    out: &mut Vec<u8>,
    seq: u64,
    handle: u32,
    index: u64,
    hash: &BlockHash,
    codec: Codec,
    data: &[u8],
) {
    framed(out, 9, |w| {
        block_body(w, seq, handle, index, hash, codec, data)
    });
}

fn block_body(
    w: &mut Writer<'_>,
    seq: u64,
    handle: u32,
    index: u64,
    hash: &BlockHash,
    codec: Codec,
    data: &[u8],
) {
    w.u64(seq);
    w.u32(handle);
    w.u64(index);
    w.hash(hash);
    w.0.push(codec as u8);
    w.u32(data.len() as u32);
    w.0.extend_from_slice(data);
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn hash(&mut self, h: &BlockHash) {
        self.0.extend_from_slice(&h.0);
    }
    fn str(&mut self, s: &str) {
        // Strings longer than MAX_STRING are cut (at a char boundary) rather than sent.
        let mut end = s.len().min(MAX_STRING);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                msg: self.msg,
                needed: n - self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn hash(&mut self) -> Result<BlockHash, DecodeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(BlockHash(a))
    }
    fn invalid(&self, what: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            msg: self.msg,
            what: what.into(),
        }
    }
    fn count(&mut self, cap: usize, what: &str) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(self.invalid(format!("{n} {what} exceed the cap of {cap}")));
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_STRING {
            return Err(self.invalid(format!("string of {n} bytes exceeds {MAX_STRING}")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid("string is not UTF-8"))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(format!("boolean byte {v}"))),
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    let t = body[0];
    let msg = type_name(t);
    let mut r = Reader {
        buf: &body[1..],
        msg,
    };
    let m = decode_fields(t, &mut r)?;
    if let Message::Block { hash, .. } = &m {
        if hash.is_zero() {
            return Err(r.invalid("a Block frame cannot carry the zero hash"));
        }
    }
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len(), msg));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = BlockHash> {
        any::<[u8; 32]>().prop_map(BlockHash)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = "[a-z0-9-]{0,40}";
        prop_oneof![
            (s, s, s, s, s).prop_map(|(a, b, c, i, n)| Message::Hello {
                server_id: a,
                token: b,
                agent_version: c,
                instance: i,
                hostname: n,
            }),
            (s, s, proptest::collection::vec(any::<u8>(), 0..100), s, s).prop_map(
                |(a, c, k, i, n)| Message::Enrol {
                    server_id: a,
                    code: c,
                    public_key: k,
                    instance: i,
                    hostname: n,
                }
            ),
            (proptest::collection::vec(any::<u8>(), 0..600), any::<u64>()).prop_map(|(c, t)| {
                Message::Enrolled {
                    certificate: c,
                    not_after_unix_ms: t,
                }
            }),
            (s, s).prop_map(|(a, h)| Message::Redirect {
                address: a,
                holder: h
            }),
            (s, any::<u64>()).prop_map(|(v, p)| Message::Welcome {
                receiver_version: v,
                last_point: p
            }),
            (any::<u32>(), s, any::<u64>()).prop_map(|(h, d, z)| Message::OpenDisk {
                handle: h,
                disk_id: d,
                size: z
            }),
            (any::<u32>(), arb_hash()).prop_map(|(h, d)| Message::DiskOpened {
                handle: h,
                digest: d
            }),
            any::<u32>().prop_map(|h| Message::GetManifest { handle: h }),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(arb_hash(), 0..50)
            )
                .prop_map(|(h, s, t, hs)| Message::ManifestChunk {
                    handle: h,
                    start: s,
                    total: t,
                    hashes: hs
                }),
            (any::<u64>(), proptest::collection::vec(arb_hash(), 0..50))
                .prop_map(|(r, hs)| Message::Have { req: r, hashes: hs }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<bool>(), 0..100)
            )
                .prop_map(|(r, p)| Message::HaveReply { req: r, present: p }),
            (
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                arb_hash().prop_filter("non-zero", |h| !h.is_zero()),
                prop_oneof![Just(Codec::Raw), Just(Codec::Zstd)],
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(seq, handle, index, hash, codec, data)| Message::Block {
                    seq,
                    handle,
                    index,
                    hash,
                    codec,
                    data
                }),
            (any::<u64>(), any::<u32>(), any::<u64>(), arb_hash()).prop_map(
                |(seq, handle, index, hash)| Message::Ref {
                    seq,
                    handle,
                    index,
                    hash
                }
            ),
            proptest::collection::vec(any::<u64>(), 0..100).prop_map(|seqs| Message::Acks { seqs }),
            any::<u64>().prop_map(|seq| Message::NeedData { seq }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                ".{0,40}",
                proptest::collection::vec((any::<u32>(), arb_hash()), 0..8)
            )
                .prop_map(|(p, t, c, why, d)| Message::Commit {
                    point: p,
                    created_unix_ms: t,
                    consistency: if c {
                        Consistency::CrashConsistent
                    } else {
                        Consistency::BestEffort
                    },
                    why,
                    disks: d,
                }),
            (
                any::<u64>(),
                arb_hash(),
                proptest::collection::vec((0u32..128, 1u32..4), 0..8),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(seq, h, pages, data)| Message::Patch {
                    seq,
                    handle: 1,
                    index: 3,
                    base: h,
                    pages,
                    codec: Codec::Raw,
                    data,
                }),
            proptest::collection::vec((any::<u64>(), arb_hash()), 0..8)
                .prop_map(|named| Message::Named { named }),
            any::<u64>().prop_map(|p| Message::Committed { point: p }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), 0u8..7, any::<u64>()), 0..8)
            )
                .prop_map(|(t, v)| Message::Progress {
                    agent_unix_ms: t,
                    disks: v
                        .into_iter()
                        .map(|(h, s, b)| DiskProgress {
                            handle: h,
                            state: DiskState::from_u8(s).unwrap(),
                            backlog_blocks: b,
                        })
                        .collect(),
                }),
            (any::<bool>(), s).prop_map(|(r, m)| Message::Error {
                code: ErrorCode::Storage,
                retryable: r,
                message: m
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msgs in proptest::collection::vec(arb_message(), 1..6)) {
            let mut buf = Vec::new();
            for m in &msgs {
                m.encode(&mut buf);
            }
            let mut off = 0;
            for m in &msgs {
                // Every strict prefix of a frame asks for more bytes, never errors.
                let (decoded, used) = decode_frame(&buf[off..]).unwrap().unwrap();
                prop_assert_eq!(&decoded, m);
                for cut in 0..used.min(64) {
                    prop_assert_eq!(decode_frame(&buf[off..off + cut]).unwrap(), None);
                }
                off += used;
            }
            prop_assert_eq!(off, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }

        /// Valid frames with their bodies mutated (bytes flipped, the type changed, the body
        /// cut or extended with the length kept consistent): every body decoder is reached.
        /// No panic, and whatever decodes re-encodes to the very same bytes (canonical).
        #[test]
        fn mutated_valid_frames_never_panic(
            m in arb_message(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            new_type in proptest::option::of(1u8..=17),
            resize in proptest::option::of(-16i32..16),
        ) {
            let mut frame = Vec::new();
            m.encode(&mut frame);
            let mut body = frame[4..].to_vec();
            if let Some(t) = new_type {
                body[0] = t;
            }
            for (at, x) in flips {
                // Past the type byte (changed above, or not).
                let i = 1 + at % (body.len() - 1).max(1);
                if i < body.len() {
                    body[i] ^= x;
                }
            }
            if let Some(d) = resize {
                let len = (body.len() as i64 + d as i64).max(1) as usize;
                body.resize(len, 0xa5);
            }
            let mut out = (body.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(&body);
            if let Ok(Some((decoded, used))) = decode_frame(&out) {
                prop_assert_eq!(used, out.len());
                let mut again = Vec::new();
                decoded.encode(&mut again);
                prop_assert_eq!(again, out);
            }
        }
    }

    /// The mutation test above must reach the body decoders, not stop at the length.
    #[test]
    fn mutations_reach_the_body_decoders() {
        let mut errors = std::collections::HashSet::new();
        let mut frame = Vec::new();
        Message::Commit {
            point: 3,
            created_unix_ms: 4,
            consistency: Consistency::BestEffort,
            why: "test".into(),
            disks: vec![(0, BlockHash([9; 32]))],
        }
        .encode(&mut frame);
        for t in 1..=22u8 {
            for cut in 0..frame.len() - 5 {
                let mut body = frame[4..].to_vec();
                body[0] = t;
                body.truncate(body.len() - cut);
                let mut out = (body.len() as u32).to_le_bytes().to_vec();
                out.extend_from_slice(&body);
                if let Err(e) = decode_frame(&out) {
                    errors.insert(std::mem::discriminant(&e));
                }
            }
        }
        // Truncated, Trailing, Invalid and UnknownType all seen.
        assert!(errors.len() >= 4, "{errors:?}");
    }

    #[test]
    fn borrowed_block_encoding_matches() {
        let m = Message::Block {
            seq: 7,
            handle: 1,
            index: 9,
            hash: BlockHash([3; 32]),
            codec: Codec::Zstd,
            data: vec![1, 2, 3],
        };
        let mut a = Vec::new();
        m.encode(&mut a);
        let mut b = Vec::new();
        encode_block(
            &mut b,
            7,
            1,
            9,
            &BlockHash([3; 32]),
            Codec::Zstd,
            &[1, 2, 3],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn oversized_refused_from_the_length_alone() {
        let len = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert_eq!(
            decode_frame(&len),
            Err(DecodeError::Oversized {
                len: MAX_FRAME + 1,
                cap: MAX_FRAME
            })
        );
        let big = (MAX_PREAUTH_FRAME as u32 + 1).to_le_bytes();
        assert!(matches!(
            decode_frame_capped(&big, MAX_PREAUTH_FRAME),
            Err(DecodeError::Oversized {
                cap: MAX_PREAUTH_FRAME,
                ..
            })
        ));
    }

    #[test]
    fn preface_checks() {
        let v = PROTOCOL_VERSION;
        assert_eq!(check_preface(&preface(v)), Ok(v));
        assert_eq!(
            check_preface(&preface(v - 1)),
            Err(DecodeError::Version(v - 1))
        );
        let mut p = preface(v);
        p[0] = b'X';
        assert!(matches!(check_preface(&p), Err(DecodeError::BadPreface(_))));
    }

    #[test]
    fn trailing_and_unknown() {
        let mut buf = Vec::new();
        Message::Committed { point: 1 }.encode(&mut buf);
        buf.push(0);
        buf[0] += 1;
        assert_eq!(
            decode_frame(&buf),
            Err(DecodeError::Trailing(1, "Committed"))
        );
        assert_eq!(
            decode_frame(&[1, 0, 0, 0, 99]),
            Err(DecodeError::UnknownType(99))
        );
        assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(DecodeError::Empty));
        // A HaveReply for 3 hashes whose bitmap sets a 4th bit is not canonical.
        let mut buf = Vec::new();
        Message::HaveReply {
            req: 1,
            present: vec![true, false, true],
        }
        .encode(&mut buf);
        let last = buf.len() - 1;
        buf[last] |= 0b1000;
        assert!(matches!(
            decode_frame(&buf),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
