//! Keys: ids, states, records of wrapped DEKs, the DEK itself, the rotation
//! policy and the in-memory cache of unwrapped DEKs.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
pub use crate::ids::{KeyId, KeyState};

mod cache;
mod dek;
pub(crate) mod lifecycle;
mod policy;
pub(crate) mod record;

pub(crate) use cache::{sweep_interval, CachedDek, DekCache};
pub use dek::Dek;
pub use policy::{Policy, MAX_CACHE_TTL, NONCE_LIMIT};

/// Strength of every DEK, in bits (AES-256).
pub const DEK_STRENGTH_BITS: u32 = 256;

impl KeyId {
    /// Parses 16 hex digits.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Name`] if `s` is not 16 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, ConfigError> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b)
            .map_err(|_| ConfigError::Name("key id must be 16 hex digits".into()))?;
        Ok(KeyId::from_bytes(b))
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyId::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// What a key is for. A key of one purpose is refused for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum KeyPurpose {
    /// A data-encryption key for sealing PANs.
    Data = 1,
    /// A blind-index key for keyed hashes of PANs (PCI DSS 3.5.1.1).
    Index = 2,
}

impl KeyPurpose {
    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => KeyPurpose::Data,
            2 => KeyPurpose::Index,
            _ => return None,
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Eq, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl $name {
            /// Validates and wraps a name: 1 to 64 characters from
            /// `A-Z a-z 0-9 . _ : -`.
            ///
            /// # Errors
            ///
            /// [`ConfigError::Name`] if the name is empty, too long or uses
            /// other characters.
            pub fn new(name: &str) -> Result<Self, ConfigError> {
                validate_name(name, $what)?;
                Ok($name(std::sync::Arc::from(name)))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                // Handles of one scope share the allocation: a pointer
                // comparison settles the common case on the hot path.
                std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A key scope: the tenant, merchant or period a set of DEKs belongs to.
    /// DEKs and index keys never cross scopes.
    Scope,
    "scope"
);
name_type!(
    /// An environment tag (`prod`, `test`, …). Keys of one environment are
    /// refused in another (PCI DSS 3.6.1.1).
    Environment,
    "environment"
);

/// Longest scope or environment name.
pub(crate) const MAX_NAME_LEN: usize = 64;

fn validate_name(name: &str, what: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ConfigError::Name(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(ConfigError::Name(format!(
            "{what} may use only A-Z a-z 0-9 . _ : -"
        )));
    }
    Ok(())
}

/// Names a key-encryption key and its version inside a key service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KekRef {
    /// The KEK's identifier in its key service (a name, label or ARN).
    pub id: String,
    /// The KEK version.
    pub version: u32,
}

impl fmt::Display for KekRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#v{}", self.id, self.version)
    }
}

/// A DEK encrypted under a KEK: what a key service returns from wrap.
/// Not secret without the KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// The KEK (and version) that wrapped it.
    pub kek: KekRef,
    /// The key service's wrapped bytes.
    pub bytes: Vec<u8>,
}

/// What a key service is asked about one key: the id, scope, environment and
/// purpose that its wrap is bound to as associated data (PCI DSS 3.7.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRequest {
    /// The key's id.
    pub id: KeyId,
    /// The key's scope.
    pub scope: Scope,
    /// The key's environment.
    pub environment: Environment,
    /// The key's purpose.
    pub purpose: KeyPurpose,
}

impl KeyRequest {
    /// The associated data a key service binds a wrap to: a fixed label,
    /// purpose, id, scope, environment, KEK id and KEK version, each
    /// length-prefixed (see `FORMAT.md`, "Wrap binding"). Changing any of
    /// them makes the wrap fail to open.
    pub fn wrap_aad(&self, kek: &KekRef) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + kek.id.len());
        aad.extend_from_slice(b"panseal-wrap-v1");
        aad.push(self.purpose as u8);
        aad.extend_from_slice(self.id.as_bytes());
        for part in [
            self.scope.as_str().as_bytes(),
            self.environment.as_str().as_bytes(),
            kek.id.as_bytes(),
        ] {
            aad.extend_from_slice(&(part.len() as u16).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&kek.version.to_be_bytes());
        aad
    }
}

/// The stored record of one wrapped key (a DEK or a blind-index key): what a
/// [`crate::KeyStore`] keeps. Holds no plaintext key.
///
/// Its binary encoding is specified in `FORMAT.md` ("Key-store record") and
/// produced by [`WrappedDek::to_bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WrappedDek {
    /// The key's id.
    pub id: KeyId,
    /// Data or index key.
    pub purpose: KeyPurpose,
    /// Version within (scope, purpose): index keys count 1, 2, …; DEKs 0.
    pub version: u32,
    /// Tenant/merchant/period scope.
    pub scope: Scope,
    /// Environment tag.
    pub environment: Environment,
    /// Lifecycle state.
    pub state: KeyState,
    /// The wrapped key; empty once destroyed.
    pub wrapped: WrappedKey,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// End of the originator-usage period (no sealing after), Unix seconds.
    pub encrypt_until: u64,
    /// End of the recipient-usage period (no opening after), Unix seconds.
    pub decrypt_until: u64,
    /// The use budget: at most this many seals.
    pub max_uses: u64,
    /// Seals reported so far (may lag the live count of a running writer).
    pub uses: u64,
    /// Record version 2: incremented at every change the key service signs,
    /// so a service that remembers the newest one refuses a rolled-back row.
    pub sequence: u64,
    /// Record version 2: the key service's MAC over the record's lifecycle
    /// fields ([`crate::KeyService::authenticate_record`]); `None` for a
    /// version-1 record written before records were authenticated.
    pub tag: Option<RecordTag>,
}

