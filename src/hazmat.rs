//! **Hazardous materials**: the format primitives with caller-chosen keys
//! and nonces, for known-answer tests, committed test vectors, fuzzing and
//! cross-checking another language's implementation of `FORMAT.md`.
//!
//! Only with the `hazmat-test-keys` feature. Nothing here belongs in a
//! production path: a repeated nonce under one key breaks AES-GCM, and keys
//! must come from a CSPRNG or a key service (PCI DSS 3.7.1).

use aes_gcm::{Aes256Gcm, KeyInit};

use crate::context::Context;
use crate::error::{Error, KeyServiceError, KeyStoreError};
use crate::format::SealedPan;
use crate::keys::{Dek, KekRef, KeyId, KeyRequest, WrappedDek};
use crate::pan::Pan;

pub use crate::ingest::IngestPrivateKey;

/// Seals 10 arbitrary bytes with an ingest public key, as if they were a
/// packed PAN (for negative vectors and fuzzing the open path).
///
/// # Errors
///
/// As [`crate::IngestSealer::seal`].
pub fn ingest_seal_packed(
    sealer: &crate::IngestSealer,
    packed: &[u8; 10],
    context: &Context,
) -> Result<crate::IngestSealed, Error> {
    let mut packed = *packed;
    sealer.seal_packed(&mut packed, context)
}

/// Seals `pan` through the `hpke` crate's encapsulation even when the
/// `fast-ingest` feature routes [`crate::IngestSealer::seal`] through
/// `ring`: the same-run comparison in `benches/ingest.rs`. Same format.
///
/// # Errors
///
/// As [`crate::IngestSealer::seal`].
pub fn ingest_seal_with_hpke_crate(
    sealer: &crate::IngestSealer,
    pan: &Pan,
    context: &Context,
) -> Result<crate::IngestSealed, Error> {
    let mut packed = zeroize::Zeroizing::new(pack_pan(pan));
    sealer.seal_packed_hpke_crate(&mut packed, context)
}

/// Seals with a given DEK, id and nonce.
pub fn seal_with_nonce(
    dek: &Dek,
    id: KeyId,
    nonce: [u8; 12],
    pan: &Pan,
    context: &Context,
) -> SealedPan {
    crate::seal::seal_raw(&dek.cipher(), id, nonce, pan, context)
}

/// Seals 10 arbitrary plaintext bytes with a given DEK, id and nonce, as
/// if they were a packed PAN: for fuzzing and testing what the open path
/// does with a payload that authenticates but is not a conforming packed
/// PAN (non-digit nibbles, bad padding, wrong lengths, Luhn failures).
/// A conforming writer never produces such ciphertexts.
pub fn seal_packed_with_nonce(
    dek: &Dek,
    id: KeyId,
    nonce: [u8; 12],
    packed: &[u8; 10],
    context: &Context,
) -> SealedPan {
    crate::seal::seal_packed(&dek.cipher(), id, nonce, packed, context)
}

/// Packs a PAN as format v1 does (BCD, padded with `0xF` nibbles to 10
/// bytes).
pub fn pack_pan(pan: &Pan) -> [u8; 10] {
    let mut out = [0u8; 10];
    crate::format::write::pack_pan(pan, &mut out);
    out
}

/// Opens with a given DEK (no key store, no audit).
///
/// # Errors
///
/// [`Error::Decryption`] or [`Error::Format`] as in [`crate::Panseal::open_pan`].
pub fn open_with_dek(dek: &Dek, sealed: &SealedPan, context: &Context) -> Result<Pan, Error> {
    crate::seal::open_raw(&dek.cipher(), sealed, context)
}

/// Wraps `dek` as the local key service does, with a given KEK and nonce.
pub fn wrap_with_nonce(
    kek: &[u8; 32],
    kek_ref: &KekRef,
    request: &KeyRequest,
    dek: &Dek,
    nonce: [u8; 12],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(kek.into());
    crate::keyservice::local::wrap_raw(&cipher, kek_ref, request, dek.expose_secret(), nonce)
}

/// Unwraps as the local key service does, with a given KEK.
///
/// # Errors
///
/// [`KeyServiceError::UnwrapFailed`] for any mismatch.
pub fn unwrap_with_kek(
    kek: &[u8; 32],
    kek_ref: &KekRef,
    request: &KeyRequest,
    wrapped: &[u8],
) -> Result<Dek, KeyServiceError> {
    let cipher = Aes256Gcm::new(kek.into());
    crate::keyservice::local::unwrap_raw(&cipher, kek_ref, request, wrapped)
}

/// A DEK's bytes in the clear.
pub fn dek_bytes(dek: &Dek) -> [u8; 32] {
    *dek.expose_secret()
}

/// The blind index of `pan` under a given index key.
pub fn blind_index_with_key(key: &[u8; 32], pan: &Pan) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(pan.expose_digits().as_bytes());
    mac.finalize().into_bytes().into()
}

/// The deterministic id of index key `version` in a scope.
///
/// # Errors
///
/// Invalid scope or environment names.
pub fn index_key_id(environment: &str, scope: &str, version: u32) -> Result<KeyId, Error> {
    Ok(crate::index::index_key_id(
        &crate::keys::Environment::new(environment)?,
        &crate::keys::Scope::new(scope)?,
        version,
    ))
}

/// Encodes a key-store file holding `records`.
pub fn encode_key_store_file(records: &[WrappedDek]) -> Vec<u8> {
    let mut set = crate::keystore::Records::default();
    for r in records {
        set.map.insert(r.id, r.clone());
    }
    crate::keystore::file::encode_file(&set)
}

/// Decodes a key-store file, strictly.
///
/// # Errors
///
/// [`KeyStoreError::Corrupt`] for any malformed or altered file.
pub fn decode_key_store_file(bytes: &[u8]) -> Result<Vec<WrappedDek>, KeyStoreError> {
    Ok(crate::keystore::file::decode_file(bytes)?
        .map
        .into_values()
        .collect())
}
