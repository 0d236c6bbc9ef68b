//! The README's Rust fragments, compiled (and where they need nothing but
//! this process, run). Each region between `readme:begin NAME` and
//! `readme:end NAME` is the README block marked `mirror
//! tests/it/readme.rs#NAME`; `scripts/readme.py` checks that they are the
//! same, so a README fragment that stops compiling fails the suite.
//!
//! The PKCS#11, AWS KMS and keyd fragments name a real HSM module, a real
//! AWS region and a keyd on 127.0.0.1:8443, so they are only compiled here
//! (`#[allow(dead_code)]`); the same calls run against SoftHSM2, moto and a
//! real keyd in `pkcs11.rs`, `aws_kms.rs` and keyd's own tests.

#![allow(clippy::all)]

use std::collections::HashMap;

use panseal::{
    Access, Context, Environment, IngestPublicKey, IngestSealed, IngestSealer, LocalKeyService,
    MemoryAuditSink, MemoryKeyStore, Pan, Panseal, StoredPan,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Config {
    ingest_public_key: String,
}

#[derive(Default)]
struct Db(HashMap<String, String>);

impl Db {
    fn insert(&mut self, row: &str, value: String) {
        self.0.insert(row.to_owned(), value);
    }
}

/// The "Write-only ingest" fragment, run on the in-process key service:
/// the front end seals with the public key only, the back office opens
/// the stored text, admission turns it into the compact form.
#[tokio::test]
#[allow(non_snake_case, unused_variables)]
#[rustfmt::skip]
async fn write_only_ingest_fragment_runs() -> Result<()> {
    let panseal = Panseal::builder()
        .key_service(LocalKeyService::new(Environment::new("prod")?))
        .key_store(MemoryKeyStore::new())
        .audit(MemoryAuditSink::new())
        .environment("prod")
        .scope("merchant-42")
        .build()
        .await?;
    let info = panseal.rotate_ingest_key().await?;
    let config = Config {
        ingest_public_key: info.public_key.to_text(),
    };
    let PINNED_FINGERPRINT = &info.public_key.fingerprint();
    let pan = Pan::parse("4111 1111 1111 1111")?;
    let row_id = "card-1001";
    let mut db = Db::default();

    // readme:begin ingest
    // Front end (Rust): no key service, no credential, no key store.
    let key = IngestPublicKey::from_text(&config.ingest_public_key)?; // "PIK1/prod/merchant-42/1/…"
    let sealer = IngestSealer::new(key);
    let stored = sealer.seal(&pan, &Context::new("cards", "pan", row_id)?)?;
    db.insert(row_id, stored.to_text());   // 134 characters, fits VARCHAR(140)
                                         // readme:end ingest
    assert_eq!(db.0[row_id].len(), 134);
    let column = db.0[row_id].clone();
    let ctx = Context::new("cards", "pan", row_id)?;
    let access = Access::new("agent-7", "refund")?;
    let ingest_sealed = IngestSealed::from_text(&column)?;

    // readme:begin ingest-service
    // Or fetch it from the key service and pin it:
    let sealer = panseal.ingest_sealer(Some(PINNED_FINGERPRINT)).await?;

    // Back office: open_pan takes either form (StoredPan parses both).
    let opened = panseal.open_pan(&StoredPan::from_text(&column)?, &ctx, &access).await?;
    assert!(opened.needs_reseal); // ingest ciphertexts are admitted, not kept

    // Admission (credential with `admit` + `wrap`): PAN and DEK stay in the service.
    let results = panseal.admit(&[(ingest_sealed, ctx)]).await?;
    for r in results { let a = r?; /* a.sealed: 48-byte compact; a.index: BlindIndex */ }
    // readme:end ingest-service
    assert_eq!(opened.pan, pan);
    Ok(())
}

/// "PKCS#11 HSMs": compiled only (a real module path and token).
#[cfg(feature = "pkcs11")]
#[allow(dead_code)]
#[rustfmt::skip]
async fn pkcs11_fragment() -> Result<()> {
    use std::time::Duration;
    fn read_pin_from_your_secret_store() -> Result<String> {
        Ok(std::env::var("HSM_PIN")?)
    }
    // readme:begin pkcs11
    use panseal::{Environment, Panseal, Pkcs11Config, Pkcs11KeyService, Pkcs11Pin};

    let hsm = Pkcs11KeyService::connect(
        Pkcs11Config::new("/opt/hsm/lib/libpkcs11.so", "payments", "cards", Environment::new("prod")?)
            .max_sessions(16)                              // default 8
            .operation_timeout(Duration::from_secs(5)),    // default 10 s
        Pkcs11Pin::new(read_pin_from_your_secret_store()?), // wiped on drop, never logged or printed
    ).await?;
    let panseal = Panseal::builder().key_service(hsm) /* key store, audit, … */ .build().await?;
    // readme:end pkcs11
    drop(panseal);
    Ok(())
}

/// "AWS KMS": compiled only (a real AWS region).
#[cfg(feature = "aws-kms")]
#[allow(dead_code)]
#[rustfmt::skip]
async fn aws_kms_fragment() -> Result<()> {
    // readme:begin aws-kms
    use panseal::{AwsKmsConfig, AwsKmsKeyService, Environment};

    let kms = AwsKmsKeyService::connect(
        AwsKmsConfig::new("cards", Environment::new("prod")?)
            .region("eu-west-1"),          // or AWS_REGION / profile
            // .endpoint_url("https://vpce-…kms.eu-west-1.vpce.amazonaws.com")  KMS-compatible or VPC endpoint
            // .credentials(AwsKmsCredentials::new(id, secret, token))          default: the standard chain
    ).await?;
    // readme:end aws-kms
    drop(kms);
    Ok(())
}

/// "panseal-keyd: Client": compiled only (a keyd on 127.0.0.1:8443).
#[cfg(feature = "keyd-client")]
#[allow(dead_code, unused_variables)]
#[rustfmt::skip]
fn keyd_client_fragment() -> Result<()> {
    use panseal::RemoteKeyService;
    // readme:begin keyd-client
    let ks = RemoteKeyService::builder()
        .address("127.0.0.1:8443")
        .server_name("localhost")
        .ca_pem_file("certs/ca.pem")
        .client_identity_pem_files("certs/refunds.pem", "certs/refunds.key.pem")
        .environment("prod")
        .scope("merchant-42")          // for kek_info / rotate_kek
        .build()?;
    let panseal = Panseal::builder().key_service(ks) /* … */;
    // readme:end keyd-client
    Ok(())
}