/// The key service's MAC over a key-store record's canonical encoding
/// (`FORMAT.md`, "Key-store record, version 2"). Not secret, but compared
/// in constant time.
#[derive(Clone, Copy, Eq)]
pub struct RecordTag(pub [u8; 32]);

impl PartialEq for RecordTag {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Debug for RecordTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordTag({})", hex::encode(&self.0[..8]))
    }
}

impl WrappedDek {
    /// The request the key service binds this record's wrap to.
    pub fn key_request(&self) -> KeyRequest {
        KeyRequest {
            id: self.id,
            scope: self.scope.clone(),
            environment: self.environment.clone(),
            purpose: self.purpose,
        }
    }

    /// Encodes the record (`FORMAT.md`, "Key-store record"): version 2
    /// when it carries a [`RecordTag`], version 1 otherwise.
    pub fn to_bytes(&self) -> Vec<u8> {
        record::encode(self)
    }

    /// The bytes a key service signs to make this record's [`RecordTag`]
    /// (`"panseal-record-v2" || record_v2 without the tag`; the current
    /// `tag` is ignored).
    pub fn signed_bytes(&self) -> Vec<u8> {
        record::signed_bytes(self)
    }

    /// Decodes a record; strict (no trailing bytes, every field checked).
    ///
    /// # Errors
    ///
    /// [`crate::error::FormatError::Record`] naming the bad field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::error::FormatError> {
        record::decode(bytes)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Longest a new record's `created_at` may be from the signer's clock, in
/// seconds ([`WrappedDek::check_transition`]).
pub const RECORD_CLOCK_SKEW: u64 = 300;

impl WrappedDek {
    /// Whether a key service may sign `next` as the successor of
    /// `previous` (`None`: a record the service has not signed before) for a
    /// credential with `signer`'s permissions, at Unix time `now`. Every
    /// backend's [`crate::KeyService::authenticate_record`] applies this
    /// rule before it signs, so a database writer holding a `wrap`
    /// credential still cannot reactivate, extend, reset or relabel a key:
    ///
    /// * a new record (`previous` `None`) signed with `wrap`: active, no
    ///   uses, sequence 0, created within [`RECORD_CLOCK_SKEW`] of `now`,
    ///   `created_at ≤ encrypt_until ≤ decrypt_until`; any other unsigned
    ///   record (the version-1 upgrade) needs `custodian`;
    /// * a successor: same id, purpose, version, scope, environment and
    ///   creation time; sequence exactly one more; state unchanged or
    ///   forward ([`KeyState::can_become`]); dates and `max_uses` never
    ///   raised; `uses` never lowered; the wrapped key unchanged unless the
    ///   signer has `rewrap` or `custodian` (a rewrap), and empty once
    ///   destroyed;
    /// * with only `wrap`, the one state change allowed is active →
    ///   decrypt-only (retiring); compromise and destruction need `custodian`.
    ///
    /// # Errors
    ///
    /// A reason (never key material) for the refusal.
    pub fn check_transition(
        previous: Option<&WrappedDek>,
        next: &WrappedDek,
        signer: &crate::Permissions,
        now: u64,
    ) -> Result<(), String> {
        let Some(p) = previous else {
            let fresh = next.state == KeyState::Active
                && next.uses == 0
                && next.sequence == 0
                && next.created_at.abs_diff(now) <= RECORD_CLOCK_SKEW
                && next.created_at <= next.encrypt_until
                && next.encrypt_until <= next.decrypt_until
                && !next.wrapped.bytes.is_empty();
            return if fresh && (signer.wrap || signer.custodian) {
                Ok(())
            } else if signer.custodian {
                // Upgrading a version-1 record as it stands.
                if next.sequence == 0 {
                    Ok(())
                } else {
                    Err("an upgraded record starts at sequence 0".into())
                }
            } else {
                Err("a new record must be active, unused, sequence 0 and created now".into())
            };
        };
        if p.id != next.id
            || p.purpose != next.purpose
            || p.version != next.version
            || p.scope != next.scope
            || p.environment != next.environment
            || p.created_at != next.created_at
        {
            return Err("identity fields may not change".into());
        }
        if next.sequence != p.sequence.wrapping_add(1) || next.sequence == 0 {
            return Err("sequence must be the previous one plus one".into());
        }
        if next.state != p.state && !p.state.can_become(next.state) {
            return Err(format!(
                "state may only move forward ({:?} -> {:?} refused)",
                p.state, next.state
            ));
        }
        if next.encrypt_until > p.encrypt_until
            || next.decrypt_until > p.decrypt_until
            || next.max_uses > p.max_uses
        {
            return Err("dates and use budget may not be extended".into());
        }
        if next.uses < p.uses {
            return Err("use count may not go down".into());
        }
        if next.state == KeyState::Destroyed {
            if !next.wrapped.bytes.is_empty() {
                return Err("a destroyed record keeps no wrapped key".into());
            }
        } else if next.wrapped != p.wrapped && !(signer.rewrap || signer.custodian) {
            return Err("only a rewrap may replace the wrapped key".into());
        }
        let state_ok = next.state == p.state
            || signer.custodian
            || (signer.wrap && p.state == KeyState::Active && next.state == KeyState::DecryptOnly);
        if !state_ok {
            return Err("this state change needs a custodian".into());
        }
        if !(signer.wrap || signer.rewrap || signer.custodian) {
            return Err("signing a record needs wrap, rewrap or custodian".into());
        }
        Ok(())
    }
}
