//! Unwrap latency and throughput: `panseal-keyd` over loopback TLS with
//! connection reuse, against the in-process `LocalKeyService`, in one run;
//! admission of ingest (HPKE) ciphertexts inside keyd, batched, as items/s
//! beside the same run's `/v1/index/hash` and unwrap rates (issue 11);
//! the cost of the audit fsync policy (every record vs periodic, raw
//! appends and keyd throughput, as ratios in the same run); and the cost
//! of one state change with few and with many scopes (journal layout).
//!
//! ```text
//! cargo bench --features keyd --bench keyd
//! ```
//!
//! Starts a real keyd on 127.0.0.1 (random port, temporary folder), unseals
//! it, and measures for a bounded time and count. `KEYD_BENCH_SECONDS`
//! (default 3) sets each throughput phase; `KEYD_BENCH_TASKS` (default 16)
//! the concurrent requests in flight.

#[path = "../tests/keyd_harness/mod.rs"]
mod keyd_harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use panseal::{
    Access, Environment, KeyId, KeyPurpose, KeyRequest, KeyService, LocalKeyService, Scope,
    WrappedKey,
};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn keys(ks: &dyn KeyService, n: usize) -> Vec<(KeyRequest, WrappedKey)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = KeyRequest {
            id: KeyId::random(),
            scope: Scope::new("bench-1").unwrap(),
            environment: Environment::new("test").unwrap(),
            purpose: KeyPurpose::Data,
        };
        let (_, w) = ks.generate(&r).await.unwrap();
        out.push((r, w));
    }
    out
}

