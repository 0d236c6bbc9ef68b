//! The DEK lifecycle of a [`Panseal`] instance (PCI DSS 3.6.4, 3.7.4, 3.7.5):
//! its active DEK per scope (made, wrapped, signed and stored; renewed or
//! retired by age, use count and record state; abandoned when its record
//! fails verification), use reporting, state changes, and keys leaving
//! memory by time and at `fork()` (the sweeper). The API (`crate::api`)
//! calls into it; the seal fast path only reads [`ActiveDek`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::access::Access;
use crate::api::{
    failure_kind, is_record_refusal, to_state, Panseal, ScopeState, Shared, ID_ATTEMPTS,
};
use crate::audit::{Emitter, Operation};
use crate::clock;
use crate::error::{Error, KeyStoreError};
use crate::keys::{unix_now, CachedDek, KeyId, KeyPurpose, KeyRequest, KeyState, WrappedDek};
use crate::keystore::change_record;

/// This instance's active DEK in a scope. Each writer instance has its own,
/// so the use budget is counted in one place with no coordination.
pub(crate) struct ActiveDek {
    pub(crate) entry: Arc<CachedDek>,
    /// Seal attempts counted against the budget (may pass it by the number
    /// of racing threads; those fall back to the slow path unsealed).
    pub(crate) uses: AtomicU64,
    /// Uses already added to the store's record.
    pub(crate) reported: AtomicU64,
    pub(crate) max_uses: u64,
    /// Coarse monotonic nanoseconds after which the fast path stops:
    /// the encrypt-until time or the next state re-check, whichever is first.
    pub(crate) deadline: AtomicU64,
    /// The process that made this DEK. A child forked from it sees the
    /// parent's `ActiveDek` in its copy of memory: it never seals under it
    /// (its uses are the parent's to count), and makes its own.
    pub(crate) pid: u32,
}

impl ActiveDek {
    pub(crate) fn used(&self) -> u64 {
        self.uses.load(Ordering::Relaxed).min(self.max_uses)
    }
}

/// When a sweep is next due on the seal/open paths, after one at `now`.
pub(crate) fn sweep_due(now_mono_nanos: u64, sweep_every: u64) -> u64 {
    now_mono_nanos.saturating_add(sweep_every.saturating_mul(2))
}

/// The sweep of the seal slow path and the open path, where the sweeper
/// thread does not run (it renews the due times before they pass), and at
/// a forked child's first seal. Notices a fork first (one `getpid`).
#[cold]
#[inline(never)]
pub(crate) fn sweep_now(shared: &Arc<Shared>) {
    if shared.pid.load(Ordering::Relaxed) != std::process::id() {
        after_fork(shared);
    }
    shared.sweep();
}

/// In a forked child, the first time it notices the fork (its first seal
/// in any scope, or its first open once a sweep is overdue): wipes every key
/// inherited from the parent — cached DEKs, every scope's active DEK and
/// index keys — and starts the child's own sweeper thread (the parent's
/// does not exist here). The child re-unwraps what it opens (audited as its
/// own unwraps) and makes its own DEKs to seal.
pub(crate) fn after_fork(shared: &Arc<Shared>) {
    let pid = std::process::id();
    if shared.pid.swap(pid, Ordering::AcqRel) == pid {
        // Another thread of this process got here first.
        return;
    }
    let cached = shared.cache.clear();
    let scopes: Vec<Arc<ScopeState>> = shared.scope_states();
    let mut active = 0usize;
    for scope in scopes {
        if scope.active.load().as_ref().is_some_and(|a| a.pid != pid) {
            scope.active.store(None);
            active += 1;
        }
        *scope.index.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
    let (stop, stopped) = std::sync::mpsc::channel();
    // Drops the parent's sender (its sweeper does not exist here).
    *shared.sweeper.lock().unwrap_or_else(|p| p.into_inner()) = stop;
    shared.sweep_due.store(
        sweep_due(clock::mono_nanos(), shared.sweep_every),
        Ordering::Relaxed,
    );
    spawn_sweeper(Arc::downgrade(shared), stopped);
    tracing::info!(
        cached,
        active,
        "forked process: keys inherited from the parent wiped; starting this process's sweeper"
    );
}

/// Starts the thread that wipes expired keys every
/// [`crate::keys::sweep_interval`] of the cache TTL, so that a process that
/// stops calling does not keep them (the seal slow path and opens sweep
/// too where this thread does not run, see [`sweep_now`]; a forked child
/// starts its own, see [`after_fork`]). It holds no strong reference between
/// sweeps and ends when the last handle is dropped.
pub(crate) fn spawn_sweeper(
    shared: std::sync::Weak<Shared>,
    stopped: std::sync::mpsc::Receiver<()>,
) {
    let Some(every) = shared
        .upgrade()
        .map(|s| crate::keys::sweep_interval(s.policy.cache_ttl))
    else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("panseal-sweep".into())
        .spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.sweep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the key sweeper; expired keys are wiped at opens and DEK rotations only");
    }
}

