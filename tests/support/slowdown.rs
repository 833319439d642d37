//! An HTTP proxy in front of an S3 server that throttles as S3 does under load: past `rate`
//! requests a second (a token bucket holding a second's worth), a request is answered
//! `503 SlowDown`; the others go to the server. Every request gets a connection of its own
//! (`connection: close` both ways), so each one passes the bucket.
//!
//! It reads a request whole (headers, then the body by its `content-length`) before answering,
//! so a throttled client sees a real 503 rather than a broken pipe.
//!
//! [`SlowDown::hold`] makes it slow instead: requests whose path contains one of some strings
//! reach the server at once, and their answers are held back for a while (a write that took
//! effect and returned late).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct SlowDown {
    pub addr: SocketAddr,
    /// Requests answered 503 so far.
    pub throttled: Arc<AtomicU64>,
    /// Requests passed to the server.
    pub passed: Arc<AtomicU64>,
    /// Answers held back: (path substrings, for how long).
    held: Arc<Mutex<(Vec<String>, std::time::Duration)>>,
    /// Answers being held back now.
    pub holding: Arc<AtomicU64>,
}

impl SlowDown {
    pub fn start(upstream: SocketAddr, rate: u64) -> SlowDown {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let throttled = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let (t, p) = (throttled.clone(), passed.clone());
        let bucket = Arc::new(Mutex::new((rate as f64, Instant::now())));
        let held: Arc<Mutex<(Vec<String>, std::time::Duration)>> = Default::default();
        let h = held.clone();
        let holding = Arc::new(AtomicU64::new(0));
        let now = holding.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (t, p, bucket, h, now) =
                    (t.clone(), p.clone(), bucket.clone(), h.clone(), now.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, rate, &bucket, &t, &p, (&h, &now));
                });
            }
        });
        SlowDown {
            addr,
            throttled,
            passed,
            held,
            holding,
        }
    }

    /// From now on, answers to requests whose path contains any of `paths` are held back for
    /// `delay` (the request itself reaches the server at once). An empty list ends it.
    pub fn hold(&self, paths: &[&str], delay: std::time::Duration) {
        *self.held.lock().unwrap() = (paths.iter().map(|p| p.to_string()).collect(), delay);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads one request's bytes (headers and a `content-length` body).
fn read_request(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + len {
        let n = conn.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&byte[..n]);
    }
    Ok(buf)
}

/// Takes a token; false when the bucket is empty.
fn admit(bucket: &Mutex<(f64, Instant)>, rate: u64) -> bool {
    let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate as f64).min(rate as f64);
    b.1 = now;
    if b.0 >= 1.0 {
        b.0 -= 1.0;
        true
    } else {
        false
    }
}

/// `head` with `connection: close` in place of any connection header it had.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("connection: close\r\n\r\n");
    out.into_bytes()
}

fn serve(
    mut conn: TcpStream,
    upstream: SocketAddr,
    rate: u64,
    bucket: &Mutex<(f64, Instant)>,
    throttled: &AtomicU64,
    passed: &AtomicU64,
    (held, holding): (&Mutex<(Vec<String>, std::time::Duration)>, &AtomicU64),
) -> std::io::Result<()> {
    let request = read_request(&mut conn)?;
    let path = String::from_utf8_lossy(&request[..request.len().min(2048)])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !admit(bucket, rate) {
        throttled.fetch_add(1, Ordering::Relaxed);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        write!(
            conn,
            "HTTP/1.1 503 Slow Down\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    passed.fetch_add(1, Ordering::Relaxed);
    let split = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(request.len());
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&closing(&request[..split]))?;
    up.write_all(&request[split..])?;
    // The answer: its head with `connection: close`, then the rest until the server closes.
    let mut answer = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = up.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        answer.extend_from_slice(&buf[..n]);
    };
    let delay = {
        let h = held.lock().unwrap_or_else(|e| e.into_inner());
        h.0.iter().any(|p| path.contains(p.as_str())).then_some(h.1)
    };
    if let Some(d) = delay {
        // The whole answer first (the write has taken effect), then the wait.
        up.read_to_end(&mut answer)?;
        holding.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(d);
        holding.fetch_sub(1, Ordering::SeqCst);
    }
    conn.write_all(&closing(&answer[..head_end]))?;
    conn.write_all(&answer[head_end..])?;
    std::io::copy(&mut up, &mut conn)?;
    Ok(())
}
