//! The PostgreSQL key store against a real server started by the tests
//! (tests/it/common/pg.rs): conformance, migrations, many instances at once,
//! inventory, corruption.
use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use crate::keystore_conformance::conformance;
use common::pg::PgServer;
use panseal::{
    blocking, Access, Context, Environment, KeyState, KeyStore, KeyStoreError, LocalKeyService,
    MemoryAuditSink, Pan, Panseal, Policy, PostgresKeyStore, RegisteredColumn,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn postgres_store_conforms_and_migrates_once() {
    let pg = PgServer::start();
    let url = pg.create_db("conf");
    let rt = rt();
    rt.block_on(async {
        // Several instances starting at once apply the migration once.
        let stores = futures_join(
            (0..4)
                .map(|_| {
                    let url = url.clone();
                    async move { PostgresKeyStore::connect(&url, 2).await }
                })
                .collect(),
        )
        .await;
        for s in &stores {
            assert_eq!(s.as_ref().unwrap().schema_version().await.unwrap(), 2);
        }
        let store = stores.into_iter().next().unwrap().unwrap();
        conformance(&store, 100).await;
        // A record altered in the database is refused as corrupt.
        pg.psql(
            "conf",
            "UPDATE panseal_keys SET record = '\\x0102' WHERE id = (SELECT id FROM panseal_keys ORDER BY id LIMIT 1)",
        );
        let ids = pg.psql("conf", "SELECT encode(id, 'hex') FROM panseal_keys ORDER BY id LIMIT 1");
        let id = panseal::KeyId::from_hex(ids.trim()).unwrap();
        assert!(matches!(
            store.fetch(id).await,
            Err(KeyStoreError::Corrupt(_))
        ));
        assert!(matches!(store.list(None).await, Err(KeyStoreError::Corrupt(_))));
    });
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn many_instances_share_the_store_without_losing_keys() {
    let pg = PgServer::start();
    let url = pg.create_db("fleet");
    let ks = LocalKeyService::new(Environment::new("test").unwrap());
    let audit = Arc::new(MemoryAuditSink::new());
    let instance = |budget: u64| {
        blocking::Panseal::build(
            Panseal::builder()
                .key_service(ks.clone())
                .key_store(PostgresKeyStore::new(&url, 4).unwrap())
                .audit_arc(audit.clone())
                .environment("test")
                .scope("merchant-1")
                .policy(Policy::default().max_uses(budget)),
        )
        .unwrap()
    };
    let pan = Pan::parse("4111111111111111").unwrap();
    // Four instances seal at once with a small budget (many rotations), and
    // all compute the scope's first blind index at the same moment.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let ps = instance(25);
            let pan = pan.clone();
            std::thread::spawn(move || {
                let index = ps.blind_index(&pan).unwrap();
                let sealed: Vec<_> = (0..200)
                    .map(|i| {
                        let c = Context::new("cards", "pan", format!("{t}-{i}")).unwrap();
                        (c.clone(), ps.seal_pan(&pan, &c).unwrap())
                    })
                    .collect();
                ps.report_usage().unwrap();
                (index, sealed)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let first_index = results[0].0;
    assert!(
        results.iter().all(|(i, _)| *i == first_index),
        "one index key per scope"
    );
    let reader = instance(25);
    let access = Access::new("auditor", "test").unwrap();
    let mut per_key: HashMap<_, u64> = HashMap::new();
    for (_, sealed) in &results {
        for (c, s) in sealed {
            *per_key.entry(s.key_id()).or_default() += 1;
            assert_eq!(reader.open_pan(s, c, &access).unwrap().pan, pan);
        }
    }
    assert!(per_key.values().all(|&n| n <= 25), "{per_key:?}");
    rt().block_on(async {
        let store = PostgresKeyStore::connect(&url, 1).await.unwrap();
        let records = store.list(None).await.unwrap();
        let data: Vec<_> = records
            .iter()
            .filter(|r| r.purpose == panseal::KeyPurpose::Data)
            .collect();
        let index: Vec<_> = records
            .iter()
            .filter(|r| r.purpose == panseal::KeyPurpose::Index)
            .collect();
        // Index keys live in the key service, not in the store.
        assert_eq!(index.len(), 0, "no index key in the key store");
        // Every DEK that sealed something is in the store, with its uses.
        for (id, n) in &per_key {
            let r = data.iter().find(|r| &r.id == id).expect("DEK lost");
            assert!(
                r.uses >= *n && r.uses <= 25,
                "{} uses recorded for {n}",
                r.uses
            );
        }
    });
}

#[test]
fn inventory_counts_references_per_key() {
    let pg = PgServer::start();
    let url = pg.create_db("inv");
    pg.psql(
        "inv",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan_sealed varchar(64), pan_bin bytea,
                             pan_index char(64), pan_index_version int)",
    );
    let ks = LocalKeyService::new(Environment::new("test").unwrap());
    let store = PostgresKeyStore::new(&url, 2).unwrap();
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(ks)
            .key_store(store.clone())
            .audit(MemoryAuditSink::new())
            .environment("test")
            .scope("m"),
    )
    .unwrap();
    let pan = Pan::parse("5555555555554444").unwrap();
    let mut sql = String::new();
    let mut first = None;
    for i in 0..30 {
        if i == 20 {
            first = ps.rotate_dek().unwrap();
        }
        let c = Context::new("cards", "pan_sealed", i.to_string()).unwrap();
        let s = ps.seal_pan(&pan, &c).unwrap();
        let b = ps
            .seal_pan(
                &pan,
                &Context::new("cards", "pan_bin", i.to_string()).unwrap(),
            )
            .unwrap();
        let idx = ps.blind_index(&pan).unwrap();
        sql += &format!(
            "INSERT INTO cards VALUES ({i}, '{}', '\\x{}', '{}', {});",
            s.to_text(),
            hex::encode(b.as_bytes()),
            idx.to_hex(),
            idx.version()
        );
    }
    pg.psql("inv", &sql);
    let first = first.unwrap();
    rt().block_on(async {
        for c in [
            RegisteredColumn::SealedText {
                table: "cards".into(),
                column: "pan_sealed".into(),
            },
            RegisteredColumn::SealedBinary {
                table: "cards".into(),
                column: "pan_bin".into(),
            },
            RegisteredColumn::BlindIndex {
                table: "cards".into(),
                column: "pan_index".into(),
                version_column: "pan_index_version".into(),
            },
        ] {
            store.register_column(c).await.unwrap();
        }
        // Identifiers are checked: no SQL through a column name.
        assert!(store
            .register_column(RegisteredColumn::SealedText {
                table: "cards; DROP TABLE cards".into(),
                column: "x".into(),
            })
            .await
            .is_err());
        let inv = store.inventory().await.unwrap();
        assert_eq!(inv.columns.len(), 3);
        let refs = |id| inv.keys.iter().find(|k| k.id == id).unwrap().references;
        // 20 rows × 2 columns under the first DEK, 10 × 2 under the second.
        assert_eq!(refs(first), 40);
        let second = inv
            .keys
            .iter()
            .find(|k| k.purpose == panseal::KeyPurpose::Data && k.id != first)
            .unwrap();
        assert_eq!(second.references, 20);
        // Index keys are in the key service: the inventory counts stored
        // values per version.
        assert!(inv
            .keys
            .iter()
            .all(|k| k.purpose == panseal::KeyPurpose::Data));
        assert_eq!(inv.index_references.get(&1), Some(&30));
        let first_entry = inv.keys.iter().find(|k| k.id == first).unwrap();
        assert_eq!(first_entry.state, KeyState::DecryptOnly);
        assert_eq!(first_entry.strength_bits, 256);
        let json = serde_json::to_string(&inv).unwrap();
        assert!(!json.contains("5555555555554444"));
    });
}
