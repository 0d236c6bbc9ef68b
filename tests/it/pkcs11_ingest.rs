//! Ingest key pairs inside a PKCS#11 token (SoftHSM2, set up by the test):
//! P-256 private keys generated in the token and never extractable,
//! front ends sealing with the listed public key, opening and admission
//! through `CKM_ECDH1_DERIVE`, and what an attacker with the PIN gets.

use crate::softhsm;

use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use panseal::hazmat::open_with_dek;
use panseal::{
    Access, AdmitItem, AdmitItemError, AdmitRequest, Context, Environment, Error,
    IngestOpenRequest, IngestSealed, IngestSealer, KeyError, KeyService, KeyServiceError, KeyState,
    KeyStore, MemoryAuditSink, MemoryKeyStore, Pan, Panseal, Permissions, Pkcs11Config,
    Pkcs11KeyService, Pkcs11Pin, Scope, WrappedDek, INGEST_LEN,
};

/// A token of its own: its objects and those of `pkcs11` never meet.
const TOKENS: &[&str] = &["ingest"];

// One PKCS#11 test at a time across the binary (SoftHSM2 2.6 fails
// token-object generation now and then while other sessions of the process
// log in and out; see pkcs11.rs).
use crate::softhsm::SERIAL;

fn hsm() -> &'static softhsm::SoftHsm {
    softhsm::softhsm(TOKENS)
}

fn config(kek: &str) -> Pkcs11Config {
    Pkcs11Config::new(
        &hsm().module,
        "ingest",
        kek,
        Environment::new("test").unwrap(),
    )
    .operation_timeout(Duration::from_secs(20))
    .create_kek_if_missing(true)
}

async fn connect_with(kek: &str, permissions: Permissions) -> Pkcs11KeyService {
    Pkcs11KeyService::connect(
        config(kek).permissions(permissions),
        Pkcs11Pin::new(softhsm::PIN.into()),
    )
    .await
    .unwrap()
}

async fn connect(kek: &str) -> Pkcs11KeyService {
    connect_with(kek, Permissions::all()).await
}

fn access() -> Access {
    Access::new("tester", "pkcs11-ingest").unwrap()
}

fn scope(name: &str) -> Scope {
    Scope::new(name).unwrap()
}

fn ctx(row: usize) -> Context {
    Context::new("cards", "pan", format!("row-{row}")).unwrap()
}

