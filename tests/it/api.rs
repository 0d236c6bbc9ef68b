//! End-to-end behaviour of the core API against the in-process key service
//! and the memory key store (the keyd, PKCS#11, KMS and PostgreSQL backends
//! have their own suites).

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_no_pan, futures_lite, luhn_pan, Fixture};
use panseal::{
    blocking, Access, AuditError, AuditEvent, AuditSink, ConfigError, Context, Environment, Error,
    KeyError, KeyServiceError, KeyState, KeyStore, KeyStoreError, LocalKeyService, MemoryKeyStore,
    Operation, Outcome, Pan, PanRules, Panseal, Permissions, Policy, SealedPan,
};

fn ctx(row: &str) -> Context {
    Context::new("cards", "pan", row).unwrap()
}

fn alice() -> Access {
    Access::new("alice", "refund").unwrap()
}

#[test]
fn round_trip_every_length_and_constant_size() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    for len in 12..=19 {
        for seed in 0..20 {
            let digits = luhn_pan("4", len, seed);
            let pan = Pan::parse(&digits).unwrap();
            let c = ctx(&format!("row-{len}-{seed}"));
            let sealed = ps.seal_pan(&pan, &c).unwrap();
            assert_eq!(sealed.as_bytes().len(), 48);
            let text = sealed.to_text();
            assert_eq!(text.len(), 64);
            assert!(text.starts_with("P1"));
            assert_no_pan(&text, &digits);
            let back = SealedPan::from_text(&text).unwrap();
            assert_eq!(back, sealed);
            let opened = ps.open_pan(&back, &c, &alice()).unwrap();
            assert_eq!(opened.pan.expose_digits(), digits);
            assert!(!opened.needs_reseal);
        }
    }
}

#[test]
fn short_pans_with_a_lower_minimum_round_trip() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let rules = PanRules::with_min_digits(8).unwrap();
    let digits = luhn_pan("5", 8, 3);
    let pan = Pan::parse_with(&digits, &rules).unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("r")).unwrap();
    assert_eq!(
        ps.open_pan(&sealed, &ctx("r"), &alice())
            .unwrap()
            .pan
            .expose_digits(),
        digits
    );
}

#[test]
fn moved_ciphertext_fails_opaquely_and_is_audited() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("row-1")).unwrap();
    for other in [
        ctx("row-2"),
        Context::new("cards", "pan_old", "row-1").unwrap(),
        Context::new("cards_archive", "pan", "row-1").unwrap(),
    ] {
        let before = f.audit.events().len();
        let err = ps.open_pan(&sealed, &other, &alice()).unwrap_err();
        assert!(matches!(err, Error::Decryption), "{err:?}");
        assert_eq!(err.to_string(), "decryption failed");
        let events = f.audit.events();
        assert_eq!(events.len(), before + 1);
        let e = events.last().unwrap();
        assert_eq!(e.operation, Operation::Open);
        assert_eq!(e.outcome, Outcome::Failure);
        assert_eq!(e.failure.as_deref(), Some("decryption failed"));
    }
    // The stored record and the ciphertext are untouched: it still opens in
    // its own context.
    assert_eq!(
        ps.open_pan(&sealed, &ctx("row-1"), &alice()).unwrap().pan,
        pan
    );
}

#[test]
fn unknown_key_id_is_a_typed_error() {
    let a = Fixture::new("test");
    let b = Fixture::new("test");
    let pa = a.blocking(Policy::default());
    let pb = b.blocking(Policy::default());
    let sealed = pa
        .seal_pan(&Pan::parse("4111111111111111").unwrap(), &ctx("1"))
        .unwrap();
    let err = pb.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::Key(KeyError::UnknownKey(id)) if id == sealed.key_id()),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[test]
fn use_budget_rotates_the_dek() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default().max_uses(3));
    let pan = Pan::parse("4111111111111111").unwrap();
    let ids: Vec<_> = (0..7)
        .map(|i| ps.seal_pan(&pan, &ctx(&i.to_string())).unwrap().key_id())
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[1], ids[2]);
    assert_ne!(ids[2], ids[3], "the 4th seal must use a new DEK");
    assert_eq!(ids[3], ids[5]);
    assert_ne!(ids[5], ids[6]);
    // The first DEK is retired with its uses recorded; it still opens.
    let records = f.store_records();
    let first = records.iter().find(|r| r.id == ids[0]).unwrap();
    assert_eq!(first.state, KeyState::DecryptOnly);
    assert_eq!(first.uses, 3);
    let s0 = ps.seal_pan(&pan, &ctx("x")).unwrap();
    assert!(ps.open_pan(&s0, &ctx("x"), &alice()).is_ok());
}

