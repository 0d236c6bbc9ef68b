//! Write-only ingest through the library (`Panseal`) on the in-process key
//! service: opening either form, admission under a service-generated
//! admission DEK, and the attacker's view (a front end's credential opens
//! and admits nothing; the admitting process holds no DEK).

use crate::common;

use std::sync::Arc;

use common::luhn_pan;
use panseal::{
    blocking, Access, Context, Environment, Error, IngestSealed, KeyError, KeyPurpose, KeyService,
    KeyServiceError, KeyState, KeyStore, LocalKeyService, MemoryAuditSink, MemoryKeyStore,
    Operation, Pan, Panseal, Permissions, Policy, Scope, StoredPan, MAX_ADMIT_BATCH,
};

fn ctx(row: &str) -> Context {
    Context::new("cards", "pan", row).unwrap()
}

fn alice() -> Access {
    Access::new("alice", "refund").unwrap()
}

struct Setup {
    ks: LocalKeyService,
    store: MemoryKeyStore,
    audit: Arc<MemoryAuditSink>,
}

impl Setup {
    fn new(env: &str) -> Self {
        Setup {
            ks: LocalKeyService::new(Environment::new(env).unwrap()),
            store: MemoryKeyStore::new(),
            audit: Arc::new(MemoryAuditSink::new()),
        }
    }

    async fn panseal(&self, ks: LocalKeyService, scope: &str, policy: Policy) -> Panseal {
        Panseal::builder()
            .key_service(ks)
            .key_store(self.store.clone())
            .audit_arc(self.audit.clone())
            .environment("test")
            .scope(scope)
            .policy(policy)
            .build()
            .await
            .unwrap()
    }

    async fn custodian(&self, scope: &str) -> Panseal {
        self.panseal(self.ks.clone(), scope, Policy::default())
            .await
    }
}

fn pans(n: usize) -> Vec<Pan> {
    (0..n)
        .map(|i| Pan::parse(&luhn_pan("4", 13 + i % 7, i as u64)).unwrap())
        .collect()
}

#[tokio::test]
async fn open_pan_takes_either_form_and_audits_the_ingest_key() {
    let s = Setup::new("test");
    let ps = s.custodian("m1").await;
    let info = ps.rotate_ingest_key().await.unwrap();
    let sealer = ps
        .ingest_sealer(Some(&info.public_key.fingerprint()))
        .await
        .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let ingest = sealer.seal(&pan, &ctx("r1")).unwrap();
    let compact = ps.seal_pan(&pan, &ctx("r2")).await.unwrap();

    let before = s.audit.events().len();
    let opened = ps.open_pan(&ingest, &ctx("r1"), &alice()).await.unwrap();
    assert_eq!(opened.pan, pan);
    assert!(
        opened.needs_reseal,
        "ingest ciphertexts are admitted, not kept"
    );
    let events = s.audit.events();
    let opens: Vec<_> = events[before..]
        .iter()
        .filter(|e| e.operation == Operation::Open)
        .collect();
    assert_eq!(opens.len(), 1, "one Open event per ingest open");
    assert!(opens[0].key_id.is_some());
    assert_eq!(opens[0].principal, "alice");

    // Either form through StoredPan, text and binary.
    for text in [ingest.to_text(), compact.to_text()] {
        let stored = StoredPan::from_text(&text).unwrap();
        let row = if matches!(stored, StoredPan::Ingest(_)) {
            "r1"
        } else {
            "r2"
        };
        let o = ps.open_pan(&stored, &ctx(row), &alice()).await.unwrap();
        assert_eq!(o.pan, pan);
        let back = StoredPan::from_bytes(stored.as_bytes()).unwrap();
        assert_eq!(back, stored);
    }
    // The compact path still works with &SealedPan.
    assert!(
        !ps.open_pan(&compact, &ctx("r2"), &alice())
            .await
            .unwrap()
            .needs_reseal
    );
    // reseal turns an ingest ciphertext into the compact form.
    let resealed = ps.reseal(&ingest, &ctx("r1"), &alice()).await.unwrap();
    assert_eq!(
        ps.open_pan(&resealed, &ctx("r1"), &alice())
            .await
            .unwrap()
            .pan,
        pan
    );
}

