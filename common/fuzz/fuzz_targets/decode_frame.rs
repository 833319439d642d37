//! Any bytes into the frame decoder: it must return a message, "need more" or an error,
//! never panic, and whatever it decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_common::protocol::decode_frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = decode_frame(rest) {
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(&again[..], &rest[..used], "re-encoding {} differs", msg.name());
        rest = &rest[used..];
    }
});