#[test]
fn age_limit_rotates_the_dek_and_old_ciphertexts_ask_for_reseal() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default().encrypt_period(Duration::from_secs(1)));
    let pan = Pan::parse("5555555555554444").unwrap();
    let old = ps.seal_pan(&pan, &ctx("1")).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let new = ps.seal_pan(&pan, &ctx("1")).unwrap();
    assert_ne!(old.key_id(), new.key_id());
    let opened = ps.open_pan(&old, &ctx("1"), &alice()).unwrap();
    assert_eq!(opened.pan, pan);
    assert!(opened.needs_reseal);
    let resealed = ps.reseal(&old, &ctx("1"), &alice()).unwrap();
    assert_eq!(resealed.key_id(), new.key_id());
    assert!(
        !ps.open_pan(&resealed, &ctx("1"), &alice())
            .unwrap()
            .needs_reseal
    );
}

#[test]
fn retired_key_opens_but_never_seals_again() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let s1 = ps.seal_pan(&pan, &ctx("1")).unwrap();
    let retired = ps.rotate_dek().unwrap().unwrap();
    assert_eq!(retired, s1.key_id());
    let s2 = ps.seal_pan(&pan, &ctx("2")).unwrap();
    assert_ne!(s2.key_id(), retired);
    let opened = ps.open_pan(&s1, &ctx("1"), &alice()).unwrap();
    assert!(opened.needs_reseal);
    let rec = f
        .store_records()
        .into_iter()
        .find(|r| r.id == retired)
        .unwrap();
    assert_eq!(rec.state, KeyState::DecryptOnly);
}

/// Issue 9, item 10 (PCI DSS 3.7.5): a compromised DEK is used only to move
/// data off it. The attacker holds an open credential and every sealed PAN
/// under the compromised key, warm cache or cold: `open_pan` yields none of
/// them; the re-encryption path (`reseal`, which never returns the PAN)
/// moves all of them, each open audited.
#[test]
fn compromised_key_opens_only_to_be_resealed() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pans: Vec<Pan> = (0..25)
        .map(|i| Pan::parse(&luhn_pan("4", 16, i)).unwrap())
        .collect();
    let sealed: Vec<SealedPan> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| ps.seal_pan(p, &ctx(&i.to_string())).unwrap())
        .collect();
    let bad = sealed[0].key_id();
    assert!(sealed.iter().all(|s| s.key_id() == bad));
    ps.set_key_state(bad, KeyState::Compromised).unwrap();

    // Warm (this process cached the DEK) and cold (a fresh process).
    let cold = f.blocking(Policy::default());
    let mut opened_plain = 0;
    for handle in [&ps, &cold] {
        for (i, s) in sealed.iter().enumerate() {
            match handle.open_pan(s, &ctx(&i.to_string()), &alice()) {
                Ok(_) => opened_plain += 1,
                Err(e) => {
                    assert!(
                        matches!(e, Error::Key(KeyError::Compromised(id)) if id == bad),
                        "{e:?}"
                    );
                    assert!(!e.is_retryable());
                }
            }
        }
    }
    assert_eq!(
        opened_plain, 0,
        "PANs opened through open_pan under a compromised key"
    );

    let reencryptor = Access::new("reencrypt-job", "re-encryption").unwrap();
    let before = f.audit.events().len();
    let mut moved = 0;
    for (i, (s, pan)) in sealed.iter().zip(&pans).enumerate() {
        let new = cold.reseal(s, &ctx(&i.to_string()), &reencryptor).unwrap();
        assert_ne!(new.key_id(), bad);
        assert_eq!(
            &ps.open_pan(&new, &ctx(&i.to_string()), &alice())
                .unwrap()
                .pan,
            pan
        );
        moved += 1;
    }
    assert_eq!(moved, sealed.len());
    let audited = f.audit.events()[before..]
        .iter()
        .filter(|e| {
            e.operation == Operation::Open
                && e.outcome == Outcome::Success
                && e.key_id == Some(bad)
                && e.principal == "reencrypt-job"
        })
        .count();
    assert_eq!(
        audited,
        sealed.len(),
        "every open under the compromised key audited"
    );
    let refused = f
        .audit
        .events()
        .iter()
        .filter(|e| e.key_id == Some(bad) && e.failure.as_deref() == Some("key compromised"))
        .count();
    assert_eq!(refused, 2 * sealed.len(), "every refused open audited");
}

