//! The async API: [`Panseal`] and its builder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwapOption;

use crate::access::Access;
use crate::audit::{AuditSink, Emitter, Operation};
use crate::clock;
use crate::context::Context;
use crate::error::AdmitItemError;
use crate::error::{ConfigError, Error, KeyError, KeyServiceError, KeyStoreError};
use crate::format::SealedPan;
use crate::index::{self, BlindIndex};
use crate::ingest::{IngestKeyInfo, IngestSealed, IngestSealer, SealedRef};
use crate::keys::lifecycle::{spawn_sweeper, sweep_due, sweep_now, ActiveDek};
use crate::keys::{
    unix_now, CachedDek, DekCache, Environment, KeyId, KeyPurpose, KeyRequest, KeyState, Policy,
    Scope, WrappedDek, DEK_STRENGTH_BITS,
};
use crate::keyservice::IndexKeyInfo;
use crate::keyservice::KeyService;
use crate::keyservice::{AdmitItem, AdmitRequest, IngestOpenRequest, MAX_ADMIT_BATCH};
use crate::keystore::verify;
use crate::keystore::KeyStore;
use crate::pan::Pan;
use crate::seal;

/// How many fresh ids to try when a new key id collides with a stored one.
pub(crate) const ID_ATTEMPTS: usize = 4;

/// The result of opening a sealed PAN.
#[derive(Debug)]
#[non_exhaustive]
pub struct Opened {
    /// The PAN (wiped on drop; prints masked).
    pub pan: Pan,
    /// `true` when the ciphertext's DEK is no longer active (retired, or
    /// past its encrypt period): re-seal it when convenient
    /// ([`Panseal::seal_pan`] with the same context, or [`Panseal::reseal`]).
    /// (Under a compromised DEK, [`Panseal::open_pan`] refuses with
    /// [`KeyError::Compromised`]: only [`Panseal::reseal`] opens it.)
    pub needs_reseal: bool,
}

/// Why a sealed PAN is opened: to hand the PAN to the caller, or only to
/// seal it again at once (the one use a compromised DEK still has).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenFor {
    /// [`Panseal::open_pan`]: the caller gets the PAN.
    Caller,
    /// [`Panseal::reseal`]: the PAN is sealed again under the active DEK
    /// and dropped.
    Reseal,
}

/// Builds a [`Panseal`]. Key service, key store, environment and scope are
/// required; the audit sink is required for opening (an encrypt-only front
/// end may omit it).
#[derive(Default)]
#[must_use]
pub struct PansealBuilder {
    key_service: Option<Arc<dyn KeyService>>,
    key_store: Option<Arc<dyn KeyStore>>,
    audit: Option<Arc<dyn AuditSink>>,
    policy: Policy,
    scope: Option<String>,
    environment: Option<String>,
}

impl PansealBuilder {
    /// The key service that wraps and unwraps DEKs.
    pub fn key_service(mut self, ks: impl KeyService + 'static) -> Self {
        self.key_service = Some(Arc::new(ks));
        self
    }

    /// A shared key service.
    pub fn key_service_arc(mut self, ks: Arc<dyn KeyService>) -> Self {
        self.key_service = Some(ks);
        self
    }

    /// The key store that holds wrapped-DEK records.
    pub fn key_store(mut self, store: impl KeyStore + 'static) -> Self {
        self.key_store = Some(Arc::new(store));
        self
    }

    /// A shared key store.
    pub fn key_store_arc(mut self, store: Arc<dyn KeyStore>) -> Self {
        self.key_store = Some(store);
        self
    }

    /// The audit sink for opens and unwraps.
    pub fn audit(mut self, sink: impl AuditSink + 'static) -> Self {
        self.audit = Some(Arc::new(sink));
        self
    }

    /// A shared audit sink.
    pub fn audit_arc(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = Some(sink);
        self
    }

    /// Rotation and cache policy (default: [`Policy::default`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The key scope (tenant, merchant or period) of this handle; more scopes
    /// through [`Panseal::with_scope`].
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.to_owned());
        self
    }

    /// The environment tag (`prod`, `test`, …); keys of other environments
    /// are refused.
    pub fn environment(mut self, environment: &str) -> Self {
        self.environment = Some(environment.to_owned());
        self
    }

    /// Checks the configuration and the key service's KEK, and builds.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a missing part or bad value;
    /// [`Error::KeyService`] if the service is unreachable, serves another
    /// environment, or its KEK is weaker than 256 bits (PCI DSS 3.6.1).
    pub async fn build(self) -> Result<Panseal, Error> {
        let key_service = self
            .key_service
            .ok_or(ConfigError::Missing("key service"))?;
        let key_store = self.key_store.ok_or(ConfigError::Missing("key store"))?;
        let environment = Environment::new(
            self.environment
                .as_deref()
                .ok_or(ConfigError::Missing("environment"))?,
        )?;
        let scope = Scope::new(self.scope.as_deref().ok_or(ConfigError::Missing("scope"))?)?;
        self.policy.validate()?;
        let info = key_service.kek_info().await?;
        if info.strength_bits < DEK_STRENGTH_BITS {
            return Err(KeyServiceError::WeakKek {
                kek_bits: info.strength_bits,
                dek_bits: DEK_STRENGTH_BITS,
            }
            .into());
        }
        if info.environment != environment.as_str() {
            return Err(KeyServiceError::Environment {
                service: info.environment,
                request: environment.to_string(),
            }
            .into());
        }
        let reveal_only = reveal_only(key_service.as_ref()).await?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let sweep_every =
            u64::try_from(crate::keys::sweep_interval(self.policy.cache_ttl).as_nanos())
                .unwrap_or(u64::MAX);
        let shared = Arc::new(Shared {
            cache: DekCache::new(self.policy.cache_capacity, self.policy.cache_ttl),
            pid: AtomicU32::new(std::process::id()),
            sweep_every,
            sweep_due: AtomicU64::new(sweep_due(clock::mono_nanos(), sweep_every)),
            key_service,
            key_store,
            audit: self.audit,
            policy: self.policy,
            environment,
            scopes: Mutex::new(HashMap::new()),
            sweeper: Mutex::new(stop),
            reveal_only,
        });
        spawn_sweeper(Arc::downgrade(&shared), stopped);
        let scope = shared.scope_state(scope);
        Ok(Panseal { shared, scope })
    }
}

pub(crate) struct Shared {
    pub(crate) key_service: Arc<dyn KeyService>,
    pub(crate) key_store: Arc<dyn KeyStore>,
    pub(crate) audit: Option<Arc<dyn AuditSink>>,
    pub(crate) policy: Policy,
    pub(crate) environment: Environment,
    pub(crate) cache: DekCache,
    pub(crate) scopes: Mutex<HashMap<Scope, Arc<ScopeState>>>,
    /// The process whose keys these are: the one that built the instance,
    /// or a forked child once it noticed the fork (see [`after_fork`]).
    pub(crate) pid: AtomicU32,
    /// Nanoseconds between two sweeps.
    pub(crate) sweep_every: u64,
    /// Coarse monotonic nanoseconds after which the seal slow path sweeps
    /// itself: two intervals after the last sweep, so only a process whose
    /// sweeper thread does not run (a forked child that has not noticed the
    /// fork yet, a failed thread spawn) ever does. (Opens use the cache's
    /// own timer, on the clock they read anyway.)
    pub(crate) sweep_due: AtomicU64,
    /// Dropped with the last handle: stops the sweeper thread (replaced in
    /// a forked child, which starts its own).
    pub(crate) sweeper: Mutex<std::sync::mpsc::Sender<()>>,
    /// The credential may `reveal` but not `unwrap` (asked once, at build):
    /// opens go through [`KeyService::reveal`] and no DEK enters this
    /// process.
    pub(crate) reveal_only: bool,
}