#[test]
fn the_blocking_facade_takes_either_form() {
    let s = Setup::new("test");
    let b = blocking::Panseal::build(
        Panseal::builder()
            .key_service(s.ks.clone())
            .key_store(s.store.clone())
            .audit_arc(s.audit.clone())
            .environment("test")
            .scope("m1"),
    )
    .unwrap();
    b.rotate_ingest_key().unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let ingest = b
        .ingest_sealer(None)
        .unwrap()
        .seal(&pan, &ctx("r1"))
        .unwrap();
    let compact = b.seal_pan(&pan, &ctx("r2")).unwrap();
    assert!(
        b.open_pan(&ingest, &ctx("r1"), &alice())
            .unwrap()
            .needs_reseal
    );
    assert_eq!(b.open_pan(&compact, &ctx("r2"), &alice()).unwrap().pan, pan);
    let resealed = b.reseal(&ingest, &ctx("r1"), &alice()).unwrap();
    assert_eq!(
        b.open_pan(&resealed, &ctx("r1"), &alice()).unwrap().pan,
        pan
    );
}

#[tokio::test]
async fn bad_ingest_input_gets_typed_errors() {
    let s = Setup::new("test");
    let ps = s.custodian("m1").await;
    let other = s.custodian("m2").await;
    // No key yet: a front end's credential cannot make a sealer (a
    // custodian's creates the first key).
    let front = s
        .panseal(
            s.ks.restricted(Permissions::wrap_only()),
            "m1",
            Policy::default(),
        )
        .await;
    assert!(matches!(
        front.ingest_sealer(None).await,
        Err(Error::Key(KeyError::UnknownIngestKey { version: 0, .. }))
    ));
    ps.rotate_ingest_key().await.unwrap();
    other.rotate_ingest_key().await.unwrap();
    assert!(matches!(
        ps.ingest_sealer(Some("00")).await,
        Err(Error::Key(KeyError::IngestKeyMismatch))
    ));
    let sealer = ps.ingest_sealer(None).await.unwrap();
    let pan = Pan::parse("5555555555554444").unwrap();
    let sealed = sealer.seal(&pan, &ctx("r")).unwrap();

    // Another scope of the same service.
    assert!(matches!(
        other.open_pan(&sealed, &ctx("r"), &alice()).await,
        Err(Error::Key(KeyError::IngestKeyMismatch))
    ));
    // Another environment (its own service and keys).
    let s2 = Setup::new("prod");
    let prod = Panseal::builder()
        .key_service(s2.ks.clone())
        .key_store(s2.store.clone())
        .audit_arc(s2.audit.clone())
        .environment("prod")
        .scope("m1")
        .build()
        .await
        .unwrap();
    prod.rotate_ingest_key().await.unwrap();
    assert!(matches!(
        prod.open_pan(&sealed, &ctx("r"), &alice()).await,
        Err(Error::Key(KeyError::IngestKeyMismatch))
    ));
    // Wrong context, altered bytes.
    assert!(matches!(
        ps.open_pan(&sealed, &ctx("other-row"), &alice()).await,
        Err(Error::Decryption)
    ));
    let mut altered = 0;
    for at in 10..101 {
        let mut b = sealed.as_bytes().to_vec();
        b[at] ^= 0x04;
        let bad = IngestSealed::from_bytes(&b).unwrap();
        if matches!(
            ps.open_pan(&bad, &ctx("r"), &alice()).await,
            Err(Error::Decryption)
        ) {
            altered += 1;
        }
    }
    assert_eq!(
        altered, 91,
        "every altered byte after the header is refused"
    );
    // Truncated, bad prefix.
    assert!(IngestSealed::from_bytes(&sealed.as_bytes()[..100]).is_err());
    assert!(StoredPan::from_text(&format!("X{}", &sealed.to_text()[1..])).is_err());
    // A version that was never created.
    let mut b = sealed.as_bytes().to_vec();
    b[9] = 7;
    assert!(matches!(
        ps.open_pan(&IngestSealed::from_bytes(&b).unwrap(), &ctx("r"), &alice())
            .await,
        Err(Error::Key(KeyError::UnknownIngestKey { version: 7, .. }))
    ));
    // Retired still opens; destroyed is unknown.
    ps.rotate_ingest_key().await.unwrap();
    assert_eq!(
        ps.open_pan(&sealed, &ctx("r"), &alice()).await.unwrap().pan,
        pan
    );
    KeyService::set_ingest_key_state(&s.ks, &Scope::new("m1").unwrap(), 1, KeyState::Destroyed)
        .await
        .unwrap();
    let err = ps.open_pan(&sealed, &ctx("r"), &alice()).await;
    assert!(
        matches!(
            err,
            Err(Error::Key(KeyError::UnknownIngestKey { version: 1, .. }))
        ),
        "{err:?}"
    );
    // Every failure above wrote an Open event naming no PAN.
    for e in s.audit.events() {
        assert!(!format!("{e:?}").contains("5555555555554444"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_splits_batches_rotates_its_dek_and_loses_nothing() {
    let s = Setup::new("test");
    let custodian = s.custodian("m1").await;
    custodian.rotate_ingest_key().await.unwrap();
    custodian.rotate_index_key().await.unwrap();
    let sealer = custodian.ingest_sealer(None).await.unwrap();

    // The admission job's credential: admit (and wrap, to make its
    // admission DEKs), nothing that opens.
    let admit_only = s.ks.restricted(Permissions {
        wrap: true,
        unwrap: false,
        index: true,
        reveal: false,
        rewrap: false,
        admit: true,
        custodian: false,
    });
    let max_uses = 500;
    let admitter = s
        .panseal(admit_only, "m1", Policy::default().max_uses(max_uses))
        .await;

    let n = MAX_ADMIT_BATCH + 200;
    let pans = pans(n);
    let mut items: Vec<(IngestSealed, Context)> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = ctx(&format!("row-{i}"));
            (sealer.seal(p, &c).unwrap(), c)
        })
        .collect();
    // Every 100th item is bound to another row: refused, reported, kept.
    let mut bad = 0;
    for i in (0..n).step_by(100) {
        items[i].1 = ctx(&format!("moved-{i}"));
        bad += 1;
    }
    let out = admitter.admit(&items).await.unwrap();
    assert_eq!(out.len(), n);
    let admitted = out.iter().filter(|r| r.is_ok()).count();
    assert_eq!((admitted, n - admitted), (n - bad, bad));

    // Every admitted item opens (through a custodian's handle, which
    // unwraps) to its PAN and is found by its blind index.
    let reader = s.custodian("m1").await;
    let mut opened = 0;
    let mut found = 0;
    for (i, r) in out.iter().enumerate() {
        let Ok(a) = r else { continue };
        let o = reader
            .open_pan(&a.sealed, &ctx(&format!("row-{i}")), &alice())
            .await
            .unwrap();
        if o.pan == pans[i] {
            opened += 1;
        }
        if reader.blind_index(&pans[i]).await.unwrap() == a.index {
            found += 1;
        }
    }
    assert_eq!((opened, found), (n - bad, n - bad));

    // The admission DEKs: data DEKs in the store, each within its budget,
    // uses adding up to what was admitted, every full one retired.
    let ids: std::collections::HashSet<_> = out
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|a| a.sealed.key_id())
        .collect();
    let expected_deks = (n - bad).div_ceil(max_uses as usize);
    assert_eq!(ids.len(), expected_deks);
    let mut total = 0;
    for id in &ids {
        let r = s.store.fetch(*id).await.unwrap().unwrap();
        assert_eq!(r.purpose, KeyPurpose::Data);
        assert!(r.uses <= max_uses);
        assert!(r.tag.is_some(), "signed like any other record");
        if r.uses == max_uses {
            assert_eq!(r.state, KeyState::DecryptOnly);
        }
        total += r.uses;
    }
    assert_eq!(total, (n - bad) as u64, "every admitted item is counted");

    // The admitting process never held a DEK.
    assert_eq!(admitter.held_keys_for_test().0.len(), 0);

    // admit_one's errors are typed.
    let one = admitter.admit_one(&items[0].0, &items[0].1).await;
    assert!(matches!(one, Err(Error::Decryption)), "{one:?}");
    let good = admitter.admit_one(&items[1].0, &items[1].1).await.unwrap();
    assert_eq!(
        reader
            .open_pan(&good.sealed, &items[1].1, &alice())
            .await
            .unwrap()
            .pan,
        pans[1]
    );
}

/// The front-end attacker: its credential (wrap + index, as an
/// encrypt-only front end has) and a dump of every ingest ciphertext it
/// sealed. It opens 0 and admits 0.
#[tokio::test]
async fn a_front_end_credential_opens_and_admits_nothing() {
    let s = Setup::new("test");
    let custodian = s.custodian("m1").await;
    custodian.rotate_ingest_key().await.unwrap();
    custodian.rotate_index_key().await.unwrap();
    let front = s
        .panseal(
            s.ks.restricted(Permissions::wrap_only()),
            "m1",
            Policy::default(),
        )
        .await;
    let sealer = front.ingest_sealer(None).await.unwrap();
    let pans = pans(50);
    let items: Vec<(IngestSealed, Context)> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = ctx(&format!("f{i}"));
            (sealer.seal(p, &c).unwrap(), c)
        })
        .collect();
    let mut recovered = 0;
    for (sealed, c) in &items {
        match front.open_pan(sealed, c, &alice()).await {
            Ok(_) => recovered += 1,
            Err(Error::KeyService(KeyServiceError::PermissionDenied(_))) => {}
            Err(e) => panic!("unexpected: {e:?}"),
        }
        let _ = front
            .reseal(sealed, c, &alice())
            .await
            .map(|_| recovered += 1);
    }
    let admitted = match front.admit(&items).await {
        Ok(v) => v.iter().filter(|r| r.is_ok()).count(),
        Err(Error::KeyService(KeyServiceError::PermissionDenied(_))) => 0,
        Err(e) => panic!("unexpected: {e:?}"),
    };
    assert_eq!((recovered, admitted), (0, 0));
    assert_eq!(
        front.held_keys_for_test().0.len(),
        0,
        "no DEK in its memory"
    );
}

