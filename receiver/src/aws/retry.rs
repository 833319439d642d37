//! The one retry policy every AWS call goes through (EBS direct APIs, EC2, S3), with the
//! SDK's own retries off.
//!
//! A call is tried up to `max_attempts` times, with a jittered exponential backoff, for what
//! may pass — 5xx, timeouts, broken connections, and "does not exist" for a resource just
//! created (EBS snapshots: `fresh_until`). Anything else (access denied, a bad KMS key, a
//! quota, a refused parameter, a failed precondition) is permanent at once: it is reported,
//! never retried in a storm.
//!
//! Throttling is not a failure but a request to slow down: every request of a client first
//! takes a slot from one shared [`Pace`], whose spacing doubles at each throttle and shrinks
//! again with each success (AIMD, like TCP), and a throttled call is tried again up to
//! [`THROTTLE_ATTEMPTS`] times.

use aws_sdk_ebs::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use rand::Rng;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Refused, and trying again cannot help. `status` and `code` (the service's error code,
    /// e.g. "PreconditionFailed", "NoSuchKey") let a caller tell expected refusals apart.
    #[error("{op} ({what}): {message}")]
    Permanent {
        op: &'static str,
        what: String,
        status: Option<u16>,
        code: Option<String>,
        message: String,
    },
    /// It kept failing in a way that may pass.
    #[error("{op} ({what}): still failing after {attempts} attempts: {message}")]
    Exhausted {
        op: &'static str,
        what: String,
        attempts: u32,
        message: String,
    },
}

impl CallError {
    /// The HTTP status of a permanent refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            CallError::Permanent { status, .. } => *status,
            CallError::Exhausted { .. } => None,
        }
    }
}

/// Attempts for a call that keeps being throttled (the pace slows meanwhile).
pub const THROTTLE_ATTEMPTS: u32 = 60;

/// The spacing between requests of one client, adapted to throttling.
///
/// Nothing is booked ahead: a request waits until `spacing` has passed since the last one
/// started, looking again after each sleep, so a spacing that shrinks (successes) shortens
/// the waits of requests already queued. A burst of throttles from requests sent under one
/// spacing doubles it once, not once per request: otherwise 32 PUTs throttled together would
/// take the spacing from 5 ms to its 2 s ceiling at once.
#[derive(Default)]
pub struct Pace {
    state: std::sync::Mutex<PaceState>,
}

#[derive(Default)]
struct PaceState {
    /// When the last request was let go.
    last: Option<Instant>,
    /// Microseconds between requests (0: none).
    spacing_us: u64,
    /// When the spacing last doubled.
    doubled: Option<Instant>,
}

impl Pace {
    const MAX_US: u64 = 2_000_000;
    const MIN_US: u64 = 5_000;

    /// Waits for this request's turn.
    async fn slot(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let next = s
                    .last
                    .map(|l| l + Duration::from_micros(s.spacing_us))
                    .filter(|n| *n > now);
                match next {
                    None => {
                        s.last = Some(now);
                        return;
                    }
                    Some(n) => n - now,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn throttled(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Throttles within one spacing (at least 50 ms) of the last doubling answer requests
        // sent before it took effect: they count once.
        let window = Duration::from_micros(s.spacing_us).max(Duration::from_millis(50));
        if s.doubled.is_some_and(|d| now.duration_since(d) < window) {
            return;
        }
        s.spacing_us = (s.spacing_us * 2).clamp(Self::MIN_US, Self::MAX_US);
        s.doubled = Some(now);
    }

    fn succeeded(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.spacing_us = if s.spacing_us < 1_000 {
            0
        } else {
            s.spacing_us - s.spacing_us / 32
        };
    }

    /// The current spacing, for logs.
    pub fn spacing(&self) -> Duration {
        Duration::from_micros(
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .spacing_us,
        )
    }
}

enum Class {
    Throttled,
    Transient,
    /// "Does not exist": transient only for a snapshot just started.
    NotFound,
    Permanent,
}

fn classify<E, R>(e: &SdkError<E, R>) -> Class
where
    E: ProvideErrorMetadata,
    R: HasStatus,
{
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Class::Transient
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let status = s.raw().status_code();
            if code == "ConflictException" {
                // A ClientToken reused with other parameters: deterministic, whatever its
                // status code (EBS sends 503) says.
                Class::Permanent
            } else if matches!(
                code,
                "RequestThrottledException"
                    | "ThrottlingException"
                    | "Throttling"
                    | "RequestLimitExceeded"
                    | "TooManyRequestsException"
                    | "ConcurrentLimitExceededException"
                    | "SlowDown"
            ) || status == 429
                // S3's SlowDown is a 503, and a HEAD's 503 has no body to name it.
                || status == 503
            {
                Class::Throttled
            } else if matches!(
                code,
                "InternalServerException"
                    | "InternalError"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "Unavailable"
            ) || status >= 500
            {
                Class::Transient
            } else if code == "ResourceNotFoundException" || code == "InvalidSnapshot.NotFound" {
                Class::NotFound
            } else {
                Class::Permanent
            }
        }
        _ => Class::Permanent,
    }
}

