//! A small S3 test server whose conditional writes are atomic: the condition (`If-None-Match:
//! *`, `If-Match: <etag>`) is checked and the object written under one lock, as S3 does. moto
//! checks a condition and then writes in two steps, so a race it lets through would prove
//! nothing about the lease logic; this server is what the lease races are proven against.
//!
//! Path-style requests only, the few operations leases use: `PutObject` (conditional or not),
//! `GetObject`, `HeadObject`, `DeleteObject`. Any bucket name is accepted and created on first
//! use. A conditional write can be made to hold its lock a while (`hold_conditional`), which
//! widens every race: two writers then always overlap, and one must still lose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// (bucket, key) → (body, ETag).
    objects: HashMap<(String, String), (Bytes, String)>,
    /// How long a conditional write holds the lock between its check and its write.
    hold: Duration,
    /// Writes so far: each write's ETag is new, even for the same bytes.
    writes: u64,
}

pub struct S3Server {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Conditional writes refused (412) so far.
    pub refused: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, headers: &[(&str, &str)], body: Bytes) -> Answer {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).unwrap()
}

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    );
    answer(
        status,
        &[("content-type", "application/xml")],
        Bytes::from(body),
    )
}

impl S3Server {
    pub fn start() -> S3Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state: Arc<Mutex<State>> = Default::default();
        let refused = Arc::new(AtomicU64::new(0));
        let (st, rf) = (state.clone(), refused.clone());
        let addr =
            super::ebs_server::serve_http(&runtime, move |req| handle(st.clone(), rf.clone(), req));
        S3Server {
            addr,
            state,
            refused,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on each conditional write holds the lock `d` between check and write.
    pub fn hold_conditional(&self, d: Duration) {
        self.state.lock().unwrap().hold = d;
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn handle(
    st: Arc<Mutex<State>>,
    refused: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Answer, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().trim_start_matches('/').to_string();
    let Some((bucket, key)) = path.split_once('/') else {
        // Bucket-level requests (CreateBucket and the like): accepted, nothing to do.
        return Ok(answer(StatusCode::OK, &[], Bytes::new()));
    };
    let id = (bucket.to_string(), key.to_string());
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (if_none, if_match) = (header("if-none-match"), header("if-match"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "IncompleteBody",
                "unreadable body",
            ))
        }
    };
    let out = match method.as_str() {
        "PUT" => {
            let conditional = if_none.is_some() || if_match.is_some();
            // std's lock across the hold: this runtime's threads may block, the point is that
            // no other write can come between the check and the write.
            let mut s = st.lock().unwrap();
            let current = s.objects.get(&id).map(|(_, e)| e.clone());
            let ok = match (&if_none, &if_match) {
                (Some(n), _) if n == "*" => current.is_none(),
                (_, Some(m)) => current.as_deref() == Some(m.as_str()),
                _ => true,
            };
            if conditional && !s.hold.is_zero() {
                std::thread::sleep(s.hold);
            }
            if !ok {
                refused.fetch_add(1, Ordering::Relaxed);
                error(
                    StatusCode::PRECONDITION_FAILED,
                    "PreconditionFailed",
                    "At least one of the pre-conditions you specified did not hold",
                )
            } else {
                // Every write a new ETag, even of the same bytes (a write counter beside the
                // content's hash), so that an If-Match on an older write never passes.
                s.writes += 1;
                let etag = format!("\"{}-{}\"", &blake3::hash(&body).to_hex()[..32], s.writes);
                s.objects.insert(id, (body, etag.clone()));
                answer(StatusCode::OK, &[("etag", &etag)], Bytes::new())
            }
        }
        "GET" | "HEAD" => match st.lock().unwrap().objects.get(&id) {
            Some((b, etag)) => {
                let len = b.len().to_string();
                let body = if method == "GET" {
                    b.clone()
                } else {
                    Bytes::new()
                };
                answer(
                    StatusCode::OK,
                    &[("etag", etag), ("content-length", &len)],
                    body,
                )
            }
            None if method == "HEAD" => answer(StatusCode::NOT_FOUND, &[], Bytes::new()),
            None => error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ),
        },
        "DELETE" => {
            st.lock().unwrap().objects.remove(&id);
            answer(StatusCode::NO_CONTENT, &[], Bytes::new())
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by this test server",
        ),
    };
    Ok(out)
}
