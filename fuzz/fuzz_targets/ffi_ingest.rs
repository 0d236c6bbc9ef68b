//! The write-only ingest C ABI entry points that take bytes:
//! `panseal_ingest_sealer_new` (public key text, also with the input's
//! bytes as the SEC1 point, to reach the curve check), `_new_pinned`
//! (fingerprint bytes), `panseal_ingest_seal` / `_seal_binary` (PAN and
//! context bytes, arbitrary capacities). Never panics (PANSEAL_PANIC is a
//! failure), never writes past the given capacities, and whatever seals
//! opens with the private key to the PAN that was sealed.
#![no_main]
use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use panseal_ffi::*;
use panseal::hazmat::IngestPrivateKey;
use panseal::{Context, Environment, IngestSealed, Pan, Scope};

struct Fixture {
    key: IngestPrivateKey,
    text: String,
    sealer: *mut panseal_ingest_sealer,
}
// SAFETY: a sealer handle is immutable and thread-safe by contract.
unsafe impl Send for Fixture {}
unsafe impl Sync for Fixture {}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = IngestPrivateKey::generate(
            &Environment::new("fuzz").unwrap(),
            &Scope::new("m").unwrap(),
            1,
        );
        let text = key.public_key().to_text();
        let mut sealer = std::ptr::null_mut();
        // SAFETY: `text` valid for its length; a valid out-pointer.
        let r = unsafe { panseal_ingest_sealer_new(text.as_ptr(), text.len(), &mut sealer) };
        assert_eq!(r, panseal_result::PANSEAL_OK);
        Fixture { key, text, sealer }
    })
}

fn split(data: &[u8]) -> [&[u8]; 5] {
    let mut parts = data.splitn(5, |b| *b == 0xFE);
    std::array::from_fn(|_| parts.next().unwrap_or(&[]))
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let [first, pan, table, column, row] = split(data);
    let ok = panseal_result::PANSEAL_OK;
    let panic = panseal_result::PANSEAL_PANIC;

    // Public key parsing: the raw bytes as text, and as the point of an
    // otherwise well-formed key.
    let point_key = format!(
        "PIK1/fuzz/m/1/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(first)
    );
    for text in [first, point_key.as_bytes()] {
        let mut s = std::ptr::null_mut();
        // SAFETY: `text` valid for its length; a valid out-pointer.
        let r = unsafe { panseal_ingest_sealer_new(text.as_ptr(), text.len(), &mut s) };
        assert_ne!(r, panic);
        assert_eq!(r == ok, !s.is_null());
        // SAFETY: NULL or a fresh handle, freed once.
        unsafe { panseal_ingest_sealer_free(s) };
    }
    // Pinning with arbitrary fingerprint bytes against the valid key.
    let mut s = std::ptr::null_mut();
    // SAFETY: pointers valid for their lengths; a valid out-pointer.
    let r = unsafe {
        panseal_ingest_sealer_new_pinned(
            f.text.as_ptr(),
            f.text.len(),
            first.as_ptr(),
            first.len(),
            &mut s,
        )
    };
    assert_ne!(r, panic);
    if r == ok {
        assert!(first.eq_ignore_ascii_case(f.key.public_key().fingerprint().as_bytes()));
    }
    // SAFETY: NULL or a fresh handle, freed once.
    unsafe { panseal_ingest_sealer_free(s) };

    // Sealing arbitrary PAN and context bytes into a buffer of arbitrary
    // capacity (the rest of the buffer must stay untouched).
    let ctx = panseal_context {
        table: table.as_ptr(),
        table_len: table.len(),
        column: column.as_ptr(),
        column_len: column.len(),
        row_key: row.as_ptr(),
        row_key_len: row.len(),
    };
    let cap = first.len() % (PANSEAL_INGEST_TEXT_BUFFER + 4);
    let mut out = [0xA5u8; PANSEAL_INGEST_TEXT_BUFFER + 8];
    let mut n = 0usize;
    // SAFETY: every pointer is valid for the length passed with it.
    let r = unsafe {
        panseal_ingest_seal(
            f.sealer,
            pan.as_ptr(),
            pan.len(),
            &ctx,
            out.as_mut_ptr().cast(),
            cap,
            &mut n,
        )
    };
    assert_ne!(r, panic);
    assert!(out[cap..].iter().all(|b| *b == 0xA5), "wrote past capacity");
    let mut bin = [0xA5u8; PANSEAL_INGEST_BINARY_LEN + 8];
    let bin_cap = first.len() % (PANSEAL_INGEST_BINARY_LEN + 4);
    let mut m = 0usize;
    // SAFETY: as above.
    let rb = unsafe {
        panseal_ingest_seal_binary(
            f.sealer,
            pan.as_ptr(),
            pan.len(),
            &ctx,
            bin.as_mut_ptr(),
            bin_cap,
            &mut m,
        )
    };
    assert_ne!(rb, panic);
    assert!(bin[bin_cap..].iter().all(|b| *b == 0xA5), "wrote past capacity");

    // What sealed opens, bound to that context, to that PAN.
    if r == ok || rb == ok {
        let expected = Pan::parse(std::str::from_utf8(pan).unwrap()).unwrap();
        let context = Context::new(
            std::str::from_utf8(table).unwrap(),
            std::str::from_utf8(column).unwrap(),
            row,
        )
        .unwrap();
        if r == ok {
            assert_eq!(n, PANSEAL_INGEST_TEXT_BUFFER - 1);
            let text = std::str::from_utf8(&out[..n]).unwrap();
            let sealed = IngestSealed::from_text(text).unwrap();
            assert!(f.key.open(&sealed, &context).unwrap() == expected);
        }
        if rb == ok {
            assert_eq!(m, PANSEAL_INGEST_BINARY_LEN);
            let sealed = IngestSealed::from_bytes(&bin[..m]).unwrap();
            assert!(f.key.open(&sealed, &context).unwrap() == expected);
        }
    }
});