/// A Luhn-valid PAN of 13..=19 digits derived from `i`.
fn pan(i: usize) -> Pan {
    let len = 13 + i % 7;
    let mut digits: Vec<u32> = (0..len - 1)
        .map(|k| ((i * 7919 + k * 104_729 + k * k * 31) % 10) as u32)
        .collect();
    digits[0] = 4;
    let mut sum = 0;
    for (k, d) in digits.iter().rev().enumerate() {
        let mut v = *d;
        if k % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    digits.push((10 - sum % 10) % 10);
    Pan::parse(
        &digits
            .iter()
            .map(|d| char::from(b'0' + *d as u8))
            .collect::<String>(),
    )
    .unwrap()
}

/// A session of our own, as a custodian (or an attacker with the PIN)
/// would open one.
fn raw_session() -> Session {
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
        .find(|s| ctx.get_token_info(*s).unwrap().label() == "ingest")
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

fn find_id(session: &Session, class: ObjectClass, id: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .unwrap()
}

/// An authenticated active data-DEK record of `scope_name`, made by a
/// Panseal over `ks` (as an admission job's setup would).
async fn record(ks: &Pkcs11KeyService, scope_name: &str) -> WrappedDek {
    let store = MemoryKeyStore::new();
    let p = Panseal::builder()
        .key_service(ks.clone())
        .key_store(store.clone())
        .audit(MemoryAuditSink::new())
        .environment("test")
        .scope(scope_name)
        .build()
        .await
        .unwrap();
    p.seal_pan(&pan(0), &ctx(0)).await.unwrap();
    let r = store.list(None).await.unwrap().remove(0);
    assert!(r.tag.is_some());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_keys_are_generated_in_the_token_and_never_leave_it() {
    let _serial = SERIAL.lock().await;
    let ks = connect("ing-attrs").await;
    let sc = scope("m-attrs");
    assert!(ks.ingest_keys(&sc).await.unwrap().is_empty());
    let v1 = ks.create_ingest_key(&sc).await.unwrap();
    let v2 = ks.create_ingest_key(&sc).await.unwrap();
    assert_eq!((v1.public_key.version(), v2.public_key.version()), (1, 2));
    assert_eq!(v1.state, KeyState::Active);
    let listed = ks.ingest_keys(&sc).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].public_key, v2.public_key);
    assert_eq!(listed[0].state, KeyState::Active);
    assert_eq!(listed[1].public_key, v1.public_key);
    assert_eq!(listed[1].state, KeyState::DecryptOnly);
    assert_eq!(listed[0].public_key.environment().as_str(), "test");
    assert_eq!(listed[0].public_key.scope(), &sc);

    // The attacker holds the PIN and a session of their own.
    let s = raw_session();
    let id = "panseal-ingest/ing-attrs/test/m-attrs";
    let privates = find_id(&s, ObjectClass::PRIVATE_KEY, id);
    assert_eq!(privates.len(), 2);
    let mut values_read = 0;
    for h in &privates {
        let attrs = s
            .get_attributes(
                *h,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                    AttributeType::Derive,
                    AttributeType::Token,
                ],
            )
            .unwrap();
        for a in [
            Attribute::KeyType(KeyType::EC),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::AlwaysSensitive(true),
            Attribute::NeverExtractable(true),
            Attribute::Local(true),
            Attribute::Derive(true),
            Attribute::Token(true),
        ] {
            assert!(attrs.contains(&a), "{a:?} missing");
        }
        // C_GetAttributeValue(CKA_VALUE) on the private key: refused
        // (CKR_ATTRIBUTE_SENSITIVE; cryptoki leaves the attribute out).
        let value = s.get_attributes(*h, &[AttributeType::Value]).unwrap();
        values_read += value
            .iter()
            .filter(|a| matches!(a, Attribute::Value(v) if !v.is_empty()))
            .count();
        // Nor can the attacker make it extractable again.
        assert!(s
            .update_attributes(*h, &[Attribute::Extractable(true)])
            .is_err());
        assert!(s
            .update_attributes(*h, &[Attribute::Sensitive(false)])
            .is_err());
    }
    assert_eq!(values_read, 0, "private key values read out of the token");
    // Every EC private key on the whole token: none extractable.
    let extractable_ec = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Extractable(true),
        ])
        .unwrap();
    assert_eq!(extractable_ec.len(), 0);
    // No session object (a derived Z) outlives a call.
    let before = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(false),
        ])
        .unwrap()
        .len();
    let sealed = IngestSealer::from_info(&listed[0])
        .unwrap()
        .seal(&pan(1), &ctx(1))
        .unwrap();
    let opened = ks
        .open_ingest(
            &IngestOpenRequest {
                scope: &sc,
                sealed: &sealed,
                context: &ctx(1),
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(opened.pan, pan(1));
    let after = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(false),
        ])
        .unwrap()
        .len();
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_ends_seal_with_the_listed_key_and_the_token_opens() {
    let _serial = SERIAL.lock().await;
    let ks = connect("ing-open").await;
    let sc = scope("m-open");
    ks.create_ingest_key(&sc).await.unwrap();
    let info = ks.ingest_keys(&sc).await.unwrap().remove(0);
    // What a front end holds: the public key's text form, nothing else.
    let configured = panseal::IngestPublicKey::from_text(&info.public_key.to_text()).unwrap();
    let sealer = IngestSealer::new(configured);
    let mut opened_ok = 0;
    let mut sealed_v1 = Vec::new();
    for i in 0..40 {
        let sealed = sealer.seal(&pan(i), &ctx(i)).unwrap();
        // Stored as text, read back.
        let stored = IngestSealed::from_text(&sealed.to_text()).unwrap();
        let opened = ks
            .open_ingest(
                &IngestOpenRequest {
                    scope: &sc,
                    sealed: &stored,
                    context: &ctx(i),
                },
                &access(),
            )
            .await
            .unwrap();
        assert!(opened.needs_reseal);
        if opened.pan == pan(i) {
            opened_ok += 1;
        }
        sealed_v1.push(stored);
    }
    assert_eq!(opened_ok, 40);
    // Rotation: v1 is retired; it still opens, front ends no longer seal
    // with it.
    ks.create_ingest_key(&sc).await.unwrap();
    let listed = ks.ingest_keys(&sc).await.unwrap();
    let retired = listed.iter().find(|k| k.public_key.version() == 1).unwrap();
    assert_eq!(retired.state, KeyState::DecryptOnly);
    assert!(matches!(
        IngestSealer::from_info(retired),
        Err(Error::Key(KeyError::IngestKeyRetired { version: 1, .. }))
    ));
    let opened = ks
        .open_ingest(
            &IngestOpenRequest {
                scope: &sc,
                sealed: &sealed_v1[3],
                context: &ctx(3),
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(opened.pan, pan(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_turns_a_batch_into_compact_ciphertexts_and_index_values() {
    let _serial = SERIAL.lock().await;
    let ks = connect("ing-admit").await;
    let sc = scope("m-admit");
    ks.create_ingest_key(&sc).await.unwrap();
    ks.create_index_key(&sc).await.unwrap();
    let other = scope("m-admit-other");
    ks.create_ingest_key(&other).await.unwrap();
    let sealer = IngestSealer::from_info(&ks.ingest_keys(&sc).await.unwrap()[0]).unwrap();
    let foreign = IngestSealer::from_info(&ks.ingest_keys(&other).await.unwrap()[0]).unwrap();
    let rec = record(&ks, "m-admit").await;

    let n = 60;
    let contexts: Vec<Context> = (0..n + 4).map(ctx).collect();
    let mut sealed: Vec<IngestSealed> = (0..n)
        .map(|i| sealer.seal(&pan(i), &contexts[i]).unwrap())
        .collect();
    // Four bad items among the good ones.
    sealed.push(foreign.seal(&pan(n), &contexts[n]).unwrap()); // another scope's key
    let mut altered = sealer
        .seal(&pan(n + 1), &contexts[n + 1])
        .unwrap()
        .as_bytes()
        .to_vec();
    altered[80] ^= 0x01;
    sealed.push(IngestSealed::from_bytes(&altered).unwrap()); // altered ciphertext
    sealed.push(sealer.seal(&pan(n + 2), &contexts[0]).unwrap()); // sealed for another row
    let mut future = sealer
        .seal(&pan(n + 3), &contexts[n + 3])
        .unwrap()
        .as_bytes()
        .to_vec();
    future[9] = 9;
    sealed.push(IngestSealed::from_bytes(&future).unwrap()); // a version never made
    let items: Vec<AdmitItem<'_>> = sealed
        .iter()
        .zip(&contexts)
        .map(|(s, c)| AdmitItem {
            sealed: s,
            context: c,
        })
        .collect();
    let results = ks
        .admit(
            &AdmitRequest {
                record: &rec,
                index_versions: &[1],
                items: &items,
            },
            &access(),
        )
        .await
        .unwrap();
    assert_eq!(results.len(), n + 4);
    let dek = ks
        .unwrap(&rec.key_request(), &rec.wrapped, &access())
        .await
        .unwrap();
    let mut same_pan = 0;
    let mut same_index = 0;
    for (i, r) in results.iter().take(n).enumerate() {
        let out = r.as_ref().unwrap();
        assert_eq!(out.sealed.key_id(), rec.id);
        if open_with_dek(&dek, &out.sealed, &contexts[i]).unwrap() == pan(i) {
            same_pan += 1;
        }
        // Bound to its context: another row's context does not open it.
        assert!(open_with_dek(&dek, &out.sealed, &contexts[i + 1]).is_err());
        let expected = ks
            .blind_index(&sc, &[1], &[&pan(i)], &access())
            .await
            .unwrap();
        if out.index == expected {
            same_index += 1;
        }
    }
    assert_eq!((same_pan, same_index), (n, n));
    assert!(matches!(results[n], Err(AdmitItemError::KeyMismatch)));
    assert!(matches!(results[n + 1], Err(AdmitItemError::OpenFailed)));
    assert!(matches!(results[n + 2], Err(AdmitItemError::OpenFailed)));
    assert!(matches!(
        results[n + 3],
        Err(AdmitItemError::UnknownIngestKey(9))
    ));

    // Whole-request refusals.
    let one = &items[..1];
    let mut tampered = rec.clone();
    tampered.max_uses += 1;
    assert!(matches!(
        ks.admit(
            &AdmitRequest {
                record: &tampered,
                index_versions: &[1],
                items: one
            },
            &access()
        )
        .await,
        Err(KeyServiceError::RecordTampered(_))
    ));
    assert!(matches!(
        ks.admit(
            &AdmitRequest {
                record: &rec,
                index_versions: &[7],
                items: one
            },
            &access()
        )
        .await,
        Err(KeyServiceError::UnknownIndexKey { version: 7, .. })
    ));
    let no_admit = connect_with(
        "ing-admit",
        Permissions {
            admit: false,
            ..Permissions::all()
        },
    )
    .await;
    assert!(matches!(
        no_admit
            .admit(
                &AdmitRequest {
                    record: &rec,
                    index_versions: &[1],
                    items: one
                },
                &access()
            )
            .await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    let too_many: Vec<AdmitItem<'_>> = vec![items[0]; 1025];
    assert!(ks
        .admit(
            &AdmitRequest {
                record: &rec,
                index_versions: &[],
                items: &too_many
            },
            &access()
        )
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors() {
    let _serial = SERIAL.lock().await;
    let ks = connect("ing-bad").await;
    let a = scope("m-bad-a");
    let b = scope("m-bad-b");
    let empty = scope("m-bad-none");
    ks.create_ingest_key(&a).await.unwrap();
    ks.create_ingest_key(&b).await.unwrap();
    let sealer = IngestSealer::from_info(&ks.ingest_keys(&a).await.unwrap()[0]).unwrap();
    let sealed = sealer.seal(&pan(5), &ctx(5)).unwrap();
    let open = |scope: Scope, sealed: IngestSealed, c: Context| {
        let ks = ks.clone();
        async move {
            ks.open_ingest(
                &IngestOpenRequest {
                    scope: &scope,
                    sealed: &sealed,
                    context: &c,
                },
                &access(),
            )
            .await
        }
    };
    // Another scope (which has a v1 of its own): opaque.
    assert!(matches!(
        open(b.clone(), sealed, ctx(5)).await,
        Err(KeyServiceError::OpenFailed)
    ));
    // A scope without ingest keys.
    assert!(matches!(
        open(empty.clone(), sealed, ctx(5)).await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
    // Another context.
    assert!(matches!(
        open(a.clone(), sealed, ctx(6)).await,
        Err(KeyServiceError::OpenFailed)
    ));
    // Every single-bit alteration of the 101 bytes that still parses:
    // refused, never opened.
    let mut opened = 0;
    let mut refused = 0;
    for byte in 2..INGEST_LEN {
        let mut bytes = sealed.as_bytes().to_vec();
        bytes[byte] ^= 0x80;
        let altered = IngestSealed::from_bytes(&bytes).unwrap();
        match open(a.clone(), altered, ctx(5)).await {
            Ok(_) => opened += 1,
            Err(KeyServiceError::OpenFailed | KeyServiceError::UnknownIngestKey { .. }) => {
                refused += 1
            }
            Err(e) => panic!("byte {byte}: {e}"),
        }
    }
    assert_eq!((opened, refused), (0, INGEST_LEN - 2));
    // Truncated: does not even parse.
    for n in 0..INGEST_LEN {
        assert!(IngestSealed::from_bytes(&sealed.as_bytes()[..n]).is_err());
    }
    // Permissions.
    let no_unwrap = connect_with(
        "ing-bad",
        Permissions {
            unwrap: false,
            ..Permissions::all()
        },
    )
    .await;
    assert!(matches!(
        no_unwrap
            .open_ingest(
                &IngestOpenRequest {
                    scope: &a,
                    sealed: &sealed,
                    context: &ctx(5),
                },
                &access(),
            )
            .await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    // Front ends can still list public keys.
    assert_eq!(no_unwrap.ingest_keys(&a).await.unwrap().len(), 1);
    let front_end = connect_with("ing-bad", Permissions::wrap_only()).await;
    assert!(matches!(
        front_end.create_ingest_key(&a).await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    assert!(matches!(
        front_end
            .set_ingest_key_state(&a, 1, KeyState::Destroyed)
            .await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    // Lifecycle: forward only; destroyed means gone.
    ks.set_ingest_key_state(&a, 1, KeyState::DecryptOnly)
        .await
        .unwrap();
    assert!(ks
        .set_ingest_key_state(&a, 1, KeyState::Active)
        .await
        .is_err());
    assert_eq!(open(a.clone(), sealed, ctx(5)).await.unwrap().pan, pan(5));
    ks.set_ingest_key_state(&a, 1, KeyState::Destroyed)
        .await
        .unwrap();
    assert!(ks.ingest_keys(&a).await.unwrap().is_empty());
    assert!(matches!(
        open(a.clone(), sealed, ctx(5)).await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
    assert!(matches!(
        ks.set_ingest_key_state(&a, 1, KeyState::DecryptOnly).await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
    let s = raw_session();
    assert!(find_id(
        &s,
        ObjectClass::PRIVATE_KEY,
        "panseal-ingest/ing-bad/test/m-bad-a"
    )
    .is_empty());
    // The version number is never reused.
    let next = ks.create_ingest_key(&a).await.unwrap();
    assert_eq!(next.public_key.version(), 2);
    assert!(matches!(
        open(a.clone(), sealed, ctx(5)).await,
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_ingest_key_with_a_known_value_is_refused() {
    let _serial = SERIAL.lock().await;
    let ks = connect("ing-plant").await;
    let sc = scope("m-plant");
    ks.create_ingest_key(&sc).await.unwrap();
    // An attacker with the PIN imports a key pair whose private value they
    // know, labelled as v2, hoping front ends seal to it.
    let known =
        panseal::hazmat::IngestPrivateKey::generate(&Environment::new("test").unwrap(), &sc, 2);
    let id = "panseal-ingest/ing-plant/test/m-plant";
    let params = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let s = raw_session();
    let mut point = vec![0x04, 0x41];
    point.extend_from_slice(known.public_key().as_bytes());
    let public = s
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(params.clone()),
            Attribute::EcPoint(point),
            Attribute::Token(true),
            Attribute::Label(format!("{id}/v2/public").into_bytes()),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .unwrap();
    let private = s
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(params),
            Attribute::Value(known.to_scalar().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
            Attribute::Label(format!("{id}/v2/active/1").into_bytes()),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .unwrap();
    let mut front_ends_given_planted_key = 0;
    match ks.ingest_keys(&sc).await {
        Ok(keys) => {
            front_ends_given_planted_key += keys
                .iter()
                .filter(|k| k.public_key.as_bytes() == known.public_key().as_bytes())
                .count()
        }
        Err(e) => assert!(e.to_string().contains("generated in the token"), "{e}"),
    }
    assert_eq!(front_ends_given_planted_key, 0);
    assert!(ks.create_ingest_key(&sc).await.is_err());
    // A custodian removes it; the genuine key serves again.
    s.destroy_object(private).unwrap();
    s.destroy_object(public).unwrap();
    let listed = ks.ingest_keys(&sc).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].public_key.version(), 1);
}
