//! The `reindex` tool against real PostgreSQL and a SoftHSM2 token: a
//! table whose blind-index column holds legacy values (an old in-database
//! index key) and values under service version 1 is moved to version 2
//! while the tool is killed with SIGKILL again and again; then every row
//! holds the version-2 value, every PAN opens and is found through the
//! index, and no row was redone or skipped (the job's committed counters
//! add up to exactly the table).

use crate::common;
use crate::softhsm;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::luhn_pan;
use common::pg::PgServer;
use hmac::{Hmac, Mac};
use panseal::config::ClientConfig;
use panseal::{
    Access, Context, Environment, KeyService, Pan, Panseal, Pkcs11Config, Pkcs11KeyService,
    Pkcs11Pin, SealedPan,
};

const TOKEN: &str = "reindex";
const KEK: &str = "cards";
const N: i64 = 2000;
const LEGACY: i64 = 700;

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "example {name} not built at {}", p.display());
    p
}

fn ctx(id: i64) -> Context {
    Context::new("cards", "pan", id.to_string()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_survives_kill_9_and_moves_every_row_to_the_newest_version() {
    // One PKCS#11 test at a time in this binary (`softhsm::SERIAL`).
    let _serial = softhsm::SERIAL.lock().await;
    let hsm = softhsm::softhsm(&[TOKEN]);
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    pg.psql(
        "pay",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(64) NOT NULL,
                             pan_index char(64) NOT NULL, pan_index_version int NOT NULL,
                             pan_index_key char(16) NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("panseal.json");
    std::fs::write(
        &config_path,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"local"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}}}}"#,
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let ks = Pkcs11KeyService::connect(
        Pkcs11Config::new(&hsm.module, TOKEN, KEK, Environment::new("test").unwrap())
            .create_kek_if_missing(true),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap();
    let ks: Arc<dyn KeyService> = Arc::new(ks);
    let config = ClientConfig::from_file(&config_path).unwrap();
    let app: Panseal = config
        .builder()
        .unwrap()
        .key_service_arc(ks.clone())
        .build()
        .await
        .unwrap();
    let scope = app.scope().clone();
    let access = Access::new("tester", "setup").unwrap();

    // 2,000 cards; the first 700 carry legacy index values (HMAC under an
    // old index key that lived in the database), the rest v1 values from
    // the service.
    ks.create_index_key(&scope).await.unwrap();
    let digits: Vec<String> = (0..N).map(|i| luhn_pan("4", 16, i as u64)).collect();
    let pans: Vec<Pan> = digits.iter().map(|d| Pan::parse(d).unwrap()).collect();
    let refs: Vec<&Pan> = pans.iter().collect();
    let v1 = ks.blind_index(&scope, &[1], &refs, &access).await.unwrap();
    let legacy_key: [u8; 32] = rand::random();
    let mut sql = String::from("INSERT INTO cards VALUES ");
    let mut expected: HashMap<i64, String> = HashMap::new();
    for id in 0..N {
        let s = app.seal_pan(&pans[id as usize], &ctx(id)).await.unwrap();
        let index = if id < LEGACY {
            let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&legacy_key).unwrap();
            m.update(digits[id as usize].as_bytes());
            hex::encode(m.finalize().into_bytes())
        } else {
            hex::encode(v1[id as usize])
        };
        if id > 0 {
            sql.push(',');
        }
        sql += &format!(
            "({id}, '{}', '{index}', 1, '{}')",
            s.to_text(),
            if id < LEGACY {
                "0000000000000000"
            } else {
                "1111111111111111"
            }
        );
        expected.insert(id, digits[id as usize].clone());
    }
    pg.psql("pay", &sql);
    // The custodian rotates the index key inside the service.
    assert_eq!(ks.create_index_key(&scope).await.unwrap().version, 2);

    let tool = example("reindex");
    let args = |extra: &[&str]| {
        let mut c = Command::new(&tool);
        c.arg("--config")
            .arg(&config_path)
            .arg("--pkcs11-module")
            .arg(&hsm.module)
            .args(["--pkcs11-token", TOKEN, "--pkcs11-kek", KEK])
            .args(["--table", "cards", "--column", "pan"])
            .args([
                "--index-column",
                "pan_index",
                "--version-column",
                "pan_index_version",
            ])
            .args(["--key-id-column", "pan_index_key", "--batch", "50"])
            .args(["--principal", "custodian-test", "--yes", "--quiet"])
            .args(extra)
            .env("PANSEAL_PKCS11_PIN", softhsm::PIN)
            .stdin(Stdio::null());
        c
    };
    let table_md5 = || {
        pg.psql(
            "pay",
            "SELECT md5(string_agg(pan || pan_index || pan_index_version, ',' ORDER BY id)) FROM cards",
        )
    };

    // A dry run counts and changes nothing.
    let before = table_md5();
    let dry = args(&["--dry-run"]).output().unwrap();
    let out = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(
        dry.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        out.contains("2000 rows to scan, 2000 of them on another version"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert_eq!(table_md5(), before);

    // Killed with SIGKILL after a few committed batches, four times.
    let mut interrupted = 0;
    for round in 0..4usize {
        let mut child = args(&[])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < 2 + round {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("committed") => seen += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let cp = pg.psql("pay", "SELECT count(*) FROM panseal_reindex_checkpoints");
        interrupted += usize::from(cp.trim() == "1");
    }
    assert!(
        interrupted >= 3,
        "the job was not interrupted mid-run ({interrupted})"
    );
    let moved = pg.psql(
        "pay",
        "SELECT count(*) FROM cards WHERE pan_index_version = 2",
    );
    let moved: i64 = moved.trim().parse().unwrap();
    assert!(moved > 0 && moved < N, "partial progress expected: {moved}");

    let final_run = args(&[]).output().unwrap();
    let out = String::from_utf8_lossy(&final_run.stdout).into_owned();
    assert!(
        final_run.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&final_run.stderr)
    );
    // Counters committed with each batch: across five processes every row
    // was scanned and updated exactly once (0 redone, 0 skipped).
    assert!(
        out.contains("done: 2000 rows scanned, 2000 updated to v2, 0 already current"),
        "{out}"
    );

    // Every row: version 2, the service's v2 value, opens to its PAN, and
    // is found through the index.
    let v2 = ks.blind_index(&scope, &[2], &refs, &access).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT id, pan, pan_index::text, pan_index_version, pan_index_key::text FROM cards ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, N);
    let reader: Panseal = config
        .builder()
        .unwrap()
        .key_service_arc(ks.clone())
        .build()
        .await
        .unwrap();
    let verifier = Access::new("verifier", "test").unwrap();
    let (mut wrong, mut unopened) = (0, 0);
    let key_ids: std::collections::HashSet<String> = rows.iter().map(|r| r.get(4)).collect();
    for r in &rows {
        let id: i64 = r.get(0);
        let sealed = SealedPan::from_text(r.get::<_, &str>(1)).unwrap();
        let index: &str = r.get(2);
        let version: i32 = r.get(3);
        if version != 2 || index != hex::encode(v2[id as usize]) {
            wrong += 1;
        }
        match reader.open_pan(&sealed, &ctx(id), &verifier).await {
            Ok(o) if o.pan.expose_digits() == expected[&id] => {}
            _ => unopened += 1,
        }
    }
    assert_eq!((wrong, unopened), (0, 0), "rows not on v2 / not opening");
    assert_eq!(key_ids.len(), 1, "one key id for v2: {key_ids:?}");
    let mut found = 0;
    for id in (0..N).step_by(37) {
        let hits = client
            .query(
                "SELECT id FROM cards WHERE pan_index = $1",
                &[&hex::encode(v2[id as usize])],
            )
            .await
            .unwrap();
        found += usize::from(hits.len() == 1 && hits[0].get::<_, i64>(0) == id);
    }
    assert_eq!(found, (0..N).step_by(37).count());
    assert_eq!(
        pg.psql("pay", "SELECT count(*) FROM panseal_reindex_checkpoints")
            .trim(),
        "0"
    );

    // A second run changes nothing.
    let again = args(&[]).output().unwrap();
    let out = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(
        out.contains("0 updated to v2, 2000 already current"),
        "{out}"
    );

    // Bad input: row 1234 holds row 1233's ciphertext (a copied field).
    // After another rotation the job stops at that row with a typed error
    // naming it; the batches before it are committed, the row is untouched.
    pg.psql(
        "pay",
        "UPDATE cards SET pan = (SELECT pan FROM cards WHERE id = 1233) WHERE id = 1234",
    );
    assert_eq!(ks.create_index_key(&scope).await.unwrap().version, 3);
    let bad = args(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(!bad.status.success());
    assert!(err.contains("row 1234: sealed PAN did not open"), "{err}");
    for d in &digits {
        assert!(!err.contains(d.as_str()), "a PAN in the error");
    }
    let on_v3: i64 = pg
        .psql(
            "pay",
            "SELECT count(*) FROM cards WHERE pan_index_version = 3",
        )
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        on_v3, 1200,
        "the 24 batches before the bad row are committed"
    );
    assert_eq!(
        pg.psql("pay", "SELECT pan_index_version FROM cards WHERE id = 1234")
            .trim(),
        "2"
    );

    // Every open was audited under the job's principal; no PAN in the log.
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(log.contains("custodian-test"));
    for d in digits.iter().step_by(10) {
        assert!(!log.contains(d.as_str()));
    }
}