#[test]
fn compromised_key_refuses_to_seal_and_destroyed_key_shreds_only_its_data() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let s1 = ps.seal_pan(&pan, &ctx("1")).unwrap();
    ps.set_key_state(s1.key_id(), KeyState::Compromised)
        .unwrap();
    let s2 = ps.seal_pan(&pan, &ctx("2")).unwrap();
    assert_ne!(s2.key_id(), s1.key_id(), "compromised DEK must not seal");
    assert!(matches!(
        ps.open_pan(&s1, &ctx("1"), &alice()).unwrap_err(),
        Error::Key(KeyError::Compromised(_))
    ));
    let moved = ps.reseal(&s1, &ctx("1"), &alice()).unwrap();
    assert_eq!(moved.key_id(), s2.key_id());

    ps.set_key_state(s1.key_id(), KeyState::Destroyed).unwrap();
    let err = ps.open_pan(&s1, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::Key(KeyError::Destroyed(id)) if id == s1.key_id()),
        "{err:?}"
    );
    assert!(err.to_string().contains("destroyed"));
    // A fresh process (empty cache) sees the same.
    let ps2 = f.blocking(Policy::default());
    assert!(matches!(
        ps2.open_pan(&s1, &ctx("1"), &alice()).unwrap_err(),
        Error::Key(KeyError::Destroyed(_))
    ));
    // Nothing else is affected.
    assert_eq!(ps2.open_pan(&moved, &ctx("1"), &alice()).unwrap().pan, pan);
    assert_eq!(ps2.open_pan(&s2, &ctx("2"), &alice()).unwrap().pan, pan);
    // The wrapped key is gone from the store; the lifecycle never goes back.
    let rec = f
        .store_records()
        .into_iter()
        .find(|r| r.id == s1.key_id())
        .unwrap();
    assert!(rec.wrapped.bytes.is_empty());
    let back = ps.set_key_state(s1.key_id(), KeyState::Active).unwrap_err();
    assert!(
        matches!(back, Error::KeyStore(KeyStoreError::Transition { .. })),
        "{back:?}"
    );
}

#[test]
fn every_open_is_audited_once_and_unwraps_once_per_cache_miss() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let digits = "4111111111111111";
    let pan = Pan::parse(digits).unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("7")).unwrap();
    let reader = f.blocking(Policy::default());
    let base = f.audit.events().len();
    reader.open_pan(&sealed, &ctx("7"), &alice()).unwrap();
    let events = f.audit.events()[base..].to_vec();
    let opens: Vec<_> = events
        .iter()
        .filter(|e| e.operation == Operation::Open)
        .collect();
    let unwraps: Vec<_> = events
        .iter()
        .filter(|e| e.operation == Operation::Unwrap)
        .collect();
    assert_eq!(opens.len(), 1);
    assert_eq!(unwraps.len(), 1, "first open in a process unwraps once");
    let e = opens[0];
    assert_eq!(e.principal, "alice");
    assert_eq!(e.purpose, "refund");
    assert_eq!(e.outcome, Outcome::Success);
    assert_eq!(e.scope, "merchant-1");
    assert_eq!(e.key_id, Some(sealed.key_id()));
    assert_eq!(
        e.context,
        Some(("cards".into(), "pan".into(), b"7".to_vec()))
    );
    // The second open is served by the cache: one more open, no unwrap.
    reader.open_pan(&sealed, &ctx("7"), &alice()).unwrap();
    let events = f.audit.events()[base..].to_vec();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.operation == Operation::Open)
            .count(),
        2
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.operation == Operation::Unwrap)
            .count(),
        1
    );
    // No event carries the PAN.
    let dump = serde_json::to_string(&f.audit.events()).unwrap();
    assert_no_pan(&dump, digits);
}

