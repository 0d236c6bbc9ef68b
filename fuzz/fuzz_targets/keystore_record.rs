//! Key-store record parser (versions 1 and 2): never panics; decode∘encode
//! is the identity; for a version-2 record, the signed bytes are the label
//! followed by the encoding without its 32-byte tag.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::WrappedDek;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = WrappedDek::from_bytes(data) {
        assert_eq!(r.to_bytes(), data);
        if r.tag.is_some() {
            let signed = r.signed_bytes();
            let label = b"panseal-record-v2";
            assert_eq!(&signed[..label.len()], label);
            assert_eq!(&signed[label.len()..], &data[..data.len() - 32]);
        }
    }
});
