//! Reading ciphertexts: structural parsing of the binary and text forms,
//! the AAD and buffer of the AEAD open, and unpacking of the decrypted PAN
//! (BCD digits, `0xF` padding, Luhn). Nothing here panics on any input.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use zeroize::Zeroize;

use super::{
    aad, SealedPan, ALG_AES256GCM_PACKED, PACKED_LEN, V1, V1_LEN, V1_TEXT_LEN, V1_TEXT_PREFIX,
};
use crate::error::{Error, FormatError};
use crate::pan::{Pan, ABSOLUTE_MIN_PAN_DIGITS, MAX_PAN_DIGITS};

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

/// Opens a v1 ciphertext around one AEAD call: `decrypt(nonce, aad,
/// buffer, tag)` decrypts the 10 ciphertext bytes in place under the
/// associated data `header ‖ context` (the encoded context) and says whether the tag verified.
///
/// # Errors
///
/// The opaque [`Error::Decryption`] for every authentication failure;
/// [`FormatError::Payload`] for a payload that authenticates but is not a
/// packed PAN. The decrypted buffer is wiped before return.
#[inline]
pub(crate) fn open_v1(
    sealed: &SealedPan,
    context: &[u8],
    decrypt: impl FnOnce(&[u8], &[u8], &mut [u8; PACKED_LEN], &[u8]) -> bool,
) -> Result<Pan, Error> {
    let mut packed = [0u8; PACKED_LEN];
    packed.copy_from_slice(sealed.ciphertext());
    let authentic = aad::with_aad(sealed.header(), context, |aad| {
        decrypt(sealed.nonce(), aad, &mut packed, sealed.tag())
    });
    if !authentic {
        packed.zeroize();
        return Err(Error::Decryption);
    }
    let pan = unpack_pan(&packed);
    packed.zeroize();
    Ok(pan?)
}

/// Unpacks BCD digits padded with `0xF` nibbles back into a PAN. The digits
/// end at the first `0xF` nibble; every nibble after it must be `0xF`.
///
/// # Errors
///
/// [`FormatError::Payload`] unless it holds 8 to 19 digits, the padding is
/// all `0xF`, and the Luhn check passes.
pub(crate) fn unpack_pan(packed: &[u8; PACKED_LEN]) -> Result<Pan, FormatError> {
    // Decoded straight into the PAN's own (wiped on drop) buffer.
    Pan::decode_with(|digits| unpack_into(packed, digits)).ok_or(FormatError::Payload)
}

/// Decodes `packed` into `digits`; the number of digits if valid.
#[inline]
fn unpack_into(packed: &[u8; PACKED_LEN], digits: &mut [u8; MAX_PAN_DIGITS]) -> Option<usize> {
    // even_plain: Luhn sum with even positions plain and odd ones
    // doubled; odd_plain: the reverse. Each byte starts at an even
    // position, so its table entry holds both contributions.
    let mut even_plain = 0u32;
    let mut odd_plain = 0u32;
    // At most 9 two-digit bytes fit in 19 digits; a 10th is refused below.
    let mut i = 0usize;
    while i < 9 {
        let e = UNPACK[usize::from(packed[i])];
        if e.kind != KIND_TWO_DIGITS {
            break;
        }
        digits[2 * i] = e.hi;
        digits[2 * i + 1] = e.lo;
        even_plain += u32::from(e.even_plain);
        odd_plain += u32::from(e.odd_plain);
        i += 1;
    }
    let mut len = 2 * i;
    if i < packed.len() {
        let e = UNPACK[usize::from(packed[i])];
        if e.kind == KIND_DIGIT_THEN_PAD {
            digits[len.min(MAX_PAN_DIGITS - 1)] = e.hi;
            len += 1;
            even_plain += u32::from(e.even_plain);
            odd_plain += u32::from(e.odd_plain);
            i += 1;
        }
    }
    let mut padding_ok = true;
    while i < packed.len() {
        padding_ok &= packed[i] == 0xFF;
        i += 1;
    }
    let len_ok = len >= ABSOLUTE_MIN_PAN_DIGITS;
    // Luhn doubles position i iff i has the parity of `len` (the last
    // digit, at len - 1, is never doubled).
    let sum = if len % 2 == 0 { odd_plain } else { even_plain };
    (padding_ok && len_ok && sum % 10 == 0).then_some(len)
}

const KIND_TWO_DIGITS: u8 = 2;
const KIND_DIGIT_THEN_PAD: u8 = 1;
const KIND_OTHER: u8 = 0;

/// What one packed byte holds: its ASCII digits and its Luhn contributions.
#[derive(Clone, Copy)]
#[repr(align(8))]
struct Unpacked {
    kind: u8,
    hi: u8,
    lo: u8,
    even_plain: u8,
    odd_plain: u8,
}

const LUHN_DOUBLED: [u8; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];

/// Decoding table for packed PAN bytes, built at compile time.
static UNPACK: [Unpacked; 256] = {
    let mut t = [Unpacked {
        kind: KIND_OTHER,
        hi: 0,
        lo: 0,
        even_plain: 0,
        odd_plain: 0,
    }; 256];
    let mut b = 0usize;
    while b < 256 {
        let hi = (b >> 4) as u8;
        let lo = (b & 0x0F) as u8;
        if hi <= 9 && lo <= 9 {
            t[b] = Unpacked {
                kind: KIND_TWO_DIGITS,
                hi: b'0' + hi,
                lo: b'0' + lo,
                even_plain: hi + LUHN_DOUBLED[lo as usize],
                odd_plain: LUHN_DOUBLED[hi as usize] + lo,
            };
        } else if hi <= 9 && lo == 0x0F {
            t[b] = Unpacked {
                kind: KIND_DIGIT_THEN_PAD,
                hi: b'0' + hi,
                lo: 0,
                even_plain: hi,
                odd_plain: LUHN_DOUBLED[hi as usize],
            };
        }
        b += 1;
    }
    t
};
