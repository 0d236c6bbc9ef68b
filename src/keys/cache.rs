//! The in-memory cache of unwrapped keys: bounded, with a TTL, wiped on
//! eviction (the AES key schedule and GHASH key are zeroized when the cipher
//! drops: `aes`/`ghash` built with their `zeroize` features). Memory only; no
//! configuration can name a disk cache (PCI DSS 3.6.1.3–4).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use aes_gcm::Aes256Gcm;

use super::{KeyId, KeyPurpose, KeyState, Scope};

/// How often expired keys are wiped: a quarter of the TTL, between 10 ms
/// and 60 s. An unwrapped key stays in memory at most `ttl +
/// sweep_interval(ttl)` after it was unwrapped.
pub(crate) fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(60))
}

/// An unwrapped key, ready to use.
pub(crate) struct CachedDek {
    pub(crate) id: KeyId,
    pub(crate) purpose: KeyPurpose,
    pub(crate) scope: Scope,
    /// AES-GCM with the expanded key (data keys).
    pub(crate) cipher: Option<Aes256Gcm>,
    /// The same key expanded for ring's AES-GCM (feature `fast-aead`; data
    /// keys), which seal and open use instead of `cipher`.
    #[cfg(feature = "fast-aead")]
    pub(crate) fast: Option<ring::aead::LessSafeKey>,
    state: AtomicU8,
    pub(crate) encrypt_until: u64,
    pub(crate) decrypt_until: u64,
    /// Unix nanoseconds (coarse clock) when unwrapped.
    loaded_at: u64,
    /// Unix nanoseconds after which the entry is stale (`loaded_at + ttl`).
    expires_at: AtomicU64,
}

impl CachedDek {
    pub(crate) fn new(
        id: KeyId,
        purpose: KeyPurpose,
        scope: &Scope,
        dek: &super::Dek,
        state: KeyState,
        encrypt_until: u64,
        decrypt_until: u64,
    ) -> Self {
        // Index keys are never held here (they stay in the key service).
        let cipher = match purpose {
            KeyPurpose::Data => Some(dek.cipher()),
            KeyPurpose::Index => None,
        };
        #[cfg(feature = "fast-aead")]
        let fast = match purpose {
            KeyPurpose::Data => crate::seal::fast::key(dek.expose_secret()),
            KeyPurpose::Index => None,
        };
        let loaded_at = crate::clock::unix_nanos();
        CachedDek {
            id,
            purpose,
            scope: scope.clone(),
            cipher,
            #[cfg(feature = "fast-aead")]
            fast,
            state: AtomicU8::new(state as u8),
            encrypt_until,
            decrypt_until,
            loaded_at,
            expires_at: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn state(&self) -> KeyState {
        KeyState::from_u8(self.state.load(Ordering::Relaxed)).unwrap_or(KeyState::Destroyed)
    }

    pub(crate) fn set_state(&self, s: KeyState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Fresh while younger than `ttl`; a clock that went backwards makes
    /// the entry stale.
    fn fresh(&self, now_unix_nanos: u64) -> bool {
        now_unix_nanos >= self.loaded_at && now_unix_nanos < self.expires_at.load(Ordering::Relaxed)
    }
}

/// Hasher for random 8-byte key ids: the id already is a uniform hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

type Map = HashMap<KeyId, Arc<CachedDek>, BuildHasherDefault<IdHasher>>;

/// Bounded TTL cache of unwrapped keys. Reads are lock-free (an atomically
/// swapped immutable map); writes, which happen only on a cache miss, copy
/// the map under a mutex.
///
/// Expired entries are removed by time, not only when the cache is full:
/// by [`DekCache::sweep`] (called every [`sweep_interval`] by the owner's
/// sweeper thread) and, as a fallback where that thread does not run, by
/// the owner's seal and open paths once a sweep is overdue
/// ([`DekCache::sweep_due`]; the owner also clears the cache in a forked
/// child). A removed key is
/// wiped when the last call still using it returns.
pub(crate) struct DekCache {
    map: ArcSwap<Map>,
    write: Mutex<()>,
    capacity: usize,
    ttl: Duration,
    /// Unix nanoseconds after which a sweep is overdue: two intervals after
    /// the last one (the sweeper thread sweeps before).
    next_sweep: AtomicU64,
    sweep_every: u64,
}

impl DekCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        let sweep_every = u64::try_from(sweep_interval(ttl).as_nanos()).unwrap_or(u64::MAX);
        DekCache {
            map: ArcSwap::from_pointee(Map::default()),
            write: Mutex::new(()),
            capacity,
            ttl,
            next_sweep: AtomicU64::new(
                crate::clock::unix_nanos().saturating_add(sweep_every.saturating_mul(2)),
            ),
            sweep_every,
        }
    }

    /// Removes every expired entry; returns how many were removed. Copies
    /// the map only if there is something to remove.
    pub(crate) fn sweep(&self, now_unix_nanos: u64) -> usize {
        self.next_sweep.store(
            now_unix_nanos.saturating_add(self.sweep_every.saturating_mul(2)),
            Ordering::Relaxed,
        );
        if self.map.load().values().all(|e| e.fresh(now_unix_nanos)) {
            return 0;
        }
        let mut removed = 0;
        self.update(|map| {
            let before = map.len();
            map.retain(|_, e| e.fresh(now_unix_nanos));
            removed = before - map.len();
        });
        removed
    }

    /// Whether a sweep is overdue (no sweep for two intervals: the owner's
    /// sweeper thread does not run in this process).
    #[inline]
    pub(crate) fn sweep_due(&self, now_unix_nanos: u64) -> bool {
        now_unix_nanos >= self.next_sweep.load(Ordering::Relaxed)
    }

    /// Runs `f` on a fresh cached key without cloning it out of the map.
    pub(crate) fn with<R>(
        &self,
        id: KeyId,
        now_unix_nanos: u64,
        f: impl FnOnce(&CachedDek) -> R,
    ) -> Option<R> {
        let map = self.map.load();
        let entry = map.get(&id)?;
        if !entry.fresh(now_unix_nanos) {
            return None;
        }
        Some(f(entry))
    }

    /// A fresh cached key.
    #[cfg(test)]
    pub(crate) fn get(&self, id: KeyId) -> Option<Arc<CachedDek>> {
        let map = self.map.load();
        let entry = map.get(&id)?;
        entry
            .fresh(crate::clock::unix_nanos())
            .then(|| Arc::clone(entry))
    }

    /// A cached key, fresh or not (for state updates).
    pub(crate) fn peek(&self, id: KeyId) -> Option<Arc<CachedDek>> {
        self.map.load().get(&id).cloned()
    }

    fn update(&self, change: impl FnOnce(&mut Map)) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Map::clone(&self.map.load());
        change(&mut next);
        self.map.store(Arc::new(next));
    }