/// Whether `ks`'s credential reveals but does not unwrap. A service that
/// cannot say (an older keyd) is taken to unwrap, as before; an outage
/// fails the build.
async fn reveal_only(ks: &dyn KeyService) -> Result<bool, Error> {
    match ks.permissions().await {
        Ok(p) => Ok(p.reveal && !p.unwrap),
        Err(e) if e.is_retryable() || matches!(e, KeyServiceError::Sealed) => Err(e.into()),
        Err(_) => Ok(false),
    }
}

impl Shared {
    /// Every scope's state, copied out of the lock.
    pub(crate) fn scope_states(&self) -> Vec<Arc<ScopeState>> {
        self.scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn scope_state(&self, scope: Scope) -> Arc<ScopeState> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(scopes.entry(scope.clone()).or_insert_with(|| {
            Arc::new(ScopeState {
                scope,
                active: ArcSwapOption::empty(),
                rotate_lock: tokio::sync::Mutex::new(()),
                index: RwLock::new(None),
                index_lock: tokio::sync::Mutex::new(()),
                ingest: RwLock::new(None),
                admit: tokio::sync::Mutex::new(None),
            })
        }))
    }
}

/// Per-scope state: this instance's active DEK and the scope's index keys.
pub(crate) struct ScopeState {
    pub(crate) scope: Scope,
    pub(crate) active: ArcSwapOption<ActiveDek>,
    pub(crate) rotate_lock: tokio::sync::Mutex<()>,
    pub(crate) index: RwLock<Option<IndexKeys>>,
    pub(crate) index_lock: tokio::sync::Mutex<()>,
    /// The scope's ingest public keys as the key service listed them.
    pub(crate) ingest: RwLock<Option<(Vec<IngestKeyInfo>, Instant)>>,
    /// This instance's admission DEK in the scope (its plaintext stays in
    /// the key service); the lock serializes this instance's admissions.
    pub(crate) admit: tokio::sync::Mutex<Option<AdmitDek>>,
}

/// The admission DEK: a data DEK made by [`KeyService::generate_wrapped`],
/// whose plaintext never entered this process. Only its stored record.
pub(crate) struct AdmitDek {
    record: WrappedDek,
    /// Items sealed under it so far (admitted), counted like seals.
    uses: u64,
    /// Uses already added to the store's record.
    reported: u64,
}

/// One admitted item: the compact ciphertext (under an admission DEK) and
/// its blind index under the scope's active index key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Admission {
    /// The compact 48-byte form, bound to the same context.
    pub sealed: SealedPan,
    /// The blind index under the scope's active index-key version.
    pub index: BlindIndex,
}

/// The scope's live index-key versions as the key service listed them,
/// active first then newest first. No key: the keys stay in the service.
pub(crate) struct IndexKeys {
    live: Vec<u32>,
    pub(crate) loaded: Instant,
}

/// Field-level PAN encryption with rotating, wrapped DEKs.
///
/// Cheap to clone; clones share keys, caches and configuration. See the
/// crate documentation for an example.
#[derive(Clone)]
pub struct Panseal {
    pub(crate) shared: Arc<Shared>,
    pub(crate) scope: Arc<ScopeState>,
}

impl std::fmt::Debug for Panseal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Panseal")
            .field("scope", &self.scope.scope)
            .field("environment", &self.shared.environment)
            .finish_non_exhaustive()
    }
}

impl Panseal {
    /// Starts a builder.
    pub fn builder() -> PansealBuilder {
        PansealBuilder::default()
    }

    /// A handle for another key scope (tenant/merchant) that shares this
    /// one's key service, key store, audit sink and caches.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Name`] for an invalid scope name.
    pub fn with_scope(&self, scope: &str) -> Result<Panseal, Error> {
        let scope = Scope::new(scope)?;
        Ok(Panseal {
            shared: Arc::clone(&self.shared),
            scope: self.shared.scope_state(scope),
        })
    }

    /// This handle's scope.
    pub fn scope(&self) -> &Scope {
        &self.scope.scope
    }

    /// The environment tag.
    pub fn environment(&self) -> &Environment {
        &self.shared.environment
    }

