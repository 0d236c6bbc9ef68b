//! Blind index: keyed hashes of PANs for equality lookup (PCI DSS 3.5.1.1).
//!
//! `index = HMAC-SHA-256(index_key, ASCII digits of the whole PAN)`, under a
//! per-scope 256-bit index key that is wrapped and stored like a DEK,
//! versioned and rotatable. There is no unkeyed hash: without the index key
//! (which never appears in the database unwrapped) a stolen index cannot be
//! brute-forced from BIN and last four.

use std::fmt;

use serde::Serialize;
use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

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
    let value = hmac_sha256_short(raw.expose_secret(), pan.expose_digits().as_bytes())?;
    Some(BlindIndex {
        key_id: key.id,
        version,
        value,
    })
}

/// SHA-256 initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// HMAC-SHA-256 (RFC 2104) of a message of at most 55 bytes (a PAN's
/// digits) under a 32-byte key, on SHA-256's compression function with
/// every key-dependent buffer wiped before returning.
///
/// The `hmac` crate's state (the key XOR ipad/opad and the two chaining
/// values derived from them, which are as good as the key) cannot be
/// zeroized: its types have no `Zeroize` and are moved by value. Here the
/// padded key blocks, the chaining values and the message block live in
/// local arrays that are wiped. (`compress256` itself may leave message
/// words in registers or its own stack frame, as every implementation
/// does.) Checked against the `hmac` crate in the tests below.
fn hmac_sha256_short(key: &[u8; 32], msg: &[u8]) -> Option<[u8; 32]> {
    if msg.len() > 55 {
        return None;
    }
    // Key block XOR ipad, then XOR opad.
    let mut pad = GenericArray::from([0x36u8; 64]);
    for (p, k) in pad.iter_mut().zip(key) {
        *p ^= k;
    }
    let mut inner = SHA256_IV;
    sha2::compress256(&mut inner, std::slice::from_ref(&pad));
    // The message block: msg || 0x80 || zeros || bit length of (64 + msg).
    let mut block = GenericArray::from([0u8; 64]);
    block[..msg.len()].copy_from_slice(msg);
    block[msg.len()] = 0x80;
    block[56..].copy_from_slice(&((64 + msg.len() as u64) * 8).to_be_bytes());
    sha2::compress256(&mut inner, std::slice::from_ref(&block));

    for p in pad.iter_mut() {
        *p ^= 0x36 ^ 0x5c;
    }
    let mut outer = SHA256_IV;
    sha2::compress256(&mut outer, std::slice::from_ref(&pad));
    // The outer message block: inner digest || 0x80 || zeros || 768 bits.
    block.fill(0);
    for (chunk, word) in block.chunks_exact_mut(4).zip(inner) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    block[32] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
    sha2::compress256(&mut outer, std::slice::from_ref(&block));

    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(outer) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    pad.as_mut_slice().zeroize();
    block.as_mut_slice().zeroize();
    inner.zeroize();
    outer.zeroize();
    Some(out)
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

#[cfg(test)]
mod tests {
    use hmac::{Hmac, Mac};

    use super::*;

    fn reference(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn wiped_hmac_matches_the_hmac_crate_for_every_length() {
        for len in 0..=55usize {
            for seed in 0..8u8 {
                let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(31) ^ seed);
                let msg: Vec<u8> = (0..len).map(|i| b'0' + ((i as u8 + seed) % 10)).collect();
                assert_eq!(
                    hmac_sha256_short(&key, &msg),
                    Some(reference(&key, &msg)),
                    "len {len}"
                );
            }
        }
        assert_eq!(hmac_sha256_short(&[0; 32], &[b'1'; 56]), None);
    }

    #[test]
    fn rfc_4231_style_known_answer() {
        // RFC 4231 test case 1 (key 0x0b * 20, zero-padded to 32 bytes is
        // the same HMAC key: HMAC pads keys to the block size with zeros).
        let mut key = [0u8; 32];
        key[..20].fill(0x0b);
        assert_eq!(
            hex::encode(hmac_sha256_short(&key, b"Hi There").unwrap()),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }
}
