//! Key stores: where wrapped-key records live (your database or a file).
//!
//! A key store holds only [`WrappedDek`] records — wrapped keys and their
//! metadata, never a plaintext key — so a dump of it alone opens nothing.
//! [`KeyStore`] is the trait (implement it for your own storage; the
//! conformance tests in `tests/it/keystore.rs` show what it must do);
//! [`FileKeyStore`] and [`MemoryKeyStore`] are the implementations here.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::{Error, KeyError, KeyServiceError, KeyStoreError};
use crate::keys::{KeyId, KeyState, Scope, WrappedDek};
use crate::keyservice::KeyService;

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

    /// Replaces `previous` by `next` (the same id) if the stored record is
    /// still exactly `previous`, byte for byte (compare-and-swap on the
    /// record's sequence and tag). Every change of a record goes through
    /// here: the library reads the record, has the key service verify it,
    /// builds and signs the successor (sequence + 1), and writes it with
    /// this call. A store does not judge the change (the key service's
    /// signature does); it only refuses to lose a concurrent one.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Conflict`] if the stored record is no longer
    /// `previous` (re-read and retry), [`KeyStoreError::NotFound`], or a
    /// storage error.
    async fn update(&self, previous: &WrappedDek, next: &WrappedDek) -> Result<(), KeyStoreError>;
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

    /// The compare-and-swap of [`KeyStore::update`].
    pub(crate) fn update(
        &mut self,
        previous: &WrappedDek,
        next: &WrappedDek,
    ) -> Result<(), KeyStoreError> {
        if previous.id != next.id {
            return Err(KeyStoreError::Backend(
                "an update must keep the record's id".into(),
            ));
        }
        let r = self
            .map
            .get_mut(&previous.id)
            .ok_or(KeyStoreError::NotFound(previous.id))?;
        if r.to_bytes() != previous.to_bytes() {
            return Err(KeyStoreError::Conflict);
        }
        *r = next.clone();
        Ok(())
    }
}

/// How often a record change is retried after losing a compare-and-swap.
const CAS_ATTEMPTS: usize = 16;

/// Checks a record read for use with the key service
/// ([`KeyService::verify_record`]). Untagged (version-1) records pass
/// unless `require_tag`; the caller never seals with one.
///
/// # Errors
///
/// [`KeyError::RecordTampered`], [`KeyError::RecordStale`],
/// [`KeyError::Untagged`] (with `require_tag`), or the service's error.
pub(crate) async fn verify(
    key_service: &dyn KeyService,
    record: &WrappedDek,
    require_tag: bool,
) -> Result<(), Error> {
    if record.tag.is_none() {
        if require_tag {
            return Err(KeyError::Untagged(record.id).into());
        }
        // A service that remembers signing this id calls an unsigned
        // record of it stale (a stripped tag: a downgrade); any other
        // answer leaves a genuine version-1 record usable for opening.
        return match key_service.verify_record(record).await {
            // Never signed by this service: a genuine version-1 record.
            Ok(()) | Err(KeyServiceError::RecordTampered(_) | KeyServiceError::Unsupported(_)) => {
                Ok(())
            }
            Err(KeyServiceError::RecordStale(_)) => Err(KeyError::RecordStale(record.id).into()),
            // The service could not say (down, refused): not opened.
            Err(e) => Err(record_error(record.id, e)),
        };
    }
    match key_service.verify_record(record).await {
        Ok(()) => Ok(()),
        // A service that signs and verifies nothing (none in this crate
        // once every backend implements issue 10) cannot refuse either.
        Err(KeyServiceError::Unsupported(_)) if !require_tag => {
            tracing::warn!(key_id = %record.id, "key service does not verify key records");
            Ok(())
        }
        Err(e) => Err(record_error(record.id, e)),
    }
}

/// Has the key service sign `next` as the successor of `previous`.
/// `Ok(None)` only for a service that does not sign records at all
/// ([`KeyServiceError::Unsupported`]) when the policy allows unsigned
/// records: the record is then written as version 1, as before issue 10.
pub(crate) async fn sign(
    key_service: &dyn KeyService,
    previous: Option<&WrappedDek>,
    next: &WrappedDek,
    require_tag: bool,
) -> Result<Option<crate::keys::RecordTag>, Error> {
    match key_service.authenticate_record(previous, next).await {
        Ok(tag) => Ok(Some(tag)),
        Err(KeyServiceError::Unsupported(_)) if !require_tag => {
            tracing::warn!(key_id = %next.id, "key service does not sign key records; writing an unsigned (version 1) record");
            Ok(None)
        }
        Err(e) => Err(record_error(next.id, e)),
    }
}

fn record_error(id: KeyId, e: KeyServiceError) -> Error {
    match e {
        KeyServiceError::RecordTampered(_) => KeyError::RecordTampered(id).into(),
        KeyServiceError::RecordStale(_) => KeyError::RecordStale(id).into(),
        other => other.into(),
    }
}