#[test]
fn opening_fails_closed_without_an_audit_sink() {
    let f = Fixture::new("test");
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(f.ks.clone())
            .key_store(f.store.clone())
            .environment("test")
            .scope("merchant-1"),
    )
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("1")).unwrap();
    let err = ps.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::Config(ConfigError::NoAuditSink)),
        "{err:?}"
    );
}

struct BrokenSink;
impl AuditSink for BrokenSink {
    fn record(&self, _e: &AuditEvent<'_>) -> Result<(), AuditError> {
        Err(AuditError::Rejected("disk full".into()))
    }
}

#[test]
fn opening_fails_closed_when_the_sink_fails() {
    let f = Fixture::new("test");
    let writer = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed = writer.seal_pan(&pan, &ctx("1")).unwrap();
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(f.ks.clone())
            .key_store(f.store.clone())
            .audit(BrokenSink)
            .environment("test")
            .scope("merchant-1"),
    )
    .unwrap();
    let err = ps.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(matches!(err, Error::Audit(_)), "{err:?}");
}

#[test]
fn environments_do_not_mix() {
    // A test-tagged client refuses a prod key service at start…
    let prod_ks = LocalKeyService::new(Environment::new("prod").unwrap());
    let err = futures_lite(
        Panseal::builder()
            .key_service(prod_ks.clone())
            .key_store(MemoryKeyStore::new())
            .environment("test")
            .scope("m")
            .build(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::KeyService(KeyServiceError::Environment { .. })),
        "{err:?}"
    );
    // …and a prod-tagged record found in its store.
    let store = MemoryKeyStore::new();
    let audit = Arc::new(panseal::MemoryAuditSink::new());
    let prod = blocking::Panseal::build(
        Panseal::builder()
            .key_service(prod_ks)
            .key_store(store.clone())
            .audit_arc(audit.clone())
            .environment("prod")
            .scope("m"),
    )
    .unwrap();
    let test = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::new(Environment::new("test").unwrap()))
            .key_store(store)
            .audit_arc(audit)
            .environment("test")
            .scope("m"),
    )
    .unwrap();
    let sealed = prod
        .seal_pan(&Pan::parse("4111111111111111").unwrap(), &ctx("1"))
        .unwrap();
    let err = test.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::Key(KeyError::Environment { .. })),
        "{err:?}"
    );
}

#[test]
fn scopes_do_not_mix() {
    let f = Fixture::new("test");
    let a = f.blocking(Policy::default());
    let b = a.with_scope("merchant-2").unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let sa = a.seal_pan(&pan, &ctx("1")).unwrap();
    let sb = b.seal_pan(&pan, &ctx("1")).unwrap();
    assert_ne!(sa.key_id(), sb.key_id());
    assert!(matches!(
        b.open_pan(&sa, &ctx("1"), &alice()).unwrap_err(),
        Error::Key(KeyError::Scope(_))
    ));
    // A fresh process too (no cache).
    let b2 = f
        .blocking(Policy::default())
        .with_scope("merchant-2")
        .unwrap();
    assert!(matches!(
        b2.open_pan(&sa, &ctx("1"), &alice()).unwrap_err(),
        Error::Key(KeyError::Scope(_))
    ));
    assert_eq!(b2.open_pan(&sb, &ctx("1"), &alice()).unwrap().pan, pan);
}

#[test]
fn wrap_only_front_end_seals_and_indexes_but_cannot_open() {
    let f = Fixture::new("test");
    let front = blocking::Panseal::build(
        Panseal::builder()
            .key_service(f.ks.restricted(Permissions::wrap_only()))
            .key_store(f.store.clone())
            .audit_arc(f.audit.clone())
            .environment("test")
            .scope("merchant-1"),
    )
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed = front.seal_pan(&pan, &ctx("1")).unwrap();
    // A front end cannot create the scope's index key: a custodian does.
    assert!(matches!(
        front.blind_index(&pan).unwrap_err(),
        Error::Key(KeyError::NoIndexKey(_))
    ));
    futures_lite(panseal::KeyService::create_index_key(
        &f.ks,
        &panseal::Scope::new("merchant-1").unwrap(),
    ))
    .unwrap();
    front.blind_index(&pan).unwrap();
    // Its own fresh DEK is cached (it made it), but a fresh front-end
    // process cannot unwrap anything.
    let front2 = blocking::Panseal::build(
        Panseal::builder()
            .key_service(f.ks.restricted(Permissions::wrap_only()))
            .key_store(f.store.clone())
            .audit_arc(f.audit.clone())
            .environment("test")
            .scope("merchant-1"),
    )
    .unwrap();
    let err = front2.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::KeyService(KeyServiceError::PermissionDenied(_))),
        "{err:?}"
    );
    let back = f.blocking(Policy::default());
    assert_eq!(
        back.open_pan(&sealed, &ctx("1"), &alice()).unwrap().pan,
        pan
    );
}

