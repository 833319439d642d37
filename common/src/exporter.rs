//! The HTTP endpoint both daemons serve for Prometheus: `GET /metrics` (the text exposition
//! format) and `GET /healthz` (200 "ok", or 503 with the reason), on their own listener and
//! task, off the replication path: a scrape renders what the daemon's counters hold at that
//! moment and never waits for replication work, and a slow or hostile scraper is bounded
//! (a few connections at once, a deadline for the request head, small bodies).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// What a daemon exposes.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics, in the Prometheus text format.
    fn metrics(&self) -> String;
    /// Ok when the daemon can do its job; otherwise why not.
    fn health(&self) -> Result<(), String>;
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 8;
/// Longest a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a whole connection may last.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Renders at once: a render stuck on a hung filesystem is not joined by every later scrape
/// (a render is not cancelled when its connection times out).
const MAX_RENDERS: usize = 2;

/// Binds `addr` for [`serve`]; an empty `addr` means no endpoint.
pub async fn bind(addr: &str) -> std::io::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(addr).await.map(Some)
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let renders = Arc::new(Semaphore::new(MAX_RENDERS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let exporter = exporter.clone();
        let renders = renders.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let exporter = exporter.clone();
                let renders = renders.clone();
                async move { Ok::<_, Infallible>(answer(&req, exporter, renders).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(16 * 1024)
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics endpoint: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics endpoint: connection timed out"),
            }
        });
    }
}

async fn answer(
    req: &Request<Incoming>,
    exporter: Arc<dyn Exporter>,
    renders: Arc<Semaphore>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    // Rendering reads files and walks state: off the async threads, a few at a time.
    let busy = || {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "busy: earlier requests are still rendering\n".into(),
        )
    };
    let path = req.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: /metrics and /healthz are served here\n".into(),
        );
    }
    // The permit goes with the blocking work, which runs on even if the connection is gone.
    let Ok(render) = renders.try_acquire_owned() else {
        return busy();
    };
    match path {
        "/metrics" => {
            let text = tokio::task::spawn_blocking(move || {
                let _render = render;
                exporter.metrics()
            })
            .await
            .unwrap_or_else(|e| format!("# rendering the metrics failed: {e}\n"));
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => match tokio::task::spawn_blocking(move || {
            let _render = render;
            exporter.health()
        })
        .await
        {
            Ok(Ok(())) => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            Ok(Err(why)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("unhealthy: {why}\n"),
            ),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("unhealthy: the health check failed: {e}\n"),
            ),
        },
        _ => busy(),
    }
}

/// Metric families rendered afresh at each scrape from what the daemon holds then (totals
/// kept as plain numbers become counters here), plus any long-lived collectors (histograms)
/// registered with [`Families::add`].
pub struct Families {
    registry: prometheus::Registry,
}

impl Default for Families {
    fn default() -> Self {
        Families::new()
    }
}

impl Families {
    pub fn new() -> Families {
        Families {
            registry: prometheus::Registry::new(),
        }
    }

    /// A gauge family with these label names. (A name or label the registry refuses is a
    /// programming error, caught by the tests that render every family.)
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        let g = prometheus::GaugeVec::new(prometheus::Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("gauge {name}: {e}"));
        self.add(g.clone());
        g
    }

    /// A counter family with these label names, to be set from totals with `inc_by`.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::IntCounterVec {
        let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("counter {name}: {e}"));
        self.add(c.clone());
        c
    }

    /// A gauge without labels, set to `v`.
    pub fn gauge_value(&self, name: &str, help: &str, v: f64) {
        self.gauge(name, help, &[])
            .with_label_values::<&str>(&[])
            .set(v);
    }

    /// A counter without labels, at the total `v`.
    pub fn counter_value(&self, name: &str, help: &str, v: u64) {
        self.counter(name, help, &[])
            .with_label_values::<&str>(&[])
            .inc_by(v);
    }

    /// Registers a collector (e.g. a histogram that lives across scrapes).
    pub fn add<C: prometheus::core::Collector + 'static>(&self, c: C) {
        if let Err(e) = self.registry.register(Box::new(c)) {
            panic!("registering a metric family: {e}");
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            out = format!("# encoding the metrics failed: {e}\n");
        }
        out
    }
}

/// A histogram of seconds with these buckets, to live across scrapes.
pub fn seconds_histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )
    .unwrap_or_else(|e| panic!("histogram {name}: {e}"))
}

/// Seconds since the epoch, for timestamps in metrics.
pub fn unix_secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The address a listener ended up on (an address with port 0 gets one from the kernel).
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed(Result<(), String>);
    impl Exporter for Fixed {
        fn metrics(&self) -> String {
            "# TYPE x counter\nx 1\n".into()
        }
        fn health(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_refuses_the_rest() {
        for (health, expect) in [(Ok(()), "200 OK"), (Err("store gone".to_string()), "503")] {
            let l = bind("127.0.0.1:0").await.unwrap().unwrap();
            let addr = local_addr(&l).unwrap();
            let (stop_tx, stop) = watch::channel(false);
            let task = tokio::spawn(serve(l, Arc::new(Fixed(health.clone())), stop));
            let m = get(addr, "/metrics").await;
            assert!(m.starts_with("HTTP/1.1 200") && m.ends_with("x 1\n"), "{m}");
            let h = get(addr, "/healthz").await;
            assert!(h.contains(expect), "{h}");
            if let Err(why) = health {
                assert!(h.ends_with(&format!("unhealthy: {why}\n")), "{h}");
            }
            assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
            // A client that never finishes its request head does not hold a slot forever,
            // nor do many of them stop a scrape.
            let mut idle = Vec::new();
            for _ in 0..MAX_CONNECTIONS - 1 {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /metr").await.unwrap();
                idle.push(s);
            }
            assert!(get(addr, "/metrics").await.contains("x 1"));
            let _ = stop_tx.send(true);
            task.await.unwrap();
        }
        assert!(
            bind("").await.unwrap().is_none(),
            "an empty address serves nothing"
        );
    }
}
