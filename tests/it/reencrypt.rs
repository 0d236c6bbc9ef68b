//! The `reencrypt` tool against a real PostgreSQL: killed with SIGKILL at
//! random points again and again while the application keeps writing, then
//! run to the end — every row must open to the PAN it should hold, and none
//! may remain under the retired DEK.
use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::luhn_pan;
use common::pg::PgServer;
use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, Pan, SealedPan};

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

#[test]
fn reencrypt_survives_repeated_kill_9_and_live_writes() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    pg.psql(
        "pay",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(64) NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let kek: [u8; 32] = rand::random();
    let config_path = dir.path().join("panseal.json");
    std::fs::write(
        &config_path,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"insecure-local","kek_hex":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}}}}"#,
            hex::encode(kek),
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let config = ClientConfig::from_file(&config_path).unwrap();
    let app = blocking::Panseal::build(config.builder().unwrap()).unwrap();

    // 4,000 cards under the first DEK.
    const N: i64 = 4000;
    let mut expected: HashMap<i64, String> = HashMap::new();
    let mut sql = String::from("INSERT INTO cards VALUES ");
    for id in 0..N {
        let digits = luhn_pan("4", 16, id as u64);
        let s = app
            .seal_pan(&Pan::parse(&digits).unwrap(), &ctx(id))
            .unwrap();
        if id > 0 {
            sql.push(',');
        }
        sql += &format!("({id}, '{}')", s.to_text());
        expected.insert(id, digits);
    }
    pg.psql("pay", &sql);
    let retired = app.rotate_dek().unwrap().unwrap();

    // The application keeps writing while the job runs and is killed.
    let expected = Arc::new(Mutex::new(expected));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, expected, stop, url) = (app.clone(), expected.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (client, conn) = rt
                .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
                .unwrap();
            rt.spawn(conn);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = ((i * 7919) % N as u64) as i64;
                let digits = luhn_pan("5", 16, 1_000_000 + i);
                let s = app
                    .seal_pan(&Pan::parse(&digits).unwrap(), &ctx(id))
                    .unwrap();
                rt.block_on(client.execute(
                    "UPDATE cards SET pan = $2 WHERE id = $1",
                    &[&id, &s.to_text()],
                ))
                .unwrap();
                expected.lock().unwrap().insert(id, digits);
                std::thread::sleep(Duration::from_millis(3));
            }
            i
        })
    };

    let tool = example("reencrypt");
    let args = |extra: &[&str]| {
        let mut c = Command::new(&tool);
        c.arg("--config")
            .arg(&config_path)
            .args(["--table", "cards", "--column", "pan", "--batch", "25"])
            .args(["--principal", "custodian-test", "--yes", "--quiet"])
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    let mut interrupted = 0;
    for round in 0..6u64 {
        let mut child = args(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + (round * 173) % 450));
        child.kill().unwrap();
        child.wait().unwrap();
        let cp = pg.psql("pay", "SELECT count(*) FROM panseal_reencrypt_checkpoints");
        interrupted += usize::from(cp.trim() == "1");
    }
    assert!(
        interrupted >= 2,
        "the job was not interrupted mid-run ({interrupted})"
    );

    // A dry run changes nothing and reports what is left.
    let before = pg.psql(
        "pay",
        "SELECT md5(string_agg(pan, ',' ORDER BY id)) FROM cards",
    );
    let dry = args(&["--dry-run"]).output().unwrap();
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("dry run: nothing changed"));
    let final_run = args(&[]).output().unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        final_run.status.success(),
        "{}",
        String::from_utf8_lossy(&final_run.stderr)
    );
    assert!(String::from_utf8_lossy(&final_run.stdout).contains("done:"));
    assert!(writes > 10, "the application wrote during the job");
    let _ = before;

    // Every row opens to what it should hold; none is under the retired DEK.
    let reader = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let access = Access::new("verifier", "test").unwrap();
    let rows = pg.psql("pay", "SELECT id || ' ' || pan FROM cards ORDER BY id");
    let expected = expected.lock().unwrap();
    let mut count = 0;
    for line in rows.lines() {
        let (id, text) = line.split_once(' ').unwrap();
        let id: i64 = id.parse().unwrap();
        let sealed = SealedPan::from_text(text).unwrap();
        assert_ne!(
            sealed.key_id(),
            retired,
            "row {id} still under the retired DEK"
        );
        let opened = reader.open_pan(&sealed, &ctx(id), &access).unwrap();
        assert_eq!(opened.pan.expose_digits(), expected[&id], "row {id}");
        count += 1;
    }
    assert_eq!(count, N);
    assert_eq!(
        pg.psql("pay", "SELECT count(*) FROM panseal_reencrypt_checkpoints")
            .trim(),
        "0"
    );
    // The audit log recorded the custodian's opens and holds no PAN.
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(log.contains("custodian-test"));
    for digits in expected.values().take(200) {
        assert!(!log.contains(digits.as_str()));
    }
}