    /// Inserts, evicting stale entries first and then the oldest ones.
    pub(crate) fn insert(&self, entry: Arc<CachedDek>) {
        let capacity = self.capacity;
        let ttl = self.ttl;
        self.update(|map| {
            if map.len() >= capacity && !map.contains_key(&entry.id) {
                let now = crate::clock::unix_nanos();
                map.retain(|_, e| e.fresh(now));
                while map.len() >= capacity {
                    let Some(oldest) = map.values().min_by_key(|e| e.loaded_at).map(|e| e.id)
                    else {
                        break;
                    };
                    map.remove(&oldest);
                }
            }
            let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
            entry
                .expires_at
                .store(entry.loaded_at.saturating_add(ttl), Ordering::Relaxed);
            map.insert(entry.id, entry);
        });
    }

    /// Drops every key (each is wiped once no call still uses it); returns
    /// how many were held.
    pub(crate) fn clear(&self) -> usize {
        let mut removed = 0;
        self.update(|map| {
            removed = map.len();
            map.clear();
        });
        removed
    }

    /// Drops one key from the cache (it is wiped once no call still uses it).
    pub(crate) fn remove(&self, id: KeyId) {
        self.update(|map| {
            map.remove(&id);
        });
    }

    /// The ids of the entries held, and how many of them are stale.
    #[cfg(feature = "hazmat-test-keys")]
    pub(crate) fn held(&self, now_unix_nanos: u64) -> (Vec<KeyId>, usize) {
        let map = self.map.load();
        let stale = map.values().filter(|e| !e.fresh(now_unix_nanos)).count();
        (map.keys().copied().collect(), stale)
    }

    /// Entries held, fresh or not.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.load().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Dek;

    fn entry(b: u8) -> Arc<CachedDek> {
        Arc::new(CachedDek::new(
            KeyId::from_bytes([b; 8]),
            KeyPurpose::Data,
            &Scope::new("s").unwrap(),
            &Dek::generate(),
            KeyState::Active,
            u64::MAX,
            u64::MAX,
        ))
    }

    #[test]
    fn bounded() {
        let c = DekCache::new(3, Duration::from_secs(60));
        for b in 0..10 {
            c.insert(entry(b));
            assert!(c.len() <= 3);
        }
        assert!(c.get(KeyId::from_bytes([9; 8])).is_some());
    }

    #[test]
    fn sweep_wipes_expired_entries_without_a_lookup() {
        let ttl = Duration::from_millis(20);
        let c = DekCache::new(100, ttl);
        let e = entry(1);
        let weak = Arc::downgrade(&e);
        c.insert(e);
        c.insert(entry(2));
        assert_eq!(c.sweep(crate::clock::unix_nanos()), 0);
        std::thread::sleep(ttl + Duration::from_millis(10));
        assert_eq!(c.sweep(crate::clock::unix_nanos()), 2);
        assert_eq!(c.len(), 0);
        // No copy left: the cipher (and its key schedule) was dropped and
        // wiped.
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn ttl_expires() {
        let c = DekCache::new(3, Duration::from_millis(20));
        c.insert(entry(1));
        assert!(c.get(KeyId::from_bytes([1; 8])).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get(KeyId::from_bytes([1; 8])).is_none());
    }
}
