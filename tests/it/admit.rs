//! The `admit` tool against a real PostgreSQL: 2,000 ingest ciphertexts
//! (plus garbage and refused rows), the job killed with SIGKILL again and
//! again, then run to the end. Asserted: 2000/2000 admitted, 0 lost, 0
//! redone (a trigger counts every update per row: each admitted row was
//! written exactly once), every row opens to its original PAN and is found
//! by its blind index, garbage and refused rows counted and untouched.
use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::luhn_pan;
use common::pg::PgServer;
use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, Pan, StoredPan};

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
fn admit_survives_repeated_kill_9_and_admits_each_row_once() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    pg.psql(
        "pay",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(140) NOT NULL, pan_index text);
         CREATE TABLE row_updates (id bigint NOT NULL);
         CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO row_updates VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER count_update AFTER UPDATE ON cards
           FOR EACH ROW EXECUTE FUNCTION count_update();",
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
    // The front end: the scope's public key only (the insecure-local
    // service derives ingest key v1 from its KEK, so the tool's process
    // holds the same key pair).
    let sealer = app.ingest_sealer(None).unwrap();

    const N: i64 = 2000;
    const GARBAGE: i64 = 10;
    const REFUSED: i64 = 5;
    let mut sql = String::from("INSERT INTO cards (id, pan) VALUES ");
    let mut expected = Vec::new();
    for id in 0..N {
        let digits = luhn_pan("4", 13 + (id % 7) as usize, id as u64);
        let s = sealer
            .seal(&Pan::parse(&digits).unwrap(), &ctx(id))
            .unwrap();
        if id > 0 {
            sql.push(',');
        }
        sql += &format!("({id}, '{}')", s.to_text());
        expected.push(digits);
    }
    for g in 0..GARBAGE {
        sql += &format!(",({}, 'garbage {g} posted by a browser')", N + g);
    }
    for r in 0..REFUSED {
        // Sealed for another row: refused by the key service.
        let s = sealer
            .seal(&Pan::parse("4111111111111111").unwrap(), &ctx(-1 - r))
            .unwrap();
        sql += &format!(",({}, '{}')", N + GARBAGE + r, s.to_text());
    }
    pg.psql("pay", &sql);
    let untouched_before = pg.psql(
        "pay",
        &format!("SELECT md5(string_agg(pan, ',' ORDER BY id)) FROM cards WHERE id >= {N}"),
    );

    let tool = example("admit");
    let args = |extra: &[&str]| {
        let mut c = Command::new(&tool);
        c.arg("--config")
            .arg(&config_path)
            .args(["--table", "cards", "--column", "pan"])
            .args(["--index-column", "pan_index", "--batch", "40"])
            .args(["--yes", "--quiet"])
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    let dry = args(&["--dry-run"]).output().unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry_out = String::from_utf8_lossy(&dry.stdout);
    assert!(dry_out.contains("dry run: nothing changed"), "{dry_out}");
    assert!(
        dry_out.contains(&format!(
            "{} ingest, 0 already compact, {GARBAGE} garbage",
            N + REFUSED
        )),
        "{dry_out}"
    );
    assert_eq!(
        pg.psql("pay", "SELECT count(*) FROM row_updates").trim(),
        "0"
    );

    // Kill the job at varying points once it has committed progress (the
    // machine is shared: poll rather than guess how long start-up takes).
    let scanned = || {
        pg.psql(
            "pay",
            "SELECT coalesce(max(scanned), -1) FROM panseal_admit_checkpoints",
        )
        .trim()
        .parse::<i64>()
        .unwrap()
    };
    let mut interrupted = 0;
    let mut last = -1;
    for round in 0..5u64 {
        let mut child = args(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while scanned() <= last
            && child.try_wait().unwrap().is_none()
            && started.elapsed() < Duration::from_secs(120)
        {
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis((round * 137) % 400));
        child.kill().unwrap();
        child.wait().unwrap();
        let now = scanned();
        if now > last && now < N + GARBAGE + REFUSED {
            interrupted += 1;
        }
        last = now;
    }
    assert!(
        interrupted >= 3,
        "the job was not interrupted mid-run ({interrupted})"
    );
    let final_run = args(&[]).output().unwrap();
    assert!(
        final_run.status.success(),
        "{}",
        String::from_utf8_lossy(&final_run.stderr)
    );
    let out = String::from_utf8_lossy(&final_run.stdout);
    assert!(
        out.contains(&format!(
            "{} rows scanned, {N} admitted, 0 already compact, {GARBAGE} garbage, {REFUSED} refused",
            N + GARBAGE + REFUSED
        )),
        "{out}"
    );

    // 0 redone: every admitted row was written exactly once.
    let updates = pg.psql(
        "pay",
        "SELECT count(*) || ' ' || count(DISTINCT id) FROM row_updates",
    );
    assert_eq!(updates.trim(), format!("{N} {N}"));
    // Garbage and refused rows untouched.
    assert_eq!(
        pg.psql(
            "pay",
            &format!("SELECT md5(string_agg(pan, ',' ORDER BY id)) FROM cards WHERE id >= {N}"),
        ),
        untouched_before
    );
    assert_eq!(
        pg.psql(
            "pay",
            &format!("SELECT count(*) FROM cards WHERE id >= {N} AND pan_index IS NOT NULL"),
        )
        .trim(),
        "0"
    );

    // 0 lost: every row opens to its original PAN and is found by its
    // blind index.
    let reader = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let access = Access::new("verifier", "test").unwrap();
    let rows = pg.psql(
        "pay",
        &format!(
            "SELECT id || ' ' || pan || ' ' || pan_index FROM cards WHERE id < {N} ORDER BY id"
        ),
    );
    let (mut opened, mut found, mut compact) = (0, 0, 0);
    for line in rows.lines() {
        let mut parts = line.split(' ');
        let id: i64 = parts.next().unwrap().parse().unwrap();
        let stored = StoredPan::from_text(parts.next().unwrap()).unwrap();
        let index = parts.next().unwrap();
        compact += usize::from(matches!(stored, StoredPan::Compact(_)));
        let o = reader.open_pan(&stored, &ctx(id), &access).unwrap();
        opened += usize::from(o.pan.expose_digits() == expected[id as usize]);
        let pan = Pan::parse(&expected[id as usize]).unwrap();
        found += usize::from(reader.blind_index(&pan).unwrap().to_hex() == index);
    }
    assert_eq!(
        (compact, opened, found),
        (N as usize, N as usize, N as usize)
    );
    assert_eq!(
        pg.psql("pay", "SELECT count(*) FROM panseal_admit_checkpoints")
            .trim(),
        "0"
    );
}
