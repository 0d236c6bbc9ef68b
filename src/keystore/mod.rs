//! Key stores: where wrapped-key records live (your database or a file).
//!
//! A key store holds only [`WrappedDek`] records — wrapped keys and their
//! metadata, never a plaintext key — so a dump of it alone opens nothing.
//! [`KeyStore`] is the trait (implement it for your own storage; the
//! conformance tests in `tests/keystore.rs` show what it must do);
//! [`FileKeyStore`] and [`MemoryKeyStore`] are the implementations here.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::KeyStoreError;
use crate::keys::{KekRef, KeyId, KeyState, Scope, WrappedDek, WrappedKey};

pub(crate) mod file;
mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;

pub use file::FileKeyStore;
pub use memory::MemoryKeyStore;

/// Persistent storage of wrapped-key records.
///
/// Every method is atomic: it either takes full effect (durably, for
/// persistent stores) or none, and returns an error in the second case.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Adds a new record.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Duplicate`] if the id exists (the caller picks a
    /// new id), or a storage error.
    async fn insert(&self, record: &WrappedDek) -> Result<(), KeyStoreError>;

    /// The record with this id, if any.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn fetch(&self, id: KeyId) -> Result<Option<WrappedDek>, KeyStoreError>;

    /// All records, or those of one scope, ordered by id.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn list(&self, scope: Option<&Scope>) -> Result<Vec<WrappedDek>, KeyStoreError>;

    /// Moves a record to a new state along the lifecycle
    /// ([`KeyState::can_become`]); moving to [`KeyState::Destroyed`] erases
    /// the wrapped key. Setting the state it already has is a no-op. Returns
    /// the updated record.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::NotFound`], [`KeyStoreError::Transition`], or a
    /// storage error.
    async fn set_state(&self, id: KeyId, state: KeyState) -> Result<WrappedDek, KeyStoreError>;

    /// Replaces the wrapped key after a rewrap, if the record is still wrapped
    /// under `expected` (compare-and-set).
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Conflict`] if the record's KEK is no longer
    /// `expected`, [`KeyStoreError::NotFound`], or a storage error.
    async fn replace_wrap(
        &self,
        id: KeyId,
        expected: &KekRef,
        wrapped: &WrappedKey,
    ) -> Result<(), KeyStoreError>;

    /// Adds `n` to the record's reported use count.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::NotFound`] or a storage error.
    async fn add_uses(&self, id: KeyId, n: u64) -> Result<(), KeyStoreError>;
}

/// The record set both in-crate stores keep in memory; each mutation is
/// applied to a copy first so a failed write leaves the live set unchanged.
#[derive(Clone, Default)]
pub(crate) struct Records {
    pub(crate) map: BTreeMap<KeyId, WrappedDek>,
}

impl Records {
    pub(crate) fn insert(&mut self, record: &WrappedDek) -> Result<(), KeyStoreError> {
        if self.map.contains_key(&record.id) {
            return Err(KeyStoreError::Duplicate(record.id));
        }
        self.map.insert(record.id, record.clone());
        Ok(())
    }

    pub(crate) fn list(&self, scope: Option<&Scope>) -> Vec<WrappedDek> {
        self.map
            .values()
            .filter(|r| scope.is_none_or(|s| &r.scope == s))
            .cloned()
            .collect()
    }

    /// Returns the updated record and whether anything changed.
    pub(crate) fn set_state(
        &mut self,
        id: KeyId,
        state: KeyState,
    ) -> Result<(WrappedDek, bool), KeyStoreError> {
        let r = self.map.get_mut(&id).ok_or(KeyStoreError::NotFound(id))?;
        if r.state == state {
            return Ok((r.clone(), false));
        }
        if !r.state.can_become(state) {
            return Err(KeyStoreError::Transition {
                id,
                from: r.state,
                to: state,
            });
        }
        r.state = state;
        if state == KeyState::Destroyed {
            // Crypto-shredding: the wrapped key is gone from the store.
            zeroize::Zeroize::zeroize(&mut r.wrapped.bytes);
            r.wrapped.bytes = Vec::new();
        }
        Ok((r.clone(), true))
    }

    pub(crate) fn replace_wrap(
        &mut self,
        id: KeyId,
        expected: &KekRef,
        wrapped: &WrappedKey,
    ) -> Result<(), KeyStoreError> {
        let r = self.map.get_mut(&id).ok_or(KeyStoreError::NotFound(id))?;
        if &r.wrapped.kek != expected || r.state == KeyState::Destroyed {
            return Err(KeyStoreError::Conflict);
        }
        r.wrapped = wrapped.clone();
        Ok(())
    }

    pub(crate) fn add_uses(&mut self, id: KeyId, n: u64) -> Result<(), KeyStoreError> {
        let r = self.map.get_mut(&id).ok_or(KeyStoreError::NotFound(id))?;
        r.uses = r.uses.saturating_add(n);
        Ok(())
    }
}
