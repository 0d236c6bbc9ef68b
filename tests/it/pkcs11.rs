//! `Pkcs11KeyService` behaviours beyond the conformance suite
//! (`tests/it/pkcs11_conformance.rs`), on SoftHSM2 tokens set up by the test:
//! the KEK objects' attributes, the session pool, PIN handling, weak and
//! extractable KEKs, disabled versions, several services on one token.

use crate::softhsm;

use std::sync::Arc;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use panseal::hazmat::dek_bytes;
use panseal::{
    Access, Environment, Error, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError,
    KeyState, MemoryAuditSink, MemoryKeyStore, Panseal, Pkcs11Config, Pkcs11KeyService, Pkcs11Pin,
    Scope,
};

/// The tokens of this module (the SoftHSM2 set-up runs once per process,
/// with every module's tokens: `softhsm::TOKENS`).
const TOKENS: &[&str] = &["main", "pins"];

// PKCS#11 tests run one at a time, across every module of this binary
// (`softhsm::SERIAL`). SoftHSM2 2.6 fails
// `C_GenerateKey` of token objects now and then (`CKR_GENERAL_ERROR`,
// `CKR_TEMPLATE_INCONSISTENT`) while other sessions of the same process
// open, log in and close concurrently — which parallel tests, each with
// its own services and custodian sessions, do all the time. (Reproduced
// with raw `cryptoki` calls; encryption and decryption are unaffected.)
use crate::softhsm::SERIAL;

fn hsm() -> &'static softhsm::SoftHsm {
    softhsm::softhsm(TOKENS)
}

fn config(token: &str, kek: &str) -> Pkcs11Config {
    Pkcs11Config::new(&hsm().module, token, kek, Environment::new("test").unwrap())
        .operation_timeout(Duration::from_secs(10))
}

async fn connect(kek: &str) -> Pkcs11KeyService {
    Pkcs11KeyService::connect(
        config("main", kek).create_kek_if_missing(true),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap()
}

fn request(purpose: KeyPurpose) -> KeyRequest {
    KeyRequest {
        id: KeyId::random(),
        scope: Scope::new("merchant-1").unwrap(),
        environment: Environment::new("test").unwrap(),
        purpose,
    }
}

fn access() -> Access {
    Access::new("tester", "pkcs11").unwrap()
}

/// A session of our own on `token`, as a custodian's tool would open one.
fn raw_session(token: &str) -> Session {
    let ctx = Pkcs11::new(&hsm().module).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == token)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(softhsm::PIN))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("{e}"),
    }
    session
}

fn find(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
}