/// A key-store record of a DEK keyd generated and kept (only its wrap
/// left), signed by the admission job's `wrap` credential.
async fn admit_record(ks: &panseal::RemoteKeyService, sc: &Scope) -> panseal::WrappedDek {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/vectors/record_v1.json")).unwrap();
    let bytes = hex::decode(v["records"][0]["record_hex"].as_str().unwrap()).unwrap();
    let mut r = panseal::WrappedDek::from_bytes(&bytes).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    r.id = KeyId::random();
    r.scope = sc.clone();
    r.environment = Environment::new("test").unwrap();
    r.purpose = KeyPurpose::Data;
    r.version = 0;
    r.state = panseal::KeyState::Active;
    r.created_at = now;
    r.encrypt_until = now + 86_400;
    r.decrypt_until = now + 10 * 86_400;
    r.max_uses = 1 << 30;
    r.uses = 0;
    r.sequence = 0;
    r.tag = None;
    r.wrapped = ks.generate_wrapped(&r.key_request()).await.unwrap();
    r.tag = Some(ks.authenticate_record(None, &r).await.unwrap());
    r
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sequential unwraps: per-call latency.
async fn latency(
    ks: &dyn KeyService,
    keys: &[(KeyRequest, WrappedKey)],
    n: usize,
) -> Vec<Duration> {
    let access = Access::new("bench", "latency").unwrap();
    // Warm up (connections, caches).
    for (r, w) in keys.iter().take(50) {
        ks.unwrap(r, w, &access).await.unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let (r, w) = &keys[i % keys.len()];
        let t = Instant::now();
        ks.unwrap(r, w, &access).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples
}

/// `tasks` concurrent unwrap loops for `secs` seconds: unwraps per second.
async fn throughput(
    ks: Arc<dyn KeyService>,
    keys: Arc<Vec<(KeyRequest, WrappedKey)>>,
    tasks: usize,
    secs: u64,
) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let ks = ks.clone();
        let keys = keys.clone();
        handles.push(tokio::spawn(async move {
            let access = Access::new("bench", "throughput").unwrap();
            let mut n = 0u64;
            // Bounded in time and in count.
            while Instant::now() < deadline && n < 2_000_000 {
                let (r, w) = &keys[(t + n as usize) % keys.len()];
                ks.unwrap(r, w, &access).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    (total, total as f64 / start.elapsed().as_secs_f64())
}

fn report(name: &str, lat: &[Duration], tput: (u64, f64)) {
    println!(
        "{name:<28} p50 {:>9.1} µs   p99 {:>9.1} µs   throughput {:>10.0} unwraps/s ({} in total)",
        pct(lat, 0.50).as_secs_f64() * 1e6,
        pct(lat, 0.99).as_secs_f64() * 1e6,
        tput.1,
        tput.0
    );
}

fn main() {
    // `cargo bench` passes filter flags; this bench takes none.
    let secs = env_or("KEYD_BENCH_SECONDS", 3);
    let tasks = env_or("KEYD_BENCH_TASKS", 16) as usize;
    let n = 5_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let local: Arc<dyn KeyService> =
            Arc::new(LocalKeyService::new(Environment::new("test").unwrap()));
        let local_keys = Arc::new(keys(&*local, 256).await);
        let l_lat = latency(&*local, &local_keys, n).await;
        let l_tput = throughput(local.clone(), local_keys, tasks, secs).await;

        let k = keyd_harness::Keyd::ready().await;
        let client = k.client_with("app", |b| b.max_idle_connections(64));
        let remote: Arc<dyn KeyService> = Arc::new(client.clone());
        let remote_keys = Arc::new(keys(&*remote, 256).await);
        let r_lat = latency(&*remote, &remote_keys, n).await;
        let r_tput = throughput(remote.clone(), remote_keys, tasks, secs).await;

        println!(
            "\nunwrap, {n} sequential calls for latency; {tasks} concurrent tasks for {secs} s for throughput"
        );
        report("LocalKeyService (in-process)", &l_lat, l_tput);
        report("panseal-keyd (loopback TLS)", &r_lat, r_tput);
        println!(
            "keyd client: {} requests over {} TLS connections (reused)",
            client.requests_made(),
            client.connections_opened()
        );

        let hmac_rate: f64;
        // State changes: 50 new scopes on a fresh server, then 50 more
        // after `KEYD_BENCH_SCOPES` (default 500) scopes exist.
        // Keyed hashes inside keyd (issue 10), beside the unwrap baseline
        // above (same run, same server).
        {
            let sc = Scope::new("bench-ix").unwrap();
            k.client("root").create_index_key(&sc).await.unwrap();
            let pans: Vec<panseal::Pan> = (0..1000u64)
                .map(|i| {
                    let body = format!("4{:014}", i);
                    let mut sum = 0;
                    for (j, c) in body.bytes().rev().enumerate() {
                        let mut d = u32::from(c - b'0');
                        if j % 2 == 0 {
                            d *= 2;
                            if d > 9 {
                                d -= 9;
                            }
                        }
                        sum += d;
                    }
                    panseal::Pan::parse(&format!("{body}{}", (10 - sum % 10) % 10)).unwrap()
                })
                .collect();
            let refs: Vec<&panseal::Pan> = pans.iter().collect();
            let fe = k.client("frontend");
            let access = Access::new("bench", "index").unwrap();
            let single_n = env_or("KEYD_BENCH_HMAC_SINGLE", 2000) as usize;
            let mut single = Vec::with_capacity(single_n);
            for i in 0..single_n + 50 {
                let t = Instant::now();
                fe.blind_index(&sc, &[1], &refs[i % 1000..i % 1000 + 1], &access)
                    .await
                    .unwrap();
                if i >= 50 {
                    single.push(t.elapsed());
                }
            }
            single.sort();
            let batch_n = env_or("KEYD_BENCH_HMAC_BATCHES", 200) as usize;
            let mut batch = Vec::with_capacity(batch_n);
            let started = Instant::now();
            for _ in 0..batch_n {
                let t = Instant::now();
                let v = fe.blind_index(&sc, &[1], &refs, &access).await.unwrap();
                assert_eq!(v.len(), 1000);
                batch.push(t.elapsed());
            }
            let batch_rate = (batch_n * 1000) as f64 / started.elapsed().as_secs_f64();
            batch.sort();
            hmac_rate = batch_rate;
            let unwrap_p50 = pct(&r_lat, 0.50).as_secs_f64();
            println!(
                "
keyd HMAC, 1 PAN per request:       p50 {:>9.1} µs   p99 {:>9.1} µs   ratio to unwrap p50 {:.2}",
                pct(&single, 0.50).as_secs_f64() * 1e6,
                pct(&single, 0.99).as_secs_f64() * 1e6,
                pct(&single, 0.50).as_secs_f64() / unwrap_p50
            );
            println!(
                "keyd HMAC, 1,000 PANs per request:  p50 {:>9.1} µs   {:>10.0} HMACs/s (sequential batches; {:.0} at p50)",
                pct(&batch, 0.50).as_secs_f64() * 1e6,
                batch_rate,
                1000.0 / pct(&batch, 0.50).as_secs_f64()
            );
        }

        // Admission (issue 11): ingest ciphertexts opened, re-sealed compact
        // and blind-indexed inside keyd, `KEYD_BENCH_ADMIT_BATCH` (default
        // 1024) per request, 2 requests in flight (2 cores), against the
        // same run's keyed-hash batch rate and unwrap throughput.
        {
            let sc = Scope::new("bench-admit").unwrap();
            let root = k.client("root");
            root.create_ingest_key(&sc).await.unwrap();
            root.create_index_key(&sc).await.unwrap();
            let info = k.client("ingest-frontend").ingest_keys(&sc).await.unwrap();
            let sealer = panseal::IngestSealer::from_info(&info[0]).unwrap();
            let batch = env_or("KEYD_BENCH_ADMIT_BATCH", 1024) as usize;
            let rows: Arc<Vec<(panseal::IngestSealed, panseal::Context)>> = Arc::new(
                (0..batch)
                    .map(|i| {
                        let c = panseal::Context::new("cards", "pan", format!("row-{i}")).unwrap();
                        let p = panseal::Pan::parse("4111111111111111").unwrap();
                        (sealer.seal(&p, &c).unwrap(), c)
                    })
                    .collect(),
            );
            let admitter = k.client_with("admitter", |b| {
                b.max_idle_connections(8)
                    .request_timeout(Duration::from_secs(60))
            });
            let record = Arc::new(admit_record(&admitter, &sc).await);
            let access = Access::new("bench", "admit").unwrap();
            // Warm up (connections, keyd's DEK cache).
            let its: Vec<panseal::AdmitItem<'_>> = rows
                .iter()
                .map(|(s, c)| panseal::AdmitItem {
                    sealed: s,
                    context: c,
                })
                .collect();
            let out = admitter
                .admit(
                    &panseal::AdmitRequest {
                        record: &record,
                        index_versions: &[1],
                        items: &its,
                    },
                    &access,
                )
                .await
                .unwrap();
            assert!(out.iter().all(Result::is_ok));
            let deadline = Instant::now() + Duration::from_secs(secs);
            let started = Instant::now();
            let mut handles = Vec::new();
            for _ in 0..2 {
                let (admitter, rows, record) = (admitter.clone(), rows.clone(), record.clone());
                handles.push(tokio::spawn(async move {
                    let access = Access::new("bench", "admit").unwrap();
                    let its: Vec<panseal::AdmitItem<'_>> = rows
                        .iter()
                        .map(|(s, c)| panseal::AdmitItem {
                            sealed: s,
                            context: c,
                        })
                        .collect();
                    let mut n = 0usize;
                    while Instant::now() < deadline && n < 10_000_000 {
                        let out = admitter
                            .admit(
                                &panseal::AdmitRequest {
                                    record: &record,
                                    index_versions: &[1],
                                    items: &its,
                                },
                                &access,
                            )
                            .await
                            .unwrap();
                        n += out.len();
                    }
                    n
                }));
            }
            let mut total = 0;
            for h in handles {
                total += h.await.unwrap();
            }
            let admit_rate = total as f64 / started.elapsed().as_secs_f64();
            println!(
                "\nkeyd admit, {batch} items per request, 2 in flight: {admit_rate:>10.0} items/s \
                 ({total} in total); ratio to keyd HMACs/s {:.3}, to keyd unwraps/s {:.2}",
                admit_rate / hmac_rate,
                admit_rate / r_tput.1
            );
        }

        let many = env_or("KEYD_BENCH_SCOPES", 500) as usize;
        let alice = k.client("alice");
        let rotate_50 = |from: usize| {
            let alice = alice.clone();
            async move {
                let t = Instant::now();
                for i in from..from + 50 {
                    alice
                        .rotate(&Scope::new(&format!("s-{i}")).unwrap())
                        .await
                        .unwrap();
                }
                t.elapsed() / 50
            }
        };
        let few = rotate_50(0).await;
        for i in 50..many {
            alice
                .rotate(&Scope::new(&format!("s-{i}")).unwrap())
                .await
                .unwrap();
        }
        let after = rotate_50(many).await;
        println!(
            "\nstate change (new scope's KEK): {:.2} ms with 50 scopes, {:.2} ms with {} scopes: ratio {:.2}",
            few.as_secs_f64() * 1e3,
            after.as_secs_f64() * 1e3,
            many + 50,
            after.as_secs_f64() / few.as_secs_f64()
        );
        drop(k);

        // Audit fsync policy: raw appends, then keyd's unwrap throughput.
        let dir = tempfile::tempdir().unwrap();
        let appends = |sync: bool, name: &str| {
            let log = panseal::ChainedAuditLog::open(
                dir.path().join(name),
                panseal::AuditKey::generate(),
            )
            .unwrap();
            log.set_sync_each_record(sync);
            let t = Instant::now();
            for i in 0..1000u32 {
                log.append(&serde_json::json!({"operation": "unwrap", "i": i}))
                    .unwrap();
            }
            t.elapsed() / 1000
        };
        let no_sync = appends(false, "a.log");
        let sync = appends(true, "b.log");
        let periodic = keyd_harness::Keyd::ready_with("audit_fsync = \"periodic\"\n").await;
        let p_client: Arc<dyn KeyService> =
            Arc::new(periodic.client_with("app", |b| b.max_idle_connections(64)));
        let p_keys = Arc::new(keys(&*p_client, 256).await);
        let p_tput = throughput(p_client, p_keys, tasks, secs).await;
        println!(
            "audit append: {:.1} µs without fsync, {:.1} µs with fdatasync per record: ratio {:.1}",
            no_sync.as_secs_f64() * 1e6,
            sync.as_secs_f64() * 1e6,
            sync.as_secs_f64() / no_sync.as_secs_f64()
        );
        println!(
            "keyd unwraps/s: {:.0} with audit_fsync = \"every-record\" (default), {:.0} with \"periodic\": ratio {:.2}",
            r_tput.1,
            p_tput.1,
            r_tput.1 / p_tput.1
        );
    });
}
