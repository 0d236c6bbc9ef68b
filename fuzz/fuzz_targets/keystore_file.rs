//! Key-store file parser: never panics; whatever it accepts re-encodes to
//! the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::hazmat;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = hazmat::decode_key_store_file(data) {
        assert_eq!(hazmat::encode_key_store_file(&records), data);
    }
});