fn bool_attr(session: &Session, h: ObjectHandle, t: AttributeType) -> bool {
    match session.get_attributes(h, &[t]).unwrap().pop() {
        Some(
            Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::NeverExtractable(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Token(b)
            | Attribute::Private(b)
            | Attribute::Local(b),
        ) => b,
        other => panic!("{t:?}: {other:?}"),
    }
}

/// Creates a KEK-like object out of band (as a careless custodian might).
fn make_object(session: &Session, label: &str, kek: &str, bytes: u64, extractable: bool) {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(bytes.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(!extractable),
                Attribute::Extractable(extractable),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(format!("panseal-kek:{kek}").into_bytes()),
            ],
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_versions_are_sensitive_non_extractable_aes256_token_objects() {
    let _serial = SERIAL.lock().await;
    let ks = connect("attrs").await;
    ks.rotate_kek().await.unwrap();
    let s = raw_session("main");
    let v1 = find(&s, "panseal-kek:attrs:v1");
    let v2 = find(&s, "panseal-kek:attrs:v2");
    assert_eq!((v1.len(), v2.len()), (1, 1));
    for (h, newest) in [(v1[0], false), (v2[0], true)] {
        for t in [
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Decrypt,
            AttributeType::Local,
        ] {
            assert!(bool_attr(&s, h, t), "{t:?} must be true");
        }
        for t in [
            AttributeType::Extractable,
            AttributeType::Wrap,
            AttributeType::Unwrap,
        ] {
            assert!(!bool_attr(&s, h, t), "{t:?} must be false");
        }
        // The retired version no longer encrypts; the HSM enforces it.
        assert_eq!(bool_attr(&s, h, AttributeType::Encrypt), newest);
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Id,
                ],
            )
            .unwrap();
        assert!(attrs.contains(&Attribute::KeyType(KeyType::AES)));
        assert!(attrs.contains(&Attribute::ValueLen(32u64.into())));
        assert!(attrs.contains(&Attribute::Id(b"panseal-kek:attrs".to_vec())));
        // The key value cannot be read out.
        let value = s.get_attributes(h, &[AttributeType::Value]).unwrap();
        assert!(
            value.is_empty(),
            "CKA_VALUE readable: {} attrs",
            value.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_lets_concurrent_callers_use_several_sessions() {
    let _serial = SERIAL.lock().await;
    let ks = Pkcs11KeyService::connect(
        config("main", "pool")
            .create_kek_if_missing(true)
            .max_sessions(4),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap();
    let r = request(KeyPurpose::Data);
    let (dek, w) = ks.generate(&r).await.unwrap();
    let expected = dek_bytes(&dek);
    // Bursts of 32 concurrent unwraps until two sessions were in use at
    // once; a pool that serialized callers on one session never gets there.
    let mut rounds = 0;
    while ks.pool_stats().open < 2 {
        rounds += 1;
        assert!(rounds <= 50, "callers never used a second session");
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let ks = ks.clone();
                let r = r.clone();
                let w = w.clone();
                tokio::spawn(async move { dek_bytes(&ks.unwrap(&r, &w, &access()).await.unwrap()) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), expected);
        }
    }
    let stats = ks.pool_stats();
    assert!(stats.open >= 2 && stats.open <= 4, "{stats:?}");
    assert_eq!(stats.max, 4);
    assert_eq!(
        stats.idle, stats.open,
        "every session went back to the pool"
    );

    // One session: still correct, never more than one open.
    let one = Pkcs11KeyService::connect(
        config("main", "pool").max_sessions(1),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let ks = one.clone();
            let r = r.clone();
            let w = w.clone();
            tokio::spawn(async move { dek_bytes(&ks.unwrap(&r, &w, &access()).await.unwrap()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), expected);
    }
    assert_eq!(one.pool_stats().open, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_is_refused_and_no_pin_is_ever_printed() {
    let _serial = SERIAL.lock().await;
    hsm();
    let wrong = "987654-wrong-pin";
    let err = Pkcs11KeyService::connect(
        config("pins", "k").create_kek_if_missing(true),
        Pkcs11Pin::new(wrong.into()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, KeyServiceError::PermissionDenied(_)),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(wrong), "PIN in error: {text}");
    }

    let pin = Pkcs11Pin::new(softhsm::PIN.into());
    assert_eq!(format!("{pin:?}"), "Pkcs11Pin(..)");
    let cfg = config("pins", "k").create_kek_if_missing(true);
    let ks = Pkcs11KeyService::connect(cfg.clone(), pin).await.unwrap();
    for text in [format!("{ks:?}"), format!("{cfg:?}")] {
        assert!(!text.contains(softhsm::PIN), "PIN printed: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kek_is_unknown_unless_creation_is_asked_for() {
    let _serial = SERIAL.lock().await;
    let err = Pkcs11KeyService::connect(
        config("main", "absent"),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, KeyServiceError::UnknownKek(ref n) if n == "absent"),
        "{err:?}"
    );
    let ks = Pkcs11KeyService::connect(
        config("main", "absent").create_kek_if_missing(true),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap();
    let info = ks.kek_info().await.unwrap();
    assert_eq!((info.id.as_str(), info.version), ("absent", 1));
    // A second connect finds it and creates nothing.
    let again = connect("absent").await;
    assert_eq!(again.kek_info().await.unwrap().version, 1);
    assert_eq!(find(&raw_session("main"), "panseal-kek:absent:v1").len(), 1);
    assert!(find(&raw_session("main"), "panseal-kek:absent:v2").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_128_bit_kek_is_reported_as_such_and_refused_by_the_core() {
    let _serial = SERIAL.lock().await;
    hsm();
    make_object(
        &raw_session("main"),
        "panseal-kek:weak:v1",
        "weak",
        16,
        false,
    );
    let ks = Pkcs11KeyService::connect(config("main", "weak"), Pkcs11Pin::new(softhsm::PIN.into()))
        .await
        .unwrap();
    assert_eq!(ks.kek_info().await.unwrap().strength_bits, 128);
    let err = Panseal::builder()
        .key_service(ks)
        .key_store(MemoryKeyStore::new())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("m")
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyService(KeyServiceError::WeakKek {
                kek_bits: 128,
                dek_bits: 256
            })
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractable_kek_is_refused() {
    let _serial = SERIAL.lock().await;
    hsm();
    make_object(
        &raw_session("main"),
        "panseal-kek:leaky:v1",
        "leaky",
        32,
        true,
    );
    let err =
        Pkcs11KeyService::connect(config("main", "leaky"), Pkcs11Pin::new(softhsm::PIN.into()))
            .await
            .unwrap_err();
    assert!(
        matches!(err, KeyServiceError::Other(ref m) if m.contains("extractable")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_with_decrypt_cleared_is_disabled_until_restored() {
    let _serial = SERIAL.lock().await;
    let ks = connect("disable").await;
    let r = request(KeyPurpose::Data);
    let (dek, w) = ks.generate(&r).await.unwrap();
    ks.rotate_kek().await.unwrap();
    let s = raw_session("main");
    let v1 = find(&s, "panseal-kek:disable:v1")[0];
    s.update_attributes(v1, &[Attribute::Decrypt(false)])
        .unwrap();
    let err = ks.unwrap(&r, &w, &access()).await.unwrap_err();
    assert!(matches!(err, KeyServiceError::KekDisabled(_)), "{err:?}");
    assert!(!err.is_retryable());
    s.update_attributes(v1, &[Attribute::Decrypt(true)])
        .unwrap();
    let back = ks.unwrap(&r, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&back), dek_bytes(&dek));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_sharing_a_kek_follow_each_others_rotation_and_destruction() {
    let _serial = SERIAL.lock().await;
    let a = connect("shared").await;
    let b = connect("shared").await;
    let r = request(KeyPurpose::Data);
    let (dek, w1) = a.generate(&r).await.unwrap();
    assert_eq!(w1.kek.version, 1);
    // b has cached version 1 as the newest; a rotates (and clears
    // CKA_ENCRYPT on v1), so b's next wrap is refused by the token, rescans
    // and uses v2.
    assert_eq!(b.kek_info().await.unwrap().version, 1);
    a.rotate_kek().await.unwrap();
    let wb = b.wrap(&r, &dek).await.unwrap();
    assert_eq!(wb.kek.version, 2);
    assert_eq!(
        dek_bytes(&a.unwrap(&r, &wb, &access()).await.unwrap()),
        dek_bytes(&dek)
    );
    assert_eq!(
        dek_bytes(&b.unwrap(&r, &w1, &access()).await.unwrap()),
        dek_bytes(&dek)
    );

    // The newest version cannot be destroyed; an older one can, and the
    // other service notices (its handle for v1 is gone).
    let err = a.destroy_kek(2).await.unwrap_err();
    assert!(matches!(err, KeyServiceError::Other(_)), "{err:?}");
    let w2 = a.rewrap(&r, &w1).await.unwrap();
    a.destroy_kek(1).await.unwrap();
    assert!(find(&raw_session("main"), "panseal-kek:shared:v1").is_empty());
    let err = b.unwrap(&r, &w1, &access()).await.unwrap_err();
    assert!(
        matches!(err, KeyServiceError::KekDestroyed(ref n) if n == "shared#v1"),
        "{err:?}"
    );
    let err = a.destroy_kek(1).await.unwrap_err();
    assert!(matches!(err, KeyServiceError::KekDestroyed(_)), "{err:?}");
    let err = a.destroy_kek(7).await.unwrap_err();
    assert!(matches!(err, KeyServiceError::UnknownKek(_)), "{err:?}");
    assert_eq!(
        dek_bytes(&b.unwrap(&r, &w2, &access()).await.unwrap()),
        dek_bytes(&dek)
    );
    assert_eq!(a.kek_info().await.unwrap().state, KeyState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_is_not_present_is_unavailable_and_a_bad_module_is_not() {
    let _serial = SERIAL.lock().await;
    hsm();
    let err = Pkcs11KeyService::connect(
        config("no-such-token", "k"),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, KeyServiceError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());

    let mut bad = config("main", "k");
    bad.module = "/nonexistent/libpkcs11.so".into();
    let err = Pkcs11KeyService::connect(bad, Pkcs11Pin::new(softhsm::PIN.into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyServiceError::Other(ref m) if m.contains("cannot load")),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    let err = Pkcs11KeyService::connect(
        config("main", "bad name!"),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, KeyServiceError::Other(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrap_is_the_documented_60_byte_gcm_layout() {
    let _serial = SERIAL.lock().await;
    let ks = connect("layout").await;
    let r = request(KeyPurpose::Data);
    let (_dek, w) = ks.generate(&r).await.unwrap();
    assert_eq!(w.bytes.len(), 12 + 32 + 16);
    assert_eq!(w.kek.id, "layout");
    let ks: Arc<dyn KeyService> = Arc::new(ks);
    // Another environment is refused before the token is asked.
    let mut other = r.clone();
    other.environment = Environment::new("prod").unwrap();
    assert!(matches!(
        ks.wrap(&other, &panseal::Dek::generate())
            .await
            .unwrap_err(),
        KeyServiceError::Environment { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_login_was_dropped_logs_in_again() {
    let _serial = SERIAL.lock().await;
    let ks = connect("relogin").await;
    let r = request(KeyPurpose::Data);
    let (dek, w) = ks.generate(&r).await.unwrap();
    // Another part of the process logs the application out of the token
    // (login state is per application and token, not per session).
    let s = raw_session("main");
    s.logout().unwrap();
    let back = ks.unwrap(&r, &w, &access()).await.unwrap();
    assert_eq!(dek_bytes(&back), dek_bytes(&dek));
    // The wrap path and kek_info recover the same way.
    raw_session("main").logout().unwrap();
    let (dek2, w2) = ks.generate(&r).await.unwrap();
    assert_eq!(
        dek_bytes(&ks.unwrap(&r, &w2, &access()).await.unwrap()),
        dek_bytes(&dek2)
    );
    raw_session("main").logout().unwrap();
    assert_eq!(ks.kek_info().await.unwrap().version, 1);
}

/// Every object with `CKA_ID = id`.
fn find_id(session: &Session, id: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Id(id.as_bytes().to_vec())])
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_record_keys_never_leave_the_token() {
    let _serial = SERIAL.lock().await;
    let ks = connect("hmac").await;
    let scope = Scope::new("merchant:7").unwrap();
    ks.create_index_key(&scope).await.unwrap();
    ks.create_index_key(&scope).await.unwrap();
    // The record-MAC key is made on first use.
    let r = panseal_record(&ks).await;
    ks.authenticate_record(None, &r).await.unwrap();

    let s = raw_session("main");
    let index = find_id(&s, "panseal-index/hmac/test/merchant:7");
    let record = find_id(&s, "panseal-record-mac/hmac/test");
    assert_eq!((index.len(), record.len()), (2, 1));
    let mut labels: Vec<String> = index
        .iter()
        .map(
            |h| match s.get_attributes(*h, &[AttributeType::Label]).unwrap().pop() {
                Some(Attribute::Label(l)) => String::from_utf8(l).unwrap(),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    labels.sort();
    assert!(labels[0].starts_with("panseal-index/hmac/test/merchant:7/v1/lookup-only/"));
    assert!(labels[1].starts_with("panseal-index/hmac/test/merchant:7/v2/active/"));
    // An attacker holding the PIN tries to read each key out.
    let wrapping = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let mut recovered = 0;
    for h in index.iter().chain(&record) {
        for t in [
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Local,
        ] {
            assert!(bool_attr(&s, *h, t), "{t:?} must be true");
        }
        for t in [
            AttributeType::Extractable,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Wrap,
            AttributeType::Unwrap,
        ] {
            assert!(!bool_attr(&s, *h, t), "{t:?} must be false");
        }
        let attrs = s
            .get_attributes(*h, &[AttributeType::KeyType, AttributeType::ValueLen])
            .unwrap();
        assert!(attrs.contains(&Attribute::KeyType(KeyType::GENERIC_SECRET)));
        assert!(attrs.contains(&Attribute::ValueLen(32u64.into())));
        match s.get_attributes(*h, &[AttributeType::Value]) {
            Ok(v) if !v.is_empty() => recovered += 1,
            _ => {}
        }
        if s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, *h).is_ok() {
            recovered += 1;
        }
    }
    assert_eq!(recovered, 0, "key values read out of the token");
}

async fn panseal_record(ks: &Pkcs11KeyService) -> panseal::WrappedDek {
    let store = MemoryKeyStore::new();
    let p = Panseal::builder()
        .key_service(ks.clone())
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope("merchant-1")
        .build()
        .await
        .unwrap();
    p.seal_pan(
        &panseal::Pan::parse("4111111111111111").unwrap(),
        &panseal::Context::new("t", "c", "1").unwrap(),
    )
    .await
    .unwrap();
    use panseal::KeyStore;
    let mut r = store.list(None).await.unwrap().remove(0);
    r.created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    r.uses = 0;
    r.sequence = 0;
    r.tag = None;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_index_key_with_a_known_value_is_refused() {
    let _serial = SERIAL.lock().await;
    let ks = connect("plant").await;
    let scope = Scope::new("m").unwrap();
    ks.create_index_key(&scope).await.unwrap();
    let pan = panseal::Pan::parse("4111111111111111").unwrap();
    let genuine = ks
        .blind_index(&scope, &[1], &[&pan], &access())
        .await
        .unwrap();
    // An attacker with the PIN imports a key whose value they know as v2.
    let s = raw_session("main");
    let id = "panseal-index/plant/test/m";
    let planted = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(format!("{id}/v2/active/1").into_bytes()),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .unwrap();
    let mut hashed_with_planted = 0;
    match ks.blind_index(&scope, &[2], &[&pan], &access()).await {
        Ok(_) => hashed_with_planted += 1,
        Err(e) => assert!(e.to_string().contains("generated in the token"), "{e}"),
    }
    assert!(ks.index_keys(&scope).await.is_err());
    assert!(ks.create_index_key(&scope).await.is_err());
    assert_eq!(hashed_with_planted, 0);
    // A custodian removes it; the genuine key hashes as before.
    s.destroy_object(planted).unwrap();
    assert_eq!(
        ks.blind_index(&scope, &[1], &[&pan], &access())
            .await
            .unwrap(),
        genuine
    );
}
