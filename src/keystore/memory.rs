use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{KeyStore, Records};
use crate::error::KeyStoreError;
use crate::keys::{KeyId, Scope, WrappedDek};

/// A key store in process memory, lost at exit. For tests, examples and
/// benchmarks. Cheap to clone; clones share the records.
#[derive(Clone, Default)]
pub struct MemoryKeyStore {
    records: Arc<Mutex<Records>>,
}

impl std::fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryKeyStore")
    }
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn insert(&self, record: &WrappedDek) -> Result<(), KeyStoreError> {
        self.lock().insert(record)
    }

    async fn fetch(&self, id: KeyId) -> Result<Option<WrappedDek>, KeyStoreError> {
        Ok(self.lock().map.get(&id).cloned())
    }

    async fn list(&self, scope: Option<&Scope>) -> Result<Vec<WrappedDek>, KeyStoreError> {
        Ok(self.lock().list(scope))
    }

    async fn update(&self, previous: &WrappedDek, next: &WrappedDek) -> Result<(), KeyStoreError> {
        self.lock().update(previous, next)
    }
}
