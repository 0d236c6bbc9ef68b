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
//! 7. custodian cycle (the checks of the former second suite,
//!    `tests/keyd_conformance`): 256-bit KEK of the right environment; wrap
//!    and generate round trips (index keys refused with `PermissionDenied`
//!    or round-tripped); binding to id, scope and purpose; another
//!    environment refused with `Environment` (not retryable) on unwrap and
//!    wrap; altered and truncated wraps `UnwrapFailed`; the backend's
//!    custodian rotation ([`Backend::rotate_kek`]) wraps under the new
//!    version while old wraps unwrap; relabelled and unknown versions
//!    refused; rewrap to the newest; destruction of the old version leaves
//!    rewrapped keys opening and refuses the rest with `KekDestroyed` (not
//!    retryable); another scope untouched.
//! 8. end to end: `Panseal` seal/open through the backend, a cold open in a
//!    fresh instance (one audited unwrap), KEK rotation with rewrap of every
//!    stored record, and opening everything again in a fresh instance.
//! 9. outage (backends that can be unreachable): every call fails with a
//!    retryable `Unavailable`; a fresh `Panseal` cannot open, retryably; the
//!    key store is unchanged; after the outage everything opens and seals.
//!
//! [`run_index_and_records`] and [`run_ingest`] add the blind-index,
//! key-record and write-only ingest checks; a backend without ingest
//! ([`Backend::ingest_unsupported`]) must refuse every ingest call with
//! `Unsupported`, which is asserted, not skipped.

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use panseal::hazmat::dek_bytes;
use panseal::{
    Access, Context, Dek, Environment, Error, KeyId, KeyPurpose, KeyRequest, KeyService,
    KeyServiceError, KeyState, KeyStore, MemoryAuditSink, MemoryKeyStore, Operation, Pan, Panseal,
    Permissions, Policy, Scope, WrappedDek, WrappedKey,
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

    /// Another handle on the same service (same keys) whose credential
    /// has only `permissions`, if the backend can restrict one
    /// ([`run_index_and_records`] checks the refusals).
    async fn restricted(&self, permissions: Permissions) -> Option<Arc<dyn KeyService>> {
        let _ = permissions;
        None
    }

    /// Whether the service remembers the newest record sequence it signed
    /// (keyd), so a rolled-back record is refused.
    fn remembers_record_sequence(&self) -> bool {
        false
    }

    /// Rotates the KEK serving `scope` the way the backend's custodian
    /// does; returns the new active version. Default: the trait's
    /// `rotate_kek` (one KEK for every scope). keyd: a custodian's
    /// `rotate(scope)` (a KEK per scope).
    async fn rotate_kek(&self, ks: &dyn KeyService, scope: &Scope) -> u32 {
        let _ = scope;
        ks.rotate_kek().await.expect("rotate_kek").version
    }

    /// `Some(why)` if the service has no write-only ingest: [`run_ingest`]
    /// then asserts that every ingest call fails with `Unsupported` naming
    /// `why` (the backend's documented reason).
    fn ingest_unsupported(&self) -> Option<&'static str> {
        None
    }
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
    step(backend, "custodian cycle");
    custodian_cycle(
        &*ks,
        backend,
        environment,
        "prod",
        "merchant-1",
        "merchant-2",
    )
    .await;
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

// ===== issue 10: keyed hashes inside the service, authenticated records =====

/// Runs the checks of the operations added for keyed hashes and record
/// tags against `ks` (every permission but perhaps `reveal`, serving
/// `environment`): index-key lifecycle, batch layout (PAN-major), unknown
/// versions, record signing with every forbidden transition refused, every
/// tampered record detected (asserting *0 forged records accepted*),
/// permission refusals through [`Backend::restricted`], and the outage.
/// Callable for any `KeyService`; scopes are fresh per run.
pub async fn run_index_and_records(
    ks: Arc<dyn KeyService>,
    backend: &dyn Backend,
    environment: &str,
) {
    let tag = hex::encode(rand::random::<[u8; 4]>());
    // Dots and colons: legal in a scope, not in every backend's key names.
    let scope = Scope::new(&format!("idx.m:{tag}")).unwrap();
    let other = Scope::new(&format!("idx-other-{tag}")).unwrap();
    step(backend, "index-key lifecycle");
    index_lifecycle(&*ks, &scope, &other).await;
    step(backend, "blind-index batch layout (PAN-major)");
    batch_layout(&*ks, &scope).await;
    step(backend, "unknown index-key versions");
    unknown_versions(&*ks, &scope).await;
    step(
        backend,
        "record tags: sign, verify, forbidden transitions, tampering",
    );
    records(Arc::clone(&ks), backend, environment).await;
    step(backend, "permission refusals");
    restricted(Arc::clone(&ks), backend, environment, &scope).await;
    if backend.has_outage() {
        step(backend, "index and record operations during an outage");
        index_outage(Arc::clone(&ks), backend, environment, &scope).await;
    }
    step(backend, "index and record checks passed");
}

pub const TEST_PANS: [&str; 5] = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "4012888888881881",
];

fn pans() -> Vec<Pan> {
    TEST_PANS.iter().map(|p| Pan::parse(p).unwrap()).collect()
}

async fn one(ks: &dyn KeyService, scope: &Scope, version: u32, pan: &Pan) -> [u8; 32] {
    let v = ks
        .blind_index(scope, &[version], &[pan], &access())
        .await
        .unwrap();
    assert_eq!(v.len(), 1);
    v[0]
}

fn assert_unknown_index(r: Result<Vec<[u8; 32]>, KeyServiceError>, version: u32, what: &str) {
    match r {
        Err(KeyServiceError::UnknownIndexKey { version: v, .. }) => {
            assert_eq!(v, version, "{what}")
        }
        other => panic!("{what}: expected UnknownIndexKey v{version}, got {other:?}"),
    }
}

