//! Write-only ingest, in one run (report ratios, not absolute times):
//!
//! * seal: the front end's `IngestSealer::seal` (HPKE, DHKEM(P-256) +
//!   HKDF-SHA256 + AES-256-GCM, one ephemeral key agreement per PAN)
//!   against the compact `seal_pan` with a cached DEK (the baseline), and
//!   the same HPKE seal with DHKEM(X25519) through the `hpke` crate
//!   (the suite-choice comparison: same plaintext, info and AAD sizes);
//!   With `--features fast-ingest` also `IngestSealer::seal` on `ring`'s
//!   P-256 (`ingest_sealer_p256_ring`), in the same run as the `hpke`-crate
//!   seal (`ingest_sealer_p256`) and the compact baseline;
//! * open: `IngestPrivateKey::open` (what keyd runs per ingest open)
//!   against the compact open and the X25519 open;
//! * admit: `Panseal::admit` on the local service, 256 items per call
//!   (open + compact seal + blind index inside the service, per item).
//!
//! `cargo bench --features hazmat-test-keys --bench ingest`
//! (`--features fast-ingest,hazmat-test-keys` for the ring row)

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hpke::{Kem as _, OpModeR, OpModeS};
use panseal::hazmat::IngestPrivateKey;
use panseal::{
    blocking, Access, AuditError, AuditEvent, AuditSink, Context, Environment, IngestSealed,
    IngestSealer, LocalKeyService, MemoryKeyStore, Pan, Panseal, Scope,
};

type X25519 = hpke::kem::X25519HkdfSha256;
type P256 = hpke::kem::DhP256HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::AesGcm256;

#[derive(Default)]
struct CountingSink(AtomicU64);

impl AuditSink for CountingSink {
    fn record(&self, _e: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let env = Environment::new("bench").unwrap();
    let scope = Scope::new("merchant-1").unwrap();
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(env.clone()))
            .key_store(MemoryKeyStore::new())
            .audit(CountingSink::default())
            .environment("bench")
            .scope("merchant-1"),
    )
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let ctx = Context::new("cards", "pan", "0001234567").unwrap();
    let access = Access::new("bench", "benchmark").unwrap();
    let compact = ps.seal_pan(&pan, &ctx).unwrap();
    assert_eq!(ps.open_pan(&compact, &ctx, &access).unwrap().pan, pan);

    let key = IngestPrivateKey::generate(&env, &scope, 1);
    let sealer = IngestSealer::new(key.public_key().clone());
    let ingest = sealer.seal(&pan, &ctx).unwrap();
    assert_eq!(key.open(&ingest, &ctx).unwrap(), pan);

    // X25519 with the same sizes: 10-byte plaintext, the ingest info
    // (label + names + version) and AAD (10-byte header + context).
    let info = {
        let mut i = b"panseal ingest v1\0".to_vec();
        i.extend_from_slice(b"\x05bench\x0amerchant-1\0\0\0\x01");
        i
    };
    let mut aad = ingest.as_bytes()[..10].to_vec();
    aad.extend_from_slice(ctx.encoded());
    let plain = [0x41u8, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xFF, 0xFF];
    let mut rng = rand::rngs::OsRng;
    let (xsk, xpk) = X25519::gen_keypair(&mut rng);
    let (xenc, xct) = hpke::single_shot_seal::<Aead, Kdf, X25519, _>(
        &OpModeS::Base,
        &xpk,
        &info,
        &plain,
        &aad,
        &mut rng,
    )
    .unwrap();
    let (psk, ppk) = P256::gen_keypair(&mut rng);

    let mut g = c.benchmark_group("ingest_seal");
    g.throughput(Throughput::Elements(1));
    g.bench_function("compact_seal_pan_cached_dek", |b| {
        b.iter(|| black_box(ps.seal_pan(black_box(&pan), black_box(&ctx)).unwrap()))
    });
    // "ingest seal (hpke crate)": `IngestSealer`'s default path, measured
    // through hazmat so the row stays comparable with `fast-ingest` on.
    g.bench_function("ingest_sealer_p256", |b| {
        b.iter(|| {
            black_box(
                panseal::hazmat::ingest_seal_with_hpke_crate(
                    &sealer,
                    black_box(&pan),
                    black_box(&ctx),
                )
                .unwrap(),
            )
        })
    });
    // "ingest seal (ring ECDH)": `IngestSealer::seal` with `fast-ingest`.
    #[cfg(feature = "fast-ingest")]
    g.bench_function("ingest_sealer_p256_ring", |b| {
        b.iter(|| black_box(sealer.seal(black_box(&pan), black_box(&ctx)).unwrap()))
    });
    g.bench_function("hpke_crate_p256_same_sizes", |b| {
        b.iter(|| {
            black_box(
                hpke::single_shot_seal::<Aead, Kdf, P256, _>(
                    &OpModeS::Base,
                    &ppk,
                    &info,
                    black_box(&plain),
                    &aad,
                    &mut rng,
                )
                .unwrap(),
            )
        })
    });
    g.bench_function("hpke_crate_x25519_same_sizes", |b| {
        b.iter(|| {
            black_box(
                hpke::single_shot_seal::<Aead, Kdf, X25519, _>(
                    &OpModeS::Base,
                    &xpk,
                    &info,
                    black_box(&plain),
                    &aad,
                    &mut rng,
                )
                .unwrap(),
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ingest_open");
    g.throughput(Throughput::Elements(1));
    g.bench_function("compact_open_pan_cached_dek", |b| {
        b.iter(|| black_box(ps.open_pan(black_box(&compact), &ctx, &access).unwrap()))
    });
    g.bench_function("ingest_private_key_p256", |b| {
        b.iter(|| black_box(key.open(black_box(&ingest), &ctx).unwrap()))
    });
    let (penc, pct) = hpke::single_shot_seal::<Aead, Kdf, P256, _>(
        &OpModeS::Base,
        &ppk,
        &info,
        &plain,
        &aad,
        &mut rng,
    )
    .unwrap();
    g.bench_function("hpke_crate_p256_same_sizes", |b| {
        b.iter(|| {
            black_box(
                hpke::single_shot_open::<Aead, Kdf, P256>(
                    &OpModeR::Base,
                    &psk,
                    &penc,
                    &info,
                    &pct,
                    &aad,
                )
                .unwrap(),
            )
        })
    });
    g.bench_function("hpke_crate_x25519_same_sizes", |b| {
        b.iter(|| {
            black_box(
                hpke::single_shot_open::<Aead, Kdf, X25519>(
                    &OpModeR::Base,
                    &xsk,
                    &xenc,
                    &info,
                    &xct,
                    &aad,
                )
                .unwrap(),
            )
        })
    });
    g.finish();

    // Admission on the local service: 256 items per call.
    ps.rotate_ingest_key().unwrap();
    let sealer = ps.ingest_sealer(None).unwrap();
    let items: Vec<(IngestSealed, Context)> = (0..256)
        .map(|i| {
            let c = Context::new("cards", "pan", format!("row-{i}")).unwrap();
            (sealer.seal(&pan, &c).unwrap(), c)
        })
        .collect();
    assert!(ps.admit(&items).unwrap().iter().all(|r| r.is_ok()));
    let mut g = c.benchmark_group("admit");
    g.throughput(Throughput::Elements(items.len() as u64));
    g.sample_size(20);
    g.bench_function("local_admit_batch_256", |b| {
        b.iter(|| black_box(ps.admit(black_box(&items)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