/// A smoke run of what `fuzz/fuzz_targets/ingest_parse.rs` checks, on
/// mutations of valid ciphertexts and keys: parsers never panic, what
/// parses writes back identically, and no mutated ciphertext opens.
#[test]
fn ingest_parsers_never_panic_and_no_mutation_opens() {
    use panseal::hazmat::IngestPrivateKey;
    use panseal::IngestPublicKey;
    let env = Environment::new("fuzz").unwrap();
    let scope = Scope::new("m").unwrap();
    let key = IngestPrivateKey::from_scalar(&env, &scope, 1, &[7u8; 32]).unwrap();
    let sealer = panseal::IngestSealer::new(key.public_key().clone());
    let c = ctx("1");
    let sealed = sealer
        .seal(&Pan::parse("4111111111111111").unwrap(), &c)
        .unwrap();
    let (mut opened, mut parsed) = (0, 0);
    for i in 0..1500u32 {
        let mut b = sealed.as_bytes().to_vec();
        let at = (i as usize * 7919) % b.len();
        b[at] ^= 1 << (i % 8);
        if i % 5 == 0 {
            b.truncate(at);
        }
        if let Ok(s) = IngestSealed::from_bytes(&b) {
            parsed += 1;
            assert_eq!(s.as_bytes(), &b[..]);
            assert_eq!(IngestSealed::from_text(&s.to_text()).unwrap(), s);
            opened += usize::from(key.open(&s, &c).is_ok());
        }
        let _ = StoredPan::from_bytes(&b);
        let mut t = sealed.to_text().into_bytes();
        let at = (i as usize * 31) % t.len();
        t[at] = b"AZaz09-_+/=I1P"[i as usize % 14];
        if let Ok(t) = String::from_utf8(t) {
            if let Ok(s) = StoredPan::from_text(&t) {
                assert_eq!(s.to_text(), t);
            }
        }
        let mut pk = key.public_key().as_bytes().to_vec();
        pk[(i as usize) % 65] ^= 1 << (i % 8);
        if let Ok(k) = IngestPublicKey::from_parts(&env, &scope, 1, &pk) {
            assert_eq!(IngestPublicKey::from_text(&k.to_text()).unwrap(), k);
        }
    }
    assert!(parsed > 1000);
    assert_eq!(opened, 0, "no mutated ciphertext opens");
}

