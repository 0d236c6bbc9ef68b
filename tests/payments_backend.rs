//! The `payments_backend` example as a real process over HTTP, against a
//! real PostgreSQL: create, show (masked only), reveal (audited, lazy
//! re-seal after a DEK rotation), lookup through the blind index.
#![cfg(all(feature = "postgres", feature = "hazmat-test-keys"))]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use common::example_binary;
use common::pg::PgServer;

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn payments_backend_end_to_end() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("panseal.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"insecure-local","kek_hex":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}},
                "policy":{{"recheck_interval_secs":1,"cache_ttl_secs":2}}}}"#,
            hex::encode(rand::random::<[u8; 32]>()),
            audit.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(example_binary("payments_backend"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();

    let (st, body) = http(&addr, "POST", "/cards", r#"{"pan":"4111 1111 1111 1111"}"#);
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    assert_eq!(body["masked"], "************1111");
    let (st, _) = http(&addr, "POST", "/cards", r#"{"pan":"5555555555554444"}"#);
    assert_eq!(st, 201);
    // Invalid input: a typed error, no echo.
    let (st, body) = http(&addr, "POST", "/cards", r#"{"pan":"4111111111111112"}"#);
    assert_eq!(st, 422);
    assert!(!body.to_string().contains("4111111111111112"));
    let (st, body) = http(
        &addr,
        "POST",
        "/cards",
        r#"{"pan":";4111111111111111=2512?"}"#,
    );
    assert_eq!(st, 422, "{body}");

    let (st, body) = http(&addr, "GET", &format!("/cards/{id}"), "");
    assert_eq!(st, 200);
    assert_eq!(body["masked"], "************1111");
    assert!(body.get("pan").is_none());

    let (st, body) = http(
        &addr,
        "POST",
        "/cards/lookup",
        r#"{"pan":"4111111111111111"}"#,
    );
    assert_eq!(st, 200);
    assert_eq!(body["cards"].as_array().unwrap().len(), 1);
    assert_eq!(body["cards"][0]["id"], id);

    let reveal = r#"{"principal":"agent-7","purpose":"refund"}"#;
    let (st, body) = http(&addr, "POST", &format!("/cards/{id}/reveal"), reveal);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pan"], "4111111111111111");
    assert_eq!(body["resealed"], false);

    // The database holds no PAN: not in the table, not in the key store.
    let dump = String::from_utf8_lossy(&pg.dump("pay")).into_owned();
    assert!(!dump.contains("4111111111111111") && !dump.contains("5555555555554444"));

    // Retire the DEK behind the service's back (as rotate_dek does); after
    // the re-check interval, a reveal re-seals lazily.
    let before = pg.psql(
        "pay",
        &format!("SELECT pan_sealed FROM cards WHERE id = {id}"),
    );
    let key_hex = {
        let s = panseal::SealedPan::from_text(before.trim()).unwrap();
        s.key_id().to_string()
    };
    let store_rt = tokio::runtime::Runtime::new().unwrap();
    store_rt.block_on(async {
        use panseal::KeyStore;
        let store = panseal::PostgresKeyStore::connect(&url, 1).await.unwrap();
        store
            .set_state(
                panseal::KeyId::from_hex(&key_hex).unwrap(),
                panseal::KeyState::DecryptOnly,
            )
            .await
            .unwrap();
    });
    // Readers see the change when the cached key expires (cache TTL 2 s here).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (st, body) = http(&addr, "POST", &format!("/cards/{id}/reveal"), reveal);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pan"], "4111111111111111");
    assert_eq!(body["resealed"], true, "{body}");
    let after = pg.psql(
        "pay",
        &format!("SELECT pan_sealed FROM cards WHERE id = {id}"),
    );
    assert_ne!(before, after);
    // Audited with principal and purpose, without the PAN.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains("\"principal\":\"agent-7\"") && log.contains("\"purpose\":\"refund\""));
    assert!(!log.contains("4111111111111111"));
}
