//! Cold open (DEK cache miss → one key-service unwrap) against warm open
//! (DEK cached), per key-service backend, in one run: the in-process local
//! service, PKCS#11 on SoftHSM2, and AWS KMS on a local moto server (both
//! set up by the bench itself, as the tests do). Also the backend's bare
//! `unwrap` call, for reference.
//!
//! Then the keyed hash inside the service (`KeyService::blind_index`) for
//! PKCS#11 (`CKM_SHA256_HMAC`) and KMS (`GenerateMac`): one PAN per
//! request, and batches of 1,000 PANs per request (throughput in PANs/s),
//! to be read against the same run's `key_service/unwrap` baseline.
//!
//! Then write-only ingest: opening one ingest ciphertext (HPKE, P-256)
//! through the token (`CKM_ECDH1_DERIVE` in SoftHSM2, the rest of HPKE in
//! process) against the in-process `IngestPrivateKey::open` of the same
//! run, and `admit` of a batch of 100 through the token.
//!
//! `cargo bench --features pkcs11,aws-kms,hazmat-test-keys --bench backends`
//!
//! A cold open is forced by a DEK cache of capacity 1 and two ciphertexts
//! under two different DEKs, opened alternately: every open misses, fetches
//! the wrapped DEK from the (in-memory) key store, unwraps it through the
//! backend, audits and decrypts. The set-up checks that each such open made
//! exactly one unwrap.

#[path = "../tests/it/moto.rs"]
mod moto;
#[path = "../tests/it/softhsm.rs"]
mod softhsm;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use panseal::hazmat::IngestPrivateKey;
use panseal::{
    blocking, Access, AdmitItem, AdmitRequest, AuditError, AuditEvent, AuditSink, AwsKmsConfig,
    AwsKmsCredentials, AwsKmsKeyService, Context, Environment, IngestOpenRequest, IngestSealer,
    KeyId, KeyPurpose, KeyRequest, KeyService, KeyStore, LocalKeyService, MemoryKeyStore,
    Operation, Pan, Panseal, Pkcs11Config, Pkcs11KeyService, Pkcs11Pin, Policy, Scope,
};

/// Counts opens and unwraps, keeps nothing.
#[derive(Default)]
struct CountingSink {
    opens: AtomicU64,
    unwraps: AtomicU64,
}

