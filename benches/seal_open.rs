//! Seal and open of one PAN with a cached DEK, blind index, and — in the
//! same run — raw `aes-gcm` seal/open of the same bytes (10-byte packed PAN,
//! same associated data) as the baseline. Report ratios, not absolute times.
//!
//! Two more same-run references: `ring`'s AES-256-GCM (`LessSafeKey`, the
//! same bytes, counter nonce) and Tink's keyset AEAD (`tink-aead`,
//! AES-256-GCM keyset: a 5-byte key prefix, random nonce, output in a new
//! `Vec`; no envelope, rotation or audit).
//!
//! `cargo bench --bench seal_open`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use criterion::{criterion_group, criterion_main, Criterion};
use panseal::{
    blocking, Access, AuditError, AuditEvent, AuditSink, Context, Environment, LocalKeyService,
    MemoryKeyStore, Pan, Panseal,
};

/// Counts events and keeps nothing: the cheapest possible sink, so the
/// bench measures panseal, not a log writer.
#[derive(Default)]
struct CountingSink(AtomicU64);

impl AuditSink for CountingSink {
    fn record(&self, _e: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("bench").unwrap()))
            .key_store(MemoryKeyStore::new())
            .audit(CountingSink::default())
            .environment("bench")
            .scope("merchant-1"),
    )
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let ctx = Context::new("cards", "pan", "0001234567").unwrap();
    let access = Access::new("bench", "benchmark").unwrap();
    // Warm: creates the DEK, caches it.
    let sealed = ps.seal_pan(&pan, &ctx).unwrap();
    assert_eq!(ps.open_pan(&sealed, &ctx, &access).unwrap().pan, pan);

    // Baseline: the same 10 bytes and the same associated data, raw AES-GCM,
    // a counter nonce (no RNG), a pre-expanded key.
    let raw = Aes256Gcm::new(&[7u8; 32].into());
    let mut aad = sealed.as_bytes()[..10].to_vec();
    aad.extend_from_slice(ctx.encoded());
    let plain = [0x41u8, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xFF, 0xFF];
    let mut counter = 0u64;
    let mut raw_ct = plain;
    let raw_nonce = [0u8; 12];
    let raw_tag = raw
        .encrypt_in_place_detached(Nonce::from_slice(&raw_nonce), &aad, &mut raw_ct)
        .unwrap();

    // ring: the same key, bytes and associated data.
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7u8; 32]).unwrap(),
    );
    let mut ring_sealed = plain.to_vec();
    ring_key
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(raw_nonce),
            ring::aead::Aad::from(&aad),
            &mut ring_sealed,
        )
        .unwrap();
    let ring_sealed: [u8; 26] = ring_sealed.try_into().unwrap();

    // Tink: an AES-256-GCM keyset handle and its primitive.
    tink_aead::init();
    let tink_handle =
        tink_core::keyset::Handle::new(&tink_aead::aes256_gcm_key_template()).unwrap();
    let tink = tink_aead::new(&tink_handle).unwrap();
    let tink_ct = tink.encrypt(&plain, &aad).unwrap();
    assert_eq!(tink.decrypt(&tink_ct, &aad).unwrap(), plain);

    let mut g = c.benchmark_group("seal");
    g.bench_function("raw_aes_gcm", |b| {
        b.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            let mut buf = plain;
            let tag = raw
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), black_box(&aad), &mut buf)
                .unwrap();
            black_box((buf, tag))
        })
    });
    g.bench_function("raw_ring", |b| {
        b.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            let mut buf = plain;
            let tag = ring_key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(black_box(&aad)),
                    &mut buf,
                )
                .unwrap();
            black_box((buf, tag))
        })
    });
    g.bench_function("tink_aead", |b| {
        b.iter(|| black_box(tink.encrypt(black_box(&plain), black_box(&aad)).unwrap()))
    });
    // What a nonce from `rand`'s thread-local generator costs on top of the
    // raw seal (the generator panseal used before it became fork-safe), and
    // what one `getpid` per seal would (the fork check it does not do).
    g.bench_function("raw_aes_gcm_thread_rng_nonce", |b| {
        use rand::RngCore;
        b.iter(|| {
            let mut nonce = [0u8; 12];
            rand::thread_rng().fill_bytes(&mut nonce);
            let mut buf = plain;
            let tag = raw
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), black_box(&aad), &mut buf)
                .unwrap();
            black_box((buf, tag))
        })
    });
    g.bench_function("raw_aes_gcm_getpid_per_seal", |b| {
        b.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            nonce[8..].copy_from_slice(&black_box(std::process::id()).to_le_bytes());
            let mut buf = plain;
            let tag = raw
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), black_box(&aad), &mut buf)
                .unwrap();
            black_box((buf, tag))
        })
    });
    g.bench_function("panseal_blocking", |b| {
        b.iter(|| black_box(ps.seal_pan(black_box(&pan), black_box(&ctx)).unwrap()))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let asynch = ps.as_async().clone();
    g.bench_function("panseal_async_current_thread", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(asynch.seal_pan(black_box(&pan), black_box(&ctx)))
                    .unwrap(),
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("open");
    g.bench_function("raw_aes_gcm", |b| {
        b.iter(|| {
            let mut buf = raw_ct;
            raw.decrypt_in_place_detached(
                Nonce::from_slice(&raw_nonce),
                black_box(&aad),
                &mut buf,
                Tag::from_slice(&raw_tag),
            )
            .unwrap();
            black_box(buf)
        })
    });
    g.bench_function("raw_ring", |b| {
        b.iter(|| {
            let mut buf = ring_sealed;
            let opened = ring_key
                .open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(raw_nonce),
                    ring::aead::Aad::from(black_box(&aad)),
                    &mut buf,
                )
                .unwrap();
            black_box(opened.len());
            black_box(buf)
        })
    });
    g.bench_function("tink_aead", |b| {
        b.iter(|| black_box(tink.decrypt(black_box(&tink_ct), black_box(&aad)).unwrap()))
    });
    g.bench_function("panseal_blocking", |b| {
        b.iter(|| {
            black_box(
                ps.open_pan(black_box(&sealed), black_box(&ctx), &access)
                    .unwrap(),
            )
        })
    });
    g.bench_function("panseal_async_current_thread", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(asynch.open_pan(black_box(&sealed), black_box(&ctx), &access))
                    .unwrap(),
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("blind_index");
    ps.blind_index(&pan).unwrap();
    g.bench_function("panseal_async_current_thread", |b| {
        b.iter(|| black_box(rt.block_on(asynch.blind_index(black_box(&pan))).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