    /// Test introspection (`hazmat-test-keys`, not part of the API): the
    /// ids of every unwrapped key this process holds for this handle's
    /// instance (cache entries and every scope's active DEK; index keys
    /// are never here: they stay in the key service), and how many cache
    /// entries are past their TTL.
    #[cfg(feature = "hazmat-test-keys")]
    #[doc(hidden)]
    pub fn held_keys_for_test(&self) -> (Vec<KeyId>, usize) {
        let (mut ids, stale) = self.shared.cache.held(clock::unix_nanos());
        let scopes: Vec<Arc<ScopeState>> = self.shared.scope_states();
        for scope in scopes {
            if let Some(active) = scope.active.load_full() {
                ids.push(active.entry.id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        (ids, stale)
    }

    // ----- seal -----------------------------------------------------------

    /// Seals `pan` bound to `context` under this instance's active DEK,
    /// creating, wrapping and storing a fresh DEK first when there is none or
    /// the current one reached its age or use limit.
    ///
    /// # Errors
    ///
    /// Key-service or key-store errors while a new DEK is made
    /// ([`Error::is_retryable`] tells outages apart). Nothing is stored by
    /// a failed seal.
    pub async fn seal_pan(&self, pan: &Pan, context: &Context) -> Result<SealedPan, Error> {
        if let Some(sealed) = self.try_seal_cached(pan, context) {
            return Ok(sealed);
        }
        self.seal_slow(pan, context).await
    }

    /// The synchronous fast path: seals with the cached active DEK if it is
    /// still within its limits. `None` means the slow path must run.
    pub(crate) fn try_seal_cached(&self, pan: &Pan, context: &Context) -> Option<SealedPan> {
        let guard = self.scope.active.load();
        let active = guard.as_ref()?;
        if clock::mono_nanos() >= active.deadline.load(Ordering::Relaxed)
            || active.entry.state() != KeyState::Active
        {
            return None;
        }
        // Drawing the nonce first tells which process this is (see
        // `seal::fresh_nonce`): after a fork, the child's copy of the
        // parent's DEK is not this process's to seal with.
        let (nonce, pid) = seal::fresh_nonce();
        if pid != active.pid {
            return None;
        }
        if active.uses.fetch_add(1, Ordering::Relaxed) >= active.max_uses {
            return None;
        }
        #[cfg(feature = "fast-aead")]
        if let Some(key) = active.entry.fast.as_ref() {
            return Some(seal::fast::seal_raw(
                key,
                active.entry.id,
                nonce,
                pan,
                context,
            ));
        }
        let cipher = active.entry.cipher.as_ref()?;
        Some(seal::seal_raw(cipher, active.entry.id, nonce, pan, context))
    }

    async fn seal_slow(&self, pan: &Pan, context: &Context) -> Result<SealedPan, Error> {
        // A forked child's first seal in any scope comes here (the parent's
        // active DEK is refused above, or there is none): it notices the
        // fork here, and so does any process whose sweeper is overdue.
        if self.shared.pid.load(Ordering::Relaxed) != std::process::id()
            || clock::mono_nanos() >= self.shared.sweep_due.load(Ordering::Relaxed)
        {
            sweep_now(&self.shared);
        }
        let _guard = self.scope.rotate_lock.lock().await;
        // Another task may have rotated while we waited.
        if let Some(sealed) = self.try_seal_cached(pan, context) {
            return Ok(sealed);
        }
        self.refresh_active().await?;
        self.try_seal_cached(pan, context).ok_or_else(|| {
            Error::Config(ConfigError::Policy("no usable DEK after rotation".into()))
        })
    }

    /// Retires this instance's active DEK in this scope now (it becomes
    /// decrypt-only); the next seal makes a fresh one. Reports its use count
    /// to the key store first.
    ///
    /// # Errors
    ///
    /// Key-store errors.
    pub async fn rotate_dek(&self) -> Result<Option<KeyId>, Error> {
        self.retire_active().await
    }
    /// Reports this instance's use counts to the key store (call before a
    /// graceful shutdown; also done at every rotation and re-check).
    ///
    /// # Errors
    ///
    /// Key-store errors.
    pub async fn report_usage(&self) -> Result<(), Error> {
        self.report_active().await
    }
    /// Moves a key to a new lifecycle state in the key store and in this
    /// process's caches, and audits it. Marking a DEK compromised stops all
    /// sealing with it at once here (other instances within their re-check
    /// interval); destroying it removes the wrapped key, after which nothing
    /// under it opens.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Transition`] for a backward move; key-store errors.
    pub async fn set_key_state(&self, id: KeyId, state: KeyState) -> Result<(), Error> {
        self.set_key_state_as(id, state, &Access::system("key-lifecycle"))
            .await
    }
    /// [`Panseal::set_key_state`] on behalf of a named custodian: the audit
    /// event records `access` (e.g. who approved a destruction).
    ///
    /// # Errors
    ///
    /// As [`Panseal::set_key_state`].
    pub async fn set_key_state_as(
        &self,
        id: KeyId,
        state: KeyState,
        access: &Access,
    ) -> Result<(), Error> {
        self.change_state(id, state, access).await
    }

    // ----- open -----------------------------------------------------------

    /// Opens a sealed PAN bound to `context`, on behalf of `access`.
    ///
    /// Emits exactly one [`Operation::Open`] audit event (success or failure)
    /// and, on a cache miss, one [`Operation::Unwrap`] event. Fails closed
    /// without an audit sink or if the sink fails.
    ///
    /// # Errors
    ///
    /// [`Error::Decryption`] (opaque) if the ciphertext was altered, moved to
    /// another context or sealed under another key; [`Error::Key`] if its
    /// key is unknown, destroyed, expired, or from another scope or
    /// environment; key-service, key-store or audit errors.
    ///
    /// An ingest ciphertext ([`IngestSealed`], or a [`crate::StoredPan`]
    /// holding one) is opened by the key service
    /// ([`KeyService::open_ingest`]: keyd's reveal path for a reveal-only
    /// credential; the local service opens in process), audited as one
    /// [`Operation::Open`] naming the ingest key, and always says
    /// `needs_reseal` (admit it: [`Panseal::admit`]). Its errors:
    /// [`KeyError::IngestKeyMismatch`] (sealed for another scope,
    /// environment or key pair), [`KeyError::UnknownIngestKey`] (never
    /// created or destroyed), [`Error::Decryption`] (altered, another
    /// context).
    pub async fn open_pan<'s>(
        &self,
        sealed: impl Into<SealedRef<'s>>,
        context: &Context,
        access: &Access,
    ) -> Result<Opened, Error> {
        match sealed.into() {
            SealedRef::Compact(sealed) => {
                self.open_for(sealed, context, access, OpenFor::Caller)
                    .await
            }
            SealedRef::Ingest(sealed) => self.open_ingest(sealed, context, access).await,
        }
    }

    /// Opens an ingest ciphertext through the key service; one
    /// [`Operation::Open`] event naming the ingest key's id.
    async fn open_ingest(
        &self,
        sealed: &IngestSealed,
        context: &Context,
        access: &Access,
    ) -> Result<Opened, Error> {
        let sink = self.sink()?;
        let version = sealed.key_version();
        let id = crate::ingest::ingest_key_id(&self.shared.environment, &self.scope.scope, version);
        let result = async {
            self.check_ingest_key(sealed).await?;
            let request = IngestOpenRequest {
                scope: &self.scope.scope,
                sealed,
                context,
            };
            self.shared
                .key_service
                .open_ingest(&request, access)
                .await
                .map(|o| Opened {
                    pan: o.pan,
                    needs_reseal: true,
                })
                .map_err(|e| self.ingest_error(e))
        }
        .await;
        let emitter = Emitter {
            sink,
            scope: &self.scope.scope,
        };
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(failure_kind(e)),
        };
        // On an audit failure `result` (and the PAN in it) is dropped.
        emitter.emit(
            SystemTime::now(),
            Operation::Open,
            outcome,
            access,
            Some(id),
            Some(context),
        )?;
        result
    }

    fn ingest_error(&self, e: KeyServiceError) -> Error {
        match e {
            KeyServiceError::OpenFailed => Error::Decryption,
            KeyServiceError::UnknownIngestKey { scope, version } => {
                KeyError::UnknownIngestKey { scope, version }.into()
            }
            e => e.into(),
        }
    }

    /// Checks the ciphertext names a live ingest key of this scope (its
    /// version and key tag), from the key service's list: another scope,
    /// environment or key pair is [`KeyError::IngestKeyMismatch`], a
    /// version not live [`KeyError::UnknownIngestKey`].
    async fn check_ingest_key(&self, sealed: &IngestSealed) -> Result<(), Error> {
        let version = sealed.key_version();
        let mut fresh = false;
        loop {
            let infos = self.ingest_infos(fresh).await?;
            if let Some(info) = infos.iter().find(|k| k.public_key.version() == version) {
                if info.public_key.key_tag() != sealed.key_tag()
                    || info.public_key.environment() != &self.shared.environment
                {
                    return Err(KeyError::IngestKeyMismatch.into());
                }
                return Ok(());
            }
            if fresh {
                return Err(KeyError::UnknownIngestKey {
                    scope: self.scope.scope.to_string(),
                    version,
                }
                .into());
            }
            fresh = true;
        }
    }

    /// The scope's ingest keys, cached for [`Policy::recheck_interval`]
    /// (`refresh`: ask the service again).
    async fn ingest_infos(&self, refresh: bool) -> Result<Vec<IngestKeyInfo>, Error> {
        if !refresh {
            let guard = self.scope.ingest.read().unwrap_or_else(|p| p.into_inner());
            if let Some((infos, at)) = guard.as_ref() {
                if at.elapsed() < self.shared.policy.recheck_interval {
                    return Ok(infos.clone());
                }
            }
        }
        let infos = self
            .shared
            .key_service
            .ingest_keys(&self.scope.scope)
            .await?;
        *self.scope.ingest.write().unwrap_or_else(|p| p.into_inner()) =
            Some((infos.clone(), Instant::now()));
        Ok(infos)
    }

    async fn open_for(
        &self,
        sealed: &SealedPan,
        context: &Context,
        access: &Access,
        why: OpenFor,
    ) -> Result<Opened, Error> {
        if let Some(result) = self.try_open_cached(sealed, context, access, why) {
            return result;
        }
        if self.shared.reveal_only {
            return self.open_by_reveal(sealed, context, access, why).await;
        }
        let sink = self.sink()?;
        if let Err(e) = self
            .load_key(sealed.key_id(), KeyPurpose::Data, access)
            .await
        {
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            emitter.emit(
                SystemTime::now(),
                Operation::Open,
                Err(failure_kind(&e)),
                access,
                Some(sealed.key_id()),
                Some(context),
            )?;
            return Err(e);
        }
        self.try_open_cached(sealed, context, access, why)
            .unwrap_or_else(|| Err(KeyError::UnknownKey(sealed.key_id()).into()))
    }

    /// Opens inside the key service ([`KeyService::reveal`]): the DEK never
    /// enters this process. One [`Operation::Open`] event, as on the
    /// unwrap path.
    async fn open_by_reveal(
        &self,
        sealed: &SealedPan,
        context: &Context,
        access: &Access,
        why: OpenFor,
    ) -> Result<Opened, Error> {
        let sink = self.sink()?;
        let id = sealed.key_id();
        let result = async {
            let record = self
                .shared
                .key_store
                .fetch(id)
                .await?
                .ok_or(KeyError::UnknownKey(id))?;
            self.check_record(&record, KeyPurpose::Data)?;
            if record.state == KeyState::Compromised && why != OpenFor::Reseal {
                return Err(KeyError::Compromised(id).into());
            }
            let request = crate::keyservice::RevealRequest {
                record: &record,
                sealed,
                context,
            };
            self.shared
                .key_service
                .reveal(&request, access)
                .await
                .map_err(|e| match e {
                    KeyServiceError::OpenFailed => Error::Decryption,
                    e => Error::from(e),
                })
        }
        .await;
        let emitter = Emitter {
            sink,
            scope: &self.scope.scope,
        };
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(failure_kind(e)),
        };
        // On an audit failure `result` (and the PAN in it) is dropped.
        emitter.emit(
            SystemTime::now(),
            Operation::Open,
            outcome,
            access,
            Some(id),
            Some(context),
        )?;
        result
    }

