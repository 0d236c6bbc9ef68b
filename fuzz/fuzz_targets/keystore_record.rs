//! Key-store record parser: never panics; decode∘encode is the identity.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::WrappedDek;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = WrappedDek::from_bytes(data) {
        assert_eq!(r.to_bytes(), data);
    }
});
