//! Seals arbitrary 10-byte plaintexts under a test DEK (as if they were
//! packed PANs: non-digit nibbles, bad padding, too few or too many digits,
//! Luhn failures) and opens them through the real open path
//! (`Panseal::open_pan` via the blocking facade: key lookup, state checks,
//! audit, AEAD, unpacking). `fuzz/open` cannot get past the GCM tag; this
//! target reaches the code after decryption.
//!
//! Input: 10 plaintext bytes, then the row key of the context (any bytes).
//! Asserts: no panic; a payload that is a canonical packed PAN opens to a
//! PAN that packs back to exactly those bytes; any other payload is the
//! typed `FormatError::Payload`, never another error.
#![no_main]
use std::future::Future;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use panseal::{
    blocking, hazmat, Access, AuditError, AuditEvent, AuditSink, Context, Dek, Environment, Error,
    FormatError, KeyId, KeyStore, LocalKeyService, MemoryKeyStore, Pan, Panseal,
};

/// Keeps nothing (a memory sink would grow with every run).
struct NullSink;

impl AuditSink for NullSink {
    fn record(&self, _e: &AuditEvent<'_>) -> Result<(), AuditError> {
        Ok(())
    }
}

struct Setup {
    ps: blocking::Panseal,
    dek: Dek,
    id: KeyId,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let kek = [0x42; 32];
        let env = Environment::new("fuzz").expect("env");
        let store = MemoryKeyStore::new();
        let ps = blocking::Panseal::build(
            Panseal::builder()
                .key_service(LocalKeyService::from_kek_bytes_insecure(env, kek))
                .key_store(store.clone())
                .audit(NullSink)
                .environment("fuzz")
                .scope("m"),
        )
        .expect("build");
        // A real DEK made by the real seal path; its bytes recovered with
        // the test KEK.
        let pan = Pan::parse("4111111111111111").expect("pan");
        let ctx = Context::new("cards", "pan", "0").expect("ctx");
        let id = ps.seal_pan(&pan, &ctx).expect("seal").key_id();
        // The memory store answers at once: one poll completes the fetch.
        let mut fetch = std::pin::pin!(store.fetch(id));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(record) = fetch.as_mut().poll(&mut cx) else {
            panic!("the memory store answered later");
        };
        let record = record.expect("store").expect("record");
        let dek = hazmat::unwrap_with_kek(
            &kek,
            &record.wrapped.kek,
            &record.key_request(),
            &record.wrapped.bytes,
        )
        .expect("unwrap");
        Setup { ps, dek, id }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let s = setup();
    let packed: [u8; 10] = data[..10].try_into().expect("10 bytes");
    let row = &data[10..];
    let Ok(ctx) = Context::new("cards", "pan", row) else {
        return;
    };
    let sealed = hazmat::seal_packed_with_nonce(&s.dek, s.id, [7; 12], &packed, &ctx);
    let access = Access::new("fuzz", "fuzz").expect("access");
    match s.ps.open_pan(&sealed, &ctx, &access) {
        Ok(opened) => assert_eq!(hazmat::pack_pan(&opened.pan), packed),
        Err(Error::Format(FormatError::Payload)) => {}
        Err(e) => panic!("unexpected error: {e:?}"),
    }
});
