//! `reencrypt` throughput on a large table in a local PostgreSQL started for
//! the run, against a plain `UPDATE cards SET pan = pan` over the same table
//! in the same run as the baseline.
//!
//! ```text
//! cargo bench --features postgres --bench reencrypt            # 1,000,000 rows
//! PANSEAL_BENCH_ROWS=100000 cargo bench --features postgres --bench reencrypt
//! ```

#[path = "../tests/it/common/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use panseal::reencrypt::{ReencryptJob, SealedForm};
use panseal::{
    Access, AuditError, AuditEvent, AuditSink, Context, Environment, LocalKeyService, Pan, Panseal,
    PostgresKeyStore,
};

#[derive(Default)]
struct CountingSink(AtomicU64);
impl AuditSink for CountingSink {
    fn record(&self, _e: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to list.
    }
    let rows: i64 = std::env::var("PANSEAL_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = pg::PgServer::start();
    let url = server.create_db("bench");
    server.psql(
        "bench",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(64) NOT NULL)",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PostgresKeyStore::connect(&url, 4).await.unwrap();
        let audit = Arc::new(CountingSink::default());
        let panseal = Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("bench").unwrap()))
            .key_store(store.clone())
            .audit_arc(audit.clone())
            .environment("bench")
            .scope("m")
            .build()
            .await
            .unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let client = store.pool().get().await.unwrap();
        let t = Instant::now();
        let chunk = 10_000i64;
        let mut start = 0;
        while start < rows {
            let end = (start + chunk).min(rows);
            let mut ids = Vec::new();
            let mut pans = Vec::new();
            for id in start..end {
                let c = Context::new("cards", "pan", id.to_string()).unwrap();
                ids.push(id);
                pans.push(panseal.seal_pan(&pan, &c).await.unwrap().to_text());
            }
            client
                .execute(
                    "INSERT INTO cards SELECT * FROM unnest($1::bigint[], $2::text[])",
                    &[&ids, &pans],
                )
                .await
                .unwrap();
            start = end;
        }
        client.batch_execute("VACUUM ANALYZE cards").await.unwrap();
        eprintln!("filled {rows} rows in {:.1?}", t.elapsed());
        panseal.rotate_dek().await.unwrap();

        let t = Instant::now();
        client
            .execute("UPDATE cards SET pan = pan", &[])
            .await
            .unwrap();
        let baseline = t.elapsed();
        client.batch_execute("VACUUM cards").await.unwrap();

        let job = ReencryptJob {
            name: "bench".into(),
            table: "cards".into(),
            id_column: "id".into(),
            sealed_column: "pan".into(),
            form: SealedForm::Text,
            context_table: "cards".into(),
            context_column: "pan".into(),
            batch_size: 5000,
            only_key: None,
        };
        let access = Access::new("bench", "reencrypt").unwrap();
        let t = Instant::now();
        let done = job
            .run(&panseal, &store, &access, |_| {}, || false)
            .await
            .unwrap();
        let reencrypt = t.elapsed();
        assert_eq!(done.resealed, rows as u64);
        let base_rate = rows as f64 / baseline.as_secs_f64();
        let re_rate = rows as f64 / reencrypt.as_secs_f64();
        println!(
            "rows {rows}: UPDATE pan = pan {:.2} s ({:.0} rows/s); reencrypt {:.2} s ({:.0} rows/s); ratio {:.2}x",
            baseline.as_secs_f64(),
            base_rate,
            reencrypt.as_secs_f64(),
            re_rate,
            reencrypt.as_secs_f64() / baseline.as_secs_f64()
        );
    });
}
