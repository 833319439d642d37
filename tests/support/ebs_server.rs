//! A strict EBS direct-API test server, with the few EC2 snapshot calls that go with it, for
//! what moto does not model (see DESIGN.md, "Testing without AWS").
//!
//! Real HTTP on 127.0.0.1, the request and response shapes the AWS SDK uses (restJson1 for
//! EBS, the EC2 query protocol for `DescribeSnapshots` and `DeleteSnapshot`), and the rules a
//! client must get right, each refused the way AWS refuses it:
//! - block size 524288: every `PutSnapshotBlock` carries exactly that many bytes, and says so
//!   in `x-amz-Data-Length`; the block index is inside the volume;
//! - each block's SHA-256 (`x-amz-Checksum`, base64, `SHA256`) matches its bytes;
//! - `CompleteSnapshot`'s `x-amz-ChangedBlocksCount` is the number of blocks written, and its
//!   LINEAR aggregate is SHA-256 over the blocks' checksums in index order;
//! - parents: a snapshot reads (and `ListSnapshotBlocks` lists) what it inherits; deleting a
//!   parent leaves its children whole;
//! - `pending` until completed, and `completed` only some time after `CompleteSnapshot`;
//! - `NextToken` pagination with `MaxResults` in 100..=10000, block tokens checked on reads;
//! - `ClientToken` idempotency: the same token returns the same snapshot.
//!
//! Faults a test can inject while it runs: latency per request, throttling past a rate, a
//! request that hangs, the transient "does not exist" right after `StartSnapshot`, and access
//! denied. Every request is counted per operation, so a test can tell a retry storm from one
//! attempt.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// A refusal is an HTTP answer, returned as the error of the helpers that check requests.
#![allow(clippy::result_large_err)]

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const BLOCK: usize = 524_288;
const BLOCKS_PER_GIB: u64 = 2048;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Error(String),
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: String,
    pub volume_size_gib: u64,
    pub parent: Option<String>,
    pub status: Status,
    pub tags: Vec<(String, String)>,
    pub description: Option<String>,
    pub encrypted: bool,
    pub kms_key_arn: Option<String>,
    pub client_token: Option<String>,
    /// Blocks written to this snapshot itself: index → (bytes, SHA-256).
    pub own: BTreeMap<u64, (Bytes, [u8; 32])>,
    /// What it inherited from a parent deleted since (under `own`).
    adopted: BTreeMap<u64, (Bytes, [u8; 32])>,
    pub changed_blocks_count: Option<u64>,
    started: SystemTime,
    /// When a completed snapshot reports `completed` (a while after `CompleteSnapshot`).
    completes_at: Option<Instant>,
}

/// Faults to inject; change them at any time through [`EbsServer::faults`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Added before every answer.
    pub latency: Duration,
    /// Requests per second past which `RequestThrottledException` is returned.
    pub throttle_per_sec: Option<u32>,
    /// The next N requests whose operation is in `hang_ops` (all when empty) never answer.
    pub hang_next: u32,
    pub hang_ops: Vec<String>,
    /// After each `StartSnapshot`, the first N requests naming the new snapshot get
    /// `ResourceNotFoundException` ("does not exist"), as EBS may answer for a moment.
    pub not_found_after_start: u32,
    /// Every request of these operations (all when it holds "*") gets AccessDeniedException.
    pub deny: Vec<String>,
    /// How long a completed snapshot stays `pending` in `DescribeSnapshots`.
    pub completion_delay: Duration,
    /// Most entries in one page of a listing, whatever MaxResults asks (EBS may answer
    /// fewer): small pages make small disks' listings span many.
    pub page_cap: Option<usize>,
}

#[derive(Default)]
struct State {
    snapshots: HashMap<String, Snapshot>,
    by_token: HashMap<String, String>,
    /// Deleted snapshot ids (requests naming them get "does not exist").
    deleted: Vec<String>,
    faults: Faults,
    counts: BTreeMap<String, u64>,
    /// (snapshot, requests left to refuse) after a start.
    not_found_left: HashMap<String, u32>,
    window: Option<(Instant, u32)>,
    next_id: u64,
    /// Every state `DescribeSnapshots` answered, in order.
    described: Vec<String>,
    /// Requests refused as throttled.
    throttled: u64,
    /// Where EC2 actions other than the snapshot ones go (moto), if anywhere.
    forward: Option<SocketAddr>,
    /// The form of every EC2 request forwarded, in order (moto ignores some parameters,
    /// e.g. RegisterImage's block device mappings: tests read them here).
    forwarded: Vec<HashMap<String, String>>,
}

