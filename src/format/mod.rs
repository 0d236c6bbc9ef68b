//! The versioned ciphertext format: every byte of the compact v1
//! ciphertext. `FORMAT.md` is the specification; this module is split into
//! a reading half ([`read`]: parsing, the open's buffer, unpacking and
//! checking the PAN), a writing half ([`write`]: packing and padding the
//! PAN, the header, the 48-byte layout, the text form) and the associated
//! data ([`aad`]: the context encoding, `header ‖ context`), round-trip
//! tested and fuzzed. The AEAD itself (AES-256-GCM, nonces) is `seal`'s;
//! [`crate::Context`] validates what [`aad`] encodes, and [`crate::Pan`]
//! parses and masks what [`write`] packs.
//!
//! Version 1, binary (48 bytes):
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 1 | version `0x01` |
//! | 1 | 1 | algorithm `0x01`: AES-256-GCM over a 10-byte packed PAN |
//! | 2 | 8 | DEK id |
//! | 10 | 12 | nonce |
//! | 22 | 10 | ciphertext of the packed PAN |
//! | 32 | 16 | GCM tag |
//!
//! Associated data: bytes 0..10 followed by the encoded [`crate::Context`].
//! Text form: `P1` followed by unpadded base64url of bytes 2..48 (64
//! characters in all).

use std::fmt;

use crate::keys::KeyId;

pub(crate) mod aad;
pub(crate) mod read;
pub(crate) mod write;

/// Version byte of format v1.
pub(crate) const V1: u8 = 0x01;
/// Algorithm byte of format v1: AES-256-GCM, 96-bit nonce, 128-bit tag,
/// plaintext = PAN packed as BCD padded with 0xF nibbles to 10 bytes.
pub(crate) const ALG_AES256GCM_PACKED: u8 = 0x01;
/// Length of the v1 header (version, algorithm, DEK id): the part of the
/// ciphertext that is also associated data.
pub(crate) const V1_HEADER_LEN: usize = 10;
/// Nonce length.
pub(crate) const NONCE_LEN: usize = 12;
/// Packed-PAN length (20 nibbles).
pub(crate) const PACKED_LEN: usize = 10;
/// Tag length.
pub(crate) const TAG_LEN: usize = 16;
/// Total v1 binary length.
pub const V1_LEN: usize = V1_HEADER_LEN + NONCE_LEN + PACKED_LEN + TAG_LEN;
/// Text prefix of v1 (stands for version 1, algorithm 1).
pub(crate) const V1_TEXT_PREFIX: &str = "P1";
/// Total v1 text length.
pub const V1_TEXT_LEN: usize = 64;

pub(crate) const NONCE_AT: usize = V1_HEADER_LEN;
pub(crate) const CT_AT: usize = NONCE_AT + NONCE_LEN;
pub(crate) const TAG_AT: usize = CT_AT + PACKED_LEN;

/// A sealed PAN: the compact, self-describing ciphertext of one PAN.
///
/// Not secret (it is what goes in the database), so it prints, compares and
/// serializes freely. Make one with [`crate::Panseal::seal_pan`]; read one
/// back from storage with [`SealedPan::from_bytes`] or
/// [`SealedPan::from_text`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SealedPan {
    bytes: [u8; V1_LEN],
}

impl SealedPan {
    pub(crate) fn from_array(bytes: [u8; V1_LEN]) -> Self {
        SealedPan { bytes }
    }

    /// The binary form (48 bytes for version 1), for a `BYTEA`/`BLOB` column.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The text form (64 characters for version 1), for a `VARCHAR` column.
    pub fn to_text(&self) -> String {
        write::to_text(self)
    }

    /// Parses the binary form.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Format`] on any malformed input; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::Error> {
        Ok(read::parse_binary(bytes)?)
    }

    /// Parses the text form.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Format`] on any malformed input; never panics.
    pub fn from_text(text: &str) -> Result<Self, crate::Error> {
        Ok(read::parse_text(text)?)
    }

    /// The format version.
    pub fn version(&self) -> u8 {
        self.bytes[0]
    }

    /// The id of the DEK this PAN is sealed under.
    pub fn key_id(&self) -> KeyId {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.bytes[2..10]);
        KeyId::from_bytes(id)
    }

    pub(crate) fn header(&self) -> &[u8] {
        &self.bytes[..V1_HEADER_LEN]
    }

    pub(crate) fn nonce(&self) -> &[u8] {
        &self.bytes[NONCE_AT..CT_AT]
    }

    pub(crate) fn ciphertext(&self) -> &[u8] {
        &self.bytes[CT_AT..TAG_AT]
    }

    pub(crate) fn tag(&self) -> &[u8] {
        &self.bytes[TAG_AT..]
    }
}

impl fmt::Debug for SealedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedPan")
            .field("version", &self.version())
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SealedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl serde::Serialize for SealedPan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text())
    }
}

impl<'de> serde::Deserialize<'de> for SealedPan {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        read::parse_text(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_meet_the_budget() {
        const { assert!(V1_LEN == 48) };
        const { assert!(V1_TEXT_LEN <= 64) };
    }
}
