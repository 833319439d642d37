//! Cross-crate integration tests: the real binaries over real TLS on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod cli;
mod e2e;
mod ebs;
mod enrolment;
mod faults;
mod fleet;
mod gc;
mod identity;
mod leases;
mod metrics;
mod object_lock;
mod packages;
mod power_cut;
mod s3;
mod sweep;
mod tracking;
