//! Ingest parsers and the ingest open path (`FORMAT.md` §17): never panic.
//! `IngestSealed::from_bytes`/`from_text`, `StoredPan` (either form),
//! `IngestPublicKey::from_text`/`from_parts`, and opening arbitrary bytes
//! with a fixed key: whatever parses writes back to the same bytes/text,
//! and nothing random opens.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use panseal::hazmat::IngestPrivateKey;
use panseal::{Context, Environment, IngestPublicKey, IngestSealed, Scope, StoredPan};

fn key() -> &'static IngestPrivateKey {
    static KEY: OnceLock<IngestPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| {
        IngestPrivateKey::from_scalar(
            &Environment::new("fuzz").unwrap(),
            &Scope::new("m").unwrap(),
            1,
            &[7u8; 32],
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = IngestSealed::from_bytes(data) {
        assert_eq!(s.as_bytes(), data);
        assert_eq!(IngestSealed::from_text(&s.to_text()).expect("own text parses"), s);
    }
    if let Ok(s) = StoredPan::from_bytes(data) {
        assert_eq!(s.as_bytes(), data);
    }
    let ctx = Context::new("cards", "pan", "1").unwrap();
    // Arbitrary bytes, header forced to the fixed key's: only the HPKE
    // open can refuse them (it always does: 2^-128).
    if data.len() >= 91 {
        let mut b = [0u8; 101];
        b[0] = 1;
        b[1] = 2;
        b[2..6].copy_from_slice(&key().public_key().key_tag());
        b[6..10].copy_from_slice(&1u32.to_be_bytes());
        b[10..101].copy_from_slice(&data[..91]);
        let s = IngestSealed::from_bytes(&b).expect("well-formed");
        assert!(key().open(&s, &ctx).is_err());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(s) = IngestSealed::from_text(text) {
            assert_eq!(s.to_text(), text);
            let _ = key().open(&s, &ctx);
        }
        if let Ok(s) = StoredPan::from_text(text) {
            assert_eq!(s.to_text(), text);
        }
        if let Ok(k) = IngestPublicKey::from_text(text) {
            assert_eq!(IngestPublicKey::from_text(&k.to_text()).unwrap(), k);
        }
    }
    let _ = IngestPublicKey::from_parts(
        &Environment::new("fuzz").unwrap(),
        &Scope::new("m").unwrap(),
        1,
        data,
    );
});
