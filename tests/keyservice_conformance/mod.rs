//! The one conformance suite every `KeyService` implementation passes
//! (house style 9). Generic over `&dyn KeyService`: a backend's test file
//! builds its service, implements [`Backend`] for the out-of-band steps a
//! custodian or an outage performs (destroying a KEK version in the HSM or
//! KMS, making the service unreachable), and calls [`run`].
//!
//! Every check compares DEK bytes through `panseal::hazmat::dek_bytes`, so
//! the test targets that use this module require `hazmat-test-keys`.
//!
//! What is checked, in order (each step prints its name to stderr):
//! 1. `kek_info`: 256-bit strength, the service's environment, active state.
//! 2. round trip: `generate` and `wrap` unwrap to the same key, for data and
//!    index keys; two wraps of one key differ; keys from `generate` differ.
//! 3. binding: another id, scope, purpose or environment, a flipped bit, a
//!    truncated, extended or empty wrap, or another KEK id: refused, never
//!    retryable, and authentication failures are the opaque `UnwrapFailed`.
//! 4. rotation: `rotate_kek` makes version N+1 that wraps from then on;
//!    records wrapped under N still unwrap; a record relabelled to another
//!    version fails.
//! 5. rewrap: moves a record to the newest version with the same key, and
//!    checks the binding on the way (a wrong scope is refused).
//! 6. destroyed KEK: after the backend destroys (or disables) a version,
//!    records under it are refused with `KekDestroyed`/`KekDisabled` (not
//!    retryable, not `UnwrapFailed`), and nothing else is affected.
//! 7. end to end: `Panseal` seal/open through the backend, a cold open in a
//!    fresh instance (one audited unwrap), KEK rotation with rewrap of every
//!    stored record, and opening everything again in a fresh instance.
//! 8. outage (backends that can be unreachable): every call fails with a
//!    retryable `Unavailable`; a fresh `Panseal` cannot open, retryably; the
//!    key store is unchanged; after the outage everything opens and seals.

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use panseal::hazmat::dek_bytes;
use panseal::{
    Access, Context, Dek, Environment, Error, KeyId, KeyPurpose, KeyRequest, KeyService,
    KeyServiceError, KeyState, KeyStore, MemoryAuditSink, MemoryKeyStore, Operation, Pan, Panseal,
    Policy, Scope, WrappedKey,
};

/// The out-of-band operations the suite needs from a backend's test file.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short name for messages.
    fn name(&self) -> &str;

    /// Destroys or disables KEK version `version` the way a custodian would
    /// in the key service itself (destroy the PKCS#11 object; KMS
    /// `ScheduleKeyDeletion` or `DisableKey`; the local service's
    /// `destroy_kek`). The version is never the newest.
    async fn destroy_kek(&self, version: u32);

    /// Whether the service can be made unreachable ([`Backend::begin_outage`]).
    /// Only the in-process service cannot; the suite says so when it skips.
    fn has_outage(&self) -> bool;

    /// Makes the service unreachable (server stopped, device gone).
    async fn begin_outage(&self);

    /// Undoes [`Backend::begin_outage`]; the service's state must survive.
    async fn end_outage(&self);
}

fn step(backend: &dyn Backend, what: &str) {
    eprintln!("[conformance:{}] {what}", backend.name());
}

/// Runs every check against `ks`, which must have every permission and
/// serve `environment`.
pub async fn run(ks: Arc<dyn KeyService>, backend: &dyn Backend, environment: &str) {
    step(backend, "kek_info");
    kek_info_is_truthful(&*ks, environment).await;
    step(backend, "round trip");
    round_trip(&*ks, environment).await;
    step(backend, "binding");
    binding(&*ks, environment).await;
    step(backend, "rotation");
    rotation(&*ks, environment).await;
    step(backend, "rewrap");
    rewrap_keeps_the_key(&*ks, environment).await;
    step(backend, "destroyed KEK");
    destroyed_kek_refuses(&*ks, backend, environment).await;
    step(backend, "end to end");
    end_to_end(Arc::clone(&ks), environment).await;
    if backend.has_outage() {
        step(backend, "outage");
        outage(Arc::clone(&ks), backend, environment).await;
    } else {
        step(
            backend,
            "outage: not applicable (in-process service cannot be unreachable)",
        );
    }
    step(backend, "all checks passed");
}

pub fn request(environment: &str, scope: &str, purpose: KeyPurpose) -> KeyRequest {
    KeyRequest {
        id: KeyId::random(),
        scope: Scope::new(scope).unwrap(),
        environment: Environment::new(environment).unwrap(),
        purpose,
    }
}

