use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::Aes256Gcm;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::error::KeyServiceError;
use crate::keys::{KekRef, KeyRequest};
use crate::keyservice::local::{unwrap_raw_bytes, wrap_raw};

/// Wraps a 32-byte key under `kek` (version `kek_ref`) bound to `request`,
/// with a fresh random nonce: `nonce || ciphertext || tag`, 60 bytes
/// (`FORMAT.md`, "Wrap binding").
pub fn wrap_key(
    kek: &Aes256Gcm,
    kek_ref: &KekRef,
    request: &KeyRequest,
    key: &[u8; 32],
) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    wrap_raw(kek, kek_ref, request, key, nonce)
}

/// Reverses [`wrap_key`].
///
/// # Errors
///
/// [`KeyServiceError::UnwrapFailed`], without detail, for any mismatch:
/// altered bytes, another record's wrap, another scope, environment,
/// purpose or KEK version.
pub fn unwrap_key(
    kek: &Aes256Gcm,
    kek_ref: &KekRef,
    request: &KeyRequest,
    wrapped: &[u8],
) -> Result<Zeroizing<[u8; 32]>, KeyServiceError> {
    unwrap_raw_bytes(kek, kek_ref, request, wrapped)
}

/// Replaces the file at `path` with `bytes` atomically and durably: a
/// temporary file in the same directory is written and fsynced, renamed
/// over `path`, and the directory is fsynced. After a crash at any point
/// the file holds either the old or the new contents.
///
/// # Errors
///
/// An I/O error; the old file is then untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    crate::keystore::file::write_atomically(path, bytes, n | (1 << 63))
}

/// Opens `sealed` (bound to `context`) with the raw DEK `key`: the same
/// code as [`crate::Panseal::open_pan`]'s, for keyd's `reveal`.
///
/// # Errors
///
/// [`crate::Error::Decryption`] (opaque) for an altered ciphertext, another
/// key or another context; [`crate::FormatError::Payload`] if what
/// authenticates is not a packed PAN.
#[doc(hidden)]
pub fn open_with_key(
    key: &[u8; 32],
    sealed: &crate::SealedPan,
    context: &crate::Context,
) -> Result<crate::Pan, crate::Error> {
    let dek = crate::keys::Dek::from_unwrapped(key);
    crate::seal::open_raw(&dek.cipher(), sealed, context)
}

/// Seals `pan` (bound to `context`) under the raw DEK `key` with id `id`
/// and a fresh nonce: the same code as [`crate::Panseal::seal_pan`]'s, for
/// keyd's `admit`.
#[doc(hidden)]
pub fn seal_with_key(
    key: &[u8; 32],
    id: crate::KeyId,
    pan: &crate::Pan,
    context: &crate::Context,
) -> crate::SealedPan {
    let dek = crate::keys::Dek::from_unwrapped(key);
    let (nonce, _) = crate::seal::fresh_nonce();
    crate::seal::seal_raw(&dek.cipher(), id, nonce, pan, context)
}