    fn sink(&self) -> Result<&dyn AuditSink, Error> {
        self.shared
            .audit
            .as_deref()
            .ok_or(Error::Config(ConfigError::NoAuditSink))
    }

    /// The synchronous fast path: opens with a cached DEK. `None` on a cache
    /// miss.
    pub(crate) fn try_open_cached(
        &self,
        sealed: &SealedPan,
        context: &Context,
        access: &Access,
        why: OpenFor,
    ) -> Option<Result<Opened, Error>> {
        let sink = match self.sink() {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let now = clock::unix_nanos();
        // Where no sweeper runs (a forked child that has not noticed the
        // fork yet): same clock read, one load.
        if self.shared.cache.sweep_due(now) {
            sweep_now(&self.shared);
        }
        let id = sealed.key_id();
        self.shared.cache.with(id, now, |entry| {
            let now_unix = now / clock::NANOS_PER_SEC;
            let result = self.open_with(entry, sealed, context, now_unix, why);
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            let outcome = match &result {
                Ok(_) => Ok(()),
                Err(e) => Err(failure_kind(e)),
            };
            // On an audit failure `result` (and the PAN in it) is dropped.
            emitter.emit(
                clock::system_time(now),
                Operation::Open,
                outcome,
                access,
                Some(id),
                Some(context),
            )?;
            result
        })
    }

    fn open_with(
        &self,
        entry: &CachedDek,
        sealed: &SealedPan,
        context: &Context,
        now_unix: u64,
        why: OpenFor,
    ) -> Result<Opened, Error> {
        if entry.purpose != KeyPurpose::Data {
            return Err(KeyError::Purpose(entry.id).into());
        }
        if entry.scope != self.scope.scope {
            return Err(KeyError::Scope(entry.id).into());
        }
        let state = entry.state();
        if state == KeyState::Destroyed {
            return Err(KeyError::Destroyed(entry.id).into());
        }
        if state == KeyState::Compromised && why != OpenFor::Reseal {
            return Err(KeyError::Compromised(entry.id).into());
        }
        if now_unix > entry.decrypt_until {
            return Err(KeyError::Expired(entry.id).into());
        }
        #[cfg(feature = "fast-aead")]
        let pan = match entry.fast.as_ref() {
            Some(key) => seal::fast::open_raw(key, sealed, context)?,
            None => {
                let cipher = entry.cipher.as_ref().ok_or(KeyError::Purpose(entry.id))?;
                seal::open_raw(cipher, sealed, context)?
            }
        };
        #[cfg(not(feature = "fast-aead"))]
        let pan = {
            let cipher = entry.cipher.as_ref().ok_or(KeyError::Purpose(entry.id))?;
            seal::open_raw(cipher, sealed, context)?
        };
        Ok(Opened {
            pan,
            needs_reseal: state != KeyState::Active || now_unix >= entry.encrypt_until,
        })
    }

    /// Fetches, checks and unwraps a key into the cache; audits the unwrap.
    async fn load_key(
        &self,
        id: KeyId,
        purpose: KeyPurpose,
        access: &Access,
    ) -> Result<Arc<CachedDek>, Error> {
        let record = self
            .shared
            .key_store
            .fetch(id)
            .await?
            .ok_or(KeyError::UnknownKey(id))?;
        // The environment first (a record of another environment carries
        // another service's tag), then the signature, then the fields it
        // covers.
        if record.environment != self.shared.environment {
            self.check_record(&record, purpose)?;
        }
        verify(
            self.shared.key_service.as_ref(),
            &record,
            self.shared.policy.require_signed_records,
        )
        .await?;
        self.check_record(&record, purpose)?;
        let unwrapped = self
            .shared
            .key_service
            .unwrap(&record.key_request(), &record.wrapped, access)
            .await;
        if let Some(sink) = self.shared.audit.as_deref() {
            let emitter = Emitter {
                sink,
                scope: &self.scope.scope,
            };
            let outcome = match &unwrapped {
                Ok(_) => Ok(()),
                Err(_) => Err("key service refused or failed"),
            };
            emitter.emit(
                SystemTime::now(),
                Operation::Unwrap,
                outcome,
                access,
                Some(id),
                None,
            )?;
        } else if purpose == KeyPurpose::Data {
            return Err(ConfigError::NoAuditSink.into());
        }
        let dek = unwrapped?;
        // `check_record` made sure the record's scope is this handle's; keep
        // the handle's (shared) allocation so the hot-path check is a
        // pointer comparison.
        let entry = Arc::new(CachedDek::new(
            id,
            purpose,
            &self.scope.scope,
            &dek,
            record.state,
            record.encrypt_until,
            record.decrypt_until,
        ));
        if purpose == KeyPurpose::Data {
            self.shared.cache.insert(Arc::clone(&entry));
        }
        Ok(entry)
    }

    fn check_record(&self, record: &WrappedDek, purpose: KeyPurpose) -> Result<(), Error> {
        let id = record.id;
        if record.environment != self.shared.environment {
            return Err(KeyError::Environment {
                id,
                key_env: record.environment.to_string(),
                our_env: self.shared.environment.to_string(),
            }
            .into());
        }
        if record.scope != self.scope.scope {
            return Err(KeyError::Scope(id).into());
        }
        if record.purpose != purpose {
            return Err(KeyError::Purpose(id).into());
        }
        if record.state == KeyState::Destroyed {
            return Err(KeyError::Destroyed(id).into());
        }
        if unix_now() > record.decrypt_until {
            return Err(KeyError::Expired(id).into());
        }
        Ok(())
    }

    /// Opens and re-seals under the active DEK (for migration off retired
    /// or compromised keys: the re-encryption path). The PAN never leaves
    /// this call. This is the only call that opens under a compromised DEK
    /// (PCI DSS 3.7.5); each such open is audited as an
    /// [`Operation::Open`] naming the compromised key and `access`.
    ///
    /// # Errors
    ///
    /// Those of [`Panseal::open_pan`] (except [`KeyError::Compromised`])
    /// and [`Panseal::seal_pan`]. If sealing fails, the opened PAN is wiped
    /// and nothing is returned.
    ///
    /// An ingest ciphertext is opened as [`Panseal::open_pan`] opens it
    /// (the PAN passes through this process); [`Panseal::admit`] does the
    /// same inside the key service.
    pub async fn reseal<'s>(
        &self,
        sealed: impl Into<SealedRef<'s>>,
        context: &Context,
        access: &Access,
    ) -> Result<SealedPan, Error> {
        let opened = match sealed.into() {
            SealedRef::Compact(sealed) => {
                self.open_for(sealed, context, access, OpenFor::Reseal)
                    .await?
            }
            SealedRef::Ingest(sealed) => self.open_ingest(sealed, context, access).await?,
        };
        self.seal_pan(&opened.pan, context).await
    }