fn access() -> Access {
    Access::new("conformance", "test").unwrap()
}

fn same(a: &Dek, b: &Dek) -> bool {
    dek_bytes(a) == dek_bytes(b)
}

async fn unwrap(
    ks: &dyn KeyService,
    r: &KeyRequest,
    w: &WrappedKey,
) -> Result<Dek, KeyServiceError> {
    ks.unwrap(r, w, &access()).await
}

/// The error is a refusal of a wrap that does not authenticate: the opaque
/// `UnwrapFailed`, not retryable.
fn assert_unwrap_failed(r: Result<Dek, KeyServiceError>, what: &str) {
    match r {
        Err(KeyServiceError::UnwrapFailed) => {}
        Err(e) => panic!("{what}: expected UnwrapFailed, got {e:?}"),
        Ok(_) => panic!("{what}: unwrapped"),
    }
}

pub async fn kek_info_is_truthful(ks: &dyn KeyService, environment: &str) {
    let info = ks.kek_info().await.unwrap();
    assert_eq!(info.strength_bits, 256, "{info:?}");
    assert_eq!(info.environment, environment);
    assert!(info.version >= 1, "{info:?}");
    assert_eq!(info.state, KeyState::Active);
    assert!(!info.id.is_empty());
    assert!(info.algorithm.contains("AES-256"), "{info:?}");
    // Stable between calls.
    assert_eq!(ks.kek_info().await.unwrap(), info);
}

pub async fn round_trip(ks: &dyn KeyService, environment: &str) {
    let info = ks.kek_info().await.unwrap();
    let mut seen = Vec::new();
    // Issue 10: no index key is wrapped for, or unwrapped to, a caller.
    let index_request = request(environment, "merchant-1", KeyPurpose::Index);
    assert!(
        ks.generate(&index_request).await.is_err(),
        "an index key was generated for the caller"
    );
    assert!(
        ks.wrap(&index_request, &Dek::generate()).await.is_err(),
        "an index key was wrapped for the caller"
    );
    for purpose in [KeyPurpose::Data, KeyPurpose::Data] {
        let r = request(environment, "merchant-1", purpose);
        // A service that keeps index keys inside (keyd, issue 10) refuses
        // to generate or wrap one for a caller.
        if purpose == KeyPurpose::Index {
            if let Err(KeyServiceError::PermissionDenied(_)) = ks.generate(&r).await {
                assert!(matches!(
                    ks.wrap(&r, &Dek::generate()).await,
                    Err(KeyServiceError::PermissionDenied(_))
                ));
                continue;
            }
        }
        let (dek, w) = ks.generate(&r).await.unwrap();
        assert_eq!(w.kek.id, info.id);
        assert_eq!(w.kek.version, info.version);
        assert!(!w.bytes.is_empty());
        assert!(
            !w.bytes.windows(32).any(|win| win == dek_bytes(&dek)),
            "the wrap contains the key in the clear"
        );
        let back = unwrap(ks, &r, &w).await.unwrap();
        assert!(same(&dek, &back), "generate: unwrap gave another key");
        seen.push(dek_bytes(&dek));

        let mine = Dek::generate();
        let w1 = ks.wrap(&r, &mine).await.unwrap();
        let w2 = ks.wrap(&r, &mine).await.unwrap();
        assert_ne!(w1.bytes, w2.bytes, "wraps must be randomized");
        assert!(same(&mine, &unwrap(ks, &r, &w1).await.unwrap()));
        assert!(same(&mine, &unwrap(ks, &r, &w2).await.unwrap()));
        // Unwrapping is repeatable.
        assert!(same(&mine, &unwrap(ks, &r, &w1).await.unwrap()));
    }
    if seen.len() == 2 {
        assert_ne!(seen[0], seen[1], "generate returned the same key twice");
    }
}

