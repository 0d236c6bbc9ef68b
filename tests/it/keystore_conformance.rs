//! The one KeyStore conformance suite: what every store must do. Run
//! against the memory and file stores (`keystore`) and PostgreSQL
//! (`postgres`).

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
    let f = crate::common::Fixture::new("test");
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

    // Every change is a compare-and-swap on the whole stored record. (The
    // store does not judge the change: the key service's signature does.)
    let a2 = successor(&a, |r| r.state = KeyState::DecryptOnly);
    store.update(&a, &a2).await.unwrap();
    assert_eq!(store.fetch(a.id).await.unwrap().as_ref(), Some(&a2));
    // The old record no longer matches: a lost race, nothing written.
    let a2_other = successor(&a, |r| r.uses += 1);
    assert!(matches!(
        store.update(&a, &a2_other).await,
        Err(KeyStoreError::Conflict)
    ));
    assert_eq!(store.fetch(a.id).await.unwrap().as_ref(), Some(&a2));
    let mut missing = a.clone();
    missing.id = KeyId::from_bytes([9; 8]);
    assert!(matches!(
        store.update(&missing, &successor(&missing, |_| {})).await,
        Err(KeyStoreError::NotFound(_))
    ));
    // An update may not move a record to another id.
    let mut moved = successor(&a2, |_| {});
    moved.id = b.id;
    assert!(store.update(&a2, &moved).await.is_err());
    assert_eq!(store.fetch(b.id).await.unwrap().as_ref(), Some(&b));

    // A rewrap: the wrapped key changes.
    let new = WrappedKey {
        kek: KekRef {
            id: a.wrapped.kek.id.clone(),
            version: a.wrapped.kek.version + 1,
        },
        bytes: vec![7; 60],
    };
    let a3 = successor(&a2, |r| r.wrapped = new.clone());
    store.update(&a2, &a3).await.unwrap();
    assert_eq!(store.fetch(a.id).await.unwrap().unwrap().wrapped, new);

    // Use counts from several successive swaps all land.
    let mut cur = b.clone();
    for n in [5, 2] {
        let next = successor(&cur, |r| r.uses += n);
        store.update(&cur, &next).await.unwrap();
        cur = next;
    }
    assert_eq!(store.fetch(b.id).await.unwrap().unwrap().uses, b.uses + 7);

    // Destroyed: the wrapped key is gone from the store.
    let d = successor(&a3, |r| {
        r.state = KeyState::Destroyed;
        r.wrapped.bytes.clear();
    });
    store.update(&a3, &d).await.unwrap();
    assert!(store
        .fetch(a.id)
        .await
        .unwrap()
        .unwrap()
        .wrapped
        .bytes
        .is_empty());
    assert!(matches!(
        store.update(&a3, &successor(&a3, |_| {})).await,
        Err(KeyStoreError::Conflict)
    ));
    // The other record is untouched by all of this.
    let b_now = store.fetch(b.id).await.unwrap().unwrap();
    assert_eq!(b_now.state, KeyState::Active);
    assert_eq!(b_now.wrapped, b.wrapped);
}

/// `r` changed by `f`, with the next sequence number.
pub fn successor(r: &WrappedDek, f: impl FnOnce(&mut WrappedDek)) -> WrappedDek {
    let mut next = r.clone();
    f(&mut next);
    next.sequence = r.sequence + 1;
    next
}
