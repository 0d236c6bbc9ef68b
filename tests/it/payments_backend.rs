//! The `payments_backend` example as a real process over HTTPS with client
//! certificates, against a real PostgreSQL, played by its users and by an
//! attacker: plain HTTP and unauthenticated callers get nothing, a wrong
//! role is refused, a stolen reveal credential gets exactly its limit of
//! PANs, lookups are limited and audited, purposes come from a fixed list,
//! the principal never comes from the body, and no malformed request gets
//! its PAN back in an error. Plus the intended path: create, show (masked),
//! reveal (audited, lazy re-seal after a DEK rotation), lookup.
use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::pg::PgServer;
use common::{example_binary, luhn_pan};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client identity: certificate (DER) and key.
struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.cert.as_ref()))
    }
}

struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn server(&self, dir: &Path) {
        let p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key.pem"), key.serialize_pem()).unwrap();
    }

    fn client(&self, name: &str) -> Identity {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Identity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

fn tls_config(ca: &CertificateDer<'static>, id: Option<&Identity>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match id {
        Some(id) => b
            .with_client_auth_cert(
                vec![id.cert.clone()],
                PrivateKeyDer::Pkcs8(id.key.clone_key()),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// One HTTPS request; the whole raw response (headers and body), or the
/// I/O error if the server refused the connection.
fn https_raw(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn =
        rustls::ClientConnection::new(tls.clone(), ServerName::try_from("localhost").unwrap())
            .map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let mut resp = Vec::new();
    match s.read_to_end(&mut resp) {
        Ok(_) => {}
        // A peer that closes without close_notify after a full answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&resp).into_owned())
}

fn status_of(raw: &str) -> u16 {
    raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn body_of(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn https(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let raw = https_raw(addr, tls, method, path, body).expect("request failed");
    (status_of(&raw), body_of(&raw))
}

/// Counts the PANs of `pans` that appear in `text`.
fn pans_in(text: &str, pans: &[String]) -> usize {
    pans.iter().filter(|p| text.contains(p.as_str())).count()
}

#[test]
fn payments_backend_end_to_end() {
    let pg = PgServer::start();
    let url = pg.create_db("pay");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let audit = d.join("audit.jsonl");
    let app_audit = d.join("app-audit.jsonl");
    let cfg = d.join("panseal.json");
    let kek: [u8; 32] = rand::random();
    std::fs::write(
        &cfg,
        format!(
            r#"{{"environment":"test","scope":"m",
                "key_service":{{"type":"insecure-local","kek_hex":"{}"}},
                "key_store":{{"type":"postgres","url":"{url}"}},
                "audit":{{"type":"jsonl","path":"{}"}},
                "policy":{{"recheck_interval_secs":1,"cache_ttl_secs":2}}}}"#,
            hex::encode(kek),
            audit.display()
        ),
    )
    .unwrap();

    // PKI: our CA (server + callers), and a foreign CA.
    let pki = Pki::new("payments test CA");
    pki.server(d);
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    let agent = pki.client("agent-7");
    let attacker = pki.client("stolen-desk"); // a stolen reveal credential
    let checkout = pki.client("checkout");
    let stranger = pki.client("stranger"); // our CA, but not registered
    let foreign = Pki::new("someone else's CA").client("agent-7");
    const REVEAL_LIMIT: usize = 3;
    const LOOKUP_LIMIT: usize = 4;
    std::fs::write(
        d.join("callers.json"),
        serde_json::json!({
            "window_secs": 3600, "reveals_per_window": 20, "lookups_per_window": 20,
            "callers": [
                {"name": "agent-7", "cert_sha256": agent.fingerprint(),
                 "roles": ["reveal", "lookup"]},
                {"name": "stolen-desk", "cert_sha256": attacker.fingerprint(),
                 "roles": ["reveal", "lookup"],
                 "reveals_per_window": REVEAL_LIMIT, "lookups_per_window": LOOKUP_LIMIT},
                {"name": "checkout", "cert_sha256": checkout.fingerprint(),
                 "roles": ["capture"]}
            ]
        })
        .to_string(),
    )
    .unwrap();

    let mut child = Command::new(example_binary("payments_backend"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(d.join("server.pem"))
        .arg("--tls-key")
        .arg(d.join("server.key.pem"))
        .arg("--client-ca")
        .arg(d.join("ca.pem"))
        .arg("--callers")
        .arg(d.join("callers.json"))
        .arg("--app-audit")
        .arg(&app_audit)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .trim_start_matches("https://")
        .to_owned();

    let as_agent = tls_config(&pki.ca_der, Some(&agent));
    let as_attacker = tls_config(&pki.ca_der, Some(&attacker));
    let as_checkout = tls_config(&pki.ca_der, Some(&checkout));
    let as_stranger = tls_config(&pki.ca_der, Some(&stranger));
    let as_foreign = tls_config(&pki.ca_der, Some(&foreign));
    let anonymous = tls_config(&pki.ca_der, None);

    // Cards, stored by the capture role. Ids are random, not a sequence.
    let mut pans: Vec<String> = vec!["4111111111111111".into(), "5555555555554444".into()];
    pans.extend((0..4).map(|i| luhn_pan("401288", 16, 900 + i)));
    let mut ids = Vec::new();
    for pan in &pans {
        let (st, body) = https(
            &addr,
            &as_checkout,
            "POST",
            "/cards",
            &format!(r#"{{"pan":"{pan}"}}"#),
        );
        assert_eq!(st, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
        ids.push(id);
    }
    let id = ids[0].clone();
    assert_ne!(
        u128::from_str_radix(&ids[1], 16).unwrap(),
        u128::from_str_radix(&id, 16).unwrap() + 1
    );
    let (st, body) = https(
        &addr,
        &as_checkout,
        "POST",
        "/cards",
        r#"{"pan":"4111 1111 1111 1111"}"#,
    );
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["masked"], "************1111");

    // --- Plain HTTP: no answer at all, and certainly no PAN.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        plain,
        "POST /cards/{id}/reveal HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\
         Connection: close\r\n\r\n{{\"purpose\":\"refund\"}}"
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(!got.starts_with("HTTP/"), "plain HTTP was answered: {got}");
    assert_eq!(pans_in(&got, &pans), 0);

    // --- No client certificate, or one from another CA: the handshake is
    // refused; looping over every card reveals nothing.
    let mut revealed = 0;
    for tls in [&anonymous, &as_foreign] {
        for id in &ids {
            if let Ok(raw) = https_raw(
                &addr,
                tls,
                "POST",
                &format!("/cards/{id}/reveal"),
                r#"{"purpose":"refund"}"#,
            ) {
                assert!(!raw.starts_with("HTTP/1.1 200"), "{raw}");
                revealed += pans_in(&raw, &pans);
            }
        }
    }
    assert_eq!(revealed, 0, "unauthenticated callers revealed PANs");

    // --- Authenticated but not allowed: registered without the role, or
    // not registered at all.
    for (tls, who) in [(&as_checkout, "checkout"), (&as_stranger, "stranger")] {
        let raw = https_raw(
            &addr,
            tls,
            "POST",
            &format!("/cards/{id}/reveal"),
            r#"{"purpose":"refund"}"#,
        )
        .unwrap();
        assert_eq!(status_of(&raw), 403, "{who}: {raw}");
        assert_eq!(pans_in(&raw, &pans), 0);
        let raw = https_raw(
            &addr,
            tls,
            "POST",
            "/cards/lookup",
            r#"{"pan":"4111111111111111","purpose":"refund"}"#,
        )
        .unwrap();
        assert_eq!(status_of(&raw), 403, "{who}: {raw}");
        let raw = https_raw(&addr, tls, "GET", &format!("/cards/{id}"), "").unwrap();
        assert_eq!(status_of(&raw), 403, "{who}: {raw}");
    }
    let (st, _) = https(
        &addr,
        &as_agent,
        "POST",
        "/cards",
        r#"{"pan":"4111111111111111"}"#,
    );
    assert_eq!(st, 403, "a reveal credential cannot capture");

    // --- Purpose from the fixed list only; principal never from the body.
    for body in [
        r#"{"purpose":"curiosity"}"#,
        r#"{"purpose":"Refund"}"#,
        r#"{"principal":"agent-7","purpose":"refund"}"#,
        r#"{}"#,
    ] {
        let (st, resp) = https(
            &addr,
            &as_agent,
            "POST",
            &format!("/cards/{id}/reveal"),
            body,
        );
        assert_eq!(st, 422, "{body}: {resp}");
        assert!(resp.get("pan").is_none());
    }

    // --- The intended path.
    let (st, body) = https(&addr, &as_agent, "GET", &format!("/cards/{id}"), "");
    assert_eq!(st, 200);
    assert_eq!(body["masked"], "************1111");
    assert!(body.get("pan").is_none());
    let (st, body) = https(
        &addr,
        &as_agent,
        "POST",
        "/cards/lookup",
        r#"{"pan":"5555555555554444","purpose":"chargeback"}"#,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["cards"].as_array().unwrap().len(), 1);
    assert_eq!(body["cards"][0]["id"], ids[1].as_str());
    let reveal = r#"{"purpose":"refund"}"#;
    let (st, body) = https(
        &addr,
        &as_agent,
        "POST",
        &format!("/cards/{id}/reveal"),
        reveal,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pan"], "4111111111111111");
    assert_eq!(body["resealed"], false);

    // --- A stolen reveal credential looping over every card, twice: it
    // gets exactly its limit of PANs; the rest are 429 with Retry-After.
    let mut stolen = std::collections::HashSet::new();
    let mut refused = 0;
    for id in ids.iter().chain(ids.iter()) {
        let raw = https_raw(
            &addr,
            &as_attacker,
            "POST",
            &format!("/cards/{id}/reveal"),
            r#"{"purpose":"fraud-review"}"#,
        )
        .unwrap();
        match status_of(&raw) {
            200 => {
                stolen.insert(body_of(&raw)["pan"].as_str().unwrap().to_owned());
            }
            429 => {
                assert!(raw.to_ascii_lowercase().contains("retry-after: "), "{raw}");
                assert_eq!(pans_in(&raw, &pans), 0);
                refused += 1;
            }
            s => panic!("unexpected {s}: {raw}"),
        }
    }
    assert_eq!(
        stolen.len(),
        REVEAL_LIMIT,
        "PANs the stolen credential read"
    );
    assert_eq!(refused, 2 * ids.len() - REVEAL_LIMIT);

    // --- The same credential searching masked → full through lookup
    // (BIN + last four candidates): limited, every attempt audited.
    let candidates: Vec<String> = (0..10).map(|i| luhn_pan("401288", 16, 900 + i)).collect();
    let (mut answered, mut limited) = (0, 0);
    for pan in &candidates {
        let raw = https_raw(
            &addr,
            &as_attacker,
            "POST",
            "/cards/lookup",
            &format!(r#"{{"pan":"{pan}","purpose":"fraud-review"}}"#),
        )
        .unwrap();
        match status_of(&raw) {
            200 => answered += 1,
            429 => limited += 1,
            s => panic!("unexpected {s}: {raw}"),
        }
        assert_eq!(pans_in(&raw, &candidates), 0);
    }
    assert_eq!(
        (answered, limited),
        (LOOKUP_LIMIT, candidates.len() - LOOKUP_LIMIT)
    );
    let app_log = std::fs::read_to_string(&app_audit).unwrap();
    let lookups: Vec<serde_json::Value> = app_log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["event"] == "lookup" && e["principal"] == "stolen-desk")
        .collect();
    assert_eq!(
        lookups.iter().filter(|e| e["outcome"] == "success").count(),
        LOOKUP_LIMIT
    );
    assert_eq!(
        lookups
            .iter()
            .filter(|e| e["outcome"] == "refused" && e["reason"] == "rate-limit")
            .count(),
        candidates.len() - LOOKUP_LIMIT
    );
    assert!(lookups.iter().all(|e| e["purpose"] == "fraud-review"));
    assert!(app_log.contains(r#""principal":"agent-7""#));
    assert_eq!(pans_in(&app_log, &pans) + pans_in(&app_log, &candidates), 0);

    // --- No PAN comes back in an error, however it is sent.
    malformed_requests_never_echo(&addr, &as_checkout, &as_agent, &id);

    // The database holds no PAN: not in the table, not in the key store.
    let dump = String::from_utf8_lossy(&pg.dump("pay")).into_owned();
    assert_eq!(pans_in(&dump, &pans), 0);

    // Retire the DEK behind the service's back (as rotate_dek does); after
    // the re-check interval, a reveal re-seals lazily.
    let select = format!("SELECT pan_sealed FROM cards WHERE id = '{id}'");
    let before = pg.psql("pay", &select);
    let key_hex = {
        let s = panseal::SealedPan::from_text(before.trim()).unwrap();
        s.key_id().to_string()
    };
    let store_rt = tokio::runtime::Runtime::new().unwrap();
    store_rt.block_on(async {
        // A raw edit of the row would be refused as tampered (issue 10):
        // retire through a custodian handle on the same key service (the
        // test's insecure local KEK), which signs the change.
        let store = panseal::PostgresKeyStore::connect(&url, 1).await.unwrap();
        let ks = panseal::LocalKeyService::from_kek_bytes_insecure(
            panseal::Environment::new("test").unwrap(),
            kek,
        );
        let custodian = panseal::Panseal::builder()
            .key_service(ks)
            .key_store(store)
            .audit(panseal::MemoryAuditSink::new())
            .environment("test")
            .scope("m")
            .build()
            .await
            .unwrap();
        let id = panseal::KeyId::from_hex(&key_hex).unwrap();
        custodian
            .set_key_state(id, panseal::KeyState::DecryptOnly)
            .await
            .unwrap();
    });
    // Readers see the change when the cached key expires (cache TTL 2 s here).
    std::thread::sleep(Duration::from_millis(2500));
    let (st, body) = https(
        &addr,
        &as_agent,
        "POST",
        &format!("/cards/{id}/reveal"),
        reveal,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pan"], "4111111111111111");
    assert_eq!(body["resealed"], true, "{body}");
    let after = pg.psql("pay", &select);
    assert_ne!(before, after);

    // Audited with the authenticated principal and the purpose, without
    // the PAN: one open per reveal that was let through.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains("\"principal\":\"agent-7\"") && log.contains("\"purpose\":\"refund\""));
    let stolen_opens = log
        .lines()
        .filter(|l| {
            l.contains("\"principal\":\"stolen-desk\"") && l.contains("\"operation\":\"open\"")
        })
        .count();
    assert_eq!(stolen_opens, REVEAL_LIMIT);
    assert_eq!(pans_in(&log, &pans), 0);
}

/// Sends PANs in every malformed way to every endpoint and scans every
/// response (status line, headers, body) for their digits.
fn malformed_requests_never_echo(
    addr: &str,
    capture: &Arc<rustls::ClientConfig>,
    reveal: &Arc<rustls::ClientConfig>,
    id: &str,
) {
    let pan = "4111111111111111";
    let bad_luhn = "4111111111111112";
    let too_long = "41111111111111111111111111";
    let short = "41111111";
    let secrets = [pan, bad_luhn, too_long, short, "411111111111"];
    let bodies: Vec<String> = vec![
        format!(r#"{{"pan":{pan}}}"#),                 // a JSON number
        format!(r#"{{"pan":{pan}.0}}"#),               // a float
        format!(r#"{{"pan":-{pan}}}"#),                // negative
        format!(r#"{{"pan":{{"pan":"{pan}"}}}}"#),     // nested object
        format!(r#"{{"pan":["{pan}"]}}"#),             // array
        format!(r#"{{"pan":true,"x":"{pan}"}}"#),      // wrong type + extra field
        format!(r#"{{"card":"{pan}"}}"#),              // wrong field name
        format!(r#"{{"pan":"{pan}","pan":"{pan}"}}"#), // duplicate field
        format!(r#"{{"pan":"{too_long}"}}"#),          // too long
        format!(r#"{{"pan":"{short}"}}"#),             // too short
        format!(r#"{{"pan":"{bad_luhn}"}}"#),          // bad Luhn
        format!(r#"{{"pan":";{pan}=2512101?"}}"#),     // track data
        format!(r#"{{"pan":"{pan}""#),                 // truncated JSON
        pan.to_owned(),                                // not an object
        format!(r#""{pan}""#),                         // a bare string
        format!(r#"{{"pan":"{pan}","purpose":{pan}}}"#),
        format!(r#"{{"pan":"{pan}","purpose":"{pan}"}}"#),
        format!(r#"{{"purpose":"{pan}"}}"#),
        format!(r#"{{"purpose":"refund","pan":"{pan}"}}"#),
        format!(r#"{{"pan":"{}"}}"#, pan.repeat(100)), // over the body limit
        format!("{{\"pan\":\"{pan}\u{0}\"}}"),
    ];
    let mut checked = 0;
    for body in &bodies {
        for (tls, path) in [
            (capture, "/cards".to_owned()),
            (reveal, "/cards/lookup".to_owned()),
            (reveal, format!("/cards/{id}/reveal")),
        ] {
            let raw = https_raw(addr, tls, "POST", &path, body).unwrap();
            let st = status_of(&raw);
            // One of these is a well-formed lookup (answered, masked only).
            let valid_lookup =
                path == "/cards/lookup" && body.starts_with(r#"{"purpose":"refund","#);
            assert!(
                (400..500).contains(&st) || (valid_lookup && st == 200),
                "{path} {body}: {raw}"
            );
            for s in secrets {
                assert!(!raw.contains(s), "{path} echoed {s}: {raw}");
            }
            checked += 1;
        }
    }
    // PANs in the path, the query string and a header.
    for (method, path) in [
        ("GET", format!("/cards/{pan}")),
        ("POST", format!("/cards/{pan}/reveal")),
        ("GET", format!("/cards/{id}?pan={pan}")),
        ("GET", format!("/{pan}")),
        ("PUT", "/cards".to_owned()),
    ] {
        let raw = https_raw(addr, reveal, method, &path, r#"{"purpose":"refund"}"#).unwrap();
        if path.contains('?') {
            assert_eq!(status_of(&raw), 200, "{raw}");
        } else {
            assert!((400..500).contains(&status_of(&raw)), "{path}: {raw}");
        }
        assert!(!raw.contains(pan), "{path} echoed the PAN: {raw}");
        checked += 1;
    }
    assert_eq!(checked, bodies.len() * 3 + 5);
}
