//! Reveal latency and throughput: `Panseal::open_pan` through keyd's
//! `reveal` (the DEK stays in keyd; every open is a request, a durable quota
//! charge and an audit record) next to a same-run baseline, `open_pan` with
//! an `unwrap` credential (one unwrap, then local opens from the DEK cache).
//!
//! ```text
//! cargo bench --features keyd --bench reveal
//! ```
//!
//! Starts a real keyd on 127.0.0.1 (random port, temporary folder), unseals
//! it, seals 1,000 PANs, and measures for a bounded time and count.
//! `REVEAL_BENCH_SECONDS` (default 3) sets each throughput phase;
//! `REVEAL_BENCH_TASKS` (default 16) the concurrent opens in flight;
//! `REVEAL_BENCH_FSYNC` the keyd `audit_fsync` policy (default
//! `every-record`, keyd's default).

#[path = "../tests/keyd_harness/mod.rs"]
mod keyd_harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use panseal::{Access, Context, MemoryAuditSink, MemoryKeyStore, Pan, Panseal, SealedPan};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

type Rows = Arc<Vec<(SealedPan, Context)>>;

async fn handle(k: &keyd_harness::Keyd, who: &str, store: &MemoryKeyStore) -> Panseal {
    Panseal::builder()
        .key_service(k.client_with(who, |b| b.scope("bench-1").max_idle_connections(64)))
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("bench-1")
        .build()
        .await
        .unwrap()
}

async fn latency(ps: &Panseal, rows: &Rows, n: usize) -> Vec<Duration> {
    let access = Access::new("bench", "latency").unwrap();
    for (s, c) in rows.iter().take(50) {
        ps.open_pan(s, c, &access).await.unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let (s, c) = &rows[i % rows.len()];
        let t = Instant::now();
        ps.open_pan(s, c, &access).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples
}

async fn throughput(ps: Panseal, rows: Rows, tasks: usize, secs: u64) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let ps = ps.clone();
        let rows = rows.clone();
        handles.push(tokio::spawn(async move {
            let access = Access::new("bench", "throughput").unwrap();
            let mut n = 0u64;
            while Instant::now() < deadline && n < 5_000_000 {
                let (s, c) = &rows[(t * 61 + n as usize) % rows.len()];
                ps.open_pan(s, c, &access).await.unwrap();
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
        "{name:<34} p50 {:>9.1} µs   p99 {:>9.1} µs   throughput {:>10.0} opens/s ({} in total)",
        pct(lat, 0.50).as_secs_f64() * 1e6,
        pct(lat, 0.99).as_secs_f64() * 1e6,
        tput.1,
        tput.0
    );
}

fn main() {
    let secs = env_or("REVEAL_BENCH_SECONDS", 3);
    let tasks = env_or("REVEAL_BENCH_TASKS", 16) as usize;
    let fsync = std::env::var("REVEAL_BENCH_FSYNC").unwrap_or_else(|_| "every-record".into());
    let n = 3_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let k = keyd_harness::Keyd::ready_with(&format!("audit_fsync = \"{fsync}\"\n")).await;
        let store = MemoryKeyStore::new();
        let writer = handle(&k, "app", &store).await;
        let mut rows = Vec::new();
        for i in 0..1000u32 {
            let c = Context::new("cards", "pan", format!("row-{i}")).unwrap();
            let s = writer
                .seal_pan(&Pan::parse("4111 1111 1111 1111").unwrap(), &c)
                .await
                .unwrap();
            rows.push((s, c));
        }
        let rows: Rows = Arc::new(rows);

        // Baseline: an `unwrap` credential (one unwrap, then local opens).
        let base = handle(&k, "reader", &store).await;
        let b_lat = latency(&base, &rows, n).await;
        let b_tput = throughput(base.clone(), rows.clone(), tasks, secs).await;

        // Reveal: a `reveal`-only credential; each open is a keyd request.
        let rev = handle(&k, "bench-reveal", &store).await;
        let r_lat = latency(&rev, &rows, n).await;
        let r_tput = throughput(rev.clone(), rows.clone(), tasks, secs).await;
        let r_tput1 = throughput(rev.clone(), rows.clone(), 1, secs).await;

        println!(
            "\nopen_pan, {n} sequential calls for latency; {tasks} concurrent tasks for {secs} s \
             for throughput; keyd audit_fsync = {fsync}"
        );
        report("unwrap once + local open (baseline)", &b_lat, b_tput);
        report("reveal inside keyd", &r_lat, r_tput);
        println!("reveal inside keyd, 1 task: {:.0} opens/s", r_tput1.1);
        println!(
            "ratios: p50 reveal / baseline {:.1}; throughput baseline / reveal {:.1}",
            pct(&r_lat, 0.5).as_secs_f64() / pct(&b_lat, 0.5).as_secs_f64(),
            b_tput.1 / r_tput.1
        );
    });
}
