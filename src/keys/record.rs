//! Binary encoding of [`WrappedDek`] records (`FORMAT.md`, "Key-store
//! record"). Strict and panic-free: every length is checked, trailing bytes
//! are refused, and decode∘encode is the identity.

use super::{Environment, KekRef, KeyId, KeyPurpose, KeyState, Scope, WrappedDek, WrappedKey};
use crate::error::FormatError;

/// Record encoding version 1 (unauthenticated lifecycle fields).
pub(crate) const RECORD_V1: u8 = 1;
/// Record encoding version 2: version 1's fields, a sequence number and the
/// key service's 32-byte MAC ([`super::RecordTag`]).
pub(crate) const RECORD_V2: u8 = 2;
/// Domain label prefixed to the bytes a key service signs.
pub(crate) const RECORD_MAC_LABEL: &[u8] = b"panseal-record-v2";
/// Longest KEK id, in bytes.
pub(crate) const MAX_KEK_ID_LEN: usize = 1024;
/// Longest wrapped key, in bytes.
pub(crate) const MAX_WRAPPED_LEN: usize = 4096;

/// Version 1 if the record has no tag, else version 2.
pub(crate) fn encode(r: &WrappedDek) -> Vec<u8> {
    match &r.tag {
        None => encode_body(r, RECORD_V1),
        Some(tag) => {
            let mut out = encode_body(r, RECORD_V2);
            out.extend_from_slice(&tag.0);
            out
        }
    }
}

/// What a key service's MAC covers (`FORMAT.md`, "Key-store record v2"):
/// `"panseal-record-v2" || record_v2 without its tag`.
pub(crate) fn signed_bytes(r: &WrappedDek) -> Vec<u8> {
    let mut out = RECORD_MAC_LABEL.to_vec();
    out.extend_from_slice(&encode_body(r, RECORD_V2));
    out
}

fn encode_body(r: &WrappedDek, version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(136 + r.wrapped.kek.id.len() + r.wrapped.bytes.len());
    out.push(version);
    out.push(r.purpose as u8);
    out.extend_from_slice(r.id.as_bytes());
    out.extend_from_slice(&r.version.to_be_bytes());
    out.push(r.state as u8);
    put_u8_str(&mut out, r.scope.as_str());
    put_u8_str(&mut out, r.environment.as_str());
    out.extend_from_slice(&(r.wrapped.kek.id.len() as u16).to_be_bytes());
    out.extend_from_slice(r.wrapped.kek.id.as_bytes());
    out.extend_from_slice(&r.wrapped.kek.version.to_be_bytes());
    for v in [
        r.created_at,
        r.encrypt_until,
        r.decrypt_until,
        r.max_uses,
        r.uses,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    if version == RECORD_V2 {
        out.extend_from_slice(&r.sequence.to_be_bytes());
    }
    out.extend_from_slice(&(r.wrapped.bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(&r.wrapped.bytes);
    out
}

fn put_u8_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.b.len() < n {
            return Err(FormatError::Record(what));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, len: usize, what: &'static str) -> Result<&'a str, FormatError> {
        let s = self.take(len, what)?;
        std::str::from_utf8(s).map_err(|_| FormatError::Record(what))
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<WrappedDek, FormatError> {
    let mut r = Reader { b: bytes };
    let format = r.u8("version")?;
    if format != RECORD_V1 && format != RECORD_V2 {
        return Err(FormatError::Record("version"));
    }
    let purpose = KeyPurpose::from_u8(r.u8("purpose")?).ok_or(FormatError::Record("purpose"))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(r.take(8, "id")?);
    let version = r.u32("key version")?;
    let state = KeyState::from_u8(r.u8("state")?).ok_or(FormatError::Record("state"))?;
    let n = usize::from(r.u8("scope")?);
    let scope = Scope::new(r.str(n, "scope")?).map_err(|_| FormatError::Record("scope"))?;
    let n = usize::from(r.u8("environment")?);
    let environment = Environment::new(r.str(n, "environment")?)
        .map_err(|_| FormatError::Record("environment"))?;
    let n = usize::from(r.u16("kek id")?);
    if n == 0 || n > MAX_KEK_ID_LEN {
        return Err(FormatError::Record("kek id"));
    }
    let kek_id = r.str(n, "kek id")?.to_owned();
    let kek_version = r.u32("kek version")?;
    let created_at = r.u64("created_at")?;
    let encrypt_until = r.u64("encrypt_until")?;
    let decrypt_until = r.u64("decrypt_until")?;
    let max_uses = r.u64("max_uses")?;
    let uses = r.u64("uses")?;
    let sequence = if format == RECORD_V2 {
        r.u64("sequence")?
    } else {
        0
    };
    let n = usize::from(r.u16("wrapped")?);
    if n > MAX_WRAPPED_LEN {
        return Err(FormatError::Record("wrapped"));
    }
    let wrapped = r.take(n, "wrapped")?.to_vec();
    let tag = if format == RECORD_V2 {
        let mut t = [0u8; 32];
        t.copy_from_slice(r.take(32, "tag")?);
        Some(super::RecordTag(t))
    } else {
        None
    };
    if !r.b.is_empty() {
        return Err(FormatError::Record("trailing bytes"));
    }
    // A destroyed key has no wrapped bytes; a live one must have them.
    if (state == KeyState::Destroyed) != wrapped.is_empty() {
        return Err(FormatError::Record("wrapped"));
    }
    if encrypt_until < created_at || decrypt_until < encrypt_until {
        return Err(FormatError::Record("dates"));
    }
    Ok(WrappedDek {
        id: KeyId::from_bytes(id),
        purpose,
        version,
        scope,
        environment,
        state,
        wrapped: WrappedKey {
            kek: KekRef {
                id: kek_id,
                version: kek_version,
            },
            bytes: wrapped,
        },
        created_at,
        encrypt_until,
        decrypt_until,
        max_uses,
        uses,
        sequence,
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> WrappedDek {
        WrappedDek {
            id: KeyId::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]),
            purpose: KeyPurpose::Data,
            version: 0,
            scope: Scope::new("merchant-42").unwrap(),
            environment: Environment::new("test").unwrap(),
            state: KeyState::Active,
            wrapped: WrappedKey {
                kek: KekRef {
                    id: "local".into(),
                    version: 3,
                },
                bytes: vec![9; 60],
            },
            created_at: 1_700_000_000,
            encrypt_until: 1_702_592_000,
            decrypt_until: 1_797_200_000,
            max_uses: 1 << 24,
            uses: 17,
            sequence: 0,
            tag: None,
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(decode(&encode(&r)).unwrap(), r);
    }

    #[test]
    fn v2_round_trip_and_signed_bytes() {
        let mut r = sample();
        r.sequence = 5;
        r.tag = Some(super::super::RecordTag([7; 32]));
        let b = encode(&r);
        assert_eq!(b[0], RECORD_V2);
        assert_eq!(decode(&b).unwrap(), r);
        let signed = signed_bytes(&r);
        assert_eq!(&signed[..RECORD_MAC_LABEL.len()], RECORD_MAC_LABEL);
        assert_eq!(&signed[RECORD_MAC_LABEL.len()..], &b[..b.len() - 32]);
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn every_truncation_and_extension_fails() {
        let b = encode(&sample());
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}