/// A running server; stops when dropped.
pub struct EbsServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EbsServer {
    pub fn start() -> EbsServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let addr = serve_http(&runtime, move |req| handle(st.clone(), req));
        EbsServer {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the faults injected from now on.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.state.lock().unwrap().faults)
    }

    /// Requests seen per operation (`StartSnapshot`, `PutSnapshotBlock`, ...), refused ones
    /// included.
    pub fn count(&self, op: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .counts
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// Sends EC2 actions this server does not answer itself (images, instances) to `addr`
    /// (a moto server), so one EC2 endpoint sees this server's snapshots and moto's
    /// instances.
    pub fn forward_ec2_to(&self, addr: SocketAddr) {
        self.state.lock().unwrap().forward = Some(addr);
    }

    /// The forms of the EC2 requests forwarded with action `action`, in order.
    pub fn forwarded(&self, action: &str) -> Vec<HashMap<String, String>> {
        self.state
            .lock()
            .unwrap()
            .forwarded
            .iter()
            .filter(|f| f.get("Action").map(String::as_str) == Some(action))
            .cloned()
            .collect()
    }

    /// Requests refused as throttled so far.
    pub fn throttled(&self) -> u64 {
        self.state.lock().unwrap().throttled
    }

    /// The states `DescribeSnapshots` answered, in order.
    pub fn described(&self) -> Vec<String> {
        self.state.lock().unwrap().described.clone()
    }

    /// Every operation's count, for assertion messages.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state.lock().unwrap().counts.clone()
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        let mut v: Vec<Snapshot> = self
            .state
            .lock()
            .unwrap()
            .snapshots
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The full content of a snapshot (inherited blocks included; unwritten blocks zero).
    pub fn content(&self, id: &str) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let s = &st.snapshots[id];
        let mut out = vec![0u8; (s.volume_size_gib * BLOCKS_PER_GIB) as usize * BLOCK];
        for (i, (data, _)) in visible(&st, id) {
            let at = i as usize * BLOCK;
            out[at..at + BLOCK].copy_from_slice(&data);
        }
        out
    }
}

/// Serves HTTP/1.1 on a loopback port of its own on `runtime`, each request answered by
/// `handler`; returns the address. (The test servers' accept loop.)
pub fn serve_http<H, F>(runtime: &tokio::runtime::Runtime, handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Answer, std::convert::Infallible>> + Send + 'static,
{
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

impl Drop for EbsServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Every block a snapshot holds, its own and inherited: index → (bytes, SHA-256).
fn visible(st: &State, id: &str) -> BTreeMap<u64, (Bytes, [u8; 32])> {
    let mut chain = Vec::new();
    let mut at = Some(id.to_string());
    while let Some(cur) = at {
        let Some(s) = st.snapshots.get(&cur) else {
            break;
        };
        chain.push(s);
        at = s.parent.clone();
    }
    let mut out = BTreeMap::new();
    let limit = chain.first().map(|s| s.volume_size_gib * BLOCKS_PER_GIB);
    for s in chain.iter().rev() {
        for (i, b) in s.adopted.iter().chain(&s.own) {
            out.insert(*i, b.clone());
        }
    }
    if let Some(limit) = limit {
        out.retain(|i, _| *i < limit);
    }
    out
}

/// One block a snapshot holds, its own or inherited (what [`visible`] lists, without building
/// the whole map for one read).
fn block_at<'a>(st: &'a State, id: &str, index: u64) -> Option<&'a (Bytes, [u8; 32])> {
    let first = st.snapshots.get(id)?;
    if index >= first.volume_size_gib * BLOCKS_PER_GIB {
        return None;
    }
    let mut at = Some(first);
    while let Some(s) = at {
        if let Some(b) = s.own.get(&index).or_else(|| s.adopted.get(&index)) {
            return Some(b);
        }
        at = s.parent.as_ref().and_then(|p| st.snapshots.get(p));
    }
    None
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().try_into().unwrap()
}

pub type Answer = Response<Full<Bytes>>;

fn json_answer(status: StatusCode, v: Value) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", "lifeboat-test")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

