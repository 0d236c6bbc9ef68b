//! The associated data of format v1: the header (bytes 0..10 of the
//! ciphertext) followed by the encoded context (`FORMAT.md`, "Context
//! encoding"): table, column and row key, each as a 2-byte big-endian length
//! and its bytes.
//!
//! [`crate::Context`] validates the parts and keeps the encoding this module
//! makes; sealing and opening assemble `header ‖ encoding` with [`with_aad`].
//! (This module takes the encoding as bytes, so `format` does not depend on
//! `context`.)

/// Largest associated data assembled on the stack; longer contexts use one
/// heap allocation.
const AAD_STACK: usize = 256;

/// Bytes of the length prefix of each context part.
const LEN_PREFIX: usize = 2;

/// Encodes a context's parts: `len(table) ‖ table ‖ len(column) ‖ column ‖
/// len(row key) ‖ row key`, lengths as big-endian `u16`. The caller has
/// checked that every part is at most `u16::MAX` bytes.
pub(crate) fn encode_context(table: &[u8], column: &[u8], row_key: &[u8]) -> Vec<u8> {
    let mut encoded =
        Vec::with_capacity(3 * LEN_PREFIX + table.len() + column.len() + row_key.len());
    for part in [table, column, row_key] {
        // Lengths were checked by the caller to fit in u16.
        encoded.extend_from_slice(&(part.len() as u16).to_be_bytes());
        encoded.extend_from_slice(part);
    }
    encoded
}

/// The three parts of an encoding made by [`encode_context`] whose table and
/// column are `table_len` and `column_len` bytes long: (table, column, row
/// key). Empty parts if the lengths do not fit the encoding.
pub(crate) fn context_parts(
    encoded: &[u8],
    table_len: usize,
    column_len: usize,
) -> (&[u8], &[u8], &[u8]) {
    let table_at = LEN_PREFIX;
    let column_at = table_at + table_len + LEN_PREFIX;
    let row_at = column_at + column_len + LEN_PREFIX;
    let part = |from: usize, to: usize| encoded.get(from..to).unwrap_or_default();
    (
        part(table_at, table_at + table_len),
        part(column_at, column_at + column_len),
        encoded.get(row_at..).unwrap_or_default(),
    )
}

/// Runs `f` with the associated data `header ‖ context` (an encoding made
/// by [`encode_context`]) as one slice, on the stack for the common short
/// contexts (no allocation up to 256 bytes in all).
#[inline]
pub(crate) fn with_aad<R>(header: &[u8], context: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    #[inline(always)]
    fn on_stack<const N: usize, R>(header: &[u8], enc: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
        let total = header.len() + enc.len();
        let mut buf = [0u8; N];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..total].copy_from_slice(enc);
        f(&buf[..total])
    }
    let enc = context;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let enc = encode_context(b"cards", b"pan", b"42");
        assert_eq!(enc, b"\x00\x05cards\x00\x03pan\x00\x0242");
        assert_eq!(
            context_parts(&enc, 5, 3),
            (&b"cards"[..], &b"pan"[..], &b"42"[..])
        );
    }

    #[test]
    fn aad_is_header_then_context() {
        let short = encode_context(b"cards", b"pan", b"42");
        let middle = encode_context(b"t", b"c", &[b'r'; 200]);
        let long = encode_context(b"t", b"c", &[b'r'; 300]);
        for ctx in [short, middle, long] {
            let header = [1u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
            let aad = with_aad(&header, &ctx, <[u8]>::to_vec);
            assert_eq!(&aad[..10], &header);
            assert_eq!(&aad[10..], &ctx[..]);
        }
    }
}
