//! The master key: generation, k-of-n Shamir shares (blahaj, GF(256)),
//! share checks, and sealing KEKs under it.
//!
//! The master key itself is used only as HKDF input: state authentication,
//! the rollback anchor, KEK sealing and the check value each use their own
//! subkey (`crate::state_file::StateKeys`). State version 1 sealed KEKs
//! and the check value directly under the master key; those are opened
//! once, at the migration to version 2.

use crate::state_file::StateKeys;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use blahaj::{Share, Sharks};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// State version 1: KEKs and the check sealed under the master key itself.
pub(crate) const V1: u8 = crate::state_file::V1;
/// State version 2: under HKDF subkeys.
pub(crate) const V2: u8 = crate::state_file::V2;

const CHECK_PLAINTEXT: &[u8] = b"panseal-keyd master key check v1";
const SHARE_PREFIX: &str = "pks1-";

/// Why a share or master key is refused. Deliberately without detail.
#[derive(Debug, thiserror::Error)]
#[error("refused")]
pub(crate) struct Refused;

/// The unsealed master key and its subkeys.
pub(crate) struct MasterKey {
    /// Version 1 only: the master key used directly.
    legacy: Aes256Gcm,
    kek: Aes256Gcm,
    check: Aes256Gcm,
    keys: StateKeys,
}

impl MasterKey {
    pub(crate) fn generate() -> (Self, Zeroizing<[u8; 32]>) {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        (Self::from_bytes(&key), key)
    }

    pub(crate) fn from_bytes(key: &Zeroizing<[u8; 32]>) -> Self {
        let keys = StateKeys::derive(key);
        MasterKey {
            legacy: Aes256Gcm::new((&**key).into()),
            kek: Aes256Gcm::new((&*keys.kek_seal).into()),
            check: Aes256Gcm::new((&*keys.check).into()),
            keys,
        }
    }

    /// The state, anchor and sealing subkeys.
    pub(crate) fn keys(&self) -> &StateKeys {
        &self.keys
    }

