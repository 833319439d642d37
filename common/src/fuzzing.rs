//! The checks of the cargo-fuzz targets (`common/fuzz/`), as plain functions: the targets
//! call them on generated inputs, and `cargo test` runs them over the committed regression
//! corpus (`common/fuzz/regressions/`), so every input that ever found a bug stays a test.
//! Each panics when the decoder breaks its contract.

use crate::manifest::Manifest;
use crate::protocol::decode_frame;

/// Any bytes into the frame decoder: a message, "need more" or an error, never a panic, and
/// whatever decodes re-encodes to exactly the bytes it came from.
pub fn frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((msg, used))) = decode_frame(rest) {
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(
            &again[..],
            &rest[..used],
            "re-encoding {} differs",
            msg.name()
        );
        rest = &rest[used..];
    }
}

/// Any bytes into the manifest decoder: no panic, and what decodes re-encodes identically.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "re-encoding a manifest differs");
    }
}
