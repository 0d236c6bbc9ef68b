//! The custodian tools as real processes against a real PostgreSQL and a
//! real `panseal-keyd`: rotate_dek, inventory, reencrypt and destroy, with
//! dry runs, refusals and dual control enforced by keyd.
use crate::common;
use crate::keyd_harness;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::pg::PgServer;
use common::{example_binary, luhn_pan};
use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, Error, KeyError, KeyId, Pan, SealedPan};

fn tool(name: &str, config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(example_binary(name))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A client configuration for `principal` of `k`, with the PostgreSQL store.
fn keyd_config(
    k: &keyd_harness::Keyd,
    principal: &str,
    url: &str,
    audit: &std::path::Path,
) -> std::path::PathBuf {
    let certs = k.path("certs");
    let p = k.path(&format!("{principal}.json"));
    std::fs::write(
        &p,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"keyd","address":"{}","server_name":"localhost",
                  "ca_file":"{}","client_cert_file":"{}","client_key_file":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}},
                "policy":{{"recheck_interval_secs":1}}}}"#,
            k.addr,
            certs.join("ca.pem").display(),
            certs.join(format!("{principal}.pem")).display(),
            certs.join(format!("{principal}.key.pem")).display(),
            audit.display()
        ),
    )
    .unwrap();
    p
}

fn ctx(id: i64) -> Context {
    Context::new("cards", "pan", id.to_string()).unwrap()
}