#[test]
fn blind_index_is_keyed_per_scope_stable_and_rotatable() {
    use sha2::{Digest, Sha256};
    let f = Fixture::new("test");
    let a = f.blocking(Policy::default());
    let a2 = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let i1 = a.blind_index(&pan).unwrap();
    assert_eq!(i1.version(), 1);
    // Another instance on the same store computes the same index.
    assert_eq!(a2.blind_index(&pan).unwrap(), i1);
    // Not an unkeyed hash.
    assert_ne!(
        i1.as_bytes().as_slice(),
        Sha256::digest(b"4111111111111111").as_slice()
    );
    // Any digit changes it.
    let other = Pan::parse("4111111111111129").unwrap();
    assert_ne!(a.blind_index(&other).unwrap().as_bytes(), i1.as_bytes());
    // Another scope has another key.
    let b = a.with_scope("merchant-2").unwrap();
    assert_ne!(b.blind_index(&pan).unwrap().as_bytes(), i1.as_bytes());
    // Rotation: new writes use v2, lookups return both.
    assert_eq!(a.rotate_index_key().unwrap(), 2);
    let i2 = a.blind_index(&pan).unwrap();
    assert_eq!(i2.version(), 2);
    assert_ne!(i2.as_bytes(), i1.as_bytes());
    let all = a.blind_indexes(&pan).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], i2);
    assert_eq!(all[1], i1);
}

#[test]
fn kek_rotation_and_rewrap_keep_every_dek() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default().max_uses(2));
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed: Vec<_> = (0..6)
        .map(|i| (i, ps.seal_pan(&pan, &ctx(&i.to_string())).unwrap()))
        .collect();
    futures_lite(async {
        use panseal::KeyService;
        let info = f.ks.rotate_kek().await.unwrap();
        assert_eq!(info.version, 2);
        for r in f.store.list(None).await.unwrap() {
            if r.wrapped.kek.version == 1 {
                let new = panseal::rewrap_record(&f.ks, &f.store, r.id).await.unwrap();
                assert_eq!(new.wrapped.kek.version, 2);
                assert_eq!(new.sequence, r.sequence + 1);
                assert!(new.tag.is_some());
            }
        }
    });
    // KEK v1 can now be destroyed; everything still opens in a new process.
    f.ks.destroy_kek(1).unwrap();
    let fresh = f.blocking(Policy::default());
    for (i, s) in &sealed {
        assert_eq!(
            fresh
                .open_pan(s, &ctx(&i.to_string()), &alice())
                .unwrap()
                .pan,
            pan
        );
    }
}

#[test]
fn destroyed_kek_refuses_records_not_yet_rewrapped() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("1")).unwrap();
    futures_lite(async {
        use panseal::KeyService;
        f.ks.rotate_kek().await.unwrap();
    });
    f.ks.destroy_kek(1).unwrap();
    let fresh = f.blocking(Policy::default());
    let err = fresh.open_pan(&sealed, &ctx("1"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::KeyService(KeyServiceError::KekDestroyed(_))),
        "{err:?}"
    );
}

/// A database writer's edit of a record row: the stored bytes change, the
/// tag stays as it was.
async fn db_edit(
    store: &panseal::MemoryKeyStore,
    id: panseal::KeyId,
    f: impl FnOnce(&mut panseal::WrappedDek),
) {
    let old = store.fetch(id).await.unwrap().unwrap();
    let mut new = old.clone();
    f(&mut new);
    store.update(&old, &new).await.unwrap();
}

