//! Writing ciphertexts: packing a PAN, the v1 header, laying out the 48
//! bytes around the AEAD call, and the text form.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use zeroize::Zeroize;

use super::{
    aad, SealedPan, ALG_AES256GCM_PACKED, CT_AT, NONCE_AT, NONCE_LEN, PACKED_LEN, TAG_AT, TAG_LEN,
    V1, V1_HEADER_LEN, V1_LEN, V1_TEXT_PREFIX,
};
use crate::keys::KeyId;
use crate::pan::Pan;

/// Packs a PAN's digits as BCD, high nibble first, padded with `0xF` nibbles
/// to 10 bytes. Every PAN length gives the same 10 bytes of plaintext.
pub(crate) fn pack_pan(pan: &Pan, out: &mut [u8; PACKED_LEN]) {
    *out = [0xFF; PACKED_LEN];
    let digits = pan.expose_digits().as_bytes();
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let hi = pair[0] - b'0';
        let lo = pair.get(1).map_or(0x0F, |d| d - b'0');
        *byte = (hi << 4) | lo;
    }
}

/// Writes the v1 header (version, algorithm, DEK id).
pub(crate) fn write_header(key_id: KeyId, out: &mut [u8]) {
    out[0] = V1;
    out[1] = ALG_AES256GCM_PACKED;
    out[2..10].copy_from_slice(key_id.as_bytes());
}

/// Lays out a v1 ciphertext around one AEAD call: `encrypt(nonce, aad,
/// buffer)` encrypts the 10-byte `plaintext` in place under the associated
/// data `header ‖ context` (the encoded context) and returns the tag; the result is `header ‖
/// nonce ‖ ciphertext ‖ tag`. The plaintext buffer is wiped before return.
#[inline]
pub(crate) fn seal_v1(
    key_id: KeyId,
    nonce: [u8; NONCE_LEN],
    plaintext: &mut [u8; PACKED_LEN],
    context: &[u8],
    encrypt: impl FnOnce(&[u8; NONCE_LEN], &[u8], &mut [u8; PACKED_LEN]) -> [u8; TAG_LEN],
) -> SealedPan {
    let mut out = [0u8; V1_LEN];
    let mut header = [0u8; V1_HEADER_LEN];
    write_header(key_id, &mut header);
    let tag = aad::with_aad(&header, context, |aad| encrypt(&nonce, aad, plaintext));
    out[..V1_HEADER_LEN].copy_from_slice(&header);
    out[NONCE_AT..CT_AT].copy_from_slice(&nonce);
    out[CT_AT..TAG_AT].copy_from_slice(plaintext);
    out[TAG_AT..].copy_from_slice(&tag);
    plaintext.zeroize();
    SealedPan::from_array(out)
}

/// The text form: `P1` + base64url (no padding) of bytes 2..48.
pub(crate) fn to_text(sealed: &SealedPan) -> String {
    let mut s = String::with_capacity(super::V1_TEXT_LEN);
    s.push_str(V1_TEXT_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&sealed.as_bytes()[2..], &mut s);
    s
}
