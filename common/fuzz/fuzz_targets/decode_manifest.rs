//! Any bytes into the manifest decoder: no panic, and what decodes re-encodes identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_common::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
