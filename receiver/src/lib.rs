//! lifeboat-receiver: keeps replicated blocks durable, cuts points in time, restores disks.
//!
//! - [`server`]: TLS listener and per-agent sessions.
//! - [`store`]: the content-addressed staging store.
//! - [`disk`]: each disk's live manifest and journal.
//! - [`durability`]: what the state directory must offer, checked at `serve`.
//! - [`catalog`] and [`target`]: committed points and where they are written.
//! - [`retention`] and [`gc`]: which points are kept, which blocks can go.
//! - [`commands`]: one file per CLI command.
//! - [`metrics`]: what `/metrics` and `/healthz` serve for Prometheus.

pub mod auth;
#[cfg(feature = "aws")]
pub mod aws;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod disk;
pub mod durability;
pub mod fleet;
pub mod gc;
pub mod identities;
#[cfg(feature = "aws")]
pub mod lease;
pub mod metrics;
pub mod recovery;
pub mod retention;
pub mod server;
pub mod snapshots;
pub mod status;
pub mod store;
mod sys;
pub mod tls;

pub use cli::{run, Cli};