/// The HTTP status of a raw response, whatever the SDK calls its type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                _ => DisplayErrorContext(e).to_string(),
            }
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        _ => DisplayErrorContext(e).to_string(),
    }
}

/// Retries, with the counters and the pace one client shares between its calls.
#[derive(Clone)]
pub struct Retrier {
    pub max_attempts: u32,
    /// Every attempt of every call.
    pub requests: Arc<AtomicU64>,
    /// Attempts that were retried (logs, status, metrics).
    pub retries: Arc<AtomicU64>,
    /// Requests refused as throttled.
    pub throttles: Arc<AtomicU64>,
    pub pace: Arc<Pace>,
    /// No attempt is sent after then (each may then take up to the attempt timeout): what
    /// must not happen past a deadline, a fleet sweep's deletes, is never sent late. On the
    /// boot-time clock: a machine suspended past the deadline sends nothing when it resumes.
    pub send_by: Option<crate::lease::Moment>,
}

impl Retrier {
    pub fn new(max_attempts: u32) -> Retrier {
        Retrier {
            max_attempts,
            requests: Default::default(),
            retries: Default::default(),
            throttles: Default::default(),
            pace: Default::default(),
            send_by: None,
        }
    }

    /// Runs `call` under the retry policy. `fresh_until`: "does not exist" is transient
    /// until then (a snapshot just started may not be visible everywhere yet).
    pub async fn run<T, E, R, F, Fut>(
        &self,
        op: &'static str,
        what: &str,
        fresh_until: Option<Instant>,
        mut call: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: HasStatus + std::fmt::Debug,
    {
        let mut max = self.max_attempts.max(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.pace.slot().await;
            if self
                .send_by
                .is_some_and(|t| crate::lease::Moment::now() >= t)
            {
                return Err(CallError::Exhausted {
                    op,
                    what: what.to_string(),
                    attempts: attempt - 1,
                    message: "not sent: its deadline passed".into(),
                });
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let e = match call().await {
                Ok(v) => {
                    self.pace.succeeded();
                    return Ok(v);
                }
                Err(e) => e,
            };
            let transient = match classify(&e) {
                Class::Throttled => {
                    self.pace.throttled();
                    self.throttles.fetch_add(1, Ordering::Relaxed);
                    max = max.max(THROTTLE_ATTEMPTS);
                    true
                }
                Class::Transient => true,
                Class::NotFound => fresh_until.is_some_and(|t| Instant::now() < t),
                Class::Permanent => false,
            };
            let message = describe(&e);
            if !transient {
                let (status, code) = status_and_code(&e);
                return Err(CallError::Permanent {
                    op,
                    what: what.to_string(),
                    status,
                    code,
                    message,
                });
            }
            if attempt >= max {
                return Err(CallError::Exhausted {
                    op,
                    what: what.to_string(),
                    attempts: attempt,
                    message,
                });
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            let delay = backoff(attempt);
            tracing::debug!(
                "{op} ({what}): {message}; attempt {attempt} of {max}, again in {delay:?}"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

fn status_and_code<E, R>(e: &SdkError<E, R>) -> (Option<u16>, Option<String>)
where
    E: ProvideErrorMetadata,
    R: HasStatus,
{
    match e {
        SdkError::ServiceError(s) => (
            Some(s.raw().status_code()),
            s.err().code().map(str::to_string),
        ),
        _ => (None, None),
    }
}

/// 100 ms × 2^attempt, capped at 20 s, jittered down to a quarter of it.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = 100u64.saturating_mul(1 << attempt.min(8)).min(20_000);
    Duration::from_millis(rand::thread_rng().gen_range(cap_ms / 4..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_throttles_doubles_the_spacing_once_and_successes_shrink_it() {
        let p = Pace::default();
        for _ in 0..32 {
            p.throttled();
        }
        assert_eq!(p.spacing(), Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(60));
        p.throttled();
        assert_eq!(p.spacing(), Duration::from_millis(10));
        for _ in 0..200 {
            p.succeeded();
        }
        assert_eq!(p.spacing(), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(20), "{attempt}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(200));
    }
}
