//! The KeyService conformance suite: the behaviour every backend must show,
//! run against `LocalKeyService` (tests/conformance.rs) and against a real
//! `panseal-keyd` process (tests/keyd.rs). Later backends (PKCS#11, KMS)
//! plug in the same way: provide a [`Target`] and call [`run`].
#![allow(dead_code)]

use async_trait::async_trait;
use panseal::hazmat::dek_bytes;
use panseal::{
    Access, Dek, Environment, KeyId, KeyPurpose, KeyRequest, KeyService, KeyServiceError, Scope,
    WrappedKey, DEK_STRENGTH_BITS,
};

/// KEK administration the trait does not cover (each backend has its own
/// custodian path).
#[async_trait]
pub trait KekAdmin: Send + Sync {
    /// Rotates the KEK serving `scope`; returns the new version.
    async fn rotate(&self, scope: &Scope) -> u32;
    /// Destroys one KEK version of `scope` (with whatever approvals the
    /// backend demands).
    async fn destroy(&self, scope: &Scope, version: u32);
}

/// What the suite runs against.
pub struct Target<'a> {
    /// The service under test, with wrap, unwrap, index and rewrap rights.
    pub ks: &'a dyn KeyService,
    /// Custodian operations.
    pub admin: &'a dyn KekAdmin,
    /// The environment `ks` serves.
    pub environment: Environment,
    /// Another environment tag (must be refused).
    pub other_environment: Environment,
    /// A scope `ks` may use. The suite rotates and destroys its KEKs, so
    /// give each run a fresh one.
    pub scope: Scope,
    /// Another scope `ks` may use.
    pub other_scope: Scope,
}

fn request(t: &Target<'_>, purpose: KeyPurpose) -> KeyRequest {
    KeyRequest {
        id: KeyId::random(),
        scope: t.scope.clone(),
        environment: t.environment.clone(),
        purpose,
    }
}

fn access() -> Access {
    Access::new("conformance", "test").unwrap()
}

async fn unwrap_ok(t: &Target<'_>, r: &KeyRequest, w: &WrappedKey, expected: &Dek) {
    let got =
        t.ks.unwrap(r, w, &access())
            .await
            .unwrap_or_else(|e| panic!("unwrap of {:?} failed: {e}", r.id));
    assert_eq!(dek_bytes(&got), dek_bytes(expected));
}

async fn unwrap_err(t: &Target<'_>, r: &KeyRequest, w: &WrappedKey) -> KeyServiceError {
    match t.ks.unwrap(r, w, &access()).await {
        Ok(_) => panic!("unwrap of {:?} should have failed", r.id),
        Err(e) => e,
    }
}

