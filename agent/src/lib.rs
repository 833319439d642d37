//! lifeboat-agent: replicates a server's disks to a Lifeboat receiver.
//!
//! - [`tracker`]: which blocks may have changed (eBPF on block-request completion, or a hash
//!   scan); [`freeze`]: the bounded filesystem freeze that makes a point crash-consistent.
//! - [`reader`]: the block reader, io_uring or pread.
//! - [`pipeline`]: reader thread → hashing/compressing workers → sender; [`pagesums`]: the
//!   page checksums that let a block read whole go as the pages that changed.
//! - [`replicate`]: the protocol client: cycles, commits; [`window`]: the send window
//!   (dedupe queries, acks, resends), sans-IO.
//! - [`link`] and [`tls`]: the TLS connection with the pinned receiver CA; [`certificate`]:
//!   the agent's client certificate (enrolment, renewal).
//! - [`run`]: the reconnecting main loop; [`state`]: what survives a restart.
//! - [`identity`]: which machine this is, so a clone cannot pass for it.
//! - [`metrics`]: what `/metrics` and `/healthz` serve for Prometheus.

pub mod adapt;
pub mod certificate;
pub mod cli;
pub mod freeze;
pub mod identity;
pub mod limiter;
pub mod link;
pub mod metrics;
pub mod pagesums;
pub mod pipeline;
pub mod reader;
pub mod reload;
pub mod replicate;
pub mod run;
pub mod source;
pub mod state;
pub mod status;
pub mod tls;
pub mod tracker;
pub mod window;

pub use cli::Cli;

/// Runs a parsed command line; returns the exit code.
///
/// Any panic, on any thread, aborts the process after it is reported: a reader or worker
/// thread that died would leave the pipeline waiting forever (a ghost that looks alive).
/// systemd restarts the agent, and nothing it keeps needs a clean exit.
pub fn main_with(cli: Cli) -> u8 {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("lifeboat-agent: aborting after a panic (systemd restarts the service)");
        std::process::abort();
    }));
    cli::run(cli)
}