pub async fn index_lifecycle(ks: &dyn KeyService, scope: &Scope, other: &Scope) {
    let pans = pans();
    assert_eq!(ks.index_keys(scope).await.unwrap(), vec![]);
    assert_unknown_index(
        ks.blind_index(scope, &[1], &[&pans[0]], &access()).await,
        1,
        "before any index key exists",
    );
    let v1 = ks.create_index_key(scope).await.unwrap();
    assert_eq!((v1.version, v1.state), (1, KeyState::Active));
    assert_eq!(&v1.scope, scope);
    let listed = ks.index_keys(scope).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].version, listed[0].state), (1, KeyState::Active));

    // Deterministic per (version, PAN); differs between PANs; keyed.
    let a = one(ks, scope, 1, &pans[0]).await;
    assert_eq!(one(ks, scope, 1, &pans[0]).await, a);
    let mut distinct: Vec<[u8; 32]> = Vec::new();
    for p in &pans {
        distinct.push(one(ks, scope, 1, p).await);
    }
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), pans.len(), "two PANs share an index value");
    use sha2::Digest;
    let unkeyed: [u8; 32] = sha2::Sha256::digest(pans[0].expose_digits().as_bytes()).into();
    assert_ne!(a, unkeyed, "the index is an unkeyed hash");

    // Rotation: v2 active, v1 lookup-only and still hashing the same.
    let v2 = ks.create_index_key(scope).await.unwrap();
    assert_eq!((v2.version, v2.state), (2, KeyState::Active));
    let listed = ks.index_keys(scope).await.unwrap();
    let summary: Vec<(u32, KeyState)> = listed.iter().map(|k| (k.version, k.state)).collect();
    assert_eq!(
        summary,
        vec![(2, KeyState::Active), (1, KeyState::DecryptOnly)],
        "newest first, one active"
    );
    assert_eq!(
        one(ks, scope, 1, &pans[0]).await,
        a,
        "v1 changed after rotation"
    );
    let b = one(ks, scope, 2, &pans[0]).await;
    assert_ne!(a, b, "versions share a key");

    // Another scope has other keys.
    let o1 = ks.create_index_key(other).await.unwrap();
    assert_eq!(o1.version, 1);
    assert_ne!(one(ks, other, 1, &pans[0]).await, a, "scopes share a key");

    // States only move forward.
    assert!(
        ks.set_index_key_state(scope, 1, KeyState::Active)
            .await
            .is_err(),
        "lookup-only → active was accepted"
    );
    assert_eq!(
        ks.index_keys(scope).await.unwrap()[1].state,
        KeyState::DecryptOnly
    );

    // Destroying v1: gone from the list, refused, v2 unaffected.
    ks.set_index_key_state(scope, 1, KeyState::Destroyed)
        .await
        .unwrap();
    let listed = ks.index_keys(scope).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, 2);
    assert_unknown_index(
        ks.blind_index(scope, &[1], &[&pans[0]], &access()).await,
        1,
        "destroyed version",
    );
    assert_unknown_index(
        ks.blind_index(scope, &[2, 1], &[&pans[0]], &access()).await,
        1,
        "a batch naming a destroyed version",
    );
    assert_eq!(one(ks, scope, 2, &pans[0]).await, b);
    // Numbers are never reused.
    let v3 = ks.create_index_key(scope).await.unwrap();
    assert_eq!(v3.version, 3);
}

pub async fn batch_layout(ks: &dyn KeyService, scope: &Scope) {
    let pans = pans();
    let refs: Vec<&Pan> = pans.iter().chain(pans.iter().take(1)).collect();
    let versions = [3u32, 2];
    let batch = ks
        .blind_index(scope, &versions, &refs, &access())
        .await
        .unwrap();
    assert_eq!(batch.len(), refs.len() * versions.len());
    for (i, p) in refs.iter().enumerate() {
        for (j, v) in versions.iter().enumerate() {
            assert_eq!(
                batch[i * versions.len() + j],
                one(ks, scope, *v, p).await,
                "batch[{i}*{}+{j}] is not pans[{i}] under v{v}",
                versions.len()
            );
        }
    }
    // A repeated PAN gets the same values.
    assert_eq!(batch[0..2], batch[batch.len() - 2..]);
    assert!(ks
        .blind_index(scope, &versions, &[], &access())
        .await
        .unwrap()
        .is_empty());
}

pub async fn unknown_versions(ks: &dyn KeyService, scope: &Scope) {
    let pans = pans();
    for v in [0u32, 99, u32::MAX] {
        let r = ks.blind_index(scope, &[v], &[&pans[1]], &access()).await;
        if let Err(e) = &r {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(TEST_PANS[1]), "the error echoes the PAN");
            assert!(!e.is_retryable());
        }
        assert_unknown_index(r, v, "a version never created");
    }
    let unknown = Scope::new("idx-never-created").unwrap();
    assert_unknown_index(
        ks.blind_index(&unknown, &[1], &[&pans[1]], &access()).await,
        1,
        "a scope without index keys",
    );
    assert!(ks
        .set_index_key_state(scope, 99, KeyState::Destroyed)
        .await
        .is_err());
}