impl AuditSink for CountingSink {
    fn record(&self, e: &AuditEvent<'_>) -> Result<(), AuditError> {
        match e.operation {
            Operation::Open => self.opens.fetch_add(1, Ordering::Relaxed),
            Operation::Unwrap => self.unwraps.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        Ok(())
    }
}

fn panseal(
    ks: Arc<dyn KeyService>,
    store: &MemoryKeyStore,
    audit: &Arc<CountingSink>,
    policy: Policy,
) -> blocking::Panseal {
    blocking::Panseal::build(
        Panseal::builder()
            .key_service_arc(ks)
            .key_store(store.clone())
            .audit_arc(audit.clone())
            .environment("bench")
            .scope("merchant-1")
            .policy(policy),
    )
    .unwrap()
}

fn bench_backend(
    c: &mut Criterion,
    name: &str,
    ks: Arc<dyn KeyService>,
    rt: &tokio::runtime::Runtime,
) {
    let pan = Pan::parse("4111111111111111").unwrap();
    let access = Access::new("bench", "benchmark").unwrap();
    let store = MemoryKeyStore::new();
    let audit = Arc::new(CountingSink::default());

    // Two ciphertexts under two DEKs.
    let writer = panseal(ks.clone(), &store, &audit, Policy::default().max_uses(1));
    let ctx_a = Context::new("cards", "pan", "row-a").unwrap();
    let ctx_b = Context::new("cards", "pan", "row-b").unwrap();
    let a = writer.seal_pan(&pan, &ctx_a).unwrap();
    let b = writer.seal_pan(&pan, &ctx_b).unwrap();
    assert_ne!(a.key_id(), b.key_id());

    // Cold: a one-entry DEK cache, alternate between the two.
    let cold = panseal(
        ks.clone(),
        &store,
        &audit,
        Policy::default().cache_capacity(1),
    );
    let before = audit.unwraps.load(Ordering::Relaxed);
    for _ in 0..4 {
        cold.open_pan(&a, &ctx_a, &access).unwrap();
        cold.open_pan(&b, &ctx_b, &access).unwrap();
    }
    assert_eq!(
        audit.unwraps.load(Ordering::Relaxed) - before,
        8,
        "every cold open must unwrap once"
    );
    let warm = panseal(ks.clone(), &store, &audit, Policy::default());
    warm.open_pan(&a, &ctx_a, &access).unwrap();

    let mut g = c.benchmark_group("open");
    g.bench_function(BenchmarkId::new("warm", name), |bench| {
        bench.iter(|| black_box(warm.open_pan(black_box(&a), &ctx_a, &access).unwrap()))
    });
    let mut flip = false;
    g.bench_function(BenchmarkId::new("cold", name), |bench| {
        bench.iter(|| {
            flip = !flip;
            let (s, c) = if flip { (&a, &ctx_a) } else { (&b, &ctx_b) };
            black_box(cold.open_pan(black_box(s), c, &access).unwrap())
        })
    });
    g.finish();

    // The backend call alone.
    let request = KeyRequest {
        id: KeyId::random(),
        scope: Scope::new("merchant-1").unwrap(),
        environment: Environment::new("bench").unwrap(),
        purpose: KeyPurpose::Data,
    };
    let (_dek, wrapped) = rt.block_on(ks.generate(&request)).unwrap();
    let mut g = c.benchmark_group("key_service");
    g.bench_function(BenchmarkId::new("unwrap", name), |bench| {
        bench.iter(|| black_box(rt.block_on(ks.unwrap(&request, &wrapped, &access)).unwrap()))
    });
    g.finish();
}

/// `blind_index` single and batch-of-1,000 against a backend that keeps
/// index keys inside (PKCS#11, KMS).
fn bench_hmac(
    c: &mut Criterion,
    name: &str,
    ks: Arc<dyn KeyService>,
    rt: &tokio::runtime::Runtime,
) {
    let access = Access::new("bench", "benchmark").unwrap();
    let scope = Scope::new("merchant-1").unwrap();
    let version = rt.block_on(ks.create_index_key(&scope)).unwrap().version;
    let pans: Vec<Pan> = (0..1000u64)
        .map(|i| {
            let body = format!("411111{:09}", i);
            // Luhn check digit.
            let sum: u32 = body
                .bytes()
                .rev()
                .enumerate()
                .map(|(k, b)| {
                    let d = u32::from(b - b'0');
                    if k % 2 == 0 {
                        let x = d * 2;
                        if x > 9 {
                            x - 9
                        } else {
                            x
                        }
                    } else {
                        d
                    }
                })
                .sum();
            Pan::parse(&format!("{body}{}", (10 - sum % 10) % 10)).unwrap()
        })
        .collect();
    let refs: Vec<&Pan> = pans.iter().collect();
    let mut g = c.benchmark_group("blind_index");
    g.bench_function(BenchmarkId::new("single", name), |bench| {
        bench.iter(|| {
            black_box(
                rt.block_on(ks.blind_index(&scope, &[version], &refs[..1], &access))
                    .unwrap(),
            )
        })
    });
    g.finish();
    let mut g = c.benchmark_group("blind_index_batch_1000");
    g.sample_size(10);
    g.throughput(criterion::Throughput::Elements(1000));
    g.bench_function(BenchmarkId::new("batch", name), |bench| {
        bench.iter(|| {
            let v = rt
                .block_on(ks.blind_index(&scope, &[version], &refs, &access))
                .unwrap();
            assert_eq!(v.len(), 1000);
            black_box(v)
        })
    });
    g.finish();
}

/// Ingest open: in process (`IngestPrivateKey::open`, the baseline) and
/// through the token; then admission of 100 ciphertexts per request.
fn bench_ingest(c: &mut Criterion, ks: Arc<dyn KeyService>, rt: &tokio::runtime::Runtime) {
    let access = Access::new("bench", "benchmark").unwrap();
    let env = Environment::new("bench").unwrap();
    let scope = Scope::new("merchant-1").unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let ctx = Context::new("cards", "pan", "row-1").unwrap();

    let local = IngestPrivateKey::generate(&env, &scope, 1);
    let local_sealed = IngestSealer::new(local.public_key().clone())
        .seal(&pan, &ctx)
        .unwrap();
    let info = rt.block_on(ks.create_ingest_key(&scope)).unwrap();
    let sealer = IngestSealer::from_info(&info).unwrap();
    let token_sealed = sealer.seal(&pan, &ctx).unwrap();
    let request = IngestOpenRequest {
        scope: &scope,
        sealed: &token_sealed,
        context: &ctx,
    };
    assert_eq!(
        rt.block_on(ks.open_ingest(&request, &access)).unwrap().pan,
        pan
    );

    let mut g = c.benchmark_group("ingest_open");
    g.bench_function(BenchmarkId::new("open", "in_process"), |bench| {
        bench.iter(|| black_box(local.open(&local_sealed, &ctx).unwrap()))
    });
    g.bench_function(BenchmarkId::new("open", "pkcs11_softhsm2"), |bench| {
        bench.iter(|| black_box(rt.block_on(ks.open_ingest(&request, &access)).unwrap()))
    });
    g.finish();

    // Admission: a data DEK record made through the same service.
    let store = MemoryKeyStore::new();
    let audit = Arc::new(CountingSink::default());
    let p = panseal(ks.clone(), &store, &audit, Policy::default());
    p.seal_pan(&pan, &ctx).unwrap();
    let record = rt.block_on(store.list(None)).unwrap().remove(0);
    let index = rt.block_on(ks.create_index_key(&scope)).unwrap().version;
    let contexts: Vec<Context> = (0..100)
        .map(|i| Context::new("cards", "pan", format!("row-{i}")).unwrap())
        .collect();
    let sealed: Vec<_> = contexts
        .iter()
        .map(|c| sealer.seal(&pan, c).unwrap())
        .collect();
    let items: Vec<AdmitItem<'_>> = sealed
        .iter()
        .zip(&contexts)
        .map(|(s, c)| AdmitItem {
            sealed: s,
            context: c,
        })
        .collect();
    let admit = AdmitRequest {
        record: &record,
        index_versions: &[index],
        items: &items,
    };
    let mut g = c.benchmark_group("ingest_admit_batch_100");
    g.sample_size(10);
    g.throughput(criterion::Throughput::Elements(100));
    g.bench_function(BenchmarkId::new("admit", "pkcs11_softhsm2"), |bench| {
        bench.iter(|| {
            let out = rt.block_on(ks.admit(&admit, &access)).unwrap();
            assert!(out.iter().all(|r| r.is_ok()));
            black_box(out)
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = Environment::new("bench").unwrap();

    let local: Arc<dyn KeyService> = Arc::new(LocalKeyService::new(env.clone()));
    bench_backend(c, "local", local, &rt);

    let hsm = softhsm::softhsm(&["bench"]);
    let pkcs11 = rt
        .block_on(Pkcs11KeyService::connect(
            Pkcs11Config::new(&hsm.module, "bench", "bench", env.clone())
                .create_kek_if_missing(true),
            Pkcs11Pin::new(softhsm::PIN.into()),
        ))
        .unwrap();
    let pkcs11: Arc<dyn KeyService> = Arc::new(pkcs11);
    bench_backend(c, "pkcs11_softhsm2", pkcs11.clone(), &rt);
    bench_hmac(c, "pkcs11_softhsm2", pkcs11.clone(), &rt);
    bench_ingest(c, pkcs11, &rt);

    let moto = moto::Moto::start();
    let kms = rt
        .block_on(AwsKmsKeyService::connect(
            AwsKmsConfig::new("bench", env)
                .region(moto::REGION)
                .endpoint_url(&moto.endpoint())
                .credentials(AwsKmsCredentials::new(
                    moto::ACCESS_KEY_ID,
                    moto::SECRET_ACCESS_KEY.into(),
                    None,
                ))
                .create_kek_if_missing(true),
        ))
        .unwrap();
    let kms: Arc<dyn KeyService> = Arc::new(kms);
    bench_backend(c, "aws_kms_moto", kms.clone(), &rt);
    bench_hmac(c, "aws_kms_moto", kms, &rt);
    drop(moto);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = bench
}
criterion_main!(benches);