#[test]
fn custodian_tools_rotate_count_reencrypt_and_destroy() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    pg.psql(
        "pay",
        "CREATE TABLE cards (id bigint PRIMARY KEY, pan varchar(64) NOT NULL)",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = rt.block_on(keyd_harness::Keyd::ready());
    let carol_ack = k.client("carol");
    rt.block_on(carol_ack.acknowledge(keyd_harness::ACK))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config_path = keyd_config(&k, "app", &url, &audit);
    let alice = keyd_config(&k, "alice", &url, &audit);
    let bob = keyd_config(&k, "bob", &url, &audit);
    let (alice, bob) = (alice.to_str().unwrap(), bob.to_str().unwrap());
    let config = ClientConfig::from_file(&config_path).unwrap();
    let app = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let mut sql = String::new();
    let mut first = None;
    for id in 0..50i64 {
        let s = app
            .seal_pan(
                &Pan::parse(&luhn_pan("4", 16, id as u64)).unwrap(),
                &ctx(id),
            )
            .unwrap();
        first = Some(s.key_id());
        sql += &format!("INSERT INTO cards VALUES ({id}, '{}');", s.to_text());
    }
    pg.psql("pay", &sql);
    let old_ciphertext = pg.psql("pay", "SELECT pan FROM cards WHERE id = 7");
    let first: KeyId = first.unwrap();

    // rotate_dek: a dry run changes nothing; then the DEK is retired.
    // Under keyd the tool needs the custodian's own credential.
    let o = tool("rotate_dek", &config_path, &["--yes"]);
    assert!(
        !o.status.success() && text(&o).contains("--keyd-config"),
        "{}",
        text(&o)
    );
    let o = tool("rotate_dek", &config_path, &["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&first.to_string()));
    assert!(text(&o).contains("dry run: nothing changed"));
    let state = || {
        pg.psql(
            "pay",
            &format!("SELECT state FROM panseal_keys WHERE id = '\\x{first}'"),
        )
        .trim()
        .to_owned()
    };
    assert_eq!(state(), "1");
    // Without --yes and no answer on stdin, nothing happens.
    let o = tool("rotate_dek", &config_path, &[]);
    assert!(!o.status.success());
    assert_eq!(state(), "1");
    let o = tool(
        "rotate_dek",
        &config_path,
        &["--yes", "--keyd-config", alice],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(state(), "2", "decrypt-only");
    assert!(std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .any(|l| l.contains("\"principal\":\"alice\"") && l.contains("rotate_dek")));
    // The running application notices within its re-check interval.
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = app
        .seal_pan(&Pan::parse("4111111111111111").unwrap(), &ctx(1000))
        .unwrap();
    assert_ne!(fresh.key_id(), first);

    // inventory counts the references.
    let o = tool(
        "inventory",
        &config_path,
        &["--register", "sealed-text:cards.pan", "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let inv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let refs = |id: KeyId| {
        inv["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.to_string())
            .unwrap()["references"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(refs(first), 50);
    let table = tool("inventory", &config_path, &[]);
    assert!(text(&table).contains("AES-256-GCM"), "{}", text(&table));

    // destroy refuses while references remain; an application credential
    // is no custodian; one custodian alone destroys nothing.
    let key = first.to_string();
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", alice, "--yes"],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("still use this key"), "{}", text(&o));
    let app_cfg = config_path.to_str().unwrap().to_owned();
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", &app_cfg, "--force", "--yes"],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("not a custodian"), "{}", text(&o));
    assert_eq!(state(), "2");

    // reencrypt moves the data; then destroy is allowed.
    let o = tool(
        "reencrypt",
        &config_path,
        &[
            "--table",
            "cards",
            "--column",
            "pan",
            "--principal",
            "alice",
            "--yes",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("50 re-sealed"), "{}", text(&o));
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", alice, "--dry-run"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 stored field(s)"), "{}", text(&o));
    assert_eq!(state(), "2");
    // First custodian: an approval in keyd, nothing destroyed.
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", alice, "--yes"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 of 2"), "{}", text(&o));
    assert_eq!(state(), "2");
    // The same custodian again does not count.
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", alice, "--yes"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("dual control"), "{}", text(&o));
    // The attacker keeps a copy of the key row (a backup of the database).
    let row = pg.psql(
        "pay",
        &format!("SELECT state || ' ' || encode(record, 'hex') FROM panseal_keys WHERE id = '\\x{first}'"),
    );
    let (row_state, row_record) = row.trim().split_once(' ').unwrap();
    let (row_state, row_record) = (row_state.to_owned(), row_record.to_owned());
    let o = tool(
        "destroy",
        &config_path,
        &["--key", &key, "--keyd-config", bob, "--yes"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("approved in keyd by alice and bob"),
        "{}",
        text(&o)
    );
    assert_eq!(state(), "4", "destroyed");
    // keyd itself refuses the DEK now, even with its row restored from the
    // backup: opens of the old ciphertext that succeed: 0.
    let old = SealedPan::from_text(old_ciphertext.trim()).unwrap();
    let shredded = pg.psql(
        "pay",
        &format!("SELECT encode(record, 'hex') FROM panseal_keys WHERE id = '\\x{first}'"),
    );
    pg.psql(
        "pay",
        &format!(
            "UPDATE panseal_keys SET state = {row_state}, record = '\\x{row_record}' WHERE id = '\\x{first}'"
        ),
    );
    let fresh_reader = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let a0 = Access::new("verifier", "test").unwrap();
    let opened = u32::from(fresh_reader.open_pan(&old, &ctx(7), &a0).is_ok());
    assert_eq!(
        opened, 0,
        "a DEK destroyed by two custodians opened from a restored row"
    );
    pg.psql(
        "pay",
        &format!(
            "UPDATE panseal_keys SET state = 4, record = '\\x{}' WHERE id = '\\x{first}'",
            shredded.trim()
        ),
    );
    let wrapped_len = pg.psql(
        "pay",
        &format!("SELECT length(record) FROM panseal_keys WHERE id = '\\x{first}'"),
    );
    // Record version 2 without its 60 wrapped bytes (a live one is longer
    // than 160).
    assert!(
        wrapped_len.trim().parse::<u32>().unwrap() < 150,
        "{wrapped_len}"
    );

    // Every row opens; the old copy of a ciphertext under the destroyed key
    // is shredded.
    let reader = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let access = Access::new("verifier", "test").unwrap();
    for line in pg
        .psql("pay", "SELECT id || ' ' || pan FROM cards WHERE id < 50")
        .lines()
    {
        let (id, t) = line.split_once(' ').unwrap();
        let id: i64 = id.parse().unwrap();
        let s = SealedPan::from_text(t).unwrap();
        assert_eq!(
            reader
                .open_pan(&s, &ctx(id), &access)
                .unwrap()
                .pan
                .expose_digits(),
            luhn_pan("4", 16, id as u64)
        );
    }
    assert!(matches!(
        reader.open_pan(&old, &ctx(7), &access).unwrap_err(),
        Error::Key(KeyError::Destroyed(_))
    ));
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains("\"principal\":\"bob\""),
        "destroy is audited by the authenticated custodian"
    );
    assert!(log.contains("approved in keyd by alice and bob"));
    let keyd_log = k.audit_lines().join("\n");
    assert!(keyd_log.contains("dek-destroy-approve") && keyd_log.contains(&key));
}