/// A fresh, unsigned key-store record as the library writes one: active,
/// unused, sequence 0, created now, with a real wrap from `ks`.
pub async fn fresh_record(ks: Arc<dyn KeyService>, environment: &str) -> WrappedDek {
    let store = MemoryKeyStore::new();
    let audit = Arc::new(MemoryAuditSink::new());
    let p = panseal(ks.clone(), &store, &audit, environment, Policy::default())
        .await
        .unwrap();
    p.seal_pan(&Pan::parse(TEST_PANS[0]).unwrap(), &ctx("rec"))
        .await
        .unwrap();
    let mut r = store
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.purpose == KeyPurpose::Data)
        .unwrap();
    // A fresh id: a service that remembers what it signed (keyd) has not
    // seen this one (the library may have signed the stored record).
    r.id = KeyId::random();
    // ...with a key wrapped for that id (the wrap binds the id).
    r.wrapped = ks.generate(&r.key_request()).await.unwrap().1;
    r.state = KeyState::Active;
    r.uses = 0;
    r.sequence = 0;
    r.tag = None;
    r.created_at = now();
    r.encrypt_until = r.encrypt_until.max(r.created_at + 3600);
    r.decrypt_until = r.decrypt_until.max(r.encrypt_until + 3600);
    r
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn sign(
    ks: &dyn KeyService,
    previous: Option<&WrappedDek>,
    next: &WrappedDek,
) -> Result<WrappedDek, KeyServiceError> {
    let tag = ks.authenticate_record(previous, next).await?;
    let mut signed = next.clone();
    signed.tag = Some(tag);
    Ok(signed)
}

fn successor(r: &WrappedDek) -> WrappedDek {
    let mut n = r.clone();
    n.sequence += 1;
    n.tag = None;
    n
}

pub async fn records(ks: Arc<dyn KeyService>, backend: &dyn Backend, environment: &str) {
    let r0 = sign(&*ks, None, &fresh_record(ks.clone(), environment).await)
        .await
        .unwrap();
    ks.verify_record(&r0).await.unwrap();
    // The tag survives the stored encoding (record version 2).
    let bytes = r0.to_bytes();
    assert_eq!(bytes[0], 2, "a tagged record encodes as version 2");
    ks.verify_record(&WrappedDek::from_bytes(&bytes).unwrap())
        .await
        .unwrap();
    let mut untagged = r0.clone();
    untagged.tag = None;
    // An untagged copy of a signed record: tampered, or (services that
    // remember what they signed) a downgrade, refused as stale.
    assert!(matches!(
        ks.verify_record(&untagged).await,
        Err(KeyServiceError::RecordTampered(_) | KeyServiceError::RecordStale(_))
    ));

    // Allowed: a use-count report, then retiring.
    let mut r1 = successor(&r0);
    r1.uses = 10;
    let r1 = sign(&*ks, Some(&r0), &r1).await.unwrap();
    ks.verify_record(&r1).await.unwrap();
    let mut r2 = successor(&r1);
    r2.state = KeyState::DecryptOnly;
    let r2 = sign(&*ks, Some(&r1), &r2).await.unwrap();
    ks.verify_record(&r2).await.unwrap();

    // Forbidden successors of the retired record: none is signed.
    type Edit = fn(&mut WrappedDek);
    let forbidden: Vec<(&str, Edit)> = vec![
        ("reactivation", |r| r.state = KeyState::Active),
        ("extended encrypt date", |r| r.encrypt_until += 86_400),
        ("extended decrypt date", |r| r.decrypt_until += 86_400),
        ("raised use budget", |r| r.max_uses += 1),
        ("lowered use count", |r| r.uses -= 1),
        ("use count reset", |r| r.uses = 0),
        ("relabelled version", |r| r.version += 1),
        ("relabelled purpose", |r| r.purpose = KeyPurpose::Index),
        ("relabelled scope", |r| {
            r.scope = Scope::new("merchant-elsewhere").unwrap()
        }),
        ("relabelled environment", |r| {
            r.environment = Environment::new("elsewhere").unwrap()
        }),
        ("another id", |r| r.id = KeyId::random()),
        ("another creation time", |r| r.created_at -= 1),
        ("sequence skipped", |r| r.sequence += 1),
        ("sequence repeated", |r| r.sequence -= 1),
    ];
    let mut signed = 0;
    for (what, edit) in &forbidden {
        let mut next = successor(&r2);
        edit(&mut next);
        match ks.authenticate_record(Some(&r2), &next).await {
            Err(KeyServiceError::RecordTransition(reason)) => {
                assert!(!reason.is_empty(), "{what}")
            }
            // Refused before the lifecycle rule (another environment or
            // scope than the credential's).
            Err(KeyServiceError::Environment { .. } | KeyServiceError::PermissionDenied(_)) => {}
            Err(e) => panic!("{what}: expected a refusal, got {e:?}"),
            Ok(_) => {
                eprintln!("  FORGED: {what} was signed");
                signed += 1;
            }
        }
    }
    eprintln!(
        "  forbidden transitions: {} tried, {signed} signed",
        forbidden.len()
    );
    assert_eq!(signed, 0, "forbidden transitions signed");

    // A forged "previous" (a database writer's edit) cannot serve as the
    // base of a signed successor.
    let mut forged_prev = r2.clone();
    forged_prev.state = KeyState::Active;
    forged_prev.encrypt_until += 365 * 86_400;
    forged_prev.decrypt_until += 365 * 86_400;
    let next = successor(&forged_prev);
    let laundered = ks.authenticate_record(Some(&forged_prev), &next).await;
    assert!(
        matches!(
            laundered,
            Err(KeyServiceError::RecordTampered(_) | KeyServiceError::RecordTransition(_))
        ),
        "a tampered previous record was accepted as the base: {laundered:?}"
    );

    // Every edit of a signed record is detected.
    let tampered: Vec<(&str, Edit)> = vec![
        ("state reactivated", |r| r.state = KeyState::Active),
        ("state compromised→?", |r| r.state = KeyState::Compromised),
        ("encrypt date extended", |r| r.encrypt_until += 86_400),
        ("decrypt date extended", |r| r.decrypt_until += 86_400),
        ("uses reset", |r| r.uses = 0),
        ("budget raised", |r| r.max_uses += 1_000_000),
        ("version relabelled", |r| r.version += 1),
        ("purpose relabelled", |r| r.purpose = KeyPurpose::Index),
        ("scope relabelled", |r| {
            r.scope = Scope::new("merchant-elsewhere").unwrap()
        }),
        ("environment relabelled", |r| {
            r.environment = Environment::new("elsewhere").unwrap()
        }),
        ("id changed", |r| r.id = KeyId::random()),
        ("created_at changed", |r| r.created_at += 1),
        ("sequence changed", |r| r.sequence += 1),
        ("wrapped byte flipped", |r| r.wrapped.bytes[0] ^= 1),
        ("kek version changed", |r| r.wrapped.kek.version += 1),
        ("tag bit flipped", |r| {
            if let Some(t) = r.tag.as_mut() {
                t.0[31] ^= 1
            }
        }),
        ("tag zeroed", |r| r.tag = Some(panseal::RecordTag([0; 32]))),
    ];
    let mut accepted = 0;
    for (what, edit) in &tampered {
        let mut bad = r2.clone();
        edit(&mut bad);
        match ks.verify_record(&bad).await {
            Err(KeyServiceError::RecordTampered(_) | KeyServiceError::RecordStale(_)) => {}
            // Refused before the tag is checked (not this credential's
            // environment or scope).
            Err(KeyServiceError::Environment { .. } | KeyServiceError::PermissionDenied(_)) => {}
            Err(e) => panic!("{what}: expected a refusal, got {e:?}"),
            Ok(()) => {
                eprintln!("  FORGED: {what} verified");
                accepted += 1;
            }
        }
    }
    eprintln!(
        "  tampered records: {} tried, {accepted} accepted",
        tampered.len()
    );
    assert_eq!(accepted, 0, "forged records accepted");
    // Nothing above hurt the genuine record.
    ks.verify_record(&r2).await.unwrap();

    // A rollback to an older, once-valid record.
    let rollback = ks.verify_record(&r1).await;
    if backend.remembers_record_sequence() {
        assert!(
            matches!(rollback, Err(KeyServiceError::RecordStale(_))),
            "{rollback:?}"
        );
    } else {
        eprintln!(
            "  rollback: this backend keeps no sequence state; the older record verifies \
             ({}) — keyd refuses it",
            if rollback.is_ok() {
                "accepted"
            } else {
                "refused"
            }
        );
    }

    // Destruction (custodian): wrapped key gone.
    let mut r3 = successor(&r2);
    r3.state = KeyState::Destroyed;
    r3.wrapped.bytes.clear();
    let r3 = sign(&*ks, Some(&r2), &r3).await.unwrap();
    ks.verify_record(&r3).await.unwrap();
}

