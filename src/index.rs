//! Blind index: keyed hashes of PANs for equality lookup (PCI DSS 3.5.1.1).
//!
//! `index = HMAC-SHA-256(index_key, ASCII digits of the whole PAN)`, under a
//! per-scope 256-bit index key that lives in the key service (keyd state,
//! an HSM object, a KMS key) and is used only there
//! ([`crate::KeyService::blind_index`]); versioned and rotatable. There is
//! no unkeyed hash, and no process outside the key service holds the key,
//! so neither a stolen index nor a front end's memory can be brute-forced
//! from BIN and last four.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::keys::{Environment, KeyId, Scope};

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
    pub(crate) fn new(key_id: KeyId, version: u32, value: [u8; 32]) -> Self {
        BlindIndex {
            key_id,
            version,
            value,
        }
    }

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

/// The id of index key `version` in a scope: the first 8 bytes of
/// SHA-256("panseal-index-key-id-v1" | environment | 0x00 | scope | 0x00 |
/// version). Deterministic, so two instances that create the same version at
/// once collide on insert instead of making two keys.
#[cfg_attr(
    not(any(feature = "postgres", feature = "hazmat-test-keys")),
    allow(dead_code)
)]
pub(crate) fn index_key_id(environment: &Environment, scope: &Scope, version: u32) -> KeyId {
    id_in_domain(b"panseal-index-key-id-v1", environment, scope, version)
}

/// The id of a key-service-held index key `version` in a scope (issue 10:
/// computed inside the key service): the first 8 bytes of
/// SHA-256("panseal-index-key-id-v2" | environment | 0x00 | scope | 0x00 |
/// version). A new domain string, so it never equals the id of a legacy
/// in-database index key ([`index_key_id`], `FORMAT.md` §11).
pub(crate) fn service_index_key_id(
    environment: &Environment,
    scope: &Scope,
    version: u32,
) -> KeyId {
    id_in_domain(b"panseal-index-key-id-v2", environment, scope, version)
}

fn id_in_domain(domain: &[u8], environment: &Environment, scope: &Scope, version: u32) -> KeyId {
    let mut h = Sha256::new();
    h.update(domain);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_never_equal_legacy_ids() {
        let env = Environment::new("test").unwrap();
        for scope in ["m", "merchant-42", "x"] {
            let scope = Scope::new(scope).unwrap();
            for v in 1..50 {
                assert_ne!(
                    service_index_key_id(&env, &scope, v),
                    index_key_id(&env, &scope, v)
                );
            }
        }
    }
}
