//! Logging setup shared by both binaries: `tracing` to stderr (journald takes it from there),
//! filtered by a RUST_LOG-style directive, colours only on a terminal.

/// Installs the subscriber; a bad filter falls back to "info" rather than failing the start.
pub fn init(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