fn ebs_error(status: StatusCode, kind: &str, reason: &str, message: &str) -> Answer {
    let mut r = json_answer(status, json!({"Message": message, "Reason": reason}));
    r.headers_mut()
        .insert("x-amzn-errortype", kind.parse().unwrap());
    r
}

fn ec2_error(code: &str, message: &str) -> Answer {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
             <Message>{}</Message></Error></Errors><RequestID>lifeboat-test</RequestID></Response>",
            xml_escape(message)
        ))))
        .unwrap()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn validation(message: &str) -> Answer {
    ebs_error(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        "INVALID_PARAMETER_VALUE",
        message,
    )
}

fn not_found(id: &str) -> Answer {
    ebs_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        "SNAPSHOT_NOT_FOUND",
        &format!("The snapshot '{id}' does not exist."),
    )
}

/// The snapshot a request's path names.
fn snapshot_named<'a>(path: &[&'a str]) -> Option<&'a str> {
    match path {
        ["snapshots", "completion", id] => Some(id),
        ["snapshots", id, ..] => Some(id),
        _ => None,
    }
}

/// Which operation a request is, from its method and path.
fn operation(method: &str, path: &[&str]) -> &'static str {
    match (method, path) {
        ("POST", ["snapshots"]) => "StartSnapshot",
        ("PUT", ["snapshots", _, "blocks", _]) => "PutSnapshotBlock",
        ("POST", ["snapshots", "completion", _]) => "CompleteSnapshot",
        ("GET", ["snapshots", _, "blocks"]) => "ListSnapshotBlocks",
        ("GET", ["snapshots", _, "blocks", _]) => "GetSnapshotBlock",
        ("GET", ["snapshots", _, "changedblocks"]) => "ListChangedBlocks",
        ("POST", []) => "Ec2",
        _ => "Unknown",
    }
}

async fn handle(
    st: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Answer, std::convert::Infallible> {
    let method = req.method().as_str().to_string();
    let path_owned = req.uri().path().to_string();
    let path: Vec<&str> = path_owned.split('/').filter(|s| !s.is_empty()).collect();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(validation("the request body could not be read")),
    };
    let mut op = operation(&method, &path).to_string();
    let form: HashMap<String, String> = if op == "Ec2" {
        form_urlencoded::parse(&body).into_owned().collect()
    } else {
        HashMap::new()
    };
    if op == "Ec2" {
        op = form.get("Action").cloned().unwrap_or_else(|| "Ec2".into());
    }
    // Faults first, as AWS's front end would answer them.
    let (latency, hang, answer) = {
        let mut s = st.lock().unwrap();
        *s.counts.entry(op.clone()).or_default() += 1;
        let f = s.faults.clone();
        let mut hang = false;
        if f.hang_next > 0 && (f.hang_ops.is_empty() || f.hang_ops.contains(&op)) {
            s.faults.hang_next -= 1;
            hang = true;
        }
        let mut answer = None;
        if f.deny.iter().any(|d| d == "*" || *d == op) {
            answer = Some(if op.starts_with("Describe") || op == "DeleteSnapshot" {
                ec2_error(
                    "UnauthorizedOperation",
                    "You are not authorized to perform this operation.",
                )
            } else {
                ebs_error(
                    StatusCode::FORBIDDEN,
                    "AccessDeniedException",
                    "UNAUTHORIZED_ACCOUNT",
                    "User: arn:aws:iam::111122223333:user/lifeboat is not authorized to \
                     perform: ebs:{op} with an explicit deny",
                )
            });
        }
        if answer.is_none() {
            if let Some(rate) = f.throttle_per_sec {
                let now = Instant::now();
                let (since, n) = s.window.get_or_insert((now, 0));
                if now.duration_since(*since) >= Duration::from_secs(1) {
                    *since = now;
                    *n = 0;
                }
                *n += 1;
                if *n > rate {
                    s.throttled += 1;
                    answer = Some(ebs_error(
                        StatusCode::BAD_REQUEST,
                        "RequestThrottledException",
                        "ACCOUNT_THROTTLED",
                        "The request was throttled: too many requests per second",
                    ));
                }
            }
        }
        if answer.is_none() {
            if let Some(id) = snapshot_named(&path) {
                if let Some(left) = s.not_found_left.get_mut(id) {
                    if *left > 0 {
                        *left -= 1;
                        answer = Some(not_found(id));
                    }
                }
            }
        }
        (f.latency, hang, answer)
    };
    if hang {
        // Held until the client gives up and closes the connection.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(a) = answer {
        return Ok(a);
    }
    let forward = {
        let mut s = st.lock().unwrap();
        let own = matches!(op.as_str(), "DescribeSnapshots" | "DeleteSnapshot");
        match s.forward {
            Some(addr) if form.contains_key("Action") && !own => {
                s.forwarded.push(form.clone());
                Some(addr)
            }
            _ => None,
        }
    };
    if let Some(addr) = forward {
        return Ok(forward_to(addr, &headers, &body).await.unwrap_or_else(|e| {
            ec2_error("InternalError", &format!("forwarding to {addr}: {e}"))
        }));
    }
    let mut s = st.lock().unwrap();
    let r = match (op.as_str(), path.as_slice()) {
        ("StartSnapshot", _) => start(&mut s, &body),
        ("PutSnapshotBlock", [_, id, _, index]) => put_block(&mut s, id, index, &headers, body),
        ("CompleteSnapshot", [_, _, id]) => complete(&mut s, id, &headers),
        ("ListSnapshotBlocks", [_, id, _]) => list_blocks(&s, id, &query),
        ("GetSnapshotBlock", [_, id, _, index]) => get_block(&s, id, index, &query),
        ("ListChangedBlocks", [_, id, _]) => list_changed(&s, id, &query),
        ("DescribeSnapshots", _) => describe(&mut s, &form),
        ("DeleteSnapshot", _) => delete(&mut s, &form),
        _ => validation(&format!("unsupported request {method} {path_owned}")),
    };
    Ok(r)
}

