//! Blind index: keyed hashes of PANs for equality lookup (PCI DSS 3.5.1.1).
//!
//! `index = HMAC-SHA-256(index_key, ASCII digits of the whole PAN)`, under a
//! per-scope 256-bit index key that is wrapped and stored like a DEK,
//! versioned and rotatable. There is no unkeyed hash: without the index key
//! (which never appears in the database unwrapped) a stolen index cannot be
//! brute-forced from BIN and last four.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::keys::{CachedDek, Environment, KeyId, Scope};
use crate::pan::Pan;

/// A blind-index value: the index key's id and version and the 32-byte
/// HMAC. Store it beside the sealed PAN and look up by equality.
#[derive(Clone, Copy, Eq, Serialize)]
pub struct BlindIndex {
    key_id: KeyId,
    version: u32,
    #[serde(serialize_with = "ser_hex")]
    value: [u8; 32],
}

fn ser_hex<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

impl BlindIndex {
    /// The index key that produced it.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The index key's version (1, 2, … per scope).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The 32-byte HMAC.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.value
    }

    /// The HMAC as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.value)
    }
}

impl PartialEq for BlindIndex {
    /// Constant-time comparison of the value.
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.key_id == other.key_id
            && self.version == other.version
            && bool::from(self.value.ct_eq(&other.value))
    }
}

impl std::hash::Hash for BlindIndex {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_id.hash(state);
        self.version.hash(state);
        self.value.hash(state);
    }
}

impl fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlindIndex(v{} {})", self.version, self.to_hex())
    }
}

/// Computes the index of `pan` under an unwrapped index key.
pub(crate) fn compute(key: &CachedDek, version: u32, pan: &Pan) -> Option<BlindIndex> {
    use secrecy::ExposeSecret;
    let raw = key.raw.as_ref()?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(raw.expose_secret()).ok()?;
    mac.update(pan.expose_digits().as_bytes());
    let value: [u8; 32] = mac.finalize().into_bytes().into();
    Some(BlindIndex {
        key_id: key.id,
        version,
        value,
    })
}

/// The id of index key `version` in a scope: the first 8 bytes of
/// SHA-256("panseal-index-key-id-v1" | environment | 0x00 | scope | 0x00 |
/// version). Deterministic, so two instances that create the same version at
/// once collide on insert instead of making two keys.
pub(crate) fn index_key_id(environment: &Environment, scope: &Scope, version: u32) -> KeyId {
    let mut h = Sha256::new();
    h.update(b"panseal-index-key-id-v1");
    h.update(environment.as_str().as_bytes());
    h.update([0]);
    h.update(scope.as_str().as_bytes());
    h.update([0]);
    h.update(version.to_be_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    KeyId::from_bytes(id)
}