    // ----- blind index ----------------------------------------------------
    //
    // Computed inside the key service (`KeyService::blind_index`): this
    // process never holds an index key. Which versions are live comes from
    // the key service (`KeyService::index_keys`, re-read every
    // `Policy::recheck_interval`), never from the key store, so nothing in
    // the database chooses which key hashes.

    /// The blind index of `pan` under the scope's active index key, to store
    /// beside the sealed PAN: HMAC-SHA-256 computed inside the key service.
    /// If the scope has no index key yet, a credential with `custodian`
    /// (e.g. a [`crate::LocalKeyService`] with every permission) creates
    /// the first one; any other credential gets [`KeyError::NoIndexKey`].
    ///
    /// # Errors
    ///
    /// [`KeyError::NoIndexKey`]; key-service errors (needs the `index`
    /// permission; quota errors are retryable).
    pub async fn blind_index(&self, pan: &Pan) -> Result<BlindIndex, Error> {
        let mut out = self.blind_index_batch(std::slice::from_ref(pan)).await?;
        out.pop()
            .ok_or_else(|| KeyError::NoIndexKey(self.scope.scope.to_string()).into())
    }

    /// The blind index of every PAN under the scope's active index key, in
    /// one key-service request (one quota charge, one audit record there).
    ///
    /// # Errors
    ///
    /// As [`Panseal::blind_index`]; a PAN the service refuses is named by
    /// its position ([`KeyServiceError::BatchItem`]) and nothing is
    /// returned.
    pub async fn blind_index_batch(&self, pans: &[Pan]) -> Result<Vec<BlindIndex>, Error> {
        let versions = self.index_versions().await?;
        let active = versions[..1].to_vec();
        Ok(self
            .compute_indexes(&active, pans)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// The blind index of `pan` under every live index key of the scope,
    /// active first: look up with all of them while an index-key rotation
    /// (and the re-index job) is in progress.
    ///
    /// # Errors
    ///
    /// As [`Panseal::blind_index`].
    pub async fn blind_indexes(&self, pan: &Pan) -> Result<Vec<BlindIndex>, Error> {
        Ok(self
            .blind_indexes_batch(std::slice::from_ref(pan))
            .await?
            .pop()
            .unwrap_or_default())
    }

    /// [`Panseal::blind_indexes`] for many PANs in one key-service request:
    /// `result[i]` holds `pans[i]`'s values under every live version,
    /// active first.
    ///
    /// # Errors
    ///
    /// As [`Panseal::blind_index_batch`].
    pub async fn blind_indexes_batch(&self, pans: &[Pan]) -> Result<Vec<Vec<BlindIndex>>, Error> {
        let versions = self.index_versions().await?;
        self.compute_indexes(&versions, pans).await
    }

    async fn compute_indexes(
        &self,
        versions: &[u32],
        pans: &[Pan],
    ) -> Result<Vec<Vec<BlindIndex>>, Error> {
        if pans.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&Pan> = pans.iter().collect();
        let access = Access::system("blind-index");
        let result = self
            .shared
            .key_service
            .blind_index(&self.scope.scope, versions, &refs, &access)
            .await;
        let values = match result {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, KeyServiceError::UnknownIndexKey { .. }) {
                    // A version went away: list again next time.
                    *self.scope.index.write().unwrap_or_else(|p| p.into_inner()) = None;
                }
                return Err(e.into());
            }
        };
        if values.len() != pans.len() * versions.len() {
            return Err(KeyServiceError::Other(format!(
                "key service returned {} index values for {} PANs x {} versions",
                values.len(),
                pans.len(),
                versions.len()
            ))
            .into());
        }
        let ids: Vec<KeyId> = versions
            .iter()
            .map(|v| index::service_index_key_id(&self.shared.environment, &self.scope.scope, *v))
            .collect();
        Ok(values
            .chunks_exact(versions.len())
            .map(|row| {
                row.iter()
                    .zip(versions.iter().zip(&ids))
                    .map(|(value, (version, id))| BlindIndex::new(*id, *version, *value))
                    .collect()
            })
            .collect())
    }

    /// Creates a new index-key version for the scope inside the key service
    /// ([`KeyService::create_index_key`], needs `custodian`); the previous
    /// active version becomes lookup-only until the re-index job has moved
    /// stored values off it and a custodian destroys it. Returns the new
    /// version.
    ///
    /// # Errors
    ///
    /// Key-service errors (permission).
    pub async fn rotate_index_key(&self) -> Result<u32, Error> {
        let _guard = self.scope.index_lock.lock().await;
        let info = self
            .shared
            .key_service
            .create_index_key(&self.scope.scope)
            .await?;
        *self.scope.index.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.lifecycle_event(
            Operation::KeyCreated,
            index::service_index_key_id(&self.shared.environment, &self.scope.scope, info.version),
        );
        Ok(info.version)
    }

    /// The scope's live index-key versions from the key service: the
    /// active one first, then the others newest first. Never empty.
    async fn index_versions(&self) -> Result<Vec<u32>, Error> {
        if let Some(v) = self.cached_index_versions() {
            return Ok(v);
        }
        let _guard = self.scope.index_lock.lock().await;
        if let Some(v) = self.cached_index_versions() {
            return Ok(v);
        }
        let ks = &self.shared.key_service;
        let mut infos = ks.index_keys(&self.scope.scope).await?;
        if !infos.iter().any(|k| k.state == KeyState::Active) {
            if !ks.permissions().await?.custodian {
                return Err(KeyError::NoIndexKey(self.scope.scope.to_string()).into());
            }
            let info = ks.create_index_key(&self.scope.scope).await?;
            self.lifecycle_event(
                Operation::KeyCreated,
                index::service_index_key_id(
                    &self.shared.environment,
                    &self.scope.scope,
                    info.version,
                ),
            );
            infos = ks.index_keys(&self.scope.scope).await?;
        }
        let live = order_index_versions(infos);
        if live.is_empty() {
            return Err(KeyError::NoIndexKey(self.scope.scope.to_string()).into());
        }
        *self.scope.index.write().unwrap_or_else(|p| p.into_inner()) = Some(IndexKeys {
            live: live.clone(),
            loaded: Instant::now(),
        });
        Ok(live)
    }

    fn cached_index_versions(&self) -> Option<Vec<u32>> {
        let guard = self.scope.index.read().unwrap_or_else(|p| p.into_inner());
        let keys = guard.as_ref()?;
        let fresh = keys.loaded.elapsed() < self.shared.policy.recheck_interval;
        (fresh && !keys.live.is_empty()).then(|| keys.live.clone())
    }

    // ----- write-only ingest: keys and admission ---------------------------
    //
    // Front ends seal with the scope's public key ([`IngestSealer`]); the
    // private key stays in the key service. Admission turns ingest
    // ciphertexts into the compact form inside the key service, under an
    // "admission DEK" whose plaintext never enters this process.

