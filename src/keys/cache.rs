//! The in-memory cache of unwrapped keys: bounded, with a TTL, wiped on
//! eviction (the AES key schedule and GHASH key are zeroized when the cipher
//! drops: `aes`/`ghash` built with their `zeroize` features). Memory only; no
//! configuration can name a disk cache (PCI DSS 3.6.1.3–4).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aes_gcm::Aes256Gcm;
use secrecy::SecretBox;

use super::{KeyId, KeyPurpose, KeyState, Scope};

/// An unwrapped key, ready to use.
pub(crate) struct CachedDek {
    pub(crate) id: KeyId,
    pub(crate) purpose: KeyPurpose,
    pub(crate) scope: Scope,
    /// AES-GCM with the expanded key (data keys).
    pub(crate) cipher: Option<Aes256Gcm>,
    /// Raw key (index keys: HMAC keys are built per call so no HMAC state
    /// that cannot be wiped outlives the call).
    pub(crate) raw: Option<SecretBox<[u8; 32]>>,
    state: AtomicU8,
    pub(crate) encrypt_until: u64,
    pub(crate) decrypt_until: u64,
    loaded_at: SystemTime,
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
        let (cipher, raw) = match purpose {
            KeyPurpose::Data => (Some(dek.cipher()), None),
            KeyPurpose::Index => (None, Some(SecretBox::new(Box::new(*dek.expose_secret())))),
        };
        CachedDek {
            id,
            purpose,
            scope: scope.clone(),
            cipher,
            raw,
            state: AtomicU8::new(state as u8),
            encrypt_until,
            decrypt_until,
            loaded_at: SystemTime::now(),
        }
    }

    pub(crate) fn state(&self) -> KeyState {
        KeyState::from_u8(self.state.load(Ordering::Relaxed)).unwrap_or(KeyState::Destroyed)
    }

    pub(crate) fn set_state(&self, s: KeyState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    fn fresh(&self, now: SystemTime, ttl: Duration) -> bool {
        match now.duration_since(self.loaded_at) {
            Ok(age) => age < ttl,
            // The clock went backwards: treat as stale.
            Err(_) => false,
        }
    }
}

/// Hasher for random 8-byte key ids: the id already is a uniform hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

type Map = HashMap<KeyId, Arc<CachedDek>, BuildHasherDefault<IdHasher>>;

/// Bounded TTL cache of unwrapped keys.
pub(crate) struct DekCache {
    map: RwLock<Map>,
    capacity: usize,
    ttl: Duration,
}

impl DekCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        DekCache {
            map: RwLock::new(Map::default()),
            capacity,
            ttl,
        }
    }

    /// Runs `f` on a fresh cached key without cloning it out of the map.
    pub(crate) fn with<R>(
        &self,
        id: KeyId,
        now: SystemTime,
        f: impl FnOnce(&CachedDek) -> R,
    ) -> Option<R> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&id)?;
        if !entry.fresh(now, self.ttl) {
            return None;
        }
        Some(f(entry))
    }

    /// A fresh cached key.
    pub(crate) fn get(&self, id: KeyId) -> Option<Arc<CachedDek>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&id)?;
        entry
            .fresh(SystemTime::now(), self.ttl)
            .then(|| Arc::clone(entry))
    }

    /// Inserts, evicting stale entries first and then the oldest ones.
    pub(crate) fn insert(&self, entry: Arc<CachedDek>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&entry.id) {
            let now = SystemTime::now();
            map.retain(|_, e| e.fresh(now, self.ttl));
            while map.len() >= self.capacity {
                let Some(oldest) = map.values().min_by_key(|e| e.loaded_at).map(|e| e.id) else {
                    break;
                };
                map.remove(&oldest);
            }
        }
        map.insert(entry.id, entry);
    }

    /// Drops one key from the cache.
    pub(crate) fn remove(&self, id: KeyId) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
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
    fn ttl_expires() {
        let c = DekCache::new(3, Duration::from_millis(20));
        c.insert(entry(1));
        assert!(c.get(KeyId::from_bytes([1; 8])).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get(KeyId::from_bytes([1; 8])).is_none());
    }
}
