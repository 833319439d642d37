//! Arbitrary bytes as a fleet journal segment (an object read back from the bucket): an error
//! or records, never a panic, and (run with `-malloc_limit_mb`) no allocation a count in the
//! input could inflate. See `lifeboat_receiver::fleet::segment::decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = lifeboat_receiver::fleet::segment::decode(data) {
        // Whatever decodes encodes back to the same bytes.
        assert_eq!(lifeboat_receiver::fleet::segment::encode(&records), data);
    }
});