fn start(s: &mut State, body: &[u8]) -> Answer {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return validation("StartSnapshot: the body is not JSON");
    };
    let Some(size) = v.get("VolumeSize").and_then(Value::as_u64) else {
        return validation("StartSnapshot: VolumeSize is required");
    };
    if size == 0 || size > 65536 {
        return validation("StartSnapshot: VolumeSize must be 1..=65536 GiB");
    }
    let token = v
        .get("ClientToken")
        .and_then(Value::as_str)
        .map(str::to_string);
    let parent = v
        .get("ParentSnapshotId")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(t) = &token {
        if let Some(id) = s.by_token.get(t).filter(|id| s.snapshots.contains_key(*id)) {
            let existing = &s.snapshots[id];
            if existing.volume_size_gib != size || existing.parent != parent {
                return ebs_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ConflictException",
                    "MISMATCHED_SNAPSHOT_SESSION",
                    "The request uses the same client token as a previous, but non-identical \
                     request.",
                );
            }
            return json_answer(StatusCode::CREATED, snapshot_json(existing));
        }
    }
    if let Some(p) = &parent {
        match s.snapshots.get(p) {
            Some(ps) if ps.status == Status::Completed => {
                if ps.volume_size_gib > size {
                    return validation(&format!(
                        "StartSnapshot: VolumeSize {size} is smaller than the parent's {}",
                        ps.volume_size_gib
                    ));
                }
            }
            Some(_) => {
                return validation(&format!("StartSnapshot: parent {p} is not completed"));
            }
            None => return not_found(p),
        }
    }
    let encrypted = v.get("Encrypted").and_then(Value::as_bool).unwrap_or(false);
    let kms = v
        .get("KmsKeyArn")
        .and_then(Value::as_str)
        .map(str::to_string);
    if kms.is_some() && !encrypted {
        return validation("StartSnapshot: KmsKeyArn requires Encrypted");
    }
    if let Some(k) = &kms {
        if !k.starts_with("arn:aws:kms:") {
            return ebs_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "INVALID_CUSTOMER_KEY",
                &format!("The KMS key {k} is not valid"),
            );
        }
    }
    s.next_id += 1;
    let id = format!("snap-{:017x}", 0x10_0000 + s.next_id);
    let tags = v
        .get("Tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some((
                        t.get("Key")?.as_str()?.to_string(),
                        t.get("Value")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let snap = Snapshot {
        id: id.clone(),
        volume_size_gib: size,
        parent,
        status: Status::Pending,
        tags,
        description: v
            .get("Description")
            .and_then(Value::as_str)
            .map(str::to_string),
        encrypted,
        kms_key_arn: kms,
        client_token: token.clone(),
        own: BTreeMap::new(),
        adopted: BTreeMap::new(),
        changed_blocks_count: None,
        started: SystemTime::now(),
        completes_at: None,
    };
    let answer = json_answer(StatusCode::CREATED, snapshot_json(&snap));
    if let Some(t) = token {
        s.by_token.insert(t, id.clone());
    }
    if s.faults.not_found_after_start > 0 {
        let n = s.faults.not_found_after_start;
        s.not_found_left.insert(id.clone(), n);
    }
    s.snapshots.insert(id, snap);
    answer
}

