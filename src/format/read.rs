//! Reading ciphertexts: structural parsing of the binary and text forms and
//! unpacking of the decrypted PAN. Nothing here panics on any input.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{SealedPan, ALG_AES256GCM_PACKED, PACKED_LEN, V1, V1_LEN, V1_TEXT_LEN, V1_TEXT_PREFIX};
use crate::error::FormatError;
use crate::pan::Pan;

/// Parses the binary form.
pub(crate) fn parse_binary(bytes: &[u8]) -> Result<SealedPan, FormatError> {
    let version = *bytes.first().ok_or(FormatError::Empty)?;
    if version != V1 {
        return Err(FormatError::UnknownVersion(version));
    }
    let alg = *bytes.get(1).ok_or(FormatError::Length {
        expected: V1_LEN,
        actual: bytes.len(),
    })?;
    if alg != ALG_AES256GCM_PACKED {
        return Err(FormatError::UnknownAlgorithm(alg));
    }
    let array: [u8; V1_LEN] = bytes.try_into().map_err(|_| FormatError::Length {
        expected: V1_LEN,
        actual: bytes.len(),
    })?;
    Ok(SealedPan::from_array(array))
}

/// Parses the text form. Only the canonical encoding is accepted (exact
/// length, base64url alphabet, zero trailing bits), so parse∘write is the
/// identity.
pub(crate) fn parse_text(text: &str) -> Result<SealedPan, FormatError> {
    if text.is_empty() {
        return Err(FormatError::Empty);
    }
    let Some(body) = text.strip_prefix(V1_TEXT_PREFIX) else {
        return Err(FormatError::Text);
    };
    if text.len() != V1_TEXT_LEN {
        return Err(FormatError::Text);
    }
    let mut array = [0u8; V1_LEN];
    array[0] = V1;
    array[1] = ALG_AES256GCM_PACKED;
    let n = URL_SAFE_NO_PAD
        .decode_slice(body.as_bytes(), &mut array[2..])
        .map_err(|_| FormatError::Text)?;
    if n != V1_LEN - 2 {
        return Err(FormatError::Text);
    }
    Ok(SealedPan::from_array(array))
}

/// Unpacks BCD digits padded with `0xF` nibbles back into a PAN. The digits
/// end at the first `0xF` nibble; every nibble after it must be `0xF`.
pub(crate) fn unpack_pan(packed: &[u8; PACKED_LEN]) -> Result<Pan, FormatError> {
    Pan::from_packed(packed).ok_or(FormatError::Payload)
}