    /// The scope's live ingest keys from the key service, newest first,
    /// with their public keys (any credential may ask).
    ///
    /// # Errors
    ///
    /// Key-service errors.
    pub async fn ingest_keys(&self) -> Result<Vec<IngestKeyInfo>, Error> {
        self.ingest_infos(true).await
    }

    /// A sealer for the scope's active ingest key, fetched from the key
    /// service. With `pinned_fingerprint` (an [`crate::IngestPublicKey::fingerprint`]
    /// configured out of band) the key must be that one. The sealer holds
    /// no secret: hand it (or its public key's text form) to front ends.
    ///
    /// If the scope has no active ingest key yet, a credential with
    /// `custodian` (e.g. a [`crate::LocalKeyService`] with every
    /// permission) creates the first one.
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownIngestKey`] (version 0) if the scope has no active
    /// ingest key and this credential may not create one (a custodian
    /// does: [`Panseal::rotate_ingest_key`]);
    /// [`KeyError::IngestKeyMismatch`] if the fetched key is not the pinned
    /// one or names another environment or scope; key-service errors.
    pub async fn ingest_sealer(
        &self,
        pinned_fingerprint: Option<&str>,
    ) -> Result<IngestSealer, Error> {
        let mut infos = self.ingest_infos(true).await?;
        if !infos.iter().any(|k| k.state == KeyState::Active)
            && self.shared.key_service.permissions().await?.custodian
        {
            // As for the index key: a custodian credential creates the
            // scope's first ingest key.
            self.rotate_ingest_key().await?;
            infos = self.ingest_infos(true).await?;
        }
        let info = infos
            .iter()
            .find(|k| k.state == KeyState::Active)
            .ok_or_else(|| KeyError::UnknownIngestKey {
                scope: self.scope.scope.to_string(),
                version: 0,
            })?;
        let key = &info.public_key;
        if key.environment() != &self.shared.environment || key.scope() != &self.scope.scope {
            return Err(KeyError::IngestKeyMismatch.into());
        }
        if let Some(pin) = pinned_fingerprint {
            if !pin.trim().eq_ignore_ascii_case(&key.fingerprint()) {
                return Err(KeyError::IngestKeyMismatch.into());
            }
        }
        IngestSealer::from_info(info)
    }

    /// Creates the scope's next ingest key pair inside the key service
    /// ([`KeyService::create_ingest_key`], needs `custodian`); the previous
    /// active version is retired (opens and admits, never seals). Front
    /// ends fetch the new public key ([`Panseal::ingest_sealer`]).
    ///
    /// # Errors
    ///
    /// Key-service errors (permission).
    pub async fn rotate_ingest_key(&self) -> Result<IngestKeyInfo, Error> {
        let info = self
            .shared
            .key_service
            .create_ingest_key(&self.scope.scope)
            .await?;
        *self.scope.ingest.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.lifecycle_event(
            Operation::KeyCreated,
            crate::ingest::ingest_key_id(
                &self.shared.environment,
                &self.scope.scope,
                info.public_key.version(),
            ),
        );
        Ok(info)
    }

    /// Admits one ingest ciphertext ([`Panseal::admit`]).
    ///
    /// # Errors
    ///
    /// Those of [`Panseal::admit`], and for the item:
    /// [`KeyError::IngestKeyMismatch`], [`KeyError::UnknownIngestKey`],
    /// [`Error::Decryption`] (altered, another context).
    pub async fn admit_one(
        &self,
        sealed: &IngestSealed,
        context: &Context,
    ) -> Result<Admission, Error> {
        let mut out = self.admit(&[(*sealed, context.clone())]).await?;
        match out.pop() {
            Some(Ok(a)) => Ok(a),
            Some(Err(e)) => Err(match e {
                AdmitItemError::Malformed => crate::error::FormatError::Payload.into(),
                AdmitItemError::KeyMismatch => KeyError::IngestKeyMismatch.into(),
                AdmitItemError::UnknownIngestKey(version) => KeyError::UnknownIngestKey {
                    scope: self.scope.scope.to_string(),
                    version,
                }
                .into(),
                _ => Error::Decryption,
            }),
            None => Err(KeyServiceError::Other("key service admitted nothing".into()).into()),
        }
    }

    /// Admits ingest ciphertexts into the compact form inside the key
    /// service ([`KeyService::admit`], needs `admit`): each is opened there
    /// with the scope's ingest private key, sealed under this instance's
    /// admission DEK bound to the same context, and blind-indexed under the
    /// scope's active index key. The PAN and the DEK never enter this
    /// process. One result per item, in order: a bad item (another scope,
    /// an unknown key, altered) is reported and does not stop the others.
    ///
    /// The admission DEK is a data DEK made by
    /// [`KeyService::generate_wrapped`], signed and stored like any other
    /// (it opens through [`Panseal::open_pan`]), one per scope per instance,
    /// rotated by the same [`Policy`] limits (age; uses = items admitted,
    /// reported to its record after every request). Batches are split at
    /// [`MAX_ADMIT_BATCH`] and at the DEK's remaining uses.
    ///
    /// # Errors
    ///
    /// For the whole call (nothing of the failing request is returned;
    /// earlier requests of a split batch were sealed and are lost to the
    /// caller, so admit at most [`MAX_ADMIT_BATCH`] items per call when that
    /// matters): [`KeyError::NoIndexKey`], key-service (permission, quota,
    /// outage) and key-store errors.
    pub async fn admit(
        &self,
        items: &[(IngestSealed, Context)],
    ) -> Result<Vec<Result<Admission, AdmitItemError>>, Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let version = self.index_versions().await?[0];
        let index_id =
            index::service_index_key_id(&self.shared.environment, &self.scope.scope, version);
        let access = Access::system("admit");
        let mut guard = self.scope.admit.lock().await;
        let mut out = Vec::with_capacity(items.len());
        let mut rest = items;
        let mut refusals = 0;
        while !rest.is_empty() {
            let room = self.admit_dek(&mut guard).await?;
            let n = rest.len().min(MAX_ADMIT_BATCH).min(room);
            let (batch, tail) = rest.split_at(n);
            let Some(dek) = guard.as_mut() else {
                return Err(ConfigError::Policy("no admission DEK".into()).into());
            };
            let admit_items: Vec<AdmitItem<'_>> = batch
                .iter()
                .map(|(sealed, context)| AdmitItem { sealed, context })
                .collect();
            let request = AdmitRequest {
                record: &dek.record,
                index_versions: &[version],
                items: &admit_items,
            };
            let results = match self.shared.key_service.admit(&request, &access).await {
                Ok(r) => r,
                Err(e) => {
                    if matches!(e, KeyServiceError::UnknownIndexKey { .. }) {
                        *self.scope.index.write().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    // Only a refusal of the record itself is worth a fresh
                    // DEK (a permission refusal would refuse that too).
                    let refused = matches!(
                        e,
                        KeyServiceError::RecordTampered(_) | KeyServiceError::RecordStale(_)
                    );
                    if refused && refusals == 0 {
                        // The admission DEK's record changed under us (a
                        // custodian retired it) or was refused: make a
                        // fresh one and try once more.
                        tracing::warn!(key_id = %dek.record.id, error = %e, "admission DEK refused; making a new one");
                        *guard = None;
                        refusals += 1;
                        continue;
                    }
                    return Err(e.into());
                }
            };
            if results.len() != n {
                return Err(KeyServiceError::Other(format!(
                    "key service returned {} admit results for {n} items",
                    results.len()
                ))
                .into());
            }
            for r in results {
                out.push(match r {
                    Ok(o) => {
                        if o.sealed.key_id() != dek.record.id || o.index.len() != 1 {
                            return Err(KeyServiceError::Other(
                                "key service returned an admission under another key".into(),
                            )
                            .into());
                        }
                        dek.uses += 1;
                        Ok(Admission {
                            sealed: o.sealed,
                            index: BlindIndex::new(index_id, version, o.index[0]),
                        })
                    }
                    Err(e) => Err(e),
                });
            }
            if let Err(e) = self.report_admit(dek).await {
                tracing::warn!(key_id = %dek.record.id, error = %e, "could not report admission DEK uses (kept for the next report)");
            }
            rest = tail;
        }
        Ok(out)
    }

    /// With the admit lock held: the uses left on this instance's
    /// admission DEK, retiring a spent one and making a fresh one first if
    /// needed (never 0).
    async fn admit_dek(&self, slot: &mut Option<AdmitDek>) -> Result<usize, Error> {
        if let Some(dek) = slot.as_mut() {
            let r = &dek.record;
            let left = r.max_uses.saturating_sub(dek.uses.max(r.uses));
            if r.state == KeyState::Active && unix_now() < r.encrypt_until && left > 0 {
                return Ok(usize::try_from(left).unwrap_or(usize::MAX));
            }
            if let Err(e) = self.report_admit(dek).await {
                tracing::warn!(key_id = %dek.record.id, error = %e, "could not report admission DEK uses");
            }
            if dek.record.state == KeyState::Active {
                self.retire(dek.record.id).await;
            }
            *slot = None;
        }
        let policy = &self.shared.policy;
        for _ in 0..ID_ATTEMPTS {
            let id = KeyId::random();
            let request = KeyRequest {
                id,
                scope: self.scope.scope.clone(),
                environment: self.shared.environment.clone(),
                purpose: KeyPurpose::Data,
            };
            let wrapped = self.shared.key_service.generate_wrapped(&request).await?;
            let mut record = self.new_record(id, wrapped);
            record.tag = crate::keystore::sign(
                self.shared.key_service.as_ref(),
                None,
                &record,
                policy.require_signed_records,
            )
            .await?;
            match self.shared.key_store.insert(&record).await {
                Ok(()) => {
                    self.lifecycle_event(Operation::KeyCreated, id);
                    let left = usize::try_from(record.max_uses).unwrap_or(usize::MAX);
                    *slot = Some(AdmitDek {
                        record,
                        uses: 0,
                        reported: 0,
                    });
                    if left == 0 {
                        return Err(ConfigError::Policy("max_uses is 0".into()).into());
                    }
                    return Ok(left);
                }
                Err(KeyStoreError::Duplicate(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KeyStoreError::Conflict.into())
    }

    /// Adds the admission DEK's unreported uses to its stored record.
    async fn report_admit(&self, dek: &mut AdmitDek) -> Result<(), Error> {
        let delta = dek.uses.saturating_sub(dek.reported);
        if delta == 0 {
            return Ok(());
        }
        let record = self
            .change(dek.record.id, |r| {
                let mut next = r.clone();
                next.uses = r.uses.saturating_add(delta);
                Ok(Some(next))
            })
            .await?;
        dek.record = record;
        dek.reported = dek.uses;
        Ok(())
    }

    // ----- authenticated records --------------------------------------------

    /// The record upgrade step (`FORMAT.md` §9): has the key service sign
    /// every version-1 (unsigned) record of this environment as it stands,
    /// so it becomes a version-2 record. Needs a `custodian` credential.
    /// Repeatable; returns how many records it signed. Then
    /// [`Policy::require_signed_records`] can refuse unsigned records.
    ///
    /// # Errors
    ///
    /// Key-service (permission) and key-store errors.
    pub async fn upgrade_records(&self) -> Result<u64, Error> {
        crate::keystore::upgrade_records(
            self.shared.key_service.as_ref(),
            self.shared.key_store.as_ref(),
            &self.shared.environment,
        )
        .await
    }
}

/// Active version first, then the rest newest first.
fn order_index_versions(mut infos: Vec<IndexKeyInfo>) -> Vec<u32> {
    infos.retain(|k| k.state != KeyState::Destroyed);
    infos.sort_by_key(|k| (k.state != KeyState::Active, std::cmp::Reverse(k.version)));
    infos.into_iter().map(|k| k.version).collect()
}

/// A record change to `state` along the lifecycle: none if it is already
/// there; destroying erases the wrapped key.
pub(crate) fn to_state(
    state: KeyState,
) -> impl FnMut(&WrappedDek) -> Result<Option<WrappedDek>, Error> + Send {
    move |r| {
        if r.state == state {
            return Ok(None);
        }
        if !r.state.can_become(state) {
            return Err(KeyStoreError::Transition {
                id: r.id,
                from: r.state,
                to: state,
            }
            .into());
        }
        let mut next = r.clone();
        next.state = state;
        if state == KeyState::Destroyed {
            // Crypto-shredding: the wrapped key leaves the store.
            zeroize::Zeroize::zeroize(&mut next.wrapped.bytes);
            next.wrapped.bytes = Vec::new();
        }
        Ok(Some(next))
    }
}

/// A record the key service refused to vouch for.
pub(crate) fn is_record_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::Key(KeyError::RecordTampered(_) | KeyError::RecordStale(_) | KeyError::Untagged(_))
    )
}

/// A short, PAN-free description of an error for audit events.
pub(crate) fn failure_kind(e: &Error) -> &'static str {
    match e {
        Error::Decryption => "decryption failed",
        Error::Format(_) => "malformed ciphertext",
        Error::Key(KeyError::UnknownKey(_)) => "unknown key",
        Error::Key(KeyError::Destroyed(_)) => "key destroyed",
        Error::Key(KeyError::Expired(_)) => "key expired",
        Error::Key(KeyError::Compromised(_)) => "key compromised",
        Error::Key(KeyError::RecordTampered(_)) => "key record tampered",
        Error::Key(KeyError::RecordStale(_)) => "key record rolled back",
        Error::Key(KeyError::Untagged(_)) => "key record unsigned",
        Error::Key(KeyError::IngestKeyMismatch) => "another ingest key",
        Error::Key(KeyError::UnknownIngestKey { .. }) => "unknown ingest key",
        Error::Key(_) => "key refused",
        Error::KeyService(_) => "key service error",
        Error::KeyStore(_) => "key store error",
        Error::Audit(_) => "audit error",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    //! Key-service failure cases need a service that can fail on demand.
    //! The real remote service (`panseal-keyd`) is tested as a process in
    //! its own suite; here a wrapper around the local service simulates an
    //! outage and a weak KEK, which no real in-crate service can produce.

    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::error::KeyServiceError;
    use crate::keys::{Dek, WrappedKey};
    use crate::keyservice::{sealed, KekInfo, LocalKeyService};
    use crate::keystore::MemoryKeyStore;
    use crate::MemoryAuditSink;

    #[derive(Clone)]
    struct Flaky {
        inner: LocalKeyService,
        down: Arc<AtomicBool>,
        kek_bits: u32,
    }

    impl Flaky {
        fn check(&self) -> Result<(), KeyServiceError> {
            if self.down.load(Ordering::SeqCst) {
                Err(KeyServiceError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    impl sealed::Sealed for Flaky {}

    #[async_trait]
    impl KeyService for Flaky {
        async fn kek_info(&self) -> Result<KekInfo, KeyServiceError> {
            self.check()?;
            let mut info = self.inner.kek_info().await?;
            info.strength_bits = self.kek_bits;
            Ok(info)
        }
        async fn wrap(&self, r: &KeyRequest, d: &Dek) -> Result<WrappedKey, KeyServiceError> {
            self.check()?;
            self.inner.wrap(r, d).await
        }
        async fn unwrap(
            &self,
            r: &KeyRequest,
            w: &WrappedKey,
            a: &Access,
        ) -> Result<Dek, KeyServiceError> {
            self.check()?;
            self.inner.unwrap(r, w, a).await
        }
        async fn rewrap(
            &self,
            r: &KeyRequest,
            w: &WrappedKey,
        ) -> Result<WrappedKey, KeyServiceError> {
            self.check()?;
            self.inner.rewrap(r, w).await
        }
        async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError> {
            self.check()?;
            self.inner.rotate_kek().await
        }
        async fn permissions(&self) -> Result<crate::Permissions, KeyServiceError> {
            self.check()?;
            KeyService::permissions(&self.inner).await
        }
        async fn index_keys(&self, s: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
            self.check()?;
            self.inner.index_keys(s).await
        }
        async fn blind_index(
            &self,
            s: &Scope,
            v: &[u32],
            p: &[&Pan],
            a: &Access,
        ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
            self.check()?;
            self.inner.blind_index(s, v, p, a).await
        }
        async fn create_index_key(&self, s: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
            self.check()?;
            self.inner.create_index_key(s).await
        }
        async fn authenticate_record(
            &self,
            p: Option<&WrappedDek>,
            r: &WrappedDek,
        ) -> Result<crate::keys::RecordTag, KeyServiceError> {
            self.check()?;
            self.inner.authenticate_record(p, r).await
        }
        async fn verify_record(&self, r: &WrappedDek) -> Result<(), KeyServiceError> {
            self.check()?;
            self.inner.verify_record(r).await
        }
    }

    fn flaky(bits: u32) -> Flaky {
        Flaky {
            inner: LocalKeyService::new(Environment::new("test").unwrap()),
            down: Arc::new(AtomicBool::new(false)),
            kek_bits: bits,
        }
    }

    async fn build(ks: Flaky, store: MemoryKeyStore, policy: Policy) -> Result<Panseal, Error> {
        Panseal::builder()
            .key_service(ks)
            .key_store(store)
            .audit(MemoryAuditSink::new())
            .environment("test")
            .scope("m")
            .policy(policy)
            .build()
            .await
    }

    #[tokio::test]
    async fn weak_kek_is_refused_at_start() {
        let err = build(flaky(128), MemoryKeyStore::new(), Policy::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::KeyService(KeyServiceError::WeakKek {
                    kek_bits: 128,
                    dek_bits: 256
                })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn key_service_down_is_retryable_and_loses_nothing() {
        let ks = flaky(256);
        let store = MemoryKeyStore::new();
        let ps = build(ks.clone(), store.clone(), Policy::default().max_uses(2))
            .await
            .unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let ctx = Context::new("cards", "pan", "1").unwrap();
        let access = Access::new("a", "b").unwrap();
        let s1 = ps.seal_pan(&pan, &ctx).await.unwrap();
        let before = store.list(None).await.unwrap();

        ks.down.store(true, Ordering::SeqCst);
        // Within the budget the cached DEK still seals and opens.
        let s2 = ps.seal_pan(&pan, &ctx).await.unwrap();
        assert_eq!(ps.open_pan(&s1, &ctx, &access).await.unwrap().pan, pan);
        // The next seal needs a new DEK: a clear, retryable error.
        let err = ps.seal_pan(&pan, &ctx).await.unwrap_err();
        assert!(matches!(
            err,
            Error::KeyService(KeyServiceError::Unavailable(_))
        ));
        assert!(err.is_retryable());
        // A process that has not cached the DEK cannot open, retryably.
        let fresh = build_while_down(&ks, &store).await;
        let err = fresh.open_pan(&s1, &ctx, &access).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        // Nothing was added, removed or changed in the store except use
        // counts and the exhausted key's retirement.
        let during = store.list(None).await.unwrap();
        assert_eq!(during.len(), before.len());
        for (a, b) in before.iter().zip(&during) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.wrapped, b.wrapped);
        }

        ks.down.store(false, Ordering::SeqCst);
        let s3 = ps.seal_pan(&pan, &ctx).await.unwrap();
        assert_ne!(s3.key_id(), s1.key_id());
        for s in [s1, s2, s3] {
            assert_eq!(fresh.open_pan(&s, &ctx, &access).await.unwrap().pan, pan);
        }
    }

    /// Keys this process holds in the clear: cached DEKs and index keys
    /// (always 0: index keys stay in the key service; `IndexKeys` holds
    /// version numbers only).
    fn keys_in_memory(ps: &Panseal) -> (usize, usize) {
        (ps.shared.cache.len(), 0)
    }

    /// Item 2 of issue 9: a process that stops calling must not keep
    /// unwrapped keys past their TTL. No call is made after the wait (no
    /// insert, no open): the sweep alone must wipe them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_keys_leave_memory_without_any_new_call() {
        let ttl = std::time::Duration::from_millis(300);
        let store = MemoryKeyStore::new();
        let ks = flaky(256);
        let policy = Policy::default().cache_ttl(ttl).max_uses(2);
        let ps = build(ks.clone(), store.clone(), policy.clone())
            .await
            .unwrap();
        let reader = build(ks, store, policy).await.unwrap();
        let access = Access::new("a", "b").unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        for scope in ["m", "m2", "m3"] {
            let w = ps.with_scope(scope).unwrap();
            let r = reader.with_scope(scope).unwrap();
            for row in 0..5 {
                let ctx = Context::new("cards", "pan", row.to_string()).unwrap();
                let sealed = w.seal_pan(&pan, &ctx).await.unwrap();
                r.open_pan(&sealed, &ctx, &access).await.unwrap();
            }
            r.blind_index(&pan).await.unwrap();
        }
        let (cached, index) = keys_in_memory(&reader);
        assert!(cached >= 9 && index == 0, "{cached} {index}");
        tokio::time::sleep(
            ttl + crate::keys::sweep_interval(ttl) + std::time::Duration::from_millis(200),
        )
        .await;
        assert_eq!(keys_in_memory(&reader), (0, 0), "stale keys left in memory");
        // The writer keeps at most its active DEK per scope, and nothing
        // else.
        assert_eq!(keys_in_memory(&ps), (0, 0));
        let active = ps
            .shared
            .scopes
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.active.load().is_some())
            .count();
        assert!(active <= 3, "{active}");
    }

    /// A write-only front end (no audit sink: it cannot open) holds at most
    /// its active DEK per scope, however often it rotates.
    #[tokio::test]
    async fn front_end_holds_only_its_active_dek() {
        let ps = Panseal::builder()
            .key_service(flaky(256))
            .key_store(MemoryKeyStore::new())
            .environment("test")
            .scope("m")
            .policy(Policy::default().max_uses(3))
            .build()
            .await
            .unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let ctx = Context::new("cards", "pan", "1").unwrap();
        let mut ids = std::collections::HashSet::new();
        for _ in 0..20 {
            ids.insert(ps.seal_pan(&pan, &ctx).await.unwrap().key_id());
            assert_eq!(keys_in_memory(&ps), (0, 0));
        }
        assert!(ids.len() >= 6, "{}", ids.len());
    }

    async fn build_while_down(ks: &Flaky, store: &MemoryKeyStore) -> Panseal {
        ks.down.store(false, Ordering::SeqCst);
        let p = build(ks.clone(), store.clone(), Policy::default())
            .await
            .unwrap();
        ks.down.store(true, Ordering::SeqCst);
        p
    }
}