/// The state AWS shows: `completed` only once the completion delay has passed.
fn shown_status(s: &Snapshot) -> &'static str {
    match &s.status {
        Status::Completed if s.completes_at.is_some_and(|t| t <= Instant::now()) => "completed",
        Status::Error(_) => "error",
        _ => "pending",
    }
}

fn snapshot_json(s: &Snapshot) -> Value {
    let started = s
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    json!({
        "SnapshotId": s.id,
        "OwnerId": "111122223333",
        "Status": shown_status(s),
        "StartTime": started,
        "VolumeSize": s.volume_size_gib,
        "BlockSize": BLOCK,
        "ParentSnapshotId": s.parent,
        "Description": s.description,
        "KmsKeyArn": s.kms_key_arn,
        "Tags": s.tags.iter().map(|(k, v)| json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
    })
}

fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn pending<'a>(s: &'a mut State, id: &str) -> Result<&'a mut Snapshot, Answer> {
    if s.deleted.iter().any(|d| d == id) {
        return Err(not_found(id));
    }
    match s.snapshots.get_mut(id) {
        None => Err(not_found(id)),
        Some(snap) if snap.status != Status::Pending => Err(validation(&format!(
            "The snapshot {id} is not in the pending state"
        ))),
        Some(snap) => Ok(snap),
    }
}

fn put_block(
    s: &mut State,
    id: &str,
    index: &str,
    headers: &hyper::HeaderMap,
    body: Bytes,
) -> Answer {
    let snap = match pending(s, id) {
        Ok(x) => x,
        Err(a) => return a,
    };
    let Ok(index) = index.parse::<u64>() else {
        return validation("BlockIndex must be a number");
    };
    if index >= snap.volume_size_gib * BLOCKS_PER_GIB {
        return validation(&format!(
            "BlockIndex {index} is past the end of a {} GiB volume",
            snap.volume_size_gib
        ));
    }
    let declared = header(headers, "x-amz-data-length").and_then(|v| v.parse::<usize>().ok());
    if declared != Some(BLOCK) || body.len() != BLOCK {
        return validation(&format!(
            "DataLength must be {BLOCK} (declared {declared:?}, body {} bytes)",
            body.len()
        ));
    }
    if header(headers, "x-amz-checksum-algorithm") != Some("SHA256") {
        return validation("ChecksumAlgorithm must be SHA256");
    }
    let digest = sha256(&body);
    let given = header(headers, "x-amz-checksum").unwrap_or("");
    if B64.encode(digest) != given {
        return ebs_error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "INVALID_CHECKSUM",
            &format!("The checksum of block {index} does not match its data"),
        );
    }
    snap.own.insert(index, (body, digest));
    let mut r = json_answer(StatusCode::CREATED, json!({}));
    r.headers_mut()
        .insert("x-amz-checksum", given.parse().unwrap());
    r.headers_mut()
        .insert("x-amz-checksum-algorithm", "SHA256".parse().unwrap());
    r
}

fn complete(s: &mut State, id: &str, headers: &hyper::HeaderMap) -> Answer {
    let delay = s.faults.completion_delay;
    let snap = match pending(s, id) {
        Ok(x) => x,
        Err(a) => return a,
    };
    let Some(count) = header(headers, "x-amz-changedblockscount").and_then(|v| v.parse().ok())
    else {
        return validation("ChangedBlocksCount is required");
    };
    if count != snap.own.len() as u64 {
        return validation(&format!(
            "ChangedBlocksCount {count} does not match the {} blocks written",
            snap.own.len()
        ));
    }
    if let Some(sum) = header(headers, "x-amz-checksum") {
        if header(headers, "x-amz-checksum-algorithm") != Some("SHA256")
            || header(headers, "x-amz-checksum-aggregation-method") != Some("LINEAR")
        {
            return validation("the aggregate checksum must be SHA256, LINEAR");
        }
        let mut all = Vec::with_capacity(snap.own.len() * 32);
        for (_, d) in snap.own.values() {
            all.extend_from_slice(d);
        }
        if B64.encode(sha256(&all)) != sum {
            return ebs_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "INVALID_CHECKSUM",
                "The aggregated checksum does not match the blocks written",
            );
        }
    }
    snap.changed_blocks_count = Some(count);
    snap.status = Status::Completed;
    snap.completes_at = Some(Instant::now() + delay);
    json_answer(StatusCode::ACCEPTED, json!({"Status": "pending"}))
}

