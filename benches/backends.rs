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
//! `cargo bench --features pkcs11,aws-kms --bench backends`
//!
//! A cold open is forced by a DEK cache of capacity 1 and two ciphertexts
//! under two different DEKs, opened alternately: every open misses, fetches
//! the wrapped DEK from the (in-memory) key store, unwraps it through the
//! backend, audits and decrypts. The set-up checks that each such open made
//! exactly one unwrap.

#[path = "../tests/moto/mod.rs"]
mod moto;
#[path = "../tests/softhsm/mod.rs"]
mod softhsm;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use panseal::{
    blocking, Access, AuditError, AuditEvent, AuditSink, AwsKmsConfig, AwsKmsCredentials,
    AwsKmsKeyService, Context, Environment, KeyId, KeyPurpose, KeyRequest, KeyService,
    LocalKeyService, MemoryKeyStore, Operation, Pan, Panseal, Pkcs11Config, Pkcs11KeyService,
    Pkcs11Pin, Policy, Scope,
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
    bench_hmac(c, "pkcs11_softhsm2", pkcs11, &rt);

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
