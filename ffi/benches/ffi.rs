//! Seal and open through the C ABI vs the Rust API, in one run.
//!
//! "rust_same_inputs" does what the C entry point does from the same raw
//! inputs (parse the PAN, build the context and access, seal, write the text
//! form into a buffer); "rust_prepared" reuses a parsed PAN, context and
//! access, as a Rust application can. The C ABI overhead target is < 20 %
//! over the Rust API doing the same work.
//!
//! "ffi_ingest_seal" does the same for write-only ingest (HPKE, public key
//! only): `IngestSealer::seal` in Rust vs `panseal_ingest_seal` through the
//! C ABI, with a sealer built from the P-256 generator as the public key
//! (any valid point serves; nothing is opened).
//!
//! `cargo bench --features ffi --bench ffi`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use panseal::{
    blocking, config::ClientConfig, Access, Context, IngestPublicKey, IngestSealer, Pan, SealedPan,
};
use panseal_ffi::*;

/// The P-256 generator, uncompressed SEC1: a valid public key.
const GENERATOR: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                         4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

fn ingest(c: &mut Criterion) {
    use base64::Engine as _;
    let point = hex::decode(GENERATOR.replace(' ', "")).unwrap();
    let text = format!(
        "PIK1/bench/m/1/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&point)
    );
    let rust = IngestSealer::new(IngestPublicKey::from_text(&text).unwrap());
    let mut sealer = std::ptr::null_mut();
    // SAFETY: `text` is valid for its length; a valid out-pointer.
    assert_eq!(
        unsafe { panseal_ingest_sealer_new(text.as_ptr(), text.len(), &mut sealer) },
        panseal_result::PANSEAL_OK
    );
    let pan_s = b"4111111111111111";
    let (table, column, row) = (b"cards", b"pan", b"0001234567");
    let ctx = panseal_context {
        table: table.as_ptr(),
        table_len: table.len(),
        column: column.as_ptr(),
        column_len: column.len(),
        row_key: row.as_ptr(),
        row_key_len: row.len(),
    };
    let pan = Pan::parse("4111111111111111").unwrap();
    let context = Context::new("cards", "pan", "0001234567").unwrap();

    let mut g = c.benchmark_group("ffi_ingest_seal");
    g.bench_function("rust_prepared", |b| {
        b.iter(|| black_box(rust.seal(black_box(&pan), black_box(&context)).unwrap()))
    });
    g.bench_function("rust_same_inputs", |b| {
        b.iter(|| {
            let p = Pan::parse(std::str::from_utf8(black_box(pan_s)).unwrap()).unwrap();
            let cx = Context::new("cards", "pan", black_box(row)).unwrap();
            let s = rust.seal(&p, &cx).unwrap();
            let mut buf = [0u8; PANSEAL_INGEST_TEXT_BUFFER];
            buf[..PANSEAL_INGEST_TEXT_BUFFER - 1].copy_from_slice(s.to_text().as_bytes());
            black_box(buf)
        })
    });
    g.bench_function("c_abi", |b| {
        // SAFETY: pointers valid for the lengths given; a live handle.
        b.iter(|| unsafe {
            let mut buf = [0u8; PANSEAL_INGEST_TEXT_BUFFER];
            let mut n = 0usize;
            let r = panseal_ingest_seal(
                sealer,
                black_box(pan_s).as_ptr(),
                16,
                &ctx,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut n,
            );
            black_box((r, buf))
        })
    });
    g.finish();
    // SAFETY: the handle is live and freed once.
    unsafe { panseal_ingest_sealer_free(sealer) };
}

const CONFIG: &str = r#"{"environment":"bench","scope":"m","key_service":{"type":"local"},
    "key_store":{"type":"memory"},"audit":{"type":"memory"}}"#;

