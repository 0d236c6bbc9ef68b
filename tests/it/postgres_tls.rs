//! The PostgreSQL key store over TLS, against real servers started by the
//! tests with TLS on and plain TCP rejected (tests/it/common/pg.rs): the
//! intended path (verify-full, the key-store conformance suite, seal and
//! open through a JSON configuration, `pg_stat_ssl` showing the connection
//! encrypted), client-certificate authentication, and the attacker's
//! attempts: a man in the middle with a certificate from another CA, a
//! certificate for another name, a server that does not offer TLS (no
//! downgrade). No error ever shows the password.
use crate::common;

use common::pg::{PgServer, ServerTls};
use panseal::config::ClientConfig;
use panseal::{
    blocking, Access, Context, Environment, KeyStore, KeyStoreError, LocalKeyService,
    MemoryAuditSink, Pan, Panseal, PostgresKeyStore,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::keystore_conformance::conformance;

/// In every URL of these tests; the servers use `trust` or `cert`
/// authentication, so it is never needed, and must never be shown.
const PASSWORD: &str = "Hunter2-pg-example";

/// The README's TLS key store (README.md, "PostgreSQL, custodian tools and
/// the breach drill"), used below with the test server's port and CA.
const README_KEY_STORE: &str = r#"
// readme:begin pg-tls-json
{
  "type": "postgres",
  "url": "postgresql://app@db.internal:5432/payments?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem"
}
// readme:end pg-tls-json
"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A certificate authority for the tests.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
            dir,
        }
    }

    /// The CA file a client names in `sslrootcert`.
    fn file(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// A certificate and key (PEM) for `names` (DNS names or IP addresses),
    /// or with common name `cn` for a client.
    fn issue(&self, names: &[&str], cn: &str) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS server configuration with a certificate of this CA.
    fn server(&self, names: &[&str]) -> ServerTls {
        let (cert_pem, key_pem) = self.issue(names, "postgres test server");
        ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: None,
        }
    }
}

fn url(pg: &PgServer, db: &str, tls: &str) -> String {
    format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{db}?{tls}",
        pg.port
    )
}

/// The store's error (the first operation connects), checked to hold no
/// password.
fn refused(url: &str) -> KeyStoreError {
    let e = rt()
        .block_on(PostgresKeyStore::connect(url, 1))
        .expect_err("the connection must be refused");
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(PASSWORD), "{text}");
    }
    e
}

/// Key-store tables the server holds (the migration creates them on the
/// first connection).
fn panseal_tables(pg: &PgServer, db: &str) -> i64 {
    pg.psql(
        db,
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'panseal%'",
    )
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn verify_full_stores_keys_seals_and_opens_over_tls() {
    let ca = Ca::new("panseal test database CA");
    let pg = PgServer::start_tls(&ca.server(&["localhost", "127.0.0.1"]));
    pg.create_db("conf");
    let store_url = url(
        &pg,
        "conf",
        &format!("sslmode=verify-full&sslrootcert={}", ca.file()),
    );
    rt().block_on(async {
        let store = PostgresKeyStore::connect(&store_url, 2).await.unwrap();
        conformance(&store, 300).await;
        // The connection is encrypted: the server says so for this session.
        let c = store.pool().get().await.unwrap();
        let row = c
            .query_one(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let (ssl, version): (bool, String) = (row.get(0), row.get(1));
        assert!(ssl, "pg_stat_ssl.ssl is false");
        assert!(version.starts_with("TLSv1."), "{version}");
    });

    // The README's configuration, with the test server's port and CA: a
    // role `app` that owns the database `payments`.
    pg.create_db("payments");
    pg.psql(
        "payments",
        "CREATE ROLE app LOGIN; ALTER DATABASE payments OWNER TO app;",
    );
    let block: Vec<&str> = README_KEY_STORE
        .lines()
        .filter(|l| !l.contains("readme:"))
        .collect();
    let key_store = block
        .join("\n")
        .replace("db.internal:5432", &format!("127.0.0.1:{}", pg.port))
        .replace("/etc/ssl/pg-ca.pem", &ca.file());
    let config = ClientConfig::from_json(&format!(
        r#"{{"environment":"test","scope":"m","key_service":{{"type":"local"}},
            "key_store":{key_store},"audit":{{"type":"memory"}}}}"#
    ))
    .unwrap();
    let app = blocking::Panseal::build(config.builder().unwrap()).unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let context = Context::new("cards", "pan", "1").unwrap();
    let sealed = app.seal_pan(&pan, &context).unwrap();
    let opened = app
        .open_pan(&sealed, &context, &Access::new("auditor", "test").unwrap())
        .unwrap();
    assert!(opened.pan == pan);
    assert_eq!(
        pg.psql("payments", "SELECT count(*) FROM panseal_keys")
            .trim(),
        "1"
    );
    assert_eq!(
        pg.psql(
            "payments",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE usename = 'app' AND NOT ssl"
        )
        .trim(),
        "0"
    );
}