pub async fn binding(ks: &dyn KeyService, environment: &str) {
    let r = request(environment, "merchant-1", KeyPurpose::Data);
    let (_dek, w) = ks.generate(&r).await.unwrap();

    let mut other = r.clone();
    other.id = KeyId::random();
    assert_unwrap_failed(unwrap(ks, &other, &w).await, "another id");

    let mut other = r.clone();
    other.scope = Scope::new("merchant-2").unwrap();
    assert_unwrap_failed(unwrap(ks, &other, &w).await, "another scope");

    let mut other = r.clone();
    other.purpose = KeyPurpose::Index;
    // Another purpose: refused (index keys never unwrap to a caller).
    assert!(unwrap(ks, &other, &w).await.is_err(), "another purpose");

    // Another environment: refused before or by authentication.
    let mut other = r.clone();
    other.environment = Environment::new("elsewhere").unwrap();
    match unwrap(ks, &other, &w).await {
        Err(KeyServiceError::Environment { .. } | KeyServiceError::UnwrapFailed) => {}
        other => panic!("another environment: {other:?}"),
    }

    for i in [0, w.bytes.len() / 2, w.bytes.len() - 1] {
        let mut bad = w.clone();
        bad.bytes[i] ^= 0x01;
        assert_unwrap_failed(unwrap(ks, &r, &bad).await, &format!("bit flipped at {i}"));
    }
    let mut bad = w.clone();
    bad.bytes.truncate(w.bytes.len() - 1);
    assert_unwrap_failed(unwrap(ks, &r, &bad).await, "truncated");
    let mut bad = w.clone();
    bad.bytes.push(0);
    assert_unwrap_failed(unwrap(ks, &r, &bad).await, "extended");
    let mut bad = w.clone();
    bad.bytes.clear();
    assert_unwrap_failed(unwrap(ks, &r, &bad).await, "empty");

    let mut bad = w.clone();
    bad.kek.id = format!("{}-other", w.kek.id);
    match unwrap(ks, &r, &bad).await {
        Err(e @ (KeyServiceError::UnknownKek(_) | KeyServiceError::UnwrapFailed)) => {
            assert!(!e.is_retryable())
        }
        other => panic!("another KEK id: {other:?}"),
    }
    let mut bad = w.clone();
    bad.kek.version = w.kek.version + 1000;
    match unwrap(ks, &r, &bad).await {
        Err(e @ (KeyServiceError::UnknownKek(_) | KeyServiceError::UnwrapFailed)) => {
            assert!(!e.is_retryable())
        }
        other => panic!("a KEK version that does not exist: {other:?}"),
    }
    // Nothing above damaged the record.
    assert!(unwrap(ks, &r, &w).await.is_ok());
}

pub async fn rotation(ks: &dyn KeyService, environment: &str) {
    let before = ks.kek_info().await.unwrap();
    let r = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek, old) = ks.generate(&r).await.unwrap();
    assert_eq!(old.kek.version, before.version);

    let after = ks.rotate_kek().await.unwrap();
    assert_eq!(after.version, before.version + 1);
    assert_eq!(after.id, before.id);
    assert_eq!(after.state, KeyState::Active);
    assert_eq!(after.strength_bits, 256);
    assert_eq!(ks.kek_info().await.unwrap(), after);

    // Old records still unwrap; new wraps use the new version.
    assert!(same(&dek, &unwrap(ks, &r, &old).await.unwrap()));
    let r2 = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek2, new) = ks.generate(&r2).await.unwrap();
    assert_eq!(new.kek.version, after.version);
    let w = ks.wrap(&r, &dek).await.unwrap();
    assert_eq!(w.kek.version, after.version);
    assert!(same(&dek2, &unwrap(ks, &r2, &new).await.unwrap()));
    assert!(same(&dek, &unwrap(ks, &r, &w).await.unwrap()));

    // A record relabelled to the other version (a rollback or a forgery)
    // fails, in both directions.
    let mut forged = old.clone();
    forged.kek.version = after.version;
    assert_unwrap_failed(
        unwrap(ks, &r, &forged).await,
        "relabelled to the newer version",
    );
    let mut forged = new.clone();
    forged.kek.version = before.version;
    assert_unwrap_failed(
        unwrap(ks, &r2, &forged).await,
        "relabelled to the older version",
    );
}

pub async fn rewrap_keeps_the_key(ks: &dyn KeyService, environment: &str) {
    let r = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek, old) = ks.generate(&r).await.unwrap();
    let info = ks.rotate_kek().await.unwrap();
    assert!(info.version > old.kek.version);

    let new = ks.rewrap(&r, &old).await.unwrap();
    assert_eq!(new.kek.version, info.version);
    assert_eq!(new.kek.id, info.id);
    assert_ne!(new.bytes, old.bytes);
    assert!(same(&dek, &unwrap(ks, &r, &new).await.unwrap()));
    // The old wrap is still good until its KEK is destroyed.
    assert!(same(&dek, &unwrap(ks, &r, &old).await.unwrap()));
    // Rewrapping the newest is allowed and keeps the key.
    let again = ks.rewrap(&r, &new).await.unwrap();
    assert_eq!(again.kek.version, info.version);
    assert!(same(&dek, &unwrap(ks, &r, &again).await.unwrap()));

    // Rewrap checks the binding: it cannot be used to launder a wrap into
    // another scope or id.
    let mut other = r.clone();
    other.scope = Scope::new("merchant-2").unwrap();
    match ks.rewrap(&other, &old).await {
        Err(KeyServiceError::UnwrapFailed) => {}
        other => panic!("rewrap under another scope: {other:?}"),
    }
    let mut other = r.clone();
    other.id = KeyId::random();
    match ks.rewrap(&other, &old).await {
        Err(KeyServiceError::UnwrapFailed) => {}
        other => panic!("rewrap under another id: {other:?}"),
    }
}

