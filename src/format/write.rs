//! Writing ciphertexts: packing a PAN and encoding the binary and text forms.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{SealedPan, ALG_AES256GCM_PACKED, PACKED_LEN, V1, V1_TEXT_PREFIX};
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

/// The text form: `P1` + base64url (no padding) of bytes 2..48.
pub(crate) fn to_text(sealed: &SealedPan) -> String {
    let mut s = String::with_capacity(super::V1_TEXT_LEN);
    s.push_str(V1_TEXT_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&sealed.as_bytes()[2..], &mut s);
    s
}