/// A custodian retires the admission DEK under a running admitter: its
/// stale record is refused by the service, the admitter makes a fresh
/// DEK and the item is admitted (nothing lost).
#[tokio::test]
async fn a_retired_admission_dek_is_replaced() {
    let s = Setup::new("test");
    let custodian = s.custodian("m1").await;
    custodian.rotate_ingest_key().await.unwrap();
    let sealer = custodian.ingest_sealer(None).await.unwrap();
    let admitter = s.custodian("m1").await;
    let p = pans(2);
    let first = admitter
        .admit_one(&sealer.seal(&p[0], &ctx("a")).unwrap(), &ctx("a"))
        .await
        .unwrap();
    let old = first.sealed.key_id();
    custodian
        .set_key_state(old, KeyState::DecryptOnly)
        .await
        .unwrap();
    let second = admitter
        .admit_one(&sealer.seal(&p[1], &ctx("b")).unwrap(), &ctx("b"))
        .await
        .unwrap();
    assert_ne!(second.sealed.key_id(), old);
    for (a, c, pan) in [(&first, "a", &p[0]), (&second, "b", &p[1])] {
        assert_eq!(
            &custodian
                .open_pan(&a.sealed, &ctx(c), &alice())
                .await
                .unwrap()
                .pan,
            pan
        );
    }
}