/// Changes the record `id`: reads it, has the key service verify it,
/// builds the successor with `change` (given the verified record; `None`
/// = nothing to change), sets its sequence to one more, has the service
/// sign it ([`KeyService::authenticate_record`], which applies
/// [`WrappedDek::check_transition`]) and writes it with a
/// compare-and-swap ([`KeyStore::update`]); a lost swap re-reads and
/// starts again, so no concurrent change (a use count) is lost. A
/// version-1 record is signed as it stands first (needs `custodian`), in
/// the same write. After the write the service verifies the new record,
/// which moves its rollback memory forward. Returns the record as stored.
///
/// # Errors
///
/// [`KeyError::UnknownKey`], the verification errors of a tampered or
/// rolled-back record, [`KeyServiceError::RecordTransition`] for a change
/// the lifecycle forbids, errors of `change`, key-service and key-store
/// errors.
pub(crate) async fn change_record(
    key_service: &dyn KeyService,
    store: &dyn KeyStore,
    id: KeyId,
    require_tag: bool,
    mut change: impl FnMut(&WrappedDek) -> Result<Option<WrappedDek>, Error> + Send,
) -> Result<WrappedDek, Error> {
    for _ in 0..CAS_ATTEMPTS {
        let stored = store.fetch(id).await?.ok_or(KeyError::UnknownKey(id))?;
        // Another writer may have stored (and the service registered) a
        // successor since our read: "stale" then means "read again", and
        // only a record that is still the stored one and still stale is
        // refused.
        let moved_on = || async { matches!(store.fetch(id).await, Ok(Some(now)) if now != stored) };
        match verify(key_service, &stored, require_tag).await {
            Err(Error::Key(KeyError::RecordStale(_))) if moved_on().await => continue,
            r => r?,
        }
        let Some(mut next) = change(&stored)? else {
            return Ok(stored);
        };
        let previous = if stored.tag.is_some() {
            Some(stored.clone())
        } else {
            let mut upgraded = stored.clone();
            upgraded.sequence = 0;
            upgraded.tag = sign(key_service, None, &upgraded, require_tag).await?;
            upgraded.tag.is_some().then_some(upgraded)
        };
        next.id = id;
        next.tag = None;
        match &previous {
            Some(p) => {
                next.sequence = p.sequence.wrapping_add(1);
                next.tag = match sign(key_service, Some(p), &next, require_tag).await {
                    Err(Error::Key(KeyError::RecordStale(_))) if moved_on().await => continue,
                    r => r?,
                };
            }
            // A service that signs nothing: the version-1 successor.
            None => next.sequence = 0,
        }
        match store.update(&stored, &next).await {
            Ok(()) if next.tag.is_none() => return Ok(next),
            Ok(()) => {
                // Moves the service's rollback memory to the new record
                // (it may refuse nothing here: the record was just signed).
                if let Err(e) = key_service.verify_record(&next).await {
                    tracing::warn!(key_id = %id, error = %e, "key service did not confirm a record it signed");
                }
                return Ok(next);
            }
            Err(KeyStoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(KeyStoreError::Conflict.into())
}

/// Rewraps the record `id` under the key service's newest KEK version
/// without the key leaving the service, and stores the signed successor
/// (compare-and-swap; see the key-rotation tool). A record already under
/// the newest version, or destroyed, is left as it is. Returns the record
/// as stored.
///
/// # Errors
///
/// As [`KeyStore::update`] after a verified read: a tampered or
/// rolled-back record ([`KeyError::RecordTampered`],
/// [`KeyError::RecordStale`]), key-service errors (needs `rewrap`), and
/// key-store errors.
pub async fn rewrap_record(
    key_service: &dyn KeyService,
    store: &dyn KeyStore,
    id: KeyId,
) -> Result<WrappedDek, Error> {
    let newest = key_service.kek_info().await?;
    // The rewrap itself is asynchronous: read, verify and rewrap first,
    // then change the record (retrying from the top on a lost swap).
    for _ in 0..CAS_ATTEMPTS {
        let stored = store.fetch(id).await?.ok_or(KeyError::UnknownKey(id))?;
        if stored.state == KeyState::Destroyed
            || (stored.wrapped.kek.id == newest.id && stored.wrapped.kek.version == newest.version)
        {
            return Ok(stored);
        }
        verify(key_service, &stored, false).await?;
        let wrapped = key_service
            .rewrap(&stored.key_request(), &stored.wrapped)
            .await?;
        let expected = stored.wrapped.clone();
        let result = change_record(key_service, store, id, false, |current| {
            // Other changes (a use-count report) may land meanwhile; only
            // a change of the wrap itself makes this rewrap obsolete.
            if current.wrapped != expected {
                return Err(KeyStoreError::Conflict.into());
            }
            let mut next = current.clone();
            next.wrapped = wrapped.clone();
            Ok(Some(next))
        })
        .await;
        match result {
            Err(Error::KeyStore(KeyStoreError::Conflict)) => continue,
            other => return other,
        }
    }
    Err(KeyStoreError::Conflict.into())
}

/// Signs every version-1 (untagged) record of `environment` in `store` as it
/// stands (the documented upgrade step, `FORMAT.md` §9): each becomes a
/// version-2 record with sequence 0. Needs a `custodian` credential.
/// Returns how many were upgraded; records already signed are left alone,
/// so the step can be repeated after an interruption.
///
/// # Errors
///
/// Key-service errors (a credential without `custodian` is refused with
/// [`KeyServiceError::RecordTransition`] or `PermissionDenied`), key-store
/// errors.
pub(crate) async fn upgrade_records(
    key_service: &dyn KeyService,
    store: &dyn KeyStore,
    environment: &crate::keys::Environment,
) -> Result<u64, Error> {
    let mut upgraded = 0;
    for record in store.list(None).await? {
        if record.tag.is_some() || &record.environment != environment {
            continue;
        }
        let mut next = record.clone();
        next.sequence = 0;
        next.tag = Some(
            key_service
                .authenticate_record(None, &next)
                .await
                .map_err(|e| record_error(record.id, e))?,
        );
        match store.update(&record, &next).await {
            Ok(()) => upgraded += 1,
            // Changed meanwhile (another upgrader): leave it.
            Err(KeyStoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(upgraded)
}
