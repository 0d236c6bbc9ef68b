//! Text ciphertext parser: never panics; only canonical text is accepted,
//! so parse∘write is the identity.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::SealedPan;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = SealedPan::from_text(text) {
        assert_eq!(s.to_text(), text);
        assert_eq!(
            SealedPan::from_bytes(s.as_bytes()).expect("own bytes parse"),
            s
        );
    }
});
