//! The master key: generation, k-of-n Shamir shares (blahaj, GF(256)),
//! share checks, and sealing KEKs under it.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use blahaj::{Share, Sharks};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const CHECK_PLAINTEXT: &[u8] = b"panseal-keyd master key check v1";
const SHARE_PREFIX: &str = "pks1-";

/// Why a share or master key is refused. Deliberately without detail.
#[derive(Debug, thiserror::Error)]
#[error("refused")]
pub(crate) struct Refused;

/// The unsealed master key.
pub(crate) struct MasterKey {
    cipher: Aes256Gcm,
}

impl MasterKey {
    pub(crate) fn generate() -> (Self, Zeroizing<[u8; 32]>) {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        (Self::from_bytes(&key), key)
    }

    pub(crate) fn from_bytes(key: &Zeroizing<[u8; 32]>) -> Self {
        MasterKey {
            cipher: Aes256Gcm::new((&**key).into()),
        }
    }

    /// `nonce (12) || ciphertext || tag (16)`.
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        out.extend_from_slice(plaintext);
        // Fails only for inputs longer than GCM allows.
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[12..])
            .unwrap_or_default();
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Refused> {
        if sealed.len() < 12 + 16 {
            return Err(Refused);
        }
        let (nonce, rest) = sealed.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let mut buf = Zeroizing::new(ct.to_vec());
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf[..], tag.into())
            .map_err(|_| Refused)?;
        Ok(buf)
    }

    /// A value stored in the state that only the right master key opens.
    pub(crate) fn check_value(&self) -> String {
        hex::encode(self.seal(b"check", CHECK_PLAINTEXT))
    }

    pub(crate) fn verify_check(&self, check_hex: &str) -> bool {
        let Ok(sealed) = hex::decode(check_hex) else {
            return false;
        };
        matches!(self.open(b"check", &sealed), Ok(p) if p.as_slice() == CHECK_PLAINTEXT)
    }

    pub(crate) fn seal_kek(
        &self,
        environment: &str,
        scope: &str,
        version: u32,
        kek: &Zeroizing<[u8; 32]>,
    ) -> String {
        hex::encode(self.seal(&kek_aad(environment, scope, version), &kek[..]))
    }

    pub(crate) fn open_kek(
        &self,
        environment: &str,
        scope: &str,
        version: u32,
        sealed_hex: &str,
    ) -> Result<Zeroizing<[u8; 32]>, Refused> {
        let sealed = hex::decode(sealed_hex).map_err(|_| Refused)?;
        let plain = self.open(&kek_aad(environment, scope, version), &sealed)?;
        if plain.len() != 32 {
            return Err(Refused);
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

fn kek_aad(environment: &str, scope: &str, version: u32) -> Vec<u8> {
    let mut aad = b"panseal-keyd-kek-v1".to_vec();
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
            let bytes = Zeroizing::new(Vec::from(&share));
            (share.x.0, Zeroizing::new(share_text(&bytes)), bytes)
        })
        .collect()
}

fn share_text(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    format!(
        "{SHARE_PREFIX}{}-{}",
        hex::encode(bytes),
        hex::encode(&sum[..4])
    )
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

    #[test]
    fn sealed_keks_are_bound_to_their_slot() {
        let (m, _) = MasterKey::generate();
        let kek = new_kek();
        let s = m.seal_kek("prod", "m1", 1, &kek);
        assert_eq!(*m.open_kek("prod", "m1", 1, &s).unwrap(), *kek);
        assert!(m.open_kek("prod", "m1", 2, &s).is_err());
        assert!(m.open_kek("test", "m1", 1, &s).is_err());
        assert!(m.verify_check(&m.check_value()));
        assert!(!MasterKey::generate().0.verify_check(&m.check_value()));
    }
}
