//! Lifeboat common: what the agent and the receiver must agree on.
//!
//! - [`block`]: the 512 KiB block geometry, blake3 block ids and the zero-block sentinel.
//! - [`codec`]: zstd on the wire and at rest.
//! - [`manifest`]: the ordered list of block hashes of one disk at one point (docs/formats.md).
//! - [`protocol`]: wire protocol v2, sans-IO (docs/protocol.md).
//! - [`config`]: the agent's and the receiver's configuration files.
//! - [`durable`]: write-tmp, fsync, rename, fsync-dir.
//! - [`fuzzing`]: the fuzz targets' checks, also run over the regression corpus by the tests.
//! - [`exporter`] (feature `exporter`): the `/metrics` and `/healthz` endpoint of both daemons.
//! - [`docgen`] (feature `docgen`): man pages and shell completions from a clap definition.

pub mod block;
pub mod codec;
pub mod config;
#[cfg(feature = "docgen")]
pub mod docgen;
pub mod durable;
#[cfg(feature = "exporter")]
pub mod exporter;
pub mod fuzzing;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod protocol;
pub mod sd_notify;

pub use block::{BlockHash, BLOCK_SIZE};

/// This machine's clock, in milliseconds since the Unix epoch (0 if it is set before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "YYYY-MM-DD HH:MM:SS" (UTC) for a Unix time in milliseconds.
pub fn fmt_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
