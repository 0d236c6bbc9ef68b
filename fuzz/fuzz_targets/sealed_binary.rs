//! Binary ciphertext parser: never panics; parse∘write is the identity.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::SealedPan;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SealedPan::from_bytes(data) {
        assert_eq!(s.as_bytes(), data);
        let text = s.to_text();
        assert_eq!(SealedPan::from_text(&text).expect("own text parses"), s);
    }
});