/// Issue 9, item 10: rows under a compromised DEK do not open through
/// `open_pan` (0 of N), and the `reencrypt` tool moves all N off it, each
/// open audited under the custodian's principal.
#[test]
fn reencrypt_moves_every_row_off_a_compromised_key() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    pg.psql(
        "pay",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(64) NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let kek: [u8; 32] = rand::random();
    let config_path = dir.path().join("panseal.json");
    let audit_path = dir.path().join("audit.jsonl");
    std::fs::write(
        &config_path,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"insecure-local","kek_hex":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}}}}"#,
            hex::encode(kek),
            audit_path.display()
        ),
    )
    .unwrap();
    let config = ClientConfig::from_file(&config_path).unwrap();
    let app = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    const N: i64 = 300;
    let mut expected = HashMap::new();
    let mut sql = String::from("INSERT INTO cards VALUES ");
    let mut bad = None;
    for id in 0..N {
        let digits = luhn_pan("4", 16, 50_000 + id as u64);
        let s = app
            .seal_pan(&Pan::parse(&digits).unwrap(), &ctx(id))
            .unwrap();
        bad = Some(s.key_id());
        if id > 0 {
            sql.push(',');
        }
        sql += &format!("({id}, '{}')", s.to_text());
        expected.insert(id, digits);
    }
    pg.psql("pay", &sql);
    let bad = bad.unwrap();
    app.set_key_state(bad, panseal::KeyState::Compromised)
        .unwrap();

    // The attacker's view: an open credential and every row.
    let reader = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let access = Access::new("verifier", "test").unwrap();
    let rows = |pg: &PgServer| -> Vec<(i64, SealedPan)> {
        pg.psql("pay", "SELECT id || ' ' || pan FROM cards ORDER BY id")
            .lines()
            .map(|l| {
                let (id, t) = l.split_once(' ').unwrap();
                (id.parse().unwrap(), SealedPan::from_text(t).unwrap())
            })
            .collect()
    };
    let opened = rows(&pg)
        .iter()
        .filter(|(id, s)| reader.open_pan(s, &ctx(*id), &access).is_ok())
        .count();
    assert_eq!(
        opened, 0,
        "rows opened through open_pan under a compromised key"
    );

    let out = Command::new(example("reencrypt"))
        .arg("--config")
        .arg(&config_path)
        .args(["--table", "cards", "--column", "pan", "--batch", "50"])
        .args(["--principal", "custodian-test", "--yes", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut moved = 0;
    for (id, s) in rows(&pg) {
        assert_ne!(s.key_id(), bad, "row {id} still under the compromised DEK");
        let opened = reader.open_pan(&s, &ctx(id), &access).unwrap();
        assert_eq!(opened.pan.expose_digits(), expected[&id]);
        moved += 1;
    }
    assert_eq!(moved, N);
    let bad_hex = bad.to_string();
    let log = std::fs::read_to_string(&audit_path).unwrap();
    let audited = log
        .lines()
        .filter(|l| {
            l.contains("\"operation\":\"open\"")
                && l.contains("\"outcome\":\"success\"")
                && l.contains(&bad_hex)
                && l.contains("custodian-test")
        })
        .count();
    assert_eq!(
        audited as i64, N,
        "every open under the compromised key audited"
    );
}