#[test]
fn a_man_in_the_middle_with_another_ca_is_refused_before_any_write() {
    // The application trusts its CA; the server it reaches presents a
    // certificate for the right name from another CA (a man in the middle,
    // or a rogue server on the database's address).
    let ours = Ca::new("panseal test database CA");
    let attacker = Ca::new("attacker CA");
    let pg = PgServer::start_tls(&attacker.server(&["localhost", "127.0.0.1"]));
    pg.create_db("pay");
    for mode in ["verify-full", "verify-ca", "require"] {
        let store_url = url(
            &pg,
            "pay",
            &format!("sslmode={mode}&sslrootcert={}", ours.file()),
        );
        let e = refused(&store_url);
        let text = e.to_string();
        assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
        assert!(
            text.starts_with("TLS certificate does not verify"),
            "{text}"
        );
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(text.contains(&format!("sslmode={mode}")), "{text}");

        // Sealing through the store fails too, and writes nothing.
        let store = PostgresKeyStore::new(&store_url, 1).unwrap();
        let app = blocking::Panseal::build(
            Panseal::builder()
                .key_service(LocalKeyService::new(Environment::new("test").unwrap()))
                .key_store(store)
                .audit(MemoryAuditSink::new())
                .environment("test")
                .scope("m"),
        )
        .unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let e = app
            .seal_pan(&pan, &Context::new("cards", "pan", "1").unwrap())
            .expect_err("sealing through the man in the middle");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!text.contains("4111111111111111"), "{text}");
    }
    // Not one statement reached the server: no key-store table, 0 records.
    assert_eq!(panseal_tables(&pg, "pay"), 0);
}

#[test]
fn a_certificate_for_another_name_is_refused_by_verify_full_only() {
    let ca = Ca::new("panseal test database CA");
    let pg = PgServer::start_tls(&ca.server(&["db.internal"]));
    pg.create_db("pay");
    let tls = |mode: &str| format!("sslmode={mode}&sslrootcert={}", ca.file());
    let e = refused(&url(&pg, "pay", &tls("verify-full")));
    let text = e.to_string();
    assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
    assert!(
        text.starts_with("TLS certificate does not verify"),
        "{text}"
    );
    assert!(text.contains("not valid for name"), "{text}");
    assert!(text.contains("db.internal"), "{text}");
    assert_eq!(panseal_tables(&pg, "pay"), 0);

    // verify-ca checks the chain only (libpq's meaning); require with a
    // root is verify-ca.
    for mode in ["verify-ca", "require"] {
        rt().block_on(async {
            let store = PostgresKeyStore::connect(&url(&pg, "pay", &tls(mode)), 1)
                .await
                .unwrap();
            assert_eq!(store.schema_version().await.unwrap(), 2);
            assert!(store.list(None).await.unwrap().is_empty());
        });
    }
}

#[test]
fn plain_tcp_is_refused_both_ways() {
    let ca = Ca::new("panseal test database CA");
    // A TLS-only server refuses a client that does not use TLS (the
    // server's own refusal: no pg_hba.conf entry without encryption).
    let tls_only = PgServer::start_tls(&ca.server(&["localhost", "127.0.0.1"]));
    tls_only.create_db("pay");
    for tls in ["sslmode=disable", "application_name=x"] {
        let e = refused(&url(&tls_only, "pay", tls));
        assert!(e.to_string().contains("no encryption"), "{tls}: {e}");
    }
    assert_eq!(panseal_tables(&tls_only, "pay"), 0);

    // A server without TLS (or a man in the middle answering "no TLS") is
    // refused when TLS is asked for: no downgrade to plain TCP.
    let plain = PgServer::start();
    plain.create_db("pay");
    for mode in ["verify-full", "verify-ca", "require"] {
        let e = refused(&url(
            &plain,
            "pay",
            &format!("sslmode={mode}&sslrootcert={}", ca.file()),
        ));
        assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
        assert!(e.to_string().contains("does not offer TLS"), "{e}");
    }
    // prefer and allow, which would fall back, are refused before any
    // connection.
    for mode in ["prefer", "allow"] {
        let e =
            PostgresKeyStore::new(&url(&plain, "pay", &format!("sslmode={mode}")), 1).unwrap_err();
        assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
        assert!(e.to_string().contains("falls back to plain TCP"), "{e}");
    }
    assert_eq!(panseal_tables(&plain, "pay"), 0);
}

#[test]
fn a_client_certificate_authenticates_the_application() {
    let ca = Ca::new("panseal test database CA");
    let clients = Ca::new("panseal test client CA");
    let mut server = ca.server(&["localhost", "127.0.0.1"]);
    server.client_ca_pem = Some(clients.pem.clone());
    let pg = PgServer::start_tls(&server);
    pg.create_db("pay");
    let (cert, key) = clients.issue(&[], "postgres");
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("app.pem"), dir.path().join("app.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    // The key=value form, with quoted values.
    let settings = format!(
        "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=pay \
         sslmode=verify-full sslrootcert='{}'",
        pg.port,
        ca.file()
    );
    let with_cert = format!(
        "{settings} sslcert='{}' sslkey='{}'",
        cert_file.display(),
        key_file.display()
    );
    rt().block_on(async {
        // A pool of one connection (a conflicting update re-reads the row
        // through the same pool).
        let store = PostgresKeyStore::connect(&with_cert, 1).await.unwrap();
        conformance(&store, 400).await;
    });
    // Without the certificate the server refuses the application.
    let e = refused(&settings);
    assert!(
        e.to_string()
            .contains("connection requires a valid client certificate")
            || e.to_string().contains("certificate authentication failed"),
        "{e}"
    );
}

#[test]
fn an_unreadable_sslrootcert_is_a_clear_error() {
    let e = PostgresKeyStore::new(
        &format!(
            "postgresql://app:{PASSWORD}@127.0.0.1:1/pay?sslmode=verify-full&sslrootcert=/nonexistent/pg-ca.pem"
        ),
        1,
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
    assert!(
        text.contains("sslrootcert /nonexistent/pg-ca.pem"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    // Through the JSON configuration too.
    let config = ClientConfig::from_json(&format!(
        r#"{{"environment":"test","scope":"m","key_service":{{"type":"local"}},
            "key_store":{{"type":"postgres","url":"postgresql://app:{PASSWORD}@db/pay?sslmode=verify-full&sslrootcert=/nonexistent/pg-ca.pem"}}}}"#
    ))
    .unwrap();
    let e = config.builder().map(|_| ()).unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(text.contains("/nonexistent/pg-ca.pem"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}