    /// `nonce (12) || ciphertext || tag (16)`.
    fn seal(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        out.extend_from_slice(plaintext);
        // Fails only for inputs longer than GCM allows.
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[12..])
            .unwrap_or_default();
        out.extend_from_slice(&tag);
        out
    }

    fn open(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Refused> {
        if sealed.len() < 12 + 16 {
            return Err(Refused);
        }
        let (nonce, rest) = sealed.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut buf = Zeroizing::new(ct.to_vec());
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf[..], tag.into())
            .map_err(|_| Refused)?;
        Ok(buf)
    }

    /// A value stored in the state that only the right master key opens.
    pub(crate) fn check_value(&self) -> String {
        hex::encode(Self::seal(&self.check, b"check-v2", CHECK_PLAINTEXT))
    }

    /// Checks the value of state version `v` (1: master key, 2: subkey).
    pub(crate) fn verify_check(&self, check_hex: &str, v: u8) -> bool {
        let Ok(sealed) = hex::decode(check_hex) else {
            return false;
        };
        let opened = if v == 1 {
            Self::open(&self.legacy, b"check", &sealed)
        } else {
            Self::open(&self.check, b"check-v2", &sealed)
        };
        matches!(opened, Ok(p) if p.as_slice() == CHECK_PLAINTEXT)
    }

    pub(crate) fn seal_kek(
        &self,
        environment: &str,
        scope: &str,
        version: u32,
        kek: &Zeroizing<[u8; 32]>,
    ) -> String {
        hex::encode(Self::seal(
            &self.kek,
            &kek_aad(b"panseal-keyd-kek-v2", environment, scope, version),
            &kek[..],
        ))
    }

    /// Opens a KEK sealed in state version `v`.
    pub(crate) fn open_kek(
        &self,
        v: u8,
        environment: &str,
        scope: &str,
        version: u32,
        sealed_hex: &str,
    ) -> Result<Zeroizing<[u8; 32]>, Refused> {
        let sealed = Zeroizing::new(hex::decode(sealed_hex).map_err(|_| Refused)?);
        let plain = if v == 1 {
            Self::open(
                &self.legacy,
                &kek_aad(b"panseal-keyd-kek-v1", environment, scope, version),
                &sealed,
            )?
        } else {
            Self::open(
                &self.kek,
                &kek_aad(b"panseal-keyd-kek-v2", environment, scope, version),
                &sealed,
            )?
        };
        if plain.len() != 32 {
            return Err(Refused);
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

fn kek_aad(label: &[u8], environment: &str, scope: &str, version: u32) -> Vec<u8> {
    let mut aad = label.to_vec();
    for part in [environment.as_bytes(), scope.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u16).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Splits the master key into `n` shares, any `k` of which rebuild it.
/// Returns `(x, share text)` pairs.
pub(crate) fn split(
    master: &Zeroizing<[u8; 32]>,
    k: u8,
    n: u8,
) -> Vec<(u8, Zeroizing<String>, Zeroizing<Vec<u8>>)> {
    Sharks(k)
        .dealer(&master[..])
        .take(usize::from(n))
        .map(|share| {
            // blahaj wipes its `Share` on drop (feature `zeroize_memory`).
            let bytes = Zeroizing::new(Vec::from(&share));
            (share.x.0, share_text(&bytes), bytes)
        })
        .collect()
}

/// `pks1-<hex>-<4-byte checksum>`, built in one wiped allocation.
fn share_text(bytes: &[u8]) -> Zeroizing<String> {
    let sum = Sha256::digest(bytes);
    let hex_share = Zeroizing::new(hex::encode(bytes));
    let mut text = Zeroizing::new(String::with_capacity(
        SHARE_PREFIX.len() + hex_share.len() + 1 + 8,
    ));
    text.push_str(SHARE_PREFIX);
    text.push_str(&hex_share);
    text.push('-');
    text.push_str(&hex::encode(&sum[..4]));
    text
}

/// Parses share text: prefix, hex, 4-byte checksum against typing errors.
pub(crate) fn parse_share(text: &str) -> Result<Zeroizing<Vec<u8>>, Refused> {
    let body = text.trim().strip_prefix(SHARE_PREFIX).ok_or(Refused)?;
    let (hex_share, sum) = body.rsplit_once('-').ok_or(Refused)?;
    let bytes = Zeroizing::new(hex::decode(hex_share).map_err(|_| Refused)?);
    if bytes.len() != 33 || hex::encode(&Sha256::digest(&bytes[..])[..4]) != sum {
        return Err(Refused);
    }
    Ok(bytes)
}

/// Salted MAC of a share, stored at init to refuse wrong shares one by one.
pub(crate) fn share_check(salt_hex: &str, share: &[u8]) -> String {
    let salt = hex::decode(salt_hex).unwrap_or_default();
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&salt).unwrap_or_else(|_| {
        // HMAC takes keys of any length.
        <Hmac<Sha256> as Mac>::new_from_slice(b"-").unwrap_or_else(|_| unreachable!())
    });
    m.update(b"panseal-keyd-share-v1");
    m.update(share);
    hex::encode(m.finalize().into_bytes())
}

pub(crate) fn new_salt() -> String {
    let mut salt = [0u8; 32];
    OsRng.fill_bytes(&mut salt);
    hex::encode(salt)
}

/// Rebuilds the master key from at least `k` distinct shares.
pub(crate) fn combine(
    k: u8,
    shares: &[Zeroizing<Vec<u8>>],
) -> Result<Zeroizing<[u8; 32]>, Refused> {
    let parsed: Vec<Share> = shares
        .iter()
        .map(|s| Share::try_from(s.as_slice()).map_err(|_| Refused))
        .collect::<Result<_, _>>()?;
    let secret = Zeroizing::new(Sharks(k).recover(&parsed).map_err(|_| Refused)?);
    if secret.len() != 32 {
        return Err(Refused);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&secret);
    Ok(key)
}

/// A fresh KEK.
pub(crate) fn new_kek() -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut key[..]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_shares_rebuild_the_key_and_fewer_do_not() {
        let (_, key) = MasterKey::generate();
        let shares = split(&key, 2, 3);
        assert_eq!(shares.len(), 3);
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            let parsed = vec![
                parse_share(&shares[a].1).unwrap(),
                parse_share(&shares[b].1).unwrap(),
            ];
            assert_eq!(*combine(2, &parsed).unwrap(), *key);
        }
        assert!(combine(2, &[parse_share(&shares[0].1).unwrap()]).is_err());
        let mut typo = shares[0].1.to_string();
        typo.replace_range(10..11, if &typo[10..11] == "0" { "1" } else { "0" });
        assert!(parse_share(&typo).is_err());
    }

    /// `tests/vectors/keyd_state_v2.json`, made by an independent Python
    /// implementation of FORMAT.md section 13.
    #[test]
    fn kek_sealing_and_check_match_the_independent_vectors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/keyd_state_v2.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(v["master_key"].as_str().unwrap(), &mut key[..]).unwrap();
        let m = MasterKey::from_bytes(&key);
        let snap = crate::state_file::decode_snapshot(
            &hex::decode(v["state_bin"].as_str().unwrap()).unwrap(),
            0,
        )
        .unwrap();
        assert!(m.verify_check(&snap.state.master_check, V2));
        let k = &snap.state.scopes["test/m-1"].versions[0];
        let opened = m
            .open_kek(V2, "test", "m-1", 1, k.sealed.as_deref().unwrap())
            .unwrap();
        assert_eq!(hex::encode(&opened[..]), v["kek"]["key"].as_str().unwrap());
    }

    #[test]
    fn sealed_keks_are_bound_to_their_slot() {
        let (m, _) = MasterKey::generate();
        let kek = new_kek();
        let s = m.seal_kek("prod", "m1", 1, &kek);
        assert_eq!(*m.open_kek(2, "prod", "m1", 1, &s).unwrap(), *kek);
        assert!(m.open_kek(2, "prod", "m1", 2, &s).is_err());
        assert!(m.open_kek(2, "test", "m1", 1, &s).is_err());
        // Subkeys are separate: a v2 seal does not open as v1.
        assert!(m.open_kek(1, "prod", "m1", 1, &s).is_err());
        assert!(m.verify_check(&m.check_value(), 2));
        assert!(!m.verify_check(&m.check_value(), 1));
        assert!(!MasterKey::generate().0.verify_check(&m.check_value(), 2));
    }
}
