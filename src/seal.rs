//! The AEAD step of format v1: seal a packed PAN under an expanded AES-256-GCM
//! key with a given nonce, and open it. Allocation-free for contexts whose
//! associated data fits `AAD_STACK` bytes.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use zeroize::Zeroize;

use crate::context::Context;
use crate::error::Error;
use crate::format::{self, SealedPan, V1_LEN};
use crate::keys::KeyId;
use crate::pan::Pan;

/// Largest associated data assembled on the stack; longer contexts use one
/// heap allocation.
const AAD_STACK: usize = 256;

/// A 96-bit nonce from the thread-local CSPRNG (ChaCha12, seeded from the OS
/// and reseeded periodically by `rand`): an OS call per nonce would cost more
/// than the whole seal.
pub(crate) fn fresh_nonce() -> [u8; format::NONCE_LEN] {
    let mut nonce = [0u8; format::NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce
}

/// Seals `pan` bound to `context` under `cipher` (the DEK `id`).
pub(crate) fn seal_raw(
    cipher: &Aes256Gcm,
    id: KeyId,
    nonce: [u8; format::NONCE_LEN],
    pan: &Pan,
    context: &Context,
) -> SealedPan {
    let mut out = [0u8; V1_LEN];
    let mut header = [0u8; format::V1_HEADER_LEN];
    format::write::write_header(id, &mut header);
    out[..format::V1_HEADER_LEN].copy_from_slice(&header);
    out[format::NONCE_AT..format::CT_AT].copy_from_slice(&nonce);
    let mut packed = [0u8; format::PACKED_LEN];
    format::write::pack_pan(pan, &mut packed);
    // Encryption fails only for messages longer than GCM allows; 10 bytes
    // never are.
    let tag = with_aad(&header, context, |aad| {
        cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut packed)
    })
    .unwrap_or_default();
    out[format::CT_AT..format::TAG_AT].copy_from_slice(&packed);
    out[format::TAG_AT..].copy_from_slice(&tag);
    packed.zeroize();
    SealedPan::from_array(out)
}

/// Opens a sealed PAN bound to `context` under `cipher`.
///
/// Every authentication failure is the opaque [`Error::Decryption`]; a
/// payload that authenticates but is not a packed PAN is
/// [`crate::FormatError::Payload`].
pub(crate) fn open_raw(
    cipher: &Aes256Gcm,
    sealed: &SealedPan,
    context: &Context,
) -> Result<Pan, Error> {
    let mut packed = [0u8; format::PACKED_LEN];
    packed.copy_from_slice(sealed.ciphertext());
    let decrypted = with_aad(sealed.header(), context, |aad| {
        cipher.decrypt_in_place_detached(
            Nonce::from_slice(sealed.nonce()),
            aad,
            &mut packed,
            Tag::from_slice(sealed.tag()),
        )
    });
    if decrypted.is_err() {
        return Err(Error::Decryption);
    }
    let pan = format::read::unpack_pan(&packed);
    packed.zeroize();
    Ok(pan?)
}

/// Runs `f` with `header || context.encoded()` as one slice, on the stack
/// for the common short contexts.
fn with_aad<R>(header: &[u8], context: &Context, f: impl FnOnce(&[u8]) -> R) -> R {
    fn on_stack<const N: usize, R>(header: &[u8], enc: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
        let total = header.len() + enc.len();
        let mut buf = [0u8; N];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..total].copy_from_slice(enc);
        f(&buf[..total])
    }
    let enc = context.encoded();
    let total = header.len() + enc.len();
    if total <= 48 {
        on_stack::<48, R>(header, enc, f)
    } else if total <= AAD_STACK {
        on_stack::<AAD_STACK, R>(header, enc, f)
    } else {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(header);
        v.extend_from_slice(enc);
        f(&v)
    }
}