pub async fn restricted(
    ks: Arc<dyn KeyService>,
    backend: &dyn Backend,
    environment: &str,
    scope: &Scope,
) {
    let pans = pans();
    let wrap_only = Permissions {
        wrap: true,
        unwrap: false,
        index: false,
        reveal: false,
        rewrap: false,
        admit: false,
        custodian: false,
    };
    let Some(front) = backend.restricted(wrap_only).await else {
        step(
            backend,
            "permission refusals: not applicable (no restricted credential)",
        );
        return;
    };
    assert_eq!(front.permissions().await.unwrap(), wrap_only);
    let mut refused = 0;
    let denied = |r: Result<(), KeyServiceError>, what: &str| match r {
        Err(KeyServiceError::PermissionDenied(_)) => 1,
        other => panic!("{what} with a wrap-only credential: {other:?}"),
    };
    refused += denied(
        front.create_index_key(scope).await.map(|_| ()),
        "create_index_key",
    );
    refused += denied(
        front
            .set_index_key_state(scope, 2, KeyState::Destroyed)
            .await,
        "set_index_key_state",
    );
    refused += denied(
        front
            .blind_index(scope, &[3], &[&pans[0]], &access())
            .await
            .map(|_| ()),
        "blind_index",
    );
    refused += denied(front.index_keys(scope).await.map(|_| ()), "index_keys");
    // Records: a front end may sign its new record and retire it, not
    // compromise or destroy it.
    let r0 = sign(&*front, None, &fresh_record(ks.clone(), environment).await)
        .await
        .unwrap();
    ks.verify_record(&r0).await.unwrap();
    let mut retire = successor(&r0);
    retire.state = KeyState::DecryptOnly;
    let retired = sign(&*front, Some(&r0), &retire).await.unwrap();
    for (what, state) in [
        ("compromise", KeyState::Compromised),
        ("destroy", KeyState::Destroyed),
    ] {
        let mut next = successor(&retired);
        next.state = state;
        if state == KeyState::Destroyed {
            next.wrapped.bytes.clear();
        }
        match front.authenticate_record(Some(&retired), &next).await {
            Err(KeyServiceError::RecordTransition(_) | KeyServiceError::PermissionDenied(_)) => {
                refused += 1
            }
            other => panic!("{what} signed for a wrap-only credential: {other:?}"),
        }
    }
    assert_eq!(refused, 6);

    // An index-only credential hashes with the same keys, nothing else.
    let index_only = Permissions {
        index: true,
        ..Permissions {
            wrap: false,
            unwrap: false,
            index: false,
            reveal: false,
            rewrap: false,
            admit: false,
            custodian: false,
        }
    };
    let indexer = backend.restricted(index_only).await.unwrap();
    assert_eq!(
        indexer
            .blind_index(scope, &[3], &[&pans[0]], &access())
            .await
            .unwrap()[0],
        one(&*ks, scope, 3, &pans[0]).await
    );
    assert!(matches!(
        indexer.create_index_key(scope).await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    assert!(indexer
        .authenticate_record(None, &fresh_record(ks.clone(), environment).await)
        .await
        .is_err());
}

pub async fn index_outage(
    ks: Arc<dyn KeyService>,
    backend: &dyn Backend,
    environment: &str,
    scope: &Scope,
) {
    let pans = pans();
    let before = one(&*ks, scope, 3, &pans[0]).await;
    let record = sign(&*ks, None, &fresh_record(ks.clone(), environment).await)
        .await
        .unwrap();
    backend.begin_outage().await;
    assert_unavailable(ks.index_keys(scope).await, "index_keys");
    assert_unavailable(
        ks.blind_index(scope, &[3], &[&pans[0], &pans[1]], &access())
            .await,
        "blind_index",
    );
    assert_unavailable(ks.verify_record(&record).await, "verify_record");
    let mut next = successor(&record);
    next.uses = 1;
    assert_unavailable(
        ks.authenticate_record(Some(&record), &next).await,
        "authenticate_record",
    );
    backend.end_outage().await;
    assert_eq!(one(&*ks, scope, 3, &pans[0]).await, before);
    ks.verify_record(&record).await.unwrap();
}

// ----- write-only ingest (HPKE): ingest keys, open_ingest, admit -------------

/// The ingest checks, for any `KeyService` with every permission (`ks`),
/// plus restricted handles through [`Backend::restricted`]:
/// 1. `ingest_keys` empty, `create_ingest_key` makes v1 (active, the
///    service's environment and the scope), v2 retires v1;
/// 2. `open_ingest` opens what an `IngestSealer` sealed (`needs_reseal`),
///    a retired key still opens, a retired key never seals;
/// 3. `admit` (record made by `generate_wrapped`, signed): the good items
///    come back as compact ciphertexts under the record's DEK bound to the
///    same context, with the service's blind index; altered, wrong context,
///    another scope's ciphertext are per-item errors that do not stop the
///    batch; more than `MAX_ADMIT_BATCH` items are refused;
/// 4. another scope's key refuses; truncated ciphertexts do not parse;
/// 5. destroying a version: `UnknownIngestKey` for open and admit;
/// 6. permissions: a credential without admit/reveal/unwrap opens 0 and
///    admits 0 of everything it is given; without custodian it creates and
///    destroys no ingest key.
pub async fn run_ingest(ks: Arc<dyn KeyService>, backend: &dyn Backend, environment: &str) {
    use panseal::{
        AdmitItem, AdmitItemError, AdmitRequest, IngestOpenRequest, IngestSealed, IngestSealer,
        MAX_ADMIT_BATCH,
    };
    let tag = hex::encode(rand::random::<[u8; 4]>());
    let scope = Scope::new(&format!("ing.m:{tag}")).unwrap();
    let other = Scope::new(&format!("ing-other-{tag}")).unwrap();
    let env = Environment::new(environment).unwrap();
    let pans = pans();
    let a = access();

    if let Some(why) = backend.ingest_unsupported() {
        step(backend, "ingest: every call Unsupported (documented)");
        ingest_unsupported(&*ks, &scope, &env, why).await;
        return;
    }

    step(backend, "ingest keys: create, list, retire");
    assert_eq!(ks.ingest_keys(&scope).await.unwrap(), vec![]);
    let v1 = ks.create_ingest_key(&scope).await.unwrap();
    assert_eq!(v1.public_key.version(), 1);
    assert_eq!(v1.state, KeyState::Active);
    assert_eq!(v1.public_key.scope(), &scope);
    assert_eq!(v1.public_key.environment(), &env);
    let s1 = IngestSealer::from_info(&v1).unwrap();
    let sealed1: Vec<IngestSealed> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| s1.seal(p, &ctx(&format!("i{i}"))).unwrap())
        .collect();
    let v2 = ks.create_ingest_key(&scope).await.unwrap();
    assert_eq!(v2.public_key.version(), 2);
    assert_ne!(v2.public_key.as_bytes(), v1.public_key.as_bytes());
    let listed = ks.ingest_keys(&scope).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|k| (k.public_key.version(), k.state))
            .collect::<Vec<_>>(),
        vec![(2, KeyState::Active), (1, KeyState::DecryptOnly)],
        "newest first; v1 retired"
    );
    assert_eq!(
        listed[1].public_key, v1.public_key,
        "the public key is stable"
    );
    assert!(
        IngestSealer::from_info(&listed[1]).is_err(),
        "a retired ingest key never seals"
    );
    let s2 = IngestSealer::from_info(&listed[0]).unwrap();
    let sealed2: Vec<IngestSealed> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| s2.seal(p, &ctx(&format!("j{i}"))).unwrap())
        .collect();

    step(
        backend,
        "open_ingest: active and retired keys open; bad input refused",
    );
    let open = |sealed: IngestSealed, c: Context, sc: Scope| {
        let ks = Arc::clone(&ks);
        let a = a.clone();
        async move {
            ks.open_ingest(
                &IngestOpenRequest {
                    scope: &sc,
                    sealed: &sealed,
                    context: &c,
                },
                &a,
            )
            .await
        }
    };
    for (i, (s, p)) in sealed1.iter().zip(&pans).enumerate() {
        let o = open(*s, ctx(&format!("i{i}")), scope.clone())
            .await
            .unwrap();
        assert_eq!(&o.pan, p, "retired v1 still opens");
        assert!(o.needs_reseal);
    }
    for (i, (s, p)) in sealed2.iter().zip(&pans).enumerate() {
        let o = open(*s, ctx(&format!("j{i}")), scope.clone())
            .await
            .unwrap();
        assert_eq!(&o.pan, p);
    }
    let mut altered = 0;
    for at in [2usize, 12, 80, 90, 100] {
        let mut b = sealed2[0].as_bytes().to_vec();
        b[at] ^= 0x01;
        let bad = IngestSealed::from_bytes(&b).unwrap();
        match open(bad, ctx("j0"), scope.clone()).await {
            Err(KeyServiceError::OpenFailed) => altered += 1,
            other => panic!("altered byte {at}: {other:?}"),
        }
    }
    assert_eq!(altered, 5, "every altered ciphertext refused");
    assert!(matches!(
        open(sealed2[0], ctx("j1"), scope.clone()).await,
        Err(KeyServiceError::OpenFailed)
    ));
    // Another scope (its own key v1): refused, opaque.
    ks.create_ingest_key(&other).await.unwrap();
    assert!(matches!(
        open(sealed1[0], ctx("i0"), other.clone()).await,
        Err(KeyServiceError::OpenFailed)
    ));
    assert!(IngestSealed::from_bytes(&sealed1[0].as_bytes()[..100]).is_err());
    assert!(IngestSealed::from_text(&sealed1[0].to_text()[..133]).is_err());

    step(backend, "admit: batches, per-item errors, blind index");
    let index_version = ks.create_index_key(&scope).await.unwrap().version;
    let record = admission_record(Arc::clone(&ks), environment, &scope).await;
    let other_sealer = IngestSealer::from_info(&ks.ingest_keys(&other).await.unwrap()[0]).unwrap();
    let foreign = other_sealer.seal(&pans[0], &ctx("f")).unwrap();
    let mut flipped = sealed2[1].as_bytes().to_vec();
    flipped[95] ^= 0x80;
    let flipped = IngestSealed::from_bytes(&flipped).unwrap();
    let contexts: Vec<Context> = (0..pans.len()).map(|i| ctx(&format!("i{i}"))).collect();
    let jctx: Vec<Context> = (0..pans.len()).map(|i| ctx(&format!("j{i}"))).collect();
    let (c_f, c_wrong) = (ctx("f"), ctx("wrong"));
    let items: Vec<AdmitItem<'_>> = vec![
        AdmitItem {
            sealed: &sealed1[0],
            context: &contexts[0],
        },
        AdmitItem {
            sealed: &flipped,
            context: &jctx[1],
        },
        AdmitItem {
            sealed: &sealed2[2],
            context: &jctx[2],
        },
        AdmitItem {
            sealed: &foreign,
            context: &c_f,
        },
        AdmitItem {
            sealed: &sealed2[3],
            context: &c_wrong,
        },
        AdmitItem {
            sealed: &sealed2[4],
            context: &jctx[4],
        },
    ];
    let out = ks
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[index_version],
                items: &items,
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 6);
    assert!(
        matches!(out[1], Err(AdmitItemError::OpenFailed)),
        "{:?}",
        out[1]
    );
    assert!(
        matches!(out[3], Err(AdmitItemError::KeyMismatch)),
        "{:?}",
        out[3]
    );
    assert!(
        matches!(out[4], Err(AdmitItemError::OpenFailed)),
        "{:?}",
        out[4]
    );
    let dek = ks
        .unwrap(&record.key_request(), &record.wrapped, &a)
        .await
        .unwrap();
    let mut admitted = 0;
    for (i, pan_i, c) in [
        (0usize, 0usize, &contexts[0]),
        (2, 2, &jctx[2]),
        (5, 4, &jctx[4]),
    ] {
        let o = out[i].as_ref().unwrap();
        assert_eq!(o.sealed.key_id(), record.id);
        let opened = panseal::hazmat::open_with_dek(&dek, &o.sealed, c).unwrap();
        assert_eq!(opened, pans[pan_i]);
        assert!(
            panseal::hazmat::open_with_dek(&dek, &o.sealed, &c_wrong).is_err(),
            "bound to its context"
        );
        assert_eq!(
            o.index,
            vec![one(&*ks, &scope, index_version, &pans[pan_i]).await]
        );
        admitted += 1;
    }
    assert_eq!(admitted, 3, "3 of 6 admitted, 3 reported per item");
    let many: Vec<AdmitItem<'_>> = (0..=MAX_ADMIT_BATCH)
        .map(|_| AdmitItem {
            sealed: &sealed2[0],
            context: &jctx[0],
        })
        .collect();
    // A service refuses a request over MAX_ADMIT_BATCH; a client that
    // splits it (keyd's) answers every item, never a partial batch.
    match ks
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[index_version],
                items: &many,
            },
            &a,
        )
        .await
    {
        Err(_) => {}
        Ok(out) => assert_eq!(
            out.len(),
            MAX_ADMIT_BATCH + 1,
            "an oversized batch is refused or split, never cut"
        ),
    }

    step(backend, "destroyed ingest key: UnknownIngestKey");
    ks.set_ingest_key_state(&scope, 1, KeyState::Destroyed)
        .await
        .unwrap();
    assert_eq!(
        ks.ingest_keys(&scope)
            .await
            .unwrap()
            .iter()
            .map(|k| k.public_key.version())
            .collect::<Vec<_>>(),
        vec![2]
    );
    match open(sealed1[0], ctx("i0"), scope.clone()).await {
        Err(KeyServiceError::UnknownIngestKey { version: 1, .. }) => {}
        other => panic!("destroyed v1: {other:?}"),
    }
    let out = ks
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[index_version],
                items: &[AdmitItem {
                    sealed: &sealed1[1],
                    context: &contexts[1],
                }],
            },
            &a,
        )
        .await
        .unwrap();
    assert_eq!(out, vec![Err(AdmitItemError::UnknownIngestKey(1))]);
    assert!(ks
        .set_ingest_key_state(&scope, 1, KeyState::Active)
        .await
        .is_err());

    step(backend, "ingest permissions");
    let none = Permissions {
        wrap: true,
        unwrap: false,
        index: true,
        reveal: false,
        rewrap: false,
        admit: false,
        custodian: false,
    };
    let Some(front) = backend.restricted(none).await else {
        step(
            backend,
            "ingest permissions: not applicable (no restricted credential)",
        );
        return;
    };
    // A front end may list public keys...
    assert_eq!(front.ingest_keys(&scope).await.unwrap().len(), 1);
    // ...and nothing else: it opens 0 and admits 0.
    let mut opened = 0;
    let mut admitted = 0;
    for (i, s) in sealed2.iter().enumerate() {
        let r = front
            .open_ingest(
                &IngestOpenRequest {
                    scope: &scope,
                    sealed: s,
                    context: &jctx[i],
                },
                &a,
            )
            .await;
        match r {
            Ok(_) => opened += 1,
            Err(KeyServiceError::PermissionDenied(_)) => {}
            Err(e) => panic!("open_ingest with a wrap-only credential: {e:?}"),
        }
        let r = front
            .admit(
                &AdmitRequest {
                    record: &record,
                    index_versions: &[index_version],
                    items: &[AdmitItem {
                        sealed: s,
                        context: &jctx[i],
                    }],
                },
                &a,
            )
            .await;
        match r {
            Ok(v) => admitted += v.iter().filter(|r| r.is_ok()).count(),
            Err(KeyServiceError::PermissionDenied(_)) => {}
            Err(e) => panic!("admit with a wrap-only credential: {e:?}"),
        }
    }
    assert_eq!(
        (opened, admitted),
        (0, 0),
        "a front end opens 0 and admits 0"
    );
    assert!(matches!(
        front.create_ingest_key(&scope).await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    assert!(matches!(
        front
            .set_ingest_key_state(&scope, 2, KeyState::Destroyed)
            .await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    // An admission credential admits but does not open.
    let admitter = backend
        .restricted(Permissions {
            wrap: true,
            admit: true,
            index: false,
            ..none
        })
        .await
        .unwrap();
    let out = admitter
        .admit(
            &AdmitRequest {
                record: &record,
                index_versions: &[index_version],
                items: &[AdmitItem {
                    sealed: &sealed2[0],
                    context: &jctx[0],
                }],
            },
            &a,
        )
        .await
        .unwrap();
    assert!(out[0].is_ok());
    assert!(matches!(
        admitter
            .open_ingest(
                &IngestOpenRequest {
                    scope: &scope,
                    sealed: &sealed2[0],
                    context: &jctx[0],
                },
                &a,
            )
            .await,
        Err(KeyServiceError::PermissionDenied(_))
    ));
    step(backend, "ingest checks passed");
}

/// A signed, active data-DEK record of `scope` whose key was made by
/// `generate_wrapped` (the plaintext never left the service).
pub async fn admission_record(
    ks: Arc<dyn KeyService>,
    environment: &str,
    scope: &Scope,
) -> WrappedDek {
    let mut r = fresh_record(Arc::clone(&ks), environment).await;
    r.scope = scope.clone();
    r.wrapped = ks.generate_wrapped(&r.key_request()).await.unwrap();
    sign(&*ks, None, &r).await.unwrap()
}

/// A backend without write-only ingest refuses every ingest call with
/// `Unsupported` naming `why`, never retryable, and creates nothing.
async fn ingest_unsupported(ks: &dyn KeyService, scope: &Scope, env: &Environment, why: &str) {
    use panseal::{IngestOpenRequest, IngestSealer};
    let check = |what: &str, e: KeyServiceError| {
        assert!(!e.is_retryable(), "{what}: {e:?} must not be retryable");
        match e {
            KeyServiceError::Unsupported(text) => {
                assert!(text.contains(why), "{what}: {text:?} does not name {why:?}")
            }
            other => panic!("{what}: expected Unsupported, got {other:?}"),
        }
    };
    check("ingest_keys", ks.ingest_keys(scope).await.unwrap_err());
    check(
        "create_ingest_key",
        ks.create_ingest_key(scope).await.unwrap_err(),
    );
    check(
        "set_ingest_key_state",
        ks.set_ingest_key_state(scope, 1, KeyState::DecryptOnly)
            .await
            .unwrap_err(),
    );
    // A well-formed ingest ciphertext under a key the service never had.
    let key = panseal::hazmat::IngestPrivateKey::generate(env, scope, 1);
    let context = ctx("u0");
    let sealed = IngestSealer::new(key.public_key().clone())
        .seal(&pans()[0], &context)
        .unwrap();
    let request = IngestOpenRequest {
        scope,
        sealed: &sealed,
        context: &context,
    };
    check(
        "open_ingest",
        ks.open_ingest(&request, &access()).await.unwrap_err(),
    );
}

/// The custodian cycle on `scope` (the checks of the former second
/// suite): rotation through [`Backend::rotate_kek`], destruction through
/// [`Backend::destroy_kek`] (the version destroyed is the one active when
/// the step starts, never the newest), `other_environment` a tag the
/// service must refuse, `other_scope` a scope it may use.
pub async fn custodian_cycle(
    ks: &dyn KeyService,
    backend: &dyn Backend,
    environment: &str,
    other_environment: &str,
    scope: &str,
    other_scope: &str,
) {
    use panseal::DEK_STRENGTH_BITS;
    let environment_tag = Environment::new(environment).unwrap();
    let other_environment = Environment::new(other_environment).unwrap();
    let scope_tag = Scope::new(scope).unwrap();
    let other_scope = Scope::new(other_scope).unwrap();
    let request = |purpose| KeyRequest {
        id: KeyId::random(),
        scope: scope_tag.clone(),
        environment: environment_tag.clone(),
        purpose,
    };
    // KEK facts.
    let info = ks.kek_info().await.expect("kek_info");
    assert!(info.strength_bits >= DEK_STRENGTH_BITS, "{info:?}");
    assert_eq!(info.environment, environment_tag.as_str());

    // Round trips: wrap of a client key and service-generated keys, for
    // data and index purposes.
    let r = request(KeyPurpose::Data);
    let dek = Dek::generate();
    let w = ks.wrap(&r, &dek).await.expect("wrap");
    cc_unwrap_ok(ks, &r, &w, &dek).await;
    // Index keys: a service that keeps them inside (issue 10) refuses to
    // generate one for a caller; others round-trip it.
    let ri = request(KeyPurpose::Index);
    let index_key = match ks.generate(&ri).await {
        Ok((idx, wi)) => {
            cc_unwrap_ok(ks, &ri, &wi, &idx).await;
            Some((idx, wi))
        }
        Err(KeyServiceError::PermissionDenied(_)) => None,
        Err(e) => panic!("generate index key: {e}"),
    };
    let (dek2, w2) = ks.generate(&request(KeyPurpose::Data)).await.unwrap();
    assert_ne!(
        dek_bytes(&dek2),
        dek_bytes(&dek),
        "generate must draw fresh keys"
    );
    drop(w2);

    // The wrap is bound to id, scope, environment and purpose.
    let mut moved = r.clone();
    moved.id = KeyId::random();
    assert_eq!(
        cc_unwrap_err(ks, &moved, &w).await,
        KeyServiceError::UnwrapFailed
    );
    let mut moved = r.clone();
    moved.scope = other_scope.clone();
    assert_eq!(
        cc_unwrap_err(ks, &moved, &w).await,
        KeyServiceError::UnwrapFailed
    );
    let mut moved = r.clone();
    moved.purpose = KeyPurpose::Index;
    let e = cc_unwrap_err(ks, &moved, &w).await;
    // keyd refuses any index-purpose unwrap before looking at the wrap.
    assert!(
        matches!(
            e,
            KeyServiceError::UnwrapFailed | KeyServiceError::PermissionDenied(_)
        ),
        "{e:?}"
    );
    let mut other_env = r.clone();
    other_env.environment = other_environment.clone();
    let e = cc_unwrap_err(ks, &other_env, &w).await;
    assert!(
        matches!(e, KeyServiceError::Environment { .. }),
        "wrong environment: {e:?}"
    );
    assert!(!e.is_retryable());
    let e = ks.wrap(&other_env, &dek).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Environment { .. }), "{e:?}");

    // Altered bytes: opaque failure.
    for i in [0usize, 20, w.bytes.len() - 1] {
        let mut bad = w.clone();
        bad.bytes[i] ^= 1;
        assert_eq!(
            cc_unwrap_err(ks, &r, &bad).await,
            KeyServiceError::UnwrapFailed
        );
    }
    let mut short = w.clone();
    short.bytes.truncate(30);
    assert_eq!(
        cc_unwrap_err(ks, &r, &short).await,
        KeyServiceError::UnwrapFailed
    );

    // Rotation: new wraps use the new version, old wraps keep unwrapping,
    // a wrap relabelled to another version fails.
    let v_old = w.kek.version;
    let v_new = backend.rotate_kek(ks, &scope_tag).await;
    assert!(v_new > v_old);
    let r3 = request(KeyPurpose::Data);
    let dek3 = Dek::generate();
    let w3 = ks.wrap(&r3, &dek3).await.unwrap();
    assert_eq!(w3.kek.version, v_new);
    cc_unwrap_ok(ks, &r, &w, &dek).await;
    let mut rolled = w3.clone();
    rolled.kek.version = v_old;
    assert_eq!(
        cc_unwrap_err(ks, &r3, &rolled).await,
        KeyServiceError::UnwrapFailed
    );
    let mut unknown = w.clone();
    unknown.kek.version = v_new + 100;
    let e = cc_unwrap_err(ks, &r, &unknown).await;
    assert!(
        matches!(
            e,
            KeyServiceError::UnknownKek(_) | KeyServiceError::UnwrapFailed
        ),
        "{e:?}"
    );

    // Rewrap moves to the newest version and keeps the key.
    let rw = ks.rewrap(&r, &w).await.expect("rewrap");
    assert_eq!(rw.kek.version, v_new);
    assert_ne!(rw.bytes, w.bytes);
    cc_unwrap_ok(ks, &r, &rw, &dek).await;
    if let Some((idx, wi)) = &index_key {
        let rwi = ks.rewrap(&ri, wi).await.unwrap();
        cc_unwrap_ok(ks, &ri, &rwi, idx).await;
    }

    // Destroying the old version: what was rewrapped still opens, what was
    // not is refused with a clear, non-retryable error.
    backend.destroy_kek(v_old).await;
    cc_unwrap_ok(ks, &r, &rw, &dek).await;
    let e = cc_unwrap_err(ks, &r, &w).await;
    assert!(matches!(e, KeyServiceError::KekDestroyed(_)), "{e:?}");
    assert!(!e.is_retryable());
    let e = ks.rewrap(&r, &w).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::KekDestroyed(_)), "{e:?}");

    // Another scope is untouched.
    let ro = KeyRequest {
        scope: other_scope.clone(),
        ..request(KeyPurpose::Data)
    };
    let dek_o = Dek::generate();
    let wo = ks.wrap(&ro, &dek_o).await.unwrap();
    cc_unwrap_ok(ks, &ro, &wo, &dek_o).await;
}

async fn cc_unwrap_ok(ks: &dyn KeyService, r: &KeyRequest, w: &WrappedKey, expected: &Dek) {
    let got = ks
        .unwrap(r, w, &access())
        .await
        .unwrap_or_else(|e| panic!("unwrap of {:?} failed: {e}", r.id));
    assert_eq!(dek_bytes(&got), dek_bytes(expected));
}

async fn cc_unwrap_err(ks: &dyn KeyService, r: &KeyRequest, w: &WrappedKey) -> KeyServiceError {
    match ks.unwrap(r, w, &access()).await {
        Ok(_) => panic!("unwrap of {:?} should have failed", r.id),
        Err(e) => e,
    }
}