impl Shared {
    /// Wipes what expired: cached keys past their TTL, index keys past
    /// their re-read time, and active DEKs that can no longer seal (past
    /// their encrypt period, or retired or compromised).
    pub(crate) fn sweep(&self) {
        self.sweep_due.store(
            sweep_due(clock::mono_nanos(), self.sweep_every),
            Ordering::Relaxed,
        );
        let now = clock::unix_nanos();
        self.cache.sweep(now);
        let scopes: Vec<Arc<ScopeState>> = self.scope_states();
        let index_fresh = self.policy.recheck_interval.min(self.policy.cache_ttl);
        let now_unix = now / clock::NANOS_PER_SEC;
        for scope in scopes {
            {
                let mut index = scope.index.write().unwrap_or_else(|p| p.into_inner());
                if index
                    .as_ref()
                    .is_some_and(|k| k.loaded.elapsed() >= index_fresh)
                {
                    *index = None;
                }
            }
            if let Some(active) = scope.active.load_full() {
                if now_unix >= active.entry.encrypt_until
                    || active.entry.state() != KeyState::Active
                {
                    // Only if it is still the one we looked at.
                    scope
                        .active
                        .compare_and_swap(&Some(Arc::clone(&active)), None::<Arc<ActiveDek>>);
                }
            }
        }
    }
}

impl Panseal {
    /// This instance's active DEK in this scope, if it was made in this
    /// process; an inherited one (after `fork()`) is dropped, never
    /// reported, retired or used, and with it every key inherited from the
    /// parent ([`after_fork`]).
    pub(crate) fn own_active(&self) -> Option<Arc<ActiveDek>> {
        let active = self.scope.active.load_full()?;
        if active.pid == std::process::id() {
            return Some(active);
        }
        after_fork(&self.shared);
        self.scope.active.store(None);
        tracing::info!(
            key_id = %active.entry.id,
            "forked process: the parent's active DEK is not used here; making a new one"
        );
        None
    }

    /// With `rotate_lock` held: reports use counts, re-reads the active DEK's
    /// record (verified by the key service), and either renews its deadline
    /// or retires it and makes a new one. A record that fails verification
    /// (edited or rolled back in the store) is audited and abandoned: this
    /// instance never seals with it again and makes a fresh DEK.
    pub(crate) async fn refresh_active(&self) -> Result<(), Error> {
        if let Some(active) = self.own_active() {
            let entry = Arc::clone(&active.entry);
            match self.report(&active).await {
                Ok((used, record)) => {
                    let max_uses = active.max_uses;
                    let now = unix_now();
                    entry.set_state(record.state);
                    if record.state == KeyState::Active
                        && now < record.encrypt_until
                        && used < max_uses
                    {
                        active
                            .deadline
                            .store(self.deadline_for(record.encrypt_until), Ordering::Relaxed);
                        return Ok(());
                    }
                    if record.state == KeyState::Active {
                        self.retire(entry.id).await;
                    }
                }
                Err(e) if is_record_refusal(&e) => self.abandon(&active, &e),
                Err(e) => return Err(e),
            }
        }
        self.create_active().await
    }

