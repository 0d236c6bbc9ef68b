//! Opening arbitrary ciphertexts under a fixed key and context: never
//! panics, and anything that opens is a valid PAN that re-seals to bytes that
//! open to the same PAN.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::{hazmat, Context, Dek, KeyId, SealedPan};

fuzz_target!(|data: &[u8]| {
    let dek = Dek::from_bytes_insecure([0x42; 32]);
    let ctx = Context::new("cards", "pan", "1").expect("valid context");
    let Ok(sealed) = SealedPan::from_bytes(data) else {
        return;
    };
    if let Ok(pan) = hazmat::open_with_dek(&dek, &sealed, &ctx) {
        let again = hazmat::seal_with_nonce(&dek, KeyId::from_bytes([1; 8]), [7; 12], &pan, &ctx);
        assert_eq!(
            hazmat::open_with_dek(&dek, &again, &ctx).expect("re-opens"),
            pan
        );
    }
});
