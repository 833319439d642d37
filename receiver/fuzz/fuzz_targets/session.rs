//! Arbitrary frames from an authenticated agent, through a real session on a fresh state
//! directory: no panic, and (run with `-malloc_limit_mb`) no unbounded allocation. See
//! `lifeboat_receiver::server::drive_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lifeboat_receiver::server::drive_session(data));