fn assert_kek_gone(r: Result<impl std::fmt::Debug, KeyServiceError>, what: &str) {
    match r {
        Err(e @ (KeyServiceError::KekDestroyed(_) | KeyServiceError::KekDisabled(_))) => {
            assert!(!e.is_retryable(), "{what}: {e:?} must not be retryable");
            assert!(
                e.to_string().contains("destroyed") || e.to_string().contains("disabled"),
                "{what}: {e}"
            );
        }
        other => panic!("{what}: expected KekDestroyed or KekDisabled, got {other:?}"),
    }
}

pub async fn destroyed_kek_refuses(ks: &dyn KeyService, backend: &dyn Backend, environment: &str) {
    let r_moved = request(environment, "merchant-1", KeyPurpose::Data);
    let r_left = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek_moved, w_moved) = ks.generate(&r_moved).await.unwrap();
    let (_dek_left, w_left) = ks.generate(&r_left).await.unwrap();
    let doomed = w_moved.kek.version;

    let info = ks.rotate_kek().await.unwrap();
    let moved = ks.rewrap(&r_moved, &w_moved).await.unwrap();
    assert_eq!(moved.kek.version, info.version);

    backend.destroy_kek(doomed).await;

    assert_kek_gone(
        unwrap(ks, &r_left, &w_left).await,
        "unwrap under the destroyed version",
    );
    assert_kek_gone(
        unwrap(ks, &r_moved, &w_moved).await,
        "old wrap of a rewrapped key",
    );
    assert_kek_gone(
        ks.rewrap(&r_left, &w_left).await,
        "rewrap from the destroyed version",
    );
    // A wrong binding under a destroyed version is still refused.
    let mut other = r_left.clone();
    other.scope = Scope::new("merchant-2").unwrap();
    assert!(unwrap(ks, &other, &w_left).await.is_err());

    // Everything else is unaffected.
    assert!(same(
        &dek_moved,
        &unwrap(ks, &r_moved, &moved).await.unwrap()
    ));
    let r = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek, w) = ks.generate(&r).await.unwrap();
    assert!(same(&dek, &unwrap(ks, &r, &w).await.unwrap()));
    assert_eq!(ks.kek_info().await.unwrap().version, info.version);
}

fn ctx(row: &str) -> Context {
    Context::new("cards", "pan", row).unwrap()
}

async fn panseal(
    ks: Arc<dyn KeyService>,
    store: &MemoryKeyStore,
    audit: &Arc<MemoryAuditSink>,
    environment: &str,
    policy: Policy,
) -> Result<Panseal, Error> {
    Panseal::builder()
        .key_service_arc(ks)
        .key_store(store.clone())
        .audit_arc(audit.clone())
        .environment(environment)
        .scope("merchant-1")
        .policy(policy)
        .build()
        .await
}

