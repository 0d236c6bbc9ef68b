//! The KeyStore conformance suite: what every store must do. Run against
//! the memory and file stores (tests/keystore.rs) and PostgreSQL
//! (tests/postgres.rs).

use panseal::{KekRef, KeyId, KeyState, KeyStore, KeyStoreError, Scope, WrappedDek, WrappedKey};

pub fn record(id: u64, scope: &str) -> WrappedDek {
    // WrappedDek is #[non_exhaustive]; build it through its encoding.
    let r = sample();
    let mut bytes = r.to_bytes();
    bytes[2..10].copy_from_slice(&id.to_be_bytes());
    let mut r = WrappedDek::from_bytes(&bytes).unwrap();
    r.scope = Scope::new(scope).unwrap();
    r
}

pub fn sample() -> WrappedDek {
    static SAMPLE: std::sync::OnceLock<WrappedDek> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(real_record).clone()
}

fn real_record() -> WrappedDek {
    // A record as the library writes it, taken from a real seal, on a thread
    // of its own (callers may be inside a runtime).
    std::thread::spawn(real_record_here).join().unwrap()
}

fn real_record_here() -> WrappedDek {
    let f = super::Fixture::new("test");
    let ps = f.blocking(panseal::Policy::default());
    ps.seal_pan(
        &panseal::Pan::parse("4111111111111111").unwrap(),
        &panseal::Context::new("t", "c", "r").unwrap(),
    )
    .unwrap();
    f.store_records().remove(0)
}

/// What every KeyStore must do.
pub async fn conformance(store: &dyn KeyStore, base: u64) {
    let a = record(base + 1, "merchant-a");
    let b = record(base + 2, "merchant-b");
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    assert!(matches!(
        store.insert(&a).await,
        Err(KeyStoreError::Duplicate(id)) if id == a.id
    ));
    assert_eq!(store.fetch(a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(store.fetch(KeyId::from_bytes([9; 8])).await.unwrap(), None);
    assert_eq!(store.list(None).await.unwrap().len(), 2);
    let only_a = store.list(Some(&a.scope)).await.unwrap();
    assert_eq!(only_a, vec![a.clone()]);

    // Lifecycle: forward only; the same state again is a no-op.
    let r = store.set_state(a.id, KeyState::DecryptOnly).await.unwrap();
    assert_eq!(r.state, KeyState::DecryptOnly);
    store.set_state(a.id, KeyState::DecryptOnly).await.unwrap();
    assert!(matches!(
        store.set_state(a.id, KeyState::Active).await,
        Err(KeyStoreError::Transition { .. })
    ));
    assert!(matches!(
        store
            .set_state(KeyId::from_bytes([9; 8]), KeyState::Destroyed)
            .await,
        Err(KeyStoreError::NotFound(_))
    ));

    // Rewrap is compare-and-set on the KEK reference.
    let new = WrappedKey {
        kek: KekRef {
            id: a.wrapped.kek.id.clone(),
            version: a.wrapped.kek.version + 1,
        },
        bytes: vec![7; 60],
    };
    store
        .replace_wrap(a.id, &a.wrapped.kek, &new)
        .await
        .unwrap();
    assert!(matches!(
        store.replace_wrap(a.id, &a.wrapped.kek, &new).await,
        Err(KeyStoreError::Conflict)
    ));
    assert_eq!(store.fetch(a.id).await.unwrap().unwrap().wrapped, new);

    store.add_uses(b.id, 5).await.unwrap();
    store.add_uses(b.id, 2).await.unwrap();
    assert_eq!(store.fetch(b.id).await.unwrap().unwrap().uses, b.uses + 7);

    // Destroy erases the wrapped key and is final.
    let d = store.set_state(a.id, KeyState::Destroyed).await.unwrap();
    assert!(d.wrapped.bytes.is_empty());
    assert!(store
        .fetch(a.id)
        .await
        .unwrap()
        .unwrap()
        .wrapped
        .bytes
        .is_empty());
    assert!(matches!(
        store.replace_wrap(a.id, &new.kek, &new).await,
        Err(KeyStoreError::Conflict)
    ));
    for s in [
        KeyState::Active,
        KeyState::DecryptOnly,
        KeyState::Compromised,
    ] {
        assert!(store.set_state(a.id, s).await.is_err());
    }
    // The other record is untouched.
    let b_now = store.fetch(b.id).await.unwrap().unwrap();
    assert_eq!(b_now.state, KeyState::Active);
    assert_eq!(b_now.wrapped, b.wrapped);
}
