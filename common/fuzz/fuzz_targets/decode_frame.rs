//! Any bytes into the frame decoder: see `lifeboat_common::fuzzing::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lifeboat_common::fuzzing::frames(data));