pub async fn end_to_end(ks: Arc<dyn KeyService>, environment: &str) {
    let store = MemoryKeyStore::new();
    let audit = Arc::new(MemoryAuditSink::new());
    let writer = panseal(
        ks.clone(),
        &store,
        &audit,
        environment,
        Policy::default().max_uses(2),
    )
    .await
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let mut sealed = Vec::new();
    for i in 0..5 {
        let c = ctx(&format!("row-{i}"));
        let s = writer.seal_pan(&pan, &c).await.unwrap();
        assert_eq!(writer.open_pan(&s, &c, &access()).await.unwrap().pan, pan);
        sealed.push((c, s));
    }
    writer.report_usage().await.unwrap();
    let records = store.list(None).await.unwrap();
    assert!(
        records.len() >= 3,
        "max_uses(2) over 5 seals: {} DEKs",
        records.len()
    );
    let info = ks.kek_info().await.unwrap();
    for r in &records {
        assert_eq!(r.wrapped.kek.id, info.id);
    }

    // A fresh instance has an empty cache: its first open of each DEK is one
    // audited unwrap through the backend.
    let reader = panseal(ks.clone(), &store, &audit, environment, Policy::default())
        .await
        .unwrap();
    let base = audit.events().len();
    for (c, s) in &sealed {
        assert_eq!(reader.open_pan(s, c, &access()).await.unwrap().pan, pan);
    }
    let unwraps = audit.events()[base..]
        .iter()
        .filter(|e| e.operation == Operation::Unwrap)
        .count();
    assert_eq!(unwraps, records.len(), "one unwrap per DEK on a cold cache");
    // A ciphertext moved to another row fails opaquely.
    let (_, s0) = &sealed[0];
    assert!(matches!(
        reader
            .open_pan(s0, &ctx("row-1"), &access())
            .await
            .unwrap_err(),
        Error::Decryption
    ));

    // KEK rotation: rewrap every stored record, then everything opens in a
    // fresh instance and new DEKs are wrapped under the new version.
    let rotated = ks.rotate_kek().await.unwrap();
    for r in store.list(None).await.unwrap() {
        let new = panseal::rewrap_record(ks.as_ref(), &store, r.id)
            .await
            .unwrap();
        assert_eq!(new.wrapped.kek.version, rotated.version);
    }
    let fresh = panseal(ks.clone(), &store, &audit, environment, Policy::default())
        .await
        .unwrap();
    for (c, s) in &sealed {
        assert_eq!(fresh.open_pan(s, c, &access()).await.unwrap().pan, pan);
    }
    let s = fresh.seal_pan(&pan, &ctx("after")).await.unwrap();
    let rec = store.fetch(s.key_id()).await.unwrap().unwrap();
    assert_eq!(rec.wrapped.kek.version, rotated.version);
    assert_eq!(
        fresh
            .open_pan(&s, &ctx("after"), &access())
            .await
            .unwrap()
            .pan,
        pan
    );
}

fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, KeyServiceError>, what: &str) {
    match r {
        Err(e @ KeyServiceError::Unavailable(_)) => assert!(e.is_retryable(), "{what}"),
        other => panic!("{what} during the outage: expected Unavailable, got {other:?}"),
    }
}

pub async fn outage(ks: Arc<dyn KeyService>, backend: &dyn Backend, environment: &str) {
    let store = MemoryKeyStore::new();
    let audit = Arc::new(MemoryAuditSink::new());
    let writer = panseal(
        ks.clone(),
        &store,
        &audit,
        environment,
        Policy::default().max_uses(2),
    )
    .await
    .unwrap();
    let pan = Pan::parse("5555555555554444").unwrap();
    let s1 = writer.seal_pan(&pan, &ctx("1")).await.unwrap();
    let r = request(environment, "merchant-1", KeyPurpose::Data);
    let (dek, w) = ks.generate(&r).await.unwrap();
    let before = store.list(None).await.unwrap();

    backend.begin_outage().await;
    assert_unavailable(ks.kek_info().await, "kek_info");
    assert_unavailable(ks.generate(&r).await.map(|_| ()), "generate");
    assert_unavailable(ks.wrap(&r, &dek).await, "wrap");
    assert_unavailable(unwrap(&*ks, &r, &w).await.map(|_| ()), "unwrap");
    assert_unavailable(ks.rewrap(&r, &w).await, "rewrap");
    // Within its budget the writer's cached DEK still seals and opens.
    let s2 = writer.seal_pan(&pan, &ctx("2")).await.unwrap();
    assert_eq!(
        writer
            .open_pan(&s1, &ctx("1"), &access())
            .await
            .unwrap()
            .pan,
        pan
    );
    // The next seal needs a new DEK: a clear, retryable error.
    let err = writer.seal_pan(&pan, &ctx("3")).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        matches!(err, Error::KeyService(KeyServiceError::Unavailable(_))),
        "{err:?}"
    );
    // A new instance cannot even start (it checks the KEK), retryably.
    let err = panseal(ks.clone(), &store, &audit, environment, Policy::default())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    // Nothing was added to or changed in the store but use counts and the
    // exhausted DEK's state.
    let during = store.list(None).await.unwrap();
    assert_eq!(during.len(), before.len());
    for (a, b) in before.iter().zip(&during) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.wrapped, b.wrapped);
    }
    backend.end_outage().await;

    // Everything is back: the same wraps unwrap, a fresh instance opens all,
    // the writer seals with a new DEK.
    assert!(same(&dek, &unwrap(&*ks, &r, &w).await.unwrap()));
    let fresh = panseal(ks.clone(), &store, &audit, environment, Policy::default())
        .await
        .unwrap();
    let s3 = writer.seal_pan(&pan, &ctx("3")).await.unwrap();
    assert_ne!(s3.key_id(), s1.key_id());
    for (row, s) in [("1", s1), ("2", s2), ("3", s3)] {
        assert_eq!(
            fresh.open_pan(&s, &ctx(row), &access()).await.unwrap().pan,
            pan
        );
    }
}