/// Runs every check; panics naming the first that fails.
pub async fn run(t: &Target<'_>) {
    // KEK facts.
    let info = t.ks.kek_info().await.expect("kek_info");
    assert!(info.strength_bits >= DEK_STRENGTH_BITS, "{info:?}");
    assert_eq!(info.environment, t.environment.as_str());

    // Round trips: wrap of a client key and service-generated keys, for
    // data and index purposes.
    let r = request(t, KeyPurpose::Data);
    let dek = Dek::generate();
    let w = t.ks.wrap(&r, &dek).await.expect("wrap");
    unwrap_ok(t, &r, &w, &dek).await;
    // Index keys: a service that keeps them inside (keyd, issue 10)
    // refuses to generate one for a caller; others round-trip it.
    let ri = request(t, KeyPurpose::Index);
    let index_key = match t.ks.generate(&ri).await {
        Ok((idx, wi)) => {
            unwrap_ok(t, &ri, &wi, &idx).await;
            Some((idx, wi))
        }
        Err(KeyServiceError::PermissionDenied(_)) => None,
        Err(e) => panic!("generate index key: {e}"),
    };
    let (dek2, w2) = t.ks.generate(&request(t, KeyPurpose::Data)).await.unwrap();
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
        unwrap_err(t, &moved, &w).await,
        KeyServiceError::UnwrapFailed
    );
    let mut moved = r.clone();
    moved.scope = t.other_scope.clone();
    assert_eq!(
        unwrap_err(t, &moved, &w).await,
        KeyServiceError::UnwrapFailed
    );
    let mut moved = r.clone();
    moved.purpose = KeyPurpose::Index;
    let e = unwrap_err(t, &moved, &w).await;
    // keyd refuses any index-purpose unwrap before looking at the wrap.
    assert!(
        matches!(
            e,
            KeyServiceError::UnwrapFailed | KeyServiceError::PermissionDenied(_)
        ),
        "{e:?}"
    );
    let mut other_env = r.clone();
    other_env.environment = t.other_environment.clone();
    let e = unwrap_err(t, &other_env, &w).await;
    assert!(
        matches!(e, KeyServiceError::Environment { .. }),
        "wrong environment: {e:?}"
    );
    assert!(!e.is_retryable());
    let e = t.ks.wrap(&other_env, &dek).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::Environment { .. }), "{e:?}");

    // Altered bytes: opaque failure.
    for i in [0usize, 20, 59] {
        let mut bad = w.clone();
        bad.bytes[i] ^= 1;
        assert_eq!(unwrap_err(t, &r, &bad).await, KeyServiceError::UnwrapFailed);
    }
    let mut short = w.clone();
    short.bytes.truncate(30);
    assert_eq!(
        unwrap_err(t, &r, &short).await,
        KeyServiceError::UnwrapFailed
    );

    // Rotation: new wraps use the new version, old wraps keep unwrapping,
    // a wrap relabelled to another version fails.
    let v_old = w.kek.version;
    let v_new = t.admin.rotate(&t.scope).await;
    assert!(v_new > v_old);
    let r3 = request(t, KeyPurpose::Data);
    let dek3 = Dek::generate();
    let w3 = t.ks.wrap(&r3, &dek3).await.unwrap();
    assert_eq!(w3.kek.version, v_new);
    unwrap_ok(t, &r, &w, &dek).await;
    let mut rolled = w3.clone();
    rolled.kek.version = v_old;
    assert_eq!(
        unwrap_err(t, &r3, &rolled).await,
        KeyServiceError::UnwrapFailed
    );
    let mut unknown = w.clone();
    unknown.kek.version = v_new + 100;
    let e = unwrap_err(t, &r, &unknown).await;
    assert!(
        matches!(
            e,
            KeyServiceError::UnknownKek(_) | KeyServiceError::UnwrapFailed
        ),
        "{e:?}"
    );

    // Rewrap moves to the newest version and keeps the key.
    let rw = t.ks.rewrap(&r, &w).await.expect("rewrap");
    assert_eq!(rw.kek.version, v_new);
    assert_ne!(rw.bytes, w.bytes);
    unwrap_ok(t, &r, &rw, &dek).await;
    if let Some((idx, wi)) = &index_key {
        let rwi = t.ks.rewrap(&ri, wi).await.unwrap();
        unwrap_ok(t, &ri, &rwi, idx).await;
    }

    // Destroying the old version: what was rewrapped still opens, what was
    // not is refused with a clear, non-retryable error.
    t.admin.destroy(&t.scope, v_old).await;
    unwrap_ok(t, &r, &rw, &dek).await;
    let e = unwrap_err(t, &r, &w).await;
    assert!(matches!(e, KeyServiceError::KekDestroyed(_)), "{e:?}");
    assert!(!e.is_retryable());
    let e = t.ks.rewrap(&r, &w).await.unwrap_err();
    assert!(matches!(e, KeyServiceError::KekDestroyed(_)), "{e:?}");

    // Another scope is untouched.
    let ro = KeyRequest {
        scope: t.other_scope.clone(),
        ..request(t, KeyPurpose::Data)
    };
    let dek_o = Dek::generate();
    let wo = t.ks.wrap(&ro, &dek_o).await.unwrap();
    unwrap_ok(t, &ro, &wo, &dek_o).await;
}