#[test]
fn swapped_or_rolled_back_wrapped_keys_are_refused() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default().max_uses(1));
    let pan = Pan::parse("4111111111111111").unwrap();
    let sa = ps.seal_pan(&pan, &ctx("a")).unwrap();
    let sb = ps.seal_pan(&pan, &ctx("b")).unwrap();
    assert_ne!(sa.key_id(), sb.key_id());
    futures_lite(async {
        let a = f.store.fetch(sa.key_id()).await.unwrap().unwrap();
        let b = f.store.fetch(sb.key_id()).await.unwrap().unwrap();
        // Put A's wrapped DEK into B's record (same KEK version).
        db_edit(&f.store, b.id, |r| r.wrapped = a.wrapped.clone()).await;
    });
    let fresh = f.blocking(Policy::default());
    let err = fresh.open_pan(&sb, &ctx("b"), &alice()).unwrap_err();
    // Refused by the record's signature before any unwrap (the wrap's
    // own binding would refuse it too).
    assert!(
        matches!(err, Error::Key(panseal::KeyError::RecordTampered(id)) if id == sb.key_id()),
        "{err:?}"
    );
    // Rolled back to another KEK version: also refused.
    futures_lite(async {
        use panseal::KeyService;
        f.ks.rotate_kek().await.unwrap();
        let a = f.store.fetch(sa.key_id()).await.unwrap().unwrap();
        db_edit(&f.store, a.id, |r| r.wrapped.kek.version = 2).await;
    });
    let fresh = f.blocking(Policy::default());
    let err = fresh.open_pan(&sa, &ctx("a"), &alice()).unwrap_err();
    assert!(
        matches!(err, Error::Key(panseal::KeyError::RecordTampered(_))),
        "{err:?}"
    );
}