    /// Stops using this instance's active DEK whose record failed
    /// verification: no more seals, its cache entry wiped (opens under it
    /// re-read the record and are refused), one audit event.
    pub(crate) fn abandon(&self, active: &Arc<ActiveDek>, why: &Error) {
        let id = active.entry.id;
        self.scope
            .active
            .compare_and_swap(&Some(Arc::clone(active)), None::<Arc<ActiveDek>>);
        self.shared.cache.remove(id);
        tracing::error!(key_id = %id, error = %why, "key record failed verification; DEK abandoned");
        if let Some(sink) = self.shared.audit.as_deref() {
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            let access = Access::system("key-lifecycle");
            if let Err(e) = emitter.emit(
                SystemTime::now(),
                Operation::KeyStateChanged,
                Err(failure_kind(why)),
                &access,
                Some(id),
                None,
            ) {
                tracing::warn!(key_id = %id, error = %e, "audit sink refused a lifecycle event");
            }
        }
    }

    /// Changes record `id` through the key service's signature and a
    /// compare-and-swap (see [`change_record`]).
    pub(crate) async fn change(
        &self,
        id: KeyId,
        change: impl FnMut(&WrappedDek) -> Result<Option<WrappedDek>, Error> + Send,
    ) -> Result<WrappedDek, Error> {
        change_record(
            self.shared.key_service.as_ref(),
            self.shared.key_store.as_ref(),
            id,
            self.shared.policy.require_signed_records,
            change,
        )
        .await
    }

