//! The browser checkout (README "Browser checkout"): the card number is
//! sealed in the page with the scope's ingest public key by JavaScript
//! (`examples/checkout/checkout.js`, `@hpke/core` over WebCrypto) — an
//! implementation of `FORMAT.md` §17 other than the crate's — and only the
//! ciphertext reaches the server.
//!
//! * `node_sealer_opens_in_rust`: the page's module under Node seals 20
//!   PANs; the crate opens all 20 (and none under another context).
//! * `browser_checkout_end_to_end`: PostgreSQL, a real keyd, the
//!   `payments_backend` example and Debian's headless Chromium driven by
//!   Playwright: a card typed into the page appears in 0 request bodies,
//!   0 server log lines and 0 places of a `pg_dump`; the back office opens
//!   the stored order through keyd and gets the same PAN; garbage posted
//!   from the page gets 400 with a typed reason and stores nothing.
use crate::common;
use crate::keyd_harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::pg::PgServer;
use common::{example_binary, luhn_pan};
use keyd_harness::Keyd;
use panseal::hazmat::IngestPrivateKey;
use panseal::{
    Access, Context, Environment, IngestOpenRequest, IngestSealed, KeyService, KeyServiceError,
    Scope,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// `node tests/js/build.mjs` once per test binary: the bundle the page
/// serves and Node imports is always built from the committed source.
fn build_bundle() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        assert!(
            js_dir().join("node_modules/@hpke/core").exists(),
            "tests/js/node_modules missing: run scripts/setup.sh (npm ci --prefix tests/js)"
        );
        let out = Command::new("node")
            .arg(js_dir().join("build.mjs"))
            .output()
            .expect("node (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "bundle build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// `node tests/js/checkout.e2e.mjs seal`: seals `items` (PAN, row key)
/// with the page's module and returns the texts.
fn node_seal(key_text: &str, table: &str, column: &str, items: &[(String, String)]) -> Vec<String> {
    build_bundle();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("items.json");
    let output = dir.path().join("sealed.json");
    let items: Vec<_> = items
        .iter()
        .map(|(pan, row)| serde_json::json!({ "pan": pan, "row_key": row }))
        .collect();
    std::fs::write(
        &input,
        serde_json::json!({ "table": table, "column": column, "items": items }).to_string(),
    )
    .unwrap();
    let out = Command::new("node")
        .arg(js_dir().join("checkout.e2e.mjs"))
        .args(["seal", "--key", key_text, "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node seal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    v["sealed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// 20 PANs of every length the crate packs by default (12..19 digits).
fn twenty_pans() -> Vec<String> {
    let prefixes = ["4", "51", "37", "6011", "35", "4000", "2221", "62"];
    (0..20)
        .map(|i| luhn_pan(prefixes[i % prefixes.len()], 12 + (i % 8), 3000 + i as u64))
        .collect()
}

#[test]
fn node_sealer_opens_in_rust() {
    let env = Environment::new("test").unwrap();
    let scope = Scope::new("shop-1").unwrap();
    let key = IngestPrivateKey::generate(&env, &scope, 3);
    let pans = twenty_pans();
    let items: Vec<(String, String)> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("order-{i}")))
        .collect();
    let sealed = node_seal(&key.public_key().to_text(), "orders", "card_sealed", &items);
    assert_eq!(sealed.len(), 20);

    let mut opened = 0;
    let mut opened_elsewhere = 0;
    for (i, text) in sealed.iter().enumerate() {
        assert_eq!(text.len(), panseal::INGEST_TEXT_LEN);
        let s = IngestSealed::from_text(text).unwrap();
        assert_eq!(s.key_version(), 3);
        assert_eq!(s.key_tag(), key.public_key().key_tag());
        let ctx = Context::new("orders", "card_sealed", format!("order-{i}")).unwrap();
        let pan = key.open(&s, &ctx).unwrap();
        if pan.expose_digits() == pans[i] {
            opened += 1;
        }
        // The JS bound the row key: another row's context opens nothing.
        let other = Context::new("orders", "card_sealed", format!("order-{}", i + 1)).unwrap();
        if key.open(&s, &other).is_ok() {
            opened_elsewhere += 1;
        }
    }
    println!("independent sealer (@hpke/core): opened {opened}/20, under another row {opened_elsewhere}/20");
    assert_eq!(opened, 20);
    assert_eq!(opened_elsewhere, 0);

    // Another scope's key (same version) refuses every one as a mismatch.
    let other_scope = IngestPrivateKey::generate(&env, &Scope::new("shop-2").unwrap(), 3);
    let mismatched = sealed
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            let ctx = Context::new("orders", "card_sealed", format!("order-{i}")).unwrap();
            matches!(
                other_scope.open(&IngestSealed::from_text(t).unwrap(), &ctx),
                Err(panseal::Error::Key(panseal::KeyError::IngestKeyMismatch))
            )
        })
        .count();
    assert_eq!(mismatched, 20);
}

// ------------------------------------------------------------ end to end

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test CA of the payments backend: its server certificate and the
/// back office's client certificate.
struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "shop test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        let pki = Pki {
            ca_der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        };
        let p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &pki.issuer).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key.pem"), key.serialize_pem()).unwrap();
        pki
    }

    /// A client certificate: (DER, key, SHA-256 fingerprint hex).
    fn client(&self, name: &str) -> (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let fp = hex::encode(Sha256::digest(cert.der().as_ref()));
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            fp,
        )
    }

    fn tls(
        &self,
        id: Option<&(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>, String)>,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match id {
            Some((cert, key, _)) => b
                .with_client_auth_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

/// One HTTPS request: (status, body as JSON, or Null).
fn https(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn =
        rustls::ClientConnection::new(tls.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.flush().unwrap();
    let mut resp = Vec::new();
    match s.read_to_end(&mut resp) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
        Err(e) => panic!("{method} {path}: {e}"),
    }
    let raw = String::from_utf8_lossy(&resp).into_owned();
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// The card as a customer might type it, and as logs or dumps could hold it.
fn card_forms(card: &str) -> Vec<String> {
    let groups: Vec<&str> = card
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    vec![card.to_owned(), groups.join(" "), groups.join("-")]
}

fn count_in(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

fn keyd_config(keyd: &Keyd, principal: &str, scope: &str, url: &str, audit: &Path) -> String {
    let certs = keyd.path("certs");
    serde_json::json!({
        "environment": "test",
        "scope": scope,
        "key_service": {
            "type": "keyd",
            "address": keyd.addr,
            "server_name": "localhost",
            "ca_file": certs.join("ca.pem"),
            "client_cert_file": certs.join(format!("{principal}.pem")),
            "client_key_file": certs.join(format!("{principal}.key.pem")),
        },
        "key_store": { "type": "postgres", "url": url },
        "audit": { "type": "jsonl", "path": audit },
    })
    .to_string()
}

#[test]
fn browser_checkout_end_to_end() {
    build_bundle();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = PgServer::start();
    let url = pg.create_db("shop");
    let keyd = rt.block_on(Keyd::ready());
    let scope = Scope::new("shop-1").unwrap();
    // A custodian creates the scope's ingest key pair inside keyd.
    let v1 = rt
        .block_on(keyd.client("root").create_ingest_key(&scope))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d);
    let desk = pki.client("refund-desk");
    std::fs::write(
        d.join("callers.json"),
        serde_json::json!({
            "window_secs": 3600, "reveals_per_window": 5, "lookups_per_window": 5,
            "callers": [{"name": "refund-desk", "cert_sha256": desk.2, "roles": ["reveal", "lookup"]}]
        })
        .to_string(),
    )
    .unwrap();
    let audit = d.join("audit.jsonl");
    // The process's credentials: capture (wrap + index), the page's
    // (`ingest-frontend`: no permission at all; any principal reads public
    // keys) and the back office's (`refunds`: reveal only).
    for (file, principal) in [
        ("main.json", "frontend"),
        ("checkout.json", "ingest-frontend"),
        ("reveal.json", "refunds"),
    ] {
        std::fs::write(
            d.join(file),
            keyd_config(&keyd, principal, scope.as_str(), &url, &audit),
        )
        .unwrap();
    }
    let log_path = d.join("server-stderr.log");
    let mut child = Command::new(example_binary("payments_backend"))
        .arg("--config")
        .arg(d.join("main.json"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--checkout-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(d.join("server.pem"))
        .arg("--tls-key")
        .arg(d.join("server.key.pem"))
        .arg("--client-ca")
        .arg(d.join("ca.pem"))
        .arg("--callers")
        .arg(d.join("callers.json"))
        .arg("--app-audit")
        .arg(d.join("app-audit.jsonl"))
        .arg("--reveal-config")
        .arg(d.join("reveal.json"))
        .arg("--checkout-config")
        .arg(d.join("checkout.json"))
        .arg("--checkout-script")
        .arg(js_dir().join("dist/checkout.mjs"))
        .args(["--ingest-keys-ttl-secs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr_of = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("https://"), "backend did not start: {line:?}");
        line.trim().rsplit("https://").next().unwrap().to_owned()
    };
    let back_office = addr_of();
    let storefront = addr_of();
    let stdout_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let _server = Server(child);

    // The customer's card: typed into the page only.
    let card = luhn_pan("4", 16, 4242);
    let forms = card_forms(&card);
    std::fs::write(d.join("card.txt"), &card).unwrap();
    let shot = d.join("checkout.png");
    let result_path = d.join("result.json");
    let started = std::time::Instant::now();
    let node = Command::new("timeout")
        .args(["180", "node"])
        .arg(js_dir().join("checkout.e2e.mjs"))
        .arg("browser")
        .args(["--url", &format!("https://{storefront}")])
        .arg("--server-cert")
        .arg(d.join("server.pem"))
        .arg("--card-file")
        .arg(d.join("card.txt"))
        .arg("--screenshot")
        .arg(&shot)
        .arg("--out")
        .arg(&result_path)
        .output()
        .unwrap();
    let node_out = format!(
        "{}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    assert!(node.status.success(), "browser run failed: {node_out}");
    print!("{node_out}");
    println!(
        "browser run (Chromium start, 2 page loads, 7 garbage posts, typing, paying, screenshot): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        card_forms(&card)
            .iter()
            .map(|f| node_out.matches(f.as_str()).count())
            .sum::<usize>(),
        0
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result_path).unwrap()).unwrap();

    // 1. What the browser sent: no request carries the card.
    let requests = r["requests"].as_u64().unwrap();
    let with_card = r["requests_with_card"].as_u64().unwrap();
    println!(
        "browser: {requests} requests ({} with a body), containing the card: {with_card}; \
         to other hosts than 127.0.0.1: {}",
        r["requests_with_body"], r["non_loopback_requests"]
    );
    assert_eq!(with_card, 0);
    assert_eq!(r["non_loopback_requests"], 0);
    assert_eq!(r["console_with_card"], 0);
    assert!(r["requests_with_body"].as_u64().unwrap() >= 8);
    assert_eq!(r["page_errors"], serde_json::json!([]));
    assert_eq!(
        r["card_input_name"],
        serde_json::Value::Null,
        "the card input has a name"
    );
    assert_eq!(
        r["input_after"], "",
        "the input still holds the card after paying"
    );
    let status_text = r["status_text"].as_str().unwrap();
    assert!(
        status_text.starts_with("Payment received") && status_text.contains(&card[12..]),
        "page says {status_text:?}"
    );
    assert_eq!(r["status_has_card"], false);
    let csp = r["page_headers"]["content-security-policy"]
        .as_str()
        .unwrap();
    assert!(csp.contains("form-action 'none'") && csp.contains("connect-src 'self'"));

    // 2. Garbage from the page: 400 with a typed reason each.
    let expected = [
        ("not-json", 400, "malformed-body"),
        ("wrong-prefix", 400, "malformed-ciphertext"),
        ("truncated", 400, "malformed-ciphertext"),
        ("bad-alphabet", 400, "malformed-ciphertext"),
        ("unknown-key-tag", 400, "unknown-ingest-key"),
        ("unknown-order", 400, "unknown-order"),
        ("extra-field", 400, "malformed-body"),
    ];
    let garbage = r["garbage"].as_array().unwrap();
    assert_eq!(garbage.len(), expected.len());
    for (g, (label, status, reason)) in garbage.iter().zip(expected) {
        assert_eq!(g["label"], label);
        assert_eq!(g["status"], status, "{label}");
        assert_eq!(g["reason"], reason, "{label}");
    }

    // 3. The database: one paid order holding exactly the posted
    // ciphertext; the garbage order stored nothing; the dump holds the card
    // in no form.
    let order = r["order_id"].as_str().unwrap().to_owned();
    let garbage_order = r["garbage_order_id"].as_str().unwrap().to_owned();
    let paid = pg.psql(
        "shop",
        "SELECT count(*) FROM orders WHERE card_sealed IS NOT NULL",
    );
    assert_eq!(paid.trim(), "1");
    let stored = pg.psql(
        "shop",
        &format!("SELECT card_sealed FROM orders WHERE id = '{order}'"),
    );
    let stored = stored.trim().to_owned();
    let posted: Vec<&str> = r["posted_ciphertexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        posted.contains(&stored.as_str()),
        "the stored card is not what the page posted"
    );
    assert_eq!(stored.len(), panseal::INGEST_TEXT_LEN);
    let garbage_row = pg.psql(
        "shop",
        &format!("SELECT status, card_sealed IS NULL FROM orders WHERE id = '{garbage_order}'"),
    );
    assert_eq!(garbage_row.trim(), "open|t", "garbage changed its order");
    let dump = pg.dump("shop");
    let in_dump: usize = forms.iter().map(|f| count_in(&dump, f)).sum();
    println!(
        "pg_dump: {} bytes, card (plain, spaced, dashed) found {in_dump} times, \
         its ciphertext {} times",
        dump.len(),
        count_in(&dump, &stored)
    );
    assert_eq!(in_dump, 0);
    assert_eq!(count_in(&dump, &stored), 1);

    // 4. The back office opens the order inside keyd: the same PAN.
    let as_desk = pki.tls(Some(&desk));
    let (status, shown) = https(
        &back_office,
        &as_desk,
        "GET",
        &format!("/orders/{order}"),
        "",
    );
    assert_eq!((status, shown["status"].as_str()), (200, Some("paid")));
    let (status, opened) = https(
        &back_office,
        &as_desk,
        "POST",
        &format!("/orders/{order}/reveal"),
        r#"{"purpose":"refund"}"#,
    );
    assert_eq!(status, 200, "{opened}");
    let same = opened["pan"].as_str() == Some(card.as_str());
    println!(
        "back office: opened order's card ends {}, equal to the typed card: {same}",
        &opened["masked"].as_str().unwrap_or("")
    );
    assert!(same);
    assert!(opened["masked"].as_str().unwrap().ends_with(&card[12..]));
    let (status, _) = https(
        &back_office,
        &as_desk,
        "POST",
        &format!("/orders/{garbage_order}/reveal"),
        r#"{"purpose":"refund"}"#,
    );
    assert_eq!(status, 404);
    // panseal's audit: exactly one open, by the authenticated desk, of that order.
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    let opens: Vec<serde_json::Value> = audit_text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["operation"] == "open")
        .collect();
    assert_eq!(opens.len(), 1, "{audit_text}");
    assert_eq!(opens[0]["principal"], "refund-desk");
    assert_eq!(opens[0]["outcome"], "success");
    assert_eq!(opens[0]["context"]["row_key"], order.as_str());
    // keyd's audit: exactly one ingest open by the back office's
    // credential, on behalf of the desk, naming the order.
    let keyd_opens: Vec<serde_json::Value> = keyd
        .audit_lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .filter(|e| e["operation"] == "ingest-open" && e["principal"] == "refunds")
        .collect();
    assert_eq!(keyd_opens.len(), 1);
    assert_eq!(keyd_opens[0]["on_behalf_of"], "refund-desk");
    assert_eq!(keyd_opens[0]["context"]["row_key"], order.as_str());

    // 5. The page's credential as the attacker's: it opens 0 of the stored cards.
    let sealed = IngestSealed::from_text(&stored).unwrap();
    let ctx = Context::new("orders", "card_sealed", order.as_str()).unwrap();
    let access = Access::new("attacker", "refund").unwrap();
    let request = IngestOpenRequest {
        scope: &scope,
        sealed: &sealed,
        context: &ctx,
    };
    let by_front_end = rt.block_on(
        keyd.client("ingest-frontend")
            .open_ingest(&request, &access),
    );
    assert!(
        matches!(by_front_end, Err(KeyServiceError::PermissionDenied(_))),
        "the page's credential: {:?}",
        by_front_end.map(|_| "opened")
    );

    // 6. Independent implementation through keyd: 20 PANs sealed by the
    // page's module under Node with the key keyd serves, opened by keyd.
    let pans = twenty_pans();
    let items: Vec<(String, String)> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("{order}-{i}")))
        .collect();
    let texts = node_seal(&v1.public_key.to_text(), "orders", "card_sealed", &items);
    let revealer = keyd.client("revealer");
    let mut opened20 = 0;
    for (i, t) in texts.iter().enumerate() {
        let sealed = IngestSealed::from_text(t).unwrap();
        let ctx = Context::new("orders", "card_sealed", items[i].1.as_str()).unwrap();
        let request = IngestOpenRequest {
            scope: &scope,
            sealed: &sealed,
            context: &ctx,
        };
        let access = Access::new("revealer", "refund").unwrap();
        if let Ok(o) = rt.block_on(revealer.open_ingest(&request, &access)) {
            if o.pan.expose_digits() == pans[i] {
                opened20 += 1;
            }
        }
    }
    println!("keyd opened {opened20}/20 ciphertexts sealed by the page's module under Node");
    assert_eq!(opened20, 20);

    // 6b. The attacker posts a captured ciphertext again, for another
    // order: refused as a replay. Altered by one bit, the server cannot
    // tell (it has no private key) and stores it, but opening it fails
    // (typed, 409) and recovers nothing: 0 PANs.
    let public = pki.tls(None);
    let fresh_order = |pg: &PgServer| {
        let (status, _) = https(&storefront, &public, "GET", "/checkout", "");
        assert_eq!(status, 200);
        pg.psql(
            "shop",
            "SELECT id FROM orders WHERE status = 'open' ORDER BY created_at DESC LIMIT 1",
        )
        .trim()
        .to_owned()
    };
    let victim = fresh_order(&pg);
    let post = |order: &str, card: &str| {
        https(
            &storefront,
            &public,
            "POST",
            "/checkout",
            &serde_json::json!({ "order_id": order, "card": card }).to_string(),
        )
    };
    let (status, body) = post(&victim, &stored);
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("replayed-ciphertext"))
    );
    let (status, body) = post(&order, &stored);
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("already-paid"))
    );
    let mut altered = sealed.as_bytes().to_vec();
    altered[100] ^= 1; // the last byte of the GCM tag
    let altered = IngestSealed::from_bytes(&altered).unwrap().to_text();
    let (status, _) = post(&victim, &altered);
    assert_eq!(
        status, 201,
        "a well-formed ciphertext under the right key is stored"
    );
    let (status, body) = https(
        &back_office,
        &as_desk,
        "POST",
        &format!("/orders/{victim}/reveal"),
        r#"{"purpose":"refund"}"#,
    );
    let recovered = usize::from(body["pan"].is_string());
    println!("altered ciphertext: stored, opened with status {status}, PANs recovered {recovered}");
    assert_eq!((status, recovered), (409, 0), "{body}");

    // 7. A rotation retires v1: a page still holding it is refused
    // (typed), and new pages get v2.
    let v2 = rt
        .block_on(keyd.client("root").create_ingest_key(&scope))
        .unwrap();
    assert_eq!(v2.public_key.version(), 2);
    std::thread::sleep(Duration::from_millis(1200));
    let new_order = fresh_order(&pg);
    let old_key = node_seal(
        &v1.public_key.to_text(),
        "orders",
        "card_sealed",
        &[(pans[0].clone(), new_order.clone())],
    );
    let (status, body) = post(&new_order, &old_key[0]);
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("retired-ingest-key"))
    );
    // The storefront serves no back-office route.
    let (status, _) = https(&storefront, &public, "GET", &format!("/orders/{order}"), "");
    assert_eq!(status, 404);

    // 8. Server logs (stdout and stderr): lines, and lines holding the card.
    std::thread::sleep(Duration::from_millis(200));
    let stderr_text = std::fs::read_to_string(&log_path).unwrap();
    let mut lines: Vec<String> = stderr_text.lines().map(str::to_owned).collect();
    lines.extend(stdout_lines.lock().unwrap().iter().cloned());
    let with_card = lines
        .iter()
        .filter(|l| forms.iter().any(|f| l.contains(f.as_str())))
        .count();
    println!(
        "server log: {} lines, containing the card: {with_card}",
        lines.len()
    );
    assert!(
        lines.len() >= 10,
        "too few log lines to mean anything: {lines:?}"
    );
    assert_eq!(with_card, 0);
    assert!(stderr_text.contains(&format!("order {order} paid")));
    // Kept where scripts/test.sh scans every output of the run for secrets.
    if let Some(dir) = std::env::var_os("PANSEAL_TEST_LOG_DIR") {
        let dir = PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let pid = std::process::id();
        let _ = std::fs::write(
            dir.join(format!("payments-backend-checkout-{pid}.log")),
            lines.join("\n"),
        );
        let _ = std::fs::copy(
            &result_path,
            dir.join(format!("browser-checkout-{pid}.json")),
        );
    }

    // The screenshot (README "Browser checkout"): refreshed in docs/ on request.
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    if std::env::var_os("PANSEAL_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/checkout.png"),
            &png,
        )
        .unwrap();
    }
}