fn bench(c: &mut Criterion) {
    let rust =
        blocking::Panseal::build(ClientConfig::from_json(CONFIG).unwrap().builder().unwrap())
            .unwrap();
    let mut client = std::ptr::null_mut();
    let cfg = std::ffi::CString::new(CONFIG).unwrap();
    // SAFETY: valid NUL-terminated config and out-pointer.
    assert_eq!(
        unsafe { panseal_client_new(cfg.as_ptr(), &mut client) },
        panseal_result::PANSEAL_OK
    );
    let pan_s = b"4111111111111111";
    let (table, column, row) = (b"cards", b"pan", b"0001234567");
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
    // SAFETY (all calls below): pointers valid for the lengths given.
    unsafe {
        panseal_seal(
            client,
            pan_s.as_ptr(),
            16,
            &ctx,
            out.as_mut_ptr().cast(),
            65,
            &mut n,
        );
    }
    let sealed_text = out;

    let pan = Pan::parse("4111111111111111").unwrap();
    let context = Context::new("cards", "pan", "0001234567").unwrap();
    let access = Access::new("bench", "benchmark").unwrap();
    rust.seal_pan(&pan, &context).unwrap();
    let rust_sealed =
        SealedPan::from_text(std::str::from_utf8(&sealed_text[..64]).unwrap()).unwrap();
    // Warm the Rust handle's cache for the C client's DEK? They are separate
    // clients; each opens its own ciphertexts below.
    let rust_own = rust.seal_pan(&pan, &context).unwrap();

    let mut g = c.benchmark_group("ffi_seal");
    g.bench_function("rust_prepared", |b| {
        b.iter(|| black_box(rust.seal_pan(black_box(&pan), black_box(&context)).unwrap()))
    });
    g.bench_function("rust_same_inputs", |b| {
        b.iter(|| {
            let p = Pan::parse(std::str::from_utf8(black_box(pan_s)).unwrap()).unwrap();
            let cx = Context::new("cards", "pan", black_box(row)).unwrap();
            let s = rust.seal_pan(&p, &cx).unwrap();
            let mut buf = [0u8; 65];
            buf[..64].copy_from_slice(s.to_text().as_bytes());
            black_box(buf)
        })
    });
    g.bench_function("c_abi", |b| {
        b.iter(|| unsafe {
            let mut buf = [0u8; 65];
            let mut n = 0usize;
            let r = panseal_seal(
                client,
                black_box(pan_s).as_ptr(),
                16,
                &ctx,
                buf.as_mut_ptr().cast(),
                65,
                &mut n,
            );
            black_box((r, buf))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ffi_open");
    let own_text = rust_own.to_text();
    let _ = rust_sealed;
    g.bench_function("rust_prepared", |b| {
        b.iter(|| {
            black_box(
                rust.open_pan(black_box(&rust_own), &context, &access)
                    .unwrap(),
            )
        })
    });
    g.bench_function("rust_same_inputs", |b| {
        b.iter(|| {
            let s = SealedPan::from_text(black_box(&own_text)).unwrap();
            let cx = Context::new("cards", "pan", black_box(row)).unwrap();
            let a = Access::new("bench", "benchmark").unwrap();
            let opened = rust.open_pan(&s, &cx, &a).unwrap();
            let mut buf = [0u8; 20];
            buf[..16].copy_from_slice(opened.pan.expose_digits().as_bytes());
            black_box(buf)
        })
    });
    g.bench_function("c_abi", |b| {
        b.iter(|| unsafe {
            let mut pan_out = [0u8; 20];
            let mut n = 0usize;
            let mut reseal = false;
            let r = panseal_open(
                client,
                black_box(&sealed_text).as_ptr(),
                64,
                &ctx,
                c"bench".as_ptr(),
                c"benchmark".as_ptr(),
                pan_out.as_mut_ptr().cast(),
                20,
                &mut n,
                &mut reseal,
            );
            black_box((r, pan_out))
        })
    });
    g.finish();
    // SAFETY: the handle is live and freed once.
    unsafe { panseal_client_free(client) };
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench, ingest
}
criterion_main!(benches);