fn completed<'a>(s: &'a State, id: &str) -> Result<&'a Snapshot, Answer> {
    if s.deleted.iter().any(|d| d == id) {
        return Err(not_found(id));
    }
    match s.snapshots.get(id) {
        None => Err(not_found(id)),
        Some(snap) if snap.status != Status::Completed => {
            Err(validation(&format!("The snapshot {id} is not completed")))
        }
        Some(snap) => Ok(snap),
    }
}

fn page_args(q: &HashMap<String, String>) -> Result<(usize, u64), Answer> {
    let max = match q.get("maxResults") {
        None => 10_000,
        Some(m) => match m.parse::<usize>() {
            Ok(m) if (100..=10_000).contains(&m) => m,
            _ => return Err(validation("MaxResults must be 100..=10000")),
        },
    };
    let mut start = q
        .get("startingBlockIndex")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    if let Some(t) = q.get("pageToken") {
        match t.strip_prefix("next-").and_then(|n| n.parse().ok()) {
            Some(n) => start = start.max(n),
            None => return Err(validation("the NextToken is not valid")),
        }
    }
    Ok((max, start))
}

fn block_token(id: &str, index: u64) -> String {
    B64.encode(format!("{id}/{index}/lifeboat-test"))
}

fn list_blocks(s: &State, id: &str, q: &HashMap<String, String>) -> Answer {
    let snap = match completed(s, id) {
        Ok(x) => x,
        Err(a) => return a,
    };
    let (max, start) = match page_args(q) {
        Ok((max, start)) => (s.faults.page_cap.map_or(max, |c| c.min(max)), start),
        Err(a) => return a,
    };
    let all = visible(s, id);
    let mut blocks = Vec::new();
    let mut next = None;
    for i in all.range(start..).map(|(i, _)| *i) {
        if blocks.len() == max {
            next = Some(format!("next-{i}"));
            break;
        }
        blocks.push(json!({"BlockIndex": i, "BlockToken": block_token(id, i)}));
    }
    json_answer(
        StatusCode::OK,
        json!({"Blocks": blocks, "VolumeSize": snap.volume_size_gib, "BlockSize": BLOCK,
               "ExpiryTime": 4_102_444_800u64, "NextToken": next}),
    )
}

fn get_block(s: &State, id: &str, index: &str, q: &HashMap<String, String>) -> Answer {
    if let Err(a) = completed(s, id) {
        return a;
    }
    let Ok(index) = index.parse::<u64>() else {
        return validation("BlockIndex must be a number");
    };
    if q.get("blockToken").map(String::as_str) != Some(block_token(id, index).as_str()) {
        return validation(&format!("The block token for block {index} is not valid"));
    }
    let Some((data, digest)) = block_at(s, id, index) else {
        return validation(&format!("block {index} of {id} holds no data"));
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("x-amz-data-length", BLOCK.to_string())
        .header("x-amz-checksum", B64.encode(digest))
        .header("x-amz-checksum-algorithm", "SHA256")
        .body(Full::new(data.clone()))
        .unwrap()
}

fn list_changed(s: &State, second: &str, q: &HashMap<String, String>) -> Answer {
    let snap = match completed(s, second) {
        Ok(x) => x,
        Err(a) => return a,
    };
    let (max, start) = match page_args(q) {
        Ok((max, start)) => (s.faults.page_cap.map_or(max, |c| c.min(max)), start),
        Err(a) => return a,
    };
    let first = match q.get("firstSnapshotId") {
        Some(f) => match completed(s, f) {
            Ok(_) => Some(visible(s, f)),
            Err(a) => return a,
        },
        None => None,
    };
    let now = visible(s, second);
    let mut indices: Vec<u64> = now.keys().copied().collect();
    if let Some(f) = &first {
        indices.extend(f.keys().copied());
    }
    indices.sort_unstable();
    indices.dedup();
    let mut out = Vec::new();
    let mut next = None;
    for i in indices.into_iter().filter(|i| *i >= start) {
        let a = first.as_ref().and_then(|f| f.get(&i)).map(|b| b.1);
        let b = now.get(&i).map(|b| b.1);
        if a == b {
            continue;
        }
        if out.len() == max {
            next = Some(format!("next-{i}"));
            break;
        }
        let mut e = json!({"BlockIndex": i});
        if a.is_some() {
            e["FirstBlockToken"] = json!(block_token(q["firstSnapshotId"].as_str(), i));
        }
        if b.is_some() {
            e["SecondBlockToken"] = json!(block_token(second, i));
        }
        out.push(e);
    }
    json_answer(
        StatusCode::OK,
        json!({"ChangedBlocks": out, "VolumeSize": snap.volume_size_gib, "BlockSize": BLOCK,
               "ExpiryTime": 4_102_444_800u64, "NextToken": next}),
    )
}

fn ec2_ok(action: &str, inner: &str) -> Answer {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response \
             xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>lifeboat-test</requestId>\
             {inner}</{action}Response>"
        ))))
        .unwrap()
}

