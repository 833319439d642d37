//! Logging setup shared by both binaries: `tracing` to stderr (journald takes it from there),
//! filtered by a RUST_LOG-style directive that can be changed while running (SIGHUP), colours
//! only on a terminal.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: std::sync::OnceLock<reload::Handle<EnvFilter, Registry>> =
    std::sync::OnceLock::new();

/// Installs the subscriber; a bad filter falls back to "info" rather than failing the start.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the filter of the running process (the daemons' `log` setting, at start and at
/// each SIGHUP). A filter that does not parse is refused with the reason.
pub fn set_filter(filter: &str) -> Result<(), String> {
    let f = EnvFilter::try_new(filter).map_err(|e| format!("log = {filter:?}: {e}"))?;
    match FILTER.get() {
        Some(h) => h.reload(f).map_err(|e| e.to_string()),
        None => Err("logging is not set up".into()),
    }
}