    pub(crate) fn deadline_for(&self, encrypt_until: u64) -> u64 {
        let now_unix = unix_now();
        let to_expiry = Duration::from_secs(encrypt_until.saturating_sub(now_unix));
        let wait = to_expiry.min(self.shared.policy.recheck_interval);
        clock::mono_nanos().saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX))
    }

    pub(crate) async fn retire(&self, id: KeyId) {
        match self.change(id, to_state(KeyState::DecryptOnly)).await {
            Ok(_) => {
                if let Some(entry) = self.shared.cache.peek(id) {
                    entry.set_state(KeyState::DecryptOnly);
                }
                self.lifecycle_event(Operation::KeyStateChanged, id);
            }
            // The key expires by date anyway; a failed retire loses nothing.
            Err(e) => tracing::warn!(key_id = %id, error = %e, "could not mark DEK decrypt-only"),
        }
    }

    pub(crate) fn lifecycle_event(&self, op: Operation, id: KeyId) {
        if let Some(sink) = self.shared.audit.as_deref() {
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            let access = Access::system("key-lifecycle");
            if let Err(e) = emitter.emit(SystemTime::now(), op, Ok(()), &access, Some(id), None) {
                tracing::warn!(key_id = %id, error = %e, "audit sink refused a lifecycle event");
            }
        }
    }

    /// Creates, wraps, signs ([`KeyService::authenticate_record`]) and
    /// stores a fresh DEK.
    pub(crate) async fn create_key(&self) -> Result<(WrappedDek, Arc<CachedDek>), Error> {
        let policy = &self.shared.policy;
        let purpose = KeyPurpose::Data;
        for _ in 0..ID_ATTEMPTS {
            let id = KeyId::random();
            let request = KeyRequest {
                id,
                scope: self.scope.scope.clone(),
                environment: self.shared.environment.clone(),
                purpose,
            };
            let (dek, wrapped) = self.shared.key_service.generate(&request).await?;
            let mut record = self.new_record(id, wrapped);
            let (encrypt_until, decrypt_until) = (record.encrypt_until, record.decrypt_until);
            record.tag = crate::keystore::sign(
                self.shared.key_service.as_ref(),
                None,
                &record,
                policy.require_signed_records,
            )
            .await?;
            match self.shared.key_store.insert(&record).await {
                Ok(()) => {
                    let entry = Arc::new(CachedDek::new(
                        id,
                        purpose,
                        &self.scope.scope,
                        &dek,
                        KeyState::Active,
                        encrypt_until,
                        decrypt_until,
                    ));
                    self.lifecycle_event(Operation::KeyCreated, id);
                    return Ok((record, entry));
                }
                Err(KeyStoreError::Duplicate(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KeyStoreError::Conflict.into())
    }

    /// A fresh, unsigned, active data-DEK record under the policy's limits.
    pub(crate) fn new_record(&self, id: KeyId, wrapped: crate::keys::WrappedKey) -> WrappedDek {
        let policy = &self.shared.policy;
        let now = unix_now();
        let encrypt_until = now.saturating_add(policy.encrypt_period.as_secs());
        let decrypt_until = encrypt_until.saturating_add(policy.decrypt_period.as_secs());
        WrappedDek {
            id,
            purpose: KeyPurpose::Data,
            version: 0,
            scope: self.scope.scope.clone(),
            environment: self.shared.environment.clone(),
            state: KeyState::Active,
            wrapped,
            created_at: now,
            encrypt_until,
            decrypt_until,
            max_uses: policy.max_uses,
            uses: 0,
            sequence: 0,
            tag: None,
        }
    }

    pub(crate) async fn create_active(&self) -> Result<(), Error> {
        let (record, entry) = self.create_key().await?;
        // A front end that cannot open (no audit sink) keeps only its
        // active DEK; an instance that also opens caches it for its own
        // reads.
        if self.shared.audit.is_some() {
            self.shared.cache.insert(Arc::clone(&entry));
        }
        let active = ActiveDek {
            entry,
            uses: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            max_uses: record.max_uses,
            deadline: AtomicU64::new(self.deadline_for(record.encrypt_until)),
            pid: std::process::id(),
        };
        self.scope.active.store(Some(Arc::new(active)));
        Ok(())
    }

    /// The body of [`Panseal::rotate_dek`].
    pub(crate) async fn retire_active(&self) -> Result<Option<KeyId>, Error> {
        let _guard = self.scope.rotate_lock.lock().await;
        if self.own_active().is_none() {
            return Ok(None);
        }
        let Some(active) = self.scope.active.swap(None) else {
            return Ok(None);
        };
        if let Err(e) = self.report(&active).await {
            if is_record_refusal(&e) {
                self.abandon(&active, &e);
                return Err(e);
            }
            // Keep it active rather than lose its count.
            self.scope.active.store(Some(active));
            return Err(e);
        }
        let retired = self
            .change(active.entry.id, |r| {
                // Already retired (or further) by a custodian: nothing to do.
                Ok((r.state == KeyState::Active).then(|| {
                    let mut next = r.clone();
                    next.state = KeyState::DecryptOnly;
                    next
                }))
            })
            .await;
        if let Err(e) = retired {
            if is_record_refusal(&e) {
                self.abandon(&active, &e);
                return Ok(Some(active.entry.id));
            }
            return Err(e);
        }
        active.entry.set_state(KeyState::DecryptOnly);
        self.lifecycle_event(Operation::KeyStateChanged, active.entry.id);
        Ok(Some(active.entry.id))
    }

    /// The body of [`Panseal::report_usage`].
    pub(crate) async fn report_active(&self) -> Result<(), Error> {
        let _guard = self.scope.rotate_lock.lock().await;
        if let Some(active) = self.own_active() {
            if let Err(e) = self.report(&active).await {
                if is_record_refusal(&e) {
                    self.abandon(&active, &e);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Adds the uses not yet reported to the store's record (a signed
    /// successor, written by compare-and-swap: a lost swap re-reads and
    /// adds again, so no count is lost); returns the uses so far and the
    /// verified record as stored.
    pub(crate) async fn report(&self, active: &ActiveDek) -> Result<(u64, WrappedDek), Error> {
        let used = active.used();
        let reported = active.reported.load(Ordering::Relaxed);
        let delta = used.saturating_sub(reported);
        let record = self
            .change(active.entry.id, |r| {
                Ok((delta > 0).then(|| {
                    let mut next = r.clone();
                    next.uses = r.uses.saturating_add(delta);
                    next
                }))
            })
            .await?;
        active.reported.store(used.max(reported), Ordering::Relaxed);
        Ok((used, record))
    }

    /// The body of [`Panseal::set_key_state_as`].
    pub(crate) async fn change_state(
        &self,
        id: KeyId,
        state: KeyState,
        access: &Access,
    ) -> Result<(), Error> {
        self.change(id, to_state(state)).await?;
        if let Some(entry) = self.shared.cache.peek(id) {
            entry.set_state(state);
        }
        if state == KeyState::Destroyed {
            self.shared.cache.remove(id);
        }
        if let Some(sink) = self.shared.audit.as_deref() {
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            emitter.emit(
                SystemTime::now(),
                Operation::KeyStateChanged,
                Ok(()),
                access,
                Some(id),
                None,
            )?;
        }
        Ok(())
    }
}