fn describe(s: &mut State, form: &HashMap<String, String>) -> Answer {
    let mut ids: Vec<String> = form
        .iter()
        .filter(|(k, _)| k.starts_with("SnapshotId."))
        .map(|(_, v)| v.clone())
        .collect();
    ids.sort();
    let mut items = String::new();
    for id in &ids {
        let Some(snap) = s.snapshots.get(id).cloned() else {
            return ec2_error(
                "InvalidSnapshot.NotFound",
                &format!("The snapshot '{id}' does not exist."),
            );
        };
        let status = shown_status(&snap);
        s.described.push(status.to_string());
        let tags: String = snap
            .tags
            .iter()
            .map(|(k, v)| {
                format!(
                    "<item><key>{}</key><value>{}</value></item>",
                    xml_escape(k),
                    xml_escape(v)
                )
            })
            .collect();
        items.push_str(&format!(
            "<item><snapshotId>{id}</snapshotId><volumeId>vol-ffffffff</volumeId>\
             <status>{status}</status><startTime>2026-01-01T00:00:00.000Z</startTime>\
             <progress>{}</progress><ownerId>111122223333</ownerId>\
             <volumeSize>{}</volumeSize><description>{}</description>\
             <encrypted>{}</encrypted><tagSet>{tags}</tagSet></item>",
            if status == "completed" { "100%" } else { "50%" },
            snap.volume_size_gib,
            xml_escape(snap.description.as_deref().unwrap_or("")),
            snap.encrypted,
        ));
    }
    ec2_ok(
        "DescribeSnapshots",
        &format!("<snapshotSet>{items}</snapshotSet>"),
    )
}

fn delete(s: &mut State, form: &HashMap<String, String>) -> Answer {
    let Some(id) = form.get("SnapshotId").cloned() else {
        return ec2_error("MissingParameter", "SnapshotId is required");
    };
    if !s.snapshots.contains_key(&id) {
        return ec2_error(
            "InvalidSnapshot.NotFound",
            &format!("The snapshot '{id}' does not exist."),
        );
    }
    // Children stay whole: they take over what they inherited from the deleted snapshot.
    let inherited = visible(s, &id);
    for child in s.snapshots.values_mut() {
        if child.parent.as_deref() == Some(id.as_str()) {
            for (i, b) in &inherited {
                child.adopted.insert(*i, b.clone());
            }
            child.parent = None;
        }
    }
    s.snapshots.remove(&id);
    s.deleted.push(id);
    ec2_ok("DeleteSnapshot", "<return>true</return>")
}

/// Forwards one EC2 query request to another server (HTTP/1.0, so the answer ends at EOF and
/// is never chunked) and hands back its answer.
async fn forward_to(
    addr: SocketAddr,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> std::io::Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!(
        "POST / HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for name in [
        "authorization",
        "x-amz-date",
        "content-type",
        "x-amz-security-token",
    ] {
        if let Some(v) = header(headers, name) {
            req.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).await?;
    conn.write_all(body).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let mut answer = Response::builder().status(status);
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-type" || k.starts_with("x-amz") {
                answer = answer.header(k, v.trim());
            }
        }
    }
    answer
        .body(Full::new(Bytes::copy_from_slice(&raw[split + 4..])))
        .map_err(std::io::Error::other)
}
