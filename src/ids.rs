//! Key identifiers and lifecycle states ([`KeyId`], [`KeyState`]): the leaf
//! that both `keys/` and the error types build on (an error names the key it
//! refused), so neither imports the other in a cycle. Parsing a [`KeyId`]
//! from text (its error is a [`crate::ConfigError`]) is in `keys/`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The short id a ciphertext uses to name its DEK: 8 random bytes, printed
/// as 16 hex digits. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl std::hash::Hash for KeyId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0));
    }
}

impl KeyId {
    /// A fresh random id from the OS CSPRNG.
    pub fn random() -> Self {
        use rand_core::{OsRng, RngCore};
        let mut b = [0u8; 8];
        OsRng.fill_bytes(&mut b);
        KeyId(b)
    }

    /// The id with these bytes.
    pub const fn from_bytes(bytes: [u8; 8]) -> Self {
        KeyId(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Lifecycle state of a key (PCI DSS 3.7.5). Transitions only go forward:
/// active → decrypt-only → destroyed, and any live state → compromised →
/// destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum KeyState {
    /// Encrypts and decrypts.
    Active = 1,
    /// Retired: decrypts only.
    DecryptOnly = 2,
    /// Known or suspected compromised: never encrypts; decrypts only so that
    /// data can be re-sealed under a fresh key, and every such open asks for
    /// re-sealing.
    Compromised = 3,
    /// Destroyed: the wrapped key is gone and nothing under it can be opened.
    Destroyed = 4,
}

impl KeyState {
    /// Whether the lifecycle allows moving from `self` to `to`.
    pub fn can_become(self, to: KeyState) -> bool {
        use KeyState::*;
        matches!(
            (self, to),
            (Active, DecryptOnly)
                | (Active, Compromised)
                | (DecryptOnly, Compromised)
                | (Active, Destroyed)
                | (DecryptOnly, Destroyed)
                | (Compromised, Destroyed)
        )
    }

    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => KeyState::Active,
            2 => KeyState::DecryptOnly,
            3 => KeyState::Compromised,
            4 => KeyState::Destroyed,
            _ => return None,
        })
    }
}
