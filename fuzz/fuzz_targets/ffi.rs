//! The C ABI entry points that take bytes: seal, open, blind index, mask and
//! the configuration parser, with arbitrary input split into fields. Never
//! panics (a panic would be caught and reported as PANSEAL_PANIC, which this
//! target treats as a failure), never writes past the given capacities.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use panseal_ffi::*;

struct Client(*mut panseal_client);
// SAFETY: panseal client handles are thread-safe by contract.
unsafe impl Send for Client {}
unsafe impl Sync for Client {}

fn client() -> *const panseal_client {
    static C: OnceLock<Client> = OnceLock::new();
    C.get_or_init(|| {
        let cfg =
            b"{\"environment\":\"fuzz\",\"scope\":\"m\",\"key_service\":{\"type\":\"local\"},\
                    \"key_store\":{\"type\":\"memory\"},\"audit\":{\"type\":\"memory\"}}\0";
        let mut c = std::ptr::null_mut();
        // SAFETY: NUL-terminated config and a valid out-pointer.
        let r = unsafe { panseal_client_new(cfg.as_ptr().cast(), &mut c) };
        assert_eq!(r, panseal_result::PANSEAL_OK);
        Client(c)
    })
    .0
}

fn split(data: &[u8]) -> (&[u8], &[u8], &[u8], &[u8]) {
    let mut parts = data.splitn(4, |b| *b == 0xFE);
    let a = parts.next().unwrap_or(&[]);
    let b = parts.next().unwrap_or(&[]);
    let c = parts.next().unwrap_or(&[]);
    let d = parts.next().unwrap_or(&[]);
    (a, b, c, d)
}

fuzz_target!(|data: &[u8]| {
    let c = client();
    let (first, table, column, row) = split(data);
    let ctx = panseal_context {
        table: table.as_ptr(),
        table_len: table.len(),
        column: column.as_ptr(),
        column_len: column.len(),
        row_key: row.as_ptr(),
        row_key_len: row.len(),
    };
    let mut out = [0u8; 65];
    let mut n = 0usize;
    let cap = (first.len() % 70).min(out.len());
    // SAFETY: every pointer is valid for the length passed with it.
    unsafe {
        let r = panseal_seal(
            c,
            first.as_ptr(),
            first.len(),
            &ctx,
            out.as_mut_ptr().cast(),
            cap,
            &mut n,
        );
        assert_ne!(r, panseal_result::PANSEAL_PANIC);
        let mut pan = [0u8; 20];
        let mut reseal = false;
        let r = panseal_open(
            c,
            first.as_ptr(),
            first.len(),
            &ctx,
            b"fuzz\0".as_ptr().cast(),
            b"fuzz\0".as_ptr().cast(),
            pan.as_mut_ptr().cast(),
            pan.len(),
            &mut n,
            &mut reseal,
        );
        assert_ne!(r, panseal_result::PANSEAL_PANIC);
        let r = panseal_mask(
            first.as_ptr(),
            first.len(),
            u32::from(data.len() as u8 % 4),
            pan.as_mut_ptr().cast(),
            pan.len(),
            &mut n,
        );
        assert_ne!(r, panseal_result::PANSEAL_PANIC);
        let mut version = 0u32;
        let r = panseal_blind_index(
            c,
            first.as_ptr(),
            first.len(),
            out.as_mut_ptr().cast(),
            out.len(),
            &mut n,
            &mut version,
        );
        assert_ne!(r, panseal_result::PANSEAL_PANIC);
        // The configuration parser (NUL-terminated copy of the input).
        let mut cfg = first.to_vec();
        cfg.retain(|b| *b != 0);
        cfg.push(0);
        let mut other = std::ptr::null_mut();
        let r = panseal_client_new(cfg.as_ptr().cast(), &mut other);
        assert_ne!(r, panseal_result::PANSEAL_PANIC);
        panseal_client_free(other);
    }
});
