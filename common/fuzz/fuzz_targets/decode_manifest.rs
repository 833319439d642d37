//! Any bytes into the manifest decoder: see `lifeboat_common::fuzzing::manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lifeboat_common::fuzzing::manifest(data));