#[test]
fn concurrent_sealing_never_exceeds_the_use_budget() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default().max_uses(50));
    let pan = Pan::parse("4111111111111111").unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let ps = ps.clone();
            let pan = pan.clone();
            std::thread::spawn(move || {
                (0..500)
                    .map(|i| {
                        let c = ctx(&format!("{t}-{i}"));
                        (c.clone(), ps.seal_pan(&pan, &c).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut per_key: HashMap<_, usize> = HashMap::new();
    let mut all = Vec::new();
    for t in threads {
        for (c, s) in t.join().unwrap() {
            *per_key.entry(s.key_id()).or_default() += 1;
            all.push((c, s));
        }
    }
    assert!(per_key.values().all(|&n| n <= 50), "{per_key:?}");
    assert!(per_key.len() >= 4000 / 50);
    for (c, s) in all.iter().step_by(37) {
        assert_eq!(ps.open_pan(s, c, &alice()).unwrap().pan, pan);
    }
    // Every DEK made is in the store and none of them seals more than 50.
    ps.report_usage().unwrap();
    for r in f.store_records() {
        assert!(r.uses <= 50, "{} uses", r.uses);
    }
}

#[test]
fn malformed_ciphertexts_are_typed_errors() {
    use panseal::FormatError;
    assert!(matches!(
        SealedPan::from_bytes(&[]).unwrap_err(),
        Error::Format(FormatError::Empty)
    ));
    assert!(matches!(
        SealedPan::from_bytes(&[9; 48]).unwrap_err(),
        Error::Format(FormatError::UnknownVersion(9))
    ));
    let mut b = [0u8; 48];
    b[0] = 1;
    b[1] = 7;
    assert!(matches!(
        SealedPan::from_bytes(&b).unwrap_err(),
        Error::Format(FormatError::UnknownAlgorithm(7))
    ));
    b[1] = 1;
    assert!(matches!(
        SealedPan::from_bytes(&b[..47]).unwrap_err(),
        Error::Format(FormatError::Length {
            expected: 48,
            actual: 47
        })
    ));
    for t in ["", "P2AAAA", "P1!", &"P1".repeat(40)] {
        assert!(SealedPan::from_text(t).is_err(), "{t:?}");
    }
}

#[test]
fn errors_never_contain_the_pan() {
    let digits = "4111111111111111";
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse(digits).unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("1")).unwrap();
    let mut texts = vec![
        format!("{pan} {pan:?}"),
        format!("{sealed} {sealed:?}"),
        format!("{:?}", ps.open_pan(&sealed, &ctx("2"), &alice())),
        format!("{:?}", Pan::parse("4111111111111112")),
        format!("{:?}", Pan::parse(";4111111111111111=2512?")),
        format!("{:?}", Pan::parse("4111x111111111111")),
        format!("{:?}", Pan::parse("41111111111111111111")),
        format!("{:?}", ps.open_pan(&sealed, &ctx("1"), &alice())),
    ];
    texts.push(format!(
        "{:?}",
        ps.open_pan(&sealed, &ctx("1"), &alice()).unwrap()
    ));
    for t in texts {
        assert_no_pan(&t, digits);
    }
}

#[tokio::test]
async fn async_api_under_tokio() {
    let f = Fixture::new("test");
    let ps = f.builder("test", "merchant-1").build().await.unwrap();
    let pan = Pan::parse("378282246310005").unwrap();
    let sealed = ps.seal_pan(&pan, &ctx("1")).await.unwrap();
    let opened = ps.open_pan(&sealed, &ctx("1"), &alice()).await.unwrap();
    assert_eq!(opened.pan, pan);
    assert_eq!(opened.pan.to_string(), "***********0005");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let ps = ps.clone();
            let pan = pan.clone();
            tokio::spawn(async move {
                let c = ctx(&format!("t{i}"));
                let s = ps.seal_pan(&pan, &c).await.unwrap();
                ps.open_pan(&s, &c, &alice()).await.unwrap().pan == pan
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
}

#[test]
fn builder_refuses_incomplete_or_out_of_range_configuration() {
    let f = Fixture::new("test");
    let e = futures_lite(Panseal::builder().key_store(f.store.clone()).build()).unwrap_err();
    assert!(matches!(
        e,
        Error::Config(ConfigError::Missing("key service"))
    ));
    for policy in [
        Policy::default().max_uses(0),
        Policy::default().max_uses((1 << 32) + 1),
        Policy::default().cache_ttl(Duration::from_secs(2 * 24 * 3600)),
        Policy::default().cache_capacity(0),
    ] {
        let e = futures_lite(f.builder("test", "m").policy(policy).build()).unwrap_err();
        assert!(matches!(e, Error::Config(ConfigError::Policy(_))), "{e:?}");
    }
    let e = futures_lite(f.builder("test", "bad scope").build()).unwrap_err();
    assert!(matches!(e, Error::Config(ConfigError::Name(_))));
}

/// Issue 10, item 1: the index key stays in the key service. A process that
/// computes blind indexes holds no index key, a batch is one request, and
/// rotation keeps values under the old version findable. (Needs
/// `hazmat-test-keys` to list the keys a process holds.)
#[cfg(feature = "hazmat-test-keys")]
#[test]
fn blind_index_keys_stay_in_the_key_service() {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pans: Vec<Pan> = (0..50)
        .map(|i| Pan::parse(&common::luhn_pan("411111", 16, i)).unwrap())
        .collect();
    let singles: Vec<_> = pans.iter().map(|p| ps.blind_index(p).unwrap()).collect();
    let batch = ps.blind_index_batch(&pans).unwrap();
    assert_eq!(batch, singles);
    // No index key in this process: only version numbers are cached.
    let (held, _) = ps.as_async().held_keys_for_test();
    let data_keys: Vec<_> = f
        .store_records()
        .iter()
        .filter(|r| r.purpose == panseal::KeyPurpose::Data)
        .map(|r| r.id)
        .collect();
    let index_keys_held = held.iter().filter(|id| !data_keys.contains(id)).count();
    assert_eq!(index_keys_held, 0, "index keys in memory");
    // ...and none in the key store either.
    let in_store = f
        .store_records()
        .iter()
        .filter(|r| r.purpose == panseal::KeyPurpose::Index)
        .count();
    assert_eq!(in_store, 0);
    // Rotation: new values under v2; the old ones are still found.
    assert_eq!(ps.rotate_index_key().unwrap(), 2);
    let all = ps.blind_indexes_batch(&pans).unwrap();
    let mut found_old = 0;
    for (old, now) in singles.iter().zip(&all) {
        assert_eq!(now.len(), 2);
        assert_eq!(now[0].version(), 2);
        if now.contains(old) {
            found_old += 1;
        }
    }
    assert_eq!(found_old, 50);
    assert_eq!(ps.blind_index(&pans[0]).unwrap(), all[0][0]);
}
