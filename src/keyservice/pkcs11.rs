//! The PKCS#11 key service: KEKs are non-extractable AES-256 keys inside a
//! hardware security module (or any token reached through a PKCS#11 module,
//! such as SoftHSM2 in the tests).
//!
//! # How a wrap is made
//!
//! A wrap is `C_Encrypt` with `CKM_AES_GCM` **inside the token**, under the
//! KEK object of the newest version, with a fresh 96-bit IV and
//! [`KeyRequest::wrap_aad`] as the GCM additional data; the stored bytes are
//! `IV (12) || ciphertext (32) || tag (16)`: the same 60-byte layout and the
//! same binding as the local service (`FORMAT.md`, "Wrap binding"), only the
//! KEK never leaves the HSM. Unwrap is `C_Decrypt` with the same parameters;
//! any authentication failure is the opaque
//! [`KeyServiceError::UnwrapFailed`].
//!
//! AES-GCM is used through `C_Encrypt`/`C_Decrypt` rather than
//! `C_WrapKey`/`C_UnwrapKey` because that is what carries the associated
//! data on every token we know of (SoftHSM2 offers GCM for encrypt and
//! decrypt only, and offers no AES-KWP with associated data at all). The
//! consequence is spelled out on [`Pkcs11KeyService`]'s `rewrap`.
//!
//! # KEK versions are token objects
//!
//! Version `N` of KEK `name` is the secret-key object with
//! `CKA_LABEL = "panseal-kek:<name>:v<N>"` and `CKA_ID = "panseal-kek:<name>"`
//! (every version shares the id, so one `C_FindObjects` lists them). The
//! newest version wraps; [`KeyService::rotate_kek`] generates version `N+1`
//! in the token and clears `CKA_ENCRYPT` on version `N`, so the HSM itself
//! refuses to wrap with a retired version. [`Pkcs11KeyService::destroy_kek`]
//! destroys a version's object (`C_DestroyObject`). Versions are numbered
//! without gaps, so a missing version below the newest is reported as
//! [`KeyServiceError::KekDestroyed`], one above it as
//! [`KeyServiceError::UnknownKek`].
//!
//! # Index keys and the record-MAC key are token objects too
//!
//! Blind-index version `N` of scope `S` is a 256-bit `CKK_GENERIC_SECRET`
//! object generated in the token (`CKM_GENERIC_SECRET_KEY_GEN`; sensitive,
//! never extractable, `CKA_SIGN`/`CKA_VERIFY` only) with
//! `CKA_ID = "panseal-index/<name>/<environment>/<S>"` and
//! `CKA_LABEL = "<id>/v<N>/<active|lookup-only>/<created>"`; a destroyed
//! version is a destroyed object. Keyed hashes are `C_Sign` with
//! `CKM_SHA256_HMAC`, a whole batch in one session. The record-MAC key
//! (`panseal-record-mac/<name>/<environment>`) is generated on first use
//! and signs [`WrappedDek::signed_bytes`]. Objects that were not generated
//! in the token (a key imported with a known value) are refused.
//!
//! # Sessions
//!
//! Calls run on Tokio's blocking pool (a network HSM answers in
//! milliseconds) with sessions from a pool of at most `max_sessions`,
//! opened on demand and logged in with the caller's PIN, so concurrent
//! callers do not queue on one session. A session the token reports as lost
//! is dropped and the call is retried once on a fresh one; an unreachable
//! device is [`KeyServiceError::Unavailable`] (retryable).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand_core::{OsRng, RngCore};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{
    sealed, AdmitOutput, AdmitRequest, IndexKeyInfo, IngestOpenRequest, KekInfo, KeyService,
    Permissions, MAX_ADMIT_BATCH,
};
use crate::access::Access;
use crate::context::Context;
use crate::error::{AdmitItemError, Error, KeyError, KeyServiceError};
use crate::ingest::split::{self, DhSecret};
use crate::ingest::{IngestKeyInfo, IngestPublicKey, IngestSealed, INGEST_PUBLIC_KEY_LEN};
use crate::keys::{
    unix_now, Dek, Environment, KekRef, KeyPurpose, KeyRequest, KeyState, RecordTag, Scope,
    WrappedDek, WrappedKey,
};
use crate::pan::Pan;
use crate::Opened;

const IV_LEN: usize = 12;
const DEK_LEN: usize = 32;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = IV_LEN + DEK_LEN + TAG_LEN;
const LABEL_PREFIX: &str = "panseal-kek:";
/// `CKA_ID` prefix of index-key objects (`/` cannot occur in a name).
const INDEX_PREFIX: &str = "panseal-index/";
/// `CKA_ID` and `CKA_LABEL` prefix of the record-MAC key object.
const RECORD_MAC_PREFIX: &str = "panseal-record-mac/";
const HMAC_LEN: usize = 32;

/// The user PIN of a PKCS#11 token. Wiped on drop; its `Debug` prints
/// `Pkcs11Pin(..)`; panseal never logs it or puts it in an error.
pub struct Pkcs11Pin(AuthPin);

impl Pkcs11Pin {
    /// Takes the PIN (the `String` moves in and is wiped when the service is
    /// dropped; wiping any other copy is the caller's business).
    pub fn new(mut pin: String) -> Self {
        // `AuthPin` keeps a `Box<str>`: a `String` with spare capacity would
        // be shrunk into a new allocation, leaving the PIN's bytes in the
        // freed one. Copy it into an exact allocation and wipe the original.
        if pin.capacity() != pin.len() {
            let mut exact = String::with_capacity(pin.len());
            exact.push_str(&pin);
            zeroize::Zeroize::zeroize(&mut pin);
            pin = exact;
        }
        Pkcs11Pin(AuthPin::from(pin))
    }
}

impl std::fmt::Debug for Pkcs11Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs11Pin(..)")
    }
}

/// Where the KEK lives and how to reach it. Holds no secret: the PIN is
/// passed to [`Pkcs11KeyService::connect`] separately.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Label of the token (HSM partition) that holds the KEK.
    pub token_label: String,
    /// The KEK's name: its objects are labelled `panseal-kek:<name>:v<N>`.
    pub kek_name: String,
    /// The environment this service serves (`prod`, `test`, …).
    pub environment: Environment,
    /// Most sessions open at once (default 8). Also the most calls in
    /// flight; further callers wait for a free session.
    pub max_sessions: usize,
    /// How long one call may take before it is reported as
    /// [`KeyServiceError::Unavailable`] (default 10 s).
    pub operation_timeout: Duration,
    /// Generate version 1 in the token if no version of the KEK exists
    /// (default `false`: a missing KEK is [`KeyServiceError::UnknownKek`]).
    pub create_kek_if_missing: bool,
    /// What this handle offers its callers (default: everything but
    /// `reveal`, which a service that hands DEKs to its callers does not
    /// offer). Operations outside it fail with
    /// [`KeyServiceError::PermissionDenied`] before the token is asked.
    /// The PIN itself can do more: give a front end a token (partition)
    /// and PIN of its own where the HSM supports it (README, "PKCS#11").
    pub permissions: Permissions,
}

impl Pkcs11Config {
    /// A configuration with the defaults.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: &str,
        kek_name: &str,
        environment: Environment,
    ) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.to_owned(),
            kek_name: kek_name.to_owned(),
            environment,
            max_sessions: 8,
            operation_timeout: Duration::from_secs(10),
            create_kek_if_missing: false,
            permissions: Permissions {
                reveal: false,
                ..Permissions::all()
            },
        }
    }

    /// Sets [`Pkcs11Config::permissions`] (`reveal` is always off).
    pub fn permissions(mut self, permissions: Permissions) -> Self {
        self.permissions = Permissions {
            reveal: false,
            ..permissions
        };
        self
    }

    /// Sets [`Pkcs11Config::max_sessions`].
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = n;
        self
    }

    /// Sets [`Pkcs11Config::operation_timeout`].
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`Pkcs11Config::create_kek_if_missing`].
    pub fn create_kek_if_missing(mut self, create: bool) -> Self {
        self.create_kek_if_missing = create;
        self
    }
}

/// One KEK version object as found in the token.
#[derive(Clone, Debug)]
struct KekObject {
    version: u32,
    handle: ObjectHandle,
    bits: u32,
    encrypt: bool,
}

/// The versions found by the last scan, oldest first. Several objects may
/// carry one version only after a concurrent rotation (see `rotate`).
#[derive(Default)]
struct Keks {
    objects: Vec<KekObject>,
}

impl Keks {
    fn newest(&self) -> u32 {
        self.objects.iter().map(|k| k.version).max().unwrap_or(0)
    }

    fn version(&self, version: u32) -> Vec<KekObject> {
        self.objects
            .iter()
            .filter(|k| k.version == version)
            .cloned()
            .collect()
    }
}

struct Inner {
    ctx: Pkcs11,
    token_label: String,
    pin: Pkcs11Pin,
    kek_name: String,
    environment: Environment,
    timeout: Duration,
    max_sessions: usize,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Session>>,
    open_sessions: AtomicUsize,
    keks: RwLock<Keks>,
    permissions: Permissions,
    /// Index-key objects per scope, from the last scan of that scope.
    index: RwLock<HashMap<Scope, Vec<IndexObject>>>,
    /// Ingest-key objects per scope, from the last scan of that scope.
    ingest: RwLock<HashMap<Scope, Vec<IngestObject>>>,
}

/// One index-key version object as found in the token.
#[derive(Clone, Debug)]
struct IndexObject {
    version: u32,
    handle: ObjectHandle,
    state: KeyState,
    created_at: u64,
}

/// A failure inside a blocking call: a raw PKCS#11 error (the runner decides
/// whether the session survives) or an already-mapped error.
enum Fail {
    Ck(CkError),
    Ks(KeyServiceError),
}

impl From<CkError> for Fail {
    fn from(e: CkError) -> Self {
        Fail::Ck(e)
    }
}

impl From<KeyServiceError> for Fail {
    fn from(e: KeyServiceError) -> Self {
        Fail::Ks(e)
    }
}

/// A [`KeyService`] whose KEKs are AES-256 key objects in a PKCS#11 token.
///
/// See the module documentation for the object layout and the wrap format,
/// and the README ("PKCS#11") for what to set up in the HSM. Cheap to clone;
/// clones share the session pool.
///
/// **`rewrap`** decrypts with the old version and encrypts with the new one
/// in one session, back to back: the DEK is in this process's memory (a
/// zeroizing buffer) for the two calls and is never returned to the caller.
/// It does not stay inside the HSM, because tokens that offer AES-GCM only
/// for `C_Encrypt`/`C_Decrypt` (SoftHSM2 among them) cannot unwrap a
/// GCM-wrapped key into a token object.
#[derive(Clone)]
pub struct Pkcs11KeyService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pkcs11KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyService")
            .field("token_label", &self.inner.token_label)
            .field("kek_name", &self.inner.kek_name)
            .field("environment", &self.inner.environment)
            .field("max_sessions", &self.inner.max_sessions)
            .finish_non_exhaustive()
    }
}

/// Facts about the session pool, for monitoring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pkcs11PoolStats {
    /// Sessions open now (idle or in use).
    pub open: usize,
    /// Sessions open and idle now.
    pub idle: usize,
    /// The configured maximum.
    pub max: usize,
}

impl Pkcs11KeyService {
    /// Loads and initializes the module (once per process; an already
    /// initialized module is shared), finds the token by label, logs in with
    /// `pin`, and finds the KEK's versions (generating version 1 if asked
    /// to and none exists).
    ///
    /// Must be called within a Tokio runtime with timers enabled.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::Other`] for a module that does not load, a bad
    /// name, a token without AES-GCM, or a KEK object that is extractable or
    /// not sensitive; [`KeyServiceError::Unavailable`] if no token with the
    /// label is present or the device fails;
    /// [`KeyServiceError::PermissionDenied`] if the PIN is refused;
    /// [`KeyServiceError::UnknownKek`] if no version exists and
    /// `create_kek_if_missing` is off.
    pub async fn connect(config: Pkcs11Config, pin: Pkcs11Pin) -> Result<Self, KeyServiceError> {
        validate_kek_name(&config.kek_name)?;
        if config.max_sessions == 0 {
            return Err(KeyServiceError::Other(
                "max_sessions must be at least 1".into(),
            ));
        }
        let ctx = load_module(&config.module)?;
        let service = Pkcs11KeyService {
            inner: Arc::new(Inner {
                ctx,
                token_label: config.token_label,
                pin,
                kek_name: config.kek_name,
                environment: config.environment,
                timeout: config.operation_timeout,
                max_sessions: config.max_sessions,
                permits: Arc::new(Semaphore::new(config.max_sessions)),
                idle: Mutex::new(Vec::new()),
                open_sessions: AtomicUsize::new(0),
                keks: RwLock::new(Keks::default()),
                permissions: config.permissions,
                index: RwLock::new(HashMap::new()),
                ingest: RwLock::new(HashMap::new()),
            }),
        };
        let create = config.create_kek_if_missing;
        service
            .run(move |inner, session| {
                inner.check_mechanism()?;
                inner.scan(session)?;
                if inner.read_keks().objects.is_empty() {
                    if !create {
                        return Err(KeyServiceError::UnknownKek(inner.kek_name.clone()).into());
                    }
                    inner.rotate(session)?;
                }
                Ok(())
            })
            .await?;
        Ok(service)
    }

    /// The KEK's name (the `id` of every [`KekRef`] this service makes).
    pub fn kek_name(&self) -> &str {
        &self.inner.kek_name
    }

    /// The session pool now.
    pub fn pool_stats(&self) -> Pkcs11PoolStats {
        Pkcs11PoolStats {
            open: self.inner.open_sessions.load(Ordering::SeqCst),
            idle: self.inner.lock_idle().len(),
            max: self.inner.max_sessions,
        }
    }

    /// Destroys KEK version `version` in the token (`C_DestroyObject`):
    /// every DEK wrapped only under it becomes unrecoverable. Rewrap first.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::UnknownKek`] for a version that does not exist,
    /// [`KeyServiceError::KekDestroyed`] for one already destroyed,
    /// [`KeyServiceError::Other`] for the newest version (rotate first), and
    /// the token's refusals and failures.
    pub async fn destroy_kek(&self, version: u32) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        self.run(move |inner, session| {
            inner.scan(session)?;
            let (objects, newest) = {
                let keks = inner.read_keks();
                (keks.version(version), keks.newest())
            };
            if version == newest {
                return Err(KeyServiceError::Other(
                    "the newest KEK version cannot be destroyed; rotate first".into(),
                )
                .into());
            }
            if objects.is_empty() {
                return Err(inner.missing(version, newest).into());
            }
            for object in objects {
                session.destroy_object(object.handle)?;
            }
            inner.scan(session)?;
            tracing::info!(kek = %inner.kek_ref(version), "KEK version destroyed");
            Ok(())
        })
        .await
    }

    /// Runs `f` with a pooled session on the blocking pool, within the
    /// operation timeout.
    async fn run<T, F>(&self, f: F) -> Result<T, KeyServiceError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session) -> Result<T, Fail> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let call = async move {
            let permit = Arc::clone(&inner.permits)
                .acquire_owned()
                .await
                .map_err(|_| KeyServiceError::Unavailable("PKCS#11 session pool closed".into()))?;
            let task = tokio::task::spawn_blocking(move || {
                // Held until the token call returns, even if the caller gave
                // up waiting: the pool never exceeds `max_sessions`.
                let _permit = permit;
                inner.with_session(&f)
            });
            task.await.map_err(|_| {
                KeyServiceError::Other("PKCS#11 call panicked or was cancelled".into())
            })?
        };
        // Waiting for a free session counts against the timeout too: with
        // every session stuck in a hung token, callers fail instead of
        // queueing forever.
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(KeyServiceError::Unavailable(format!(
                "PKCS#11 token did not answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    fn check_env(&self, request: &KeyRequest) -> Result<(), KeyServiceError> {
        if request.environment != self.inner.environment {
            return Err(KeyServiceError::Environment {
                service: self.inner.environment.to_string(),
                request: request.environment.to_string(),
            });
        }
        Ok(())
    }

    fn require(&self, ok: bool, what: &str) -> Result<(), KeyServiceError> {
        if ok {
            Ok(())
        } else {
            Err(KeyServiceError::PermissionDenied(format!(
                "this PKCS#11 key service is not configured for {what}"
            )))
        }
    }

    fn check_kek_id(&self, wrapped: &WrappedKey) -> Result<(), KeyServiceError> {
        if wrapped.kek.id != self.inner.kek_name {
            return Err(KeyServiceError::UnknownKek(wrapped.kek.to_string()));
        }
        Ok(())
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_keks(&self) -> std::sync::RwLockReadGuard<'_, Keks> {
        self.keks.read().unwrap_or_else(|p| p.into_inner())
    }

    fn kek_ref(&self, version: u32) -> KekRef {
        KekRef {
            id: self.kek_name.clone(),
            version,
        }
    }

    fn id_marker(&self) -> Vec<u8> {
        format!("{LABEL_PREFIX}{}", self.kek_name).into_bytes()
    }

    fn label(&self, version: u32) -> String {
        format!("{LABEL_PREFIX}{}:v{version}", self.kek_name)
    }

    /// The error for a version with no object: destroyed if below the
    /// newest (versions have no gaps), unknown otherwise.
    fn missing(&self, version: u32, newest: u32) -> KeyServiceError {
        let name = self.kek_ref(version).to_string();
        if version >= 1 && version < newest {
            KeyServiceError::KekDestroyed(name)
        } else {
            KeyServiceError::UnknownKek(name)
        }
    }

    /// Takes an idle session (or opens one), runs `f`, and puts the session
    /// back unless the token reported it lost; a lost session is retried
    /// once on a fresh one.
    fn with_session<T, F>(&self, f: &F) -> Result<T, KeyServiceError>
    where
        F: Fn(&Inner, &Session) -> Result<T, Fail>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pooled = self.lock_idle().pop();
            let session = match pooled {
                Some(s) => s,
                None => self.open_session().map_err(|e| map_ck(&e))?,
            };
            match f(self, &session) {
                Ok(value) => {
                    self.lock_idle().push(session);
                    return Ok(value);
                }
                Err(Fail::Ks(e)) => {
                    self.lock_idle().push(session);
                    return Err(e);
                }
                Err(Fail::Ck(e)) => {
                    if !session_survives(&e) {
                        self.discard(session);
                        if device_gone(&e) {
                            // Every pooled session is as dead as this one.
                            let stale: Vec<Session> = self.lock_idle().drain(..).collect();
                            for s in stale {
                                self.discard(s);
                            }
                        }
                        if session_lost(&e) && attempt < 2 {
                            continue;
                        }
                    } else {
                        self.lock_idle().push(session);
                    }
                    return Err(map_ck(&e));
                }
            }
        }
    }

    fn discard(&self, session: Session) {
        self.open_sessions.fetch_sub(1, Ordering::SeqCst);
        // Closing a session the token already dropped fails; nothing to do.
        let _ = session.close();
    }

    fn find_slot(&self) -> Result<Slot, KeyServiceError> {
        let slots = self.ctx.get_slots_with_token().map_err(|e| map_ck(&e))?;
        for slot in slots {
            let info = self.ctx.get_token_info(slot).map_err(|e| map_ck(&e))?;
            if info.label() == self.token_label {
                return Ok(slot);
            }
        }
        Err(KeyServiceError::Unavailable(format!(
            "no PKCS#11 token labelled {:?} is present",
            self.token_label
        )))
    }

    fn open_session(&self) -> Result<Session, CkError> {
        let slot = self.find_slot().map_err(|e| match e {
            KeyServiceError::Unavailable(_) => CkError::Pkcs11(
                RvError::TokenNotPresent,
                cryptoki::context::Function::OpenSession,
            ),
            _ => CkError::Pkcs11(
                RvError::GeneralError,
                cryptoki::context::Function::OpenSession,
            ),
        })?;
        let session = self.ctx.open_rw_session(slot)?;
        match session.login(UserType::User, Some(&self.pin.0)) {
            // Login is per application, not per session: the pool's other
            // sessions (or another service on this token) logged in already.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(e),
        }
        self.open_sessions.fetch_add(1, Ordering::SeqCst);
        Ok(session)
    }

    fn check_mechanism(&self) -> Result<(), KeyServiceError> {
        let slot = self.find_slot()?;
        let info = self
            .ctx
            .get_mechanism_info(slot, MechanismType::AES_GCM)
            .map_err(|_| {
                KeyServiceError::Other(format!(
                    "token {:?} does not offer CKM_AES_GCM",
                    self.token_label
                ))
            })?;
        if !(info.encrypt() && info.decrypt()) {
            return Err(KeyServiceError::Other(format!(
                "token {:?} does not offer CKM_AES_GCM for encrypt and decrypt",
                self.token_label
            )));
        }
        Ok(())
    }

    /// Logs `session` in again if the application's login to the token was
    /// dropped (by a `C_Logout` elsewhere in the process, or a token
    /// reset): private objects are invisible until then.
    fn ensure_login(&self, session: &Session) -> Result<bool, Fail> {
        match session.get_session_info()?.session_state() {
            SessionState::RwUser | SessionState::RoUser => Ok(false),
            _ => match session.login(UserType::User, Some(&self.pin.0)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(true),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Lists the KEK's version objects and checks each is a sensitive,
    /// non-extractable AES key.
    fn scan(&self, session: &Session) -> Result<(), Fail> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(self.id_marker()),
        ];
        let mut handles = session.find_objects(&template)?;
        if handles.is_empty() && self.ensure_login(session)? {
            handles = session.find_objects(&template)?;
        }
        let prefix = format!("{LABEL_PREFIX}{}:v", self.kek_name);
        let mut objects = Vec::with_capacity(handles.len());
        for handle in handles {
            let attrs = session.get_attributes(
                handle,
                &[
                    AttributeType::Label,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                ],
            )?;
            let mut label = None;
            let mut key_type = None;
            let mut bits = 0u32;
            let (mut sensitive, mut extractable, mut encrypt) = (false, true, false);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = Some(String::from_utf8_lossy(&l).into_owned()),
                    Attribute::KeyType(t) => key_type = Some(t),
                    Attribute::ValueLen(n) => {
                        bits = u32::try_from(usize::from(n)).unwrap_or(0).saturating_mul(8)
                    }
                    Attribute::Sensitive(b) => sensitive = b,
                    Attribute::Extractable(b) => extractable = b,
                    Attribute::Encrypt(b) => encrypt = b,
                    _ => {}
                }
            }
            let Some(version) = label
                .as_deref()
                .and_then(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| *v >= 1)
            else {
                continue;
            };
            let name = self.kek_ref(version);
            if key_type != Some(KeyType::AES) {
                return Err(KeyServiceError::Other(format!("KEK {name} is not an AES key")).into());
            }
            if !sensitive || extractable {
                return Err(KeyServiceError::Other(format!(
                    "KEK {name} is extractable or not sensitive; refusing to use it \
                     (CKA_SENSITIVE must be true and CKA_EXTRACTABLE false)"
                ))
                .into());
            }
            objects.push(KekObject {
                version,
                handle,
                bits,
                encrypt,
            });
        }
        objects.sort_by_key(|k| k.version);
        let mut keks = self.keks.write().unwrap_or_else(|p| p.into_inner());
        if objects.is_empty() && !keks.objects.is_empty() {
            // panseal never destroys the newest version, so a token that
            // suddenly shows none is not showing its objects (a partition
            // offline, a storage failure): an outage, not a destruction.
            return Err(KeyServiceError::Unavailable(format!(
                "no version of KEK {} is visible in token {:?} (up to v{} was)",
                self.kek_name,
                self.token_label,
                keks.newest()
            ))
            .into());
        }
        *keks = Keks { objects };
        Ok(())
    }

    /// The one object of the newest version found by the last scan.
    fn current(&self) -> Result<KekObject, KeyServiceError> {
        let keks = self.read_keks();
        let newest = keks.newest();
        let mut objects = keks.version(newest);
        match objects.len() {
            0 => Err(KeyServiceError::UnknownKek(self.kek_name.clone())),
            1 => Ok(objects.remove(0)),
            _ => Err(KeyServiceError::Other(format!(
                "{} objects are labelled {:?} (a concurrent rotation?); \
                 a custodian must destroy all but one before wrapping resumes",
                objects.len(),
                self.label(newest)
            ))),
        }
    }

    fn info(&self) -> Result<KekInfo, KeyServiceError> {
        let current = self.current()?;
        Ok(KekInfo {
            id: self.kek_name.clone(),
            version: current.version,
            algorithm: "AES-256-GCM (PKCS#11 CKM_AES_GCM)".into(),
            strength_bits: current.bits,
            environment: self.environment.to_string(),
            state: if current.encrypt {
                KeyState::Active
            } else {
                KeyState::DecryptOnly
            },
        })
    }

    /// Encrypts `key` under the newest version (rescanning once if another
    /// process rotated meanwhile).
    fn wrap_key(
        &self,
        session: &Session,
        request: &KeyRequest,
        key: &[u8; DEK_LEN],
    ) -> Result<WrappedKey, Fail> {
        let mut rescanned = false;
        loop {
            let current = self.current()?;
            let kek = self.kek_ref(current.version);
            let aad = request.wrap_aad(&kek);
            let mut iv = [0u8; IV_LEN];
            OsRng.fill_bytes(&mut iv);
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, &aad, 128.into())?;
            match session.encrypt(&Mechanism::AesGcm(params), current.handle, key) {
                Ok(ct) if ct.len() == DEK_LEN + TAG_LEN => {
                    let mut bytes = Vec::with_capacity(WRAPPED_LEN);
                    bytes.extend_from_slice(&iv);
                    bytes.extend_from_slice(&ct);
                    return Ok(WrappedKey { kek, bytes });
                }
                Ok(ct) => {
                    return Err(KeyServiceError::Other(format!(
                        "token returned {} bytes for an AES-GCM wrap; expected {}",
                        ct.len(),
                        DEK_LEN + TAG_LEN
                    ))
                    .into())
                }
                Err(CkError::Pkcs11(
                    RvError::KeyFunctionNotPermitted
                    | RvError::KeyHandleInvalid
                    | RvError::ObjectHandleInvalid,
                    _,
                )) if !rescanned => {
                    // Rotated (and retired) or destroyed by another process.
                    rescanned = true;
                    self.scan(session)?;
                }
                Err(CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _)) => {
                    return Err(KeyServiceError::KekRetired(kek.to_string()).into())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Decrypts a wrap made by `wrap_key` (trying every object of the
    /// version: more than one exists only after a concurrent rotation).
    fn unwrap_key(
        &self,
        session: &Session,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, Fail> {
        if wrapped.bytes.len() != WRAPPED_LEN || wrapped.kek.version == 0 {
            return Err(KeyServiceError::UnwrapFailed.into());
        }
        let version = wrapped.kek.version;
        let aad = request.wrap_aad(&wrapped.kek);
        let (iv, body) = wrapped.bytes.split_at(IV_LEN);
        let mut rescanned = false;
        'scan: loop {
            let objects = self.read_keks().version(version);
            if objects.is_empty() {
                if !rescanned {
                    // Perhaps made by another process since our last scan.
                    self.scan(session)?;
                    rescanned = true;
                    continue 'scan;
                }
                let newest = self.read_keks().newest();
                return Err(self.missing(version, newest).into());
            }
            for object in &objects {
                let mut iv_param = [0u8; IV_LEN];
                iv_param.copy_from_slice(iv);
                let params = GcmParams::new(&mut iv_param, &aad, 128.into())?;
                match session.decrypt(&Mechanism::AesGcm(params), object.handle, body) {
                    Ok(plain) => {
                        let plain = Zeroizing::new(plain);
                        if plain.len() != DEK_LEN {
                            return Err(KeyServiceError::UnwrapFailed.into());
                        }
                        let mut key = Zeroizing::new([0u8; DEK_LEN]);
                        key.copy_from_slice(&plain);
                        return Ok(key);
                    }
                    Err(CkError::Pkcs11(rv, _)) if is_auth_failure(rv) => {}
                    Err(CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _)) => {
                        return Err(KeyServiceError::KekDisabled(wrapped.kek.to_string()).into())
                    }
                    Err(CkError::Pkcs11(
                        RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                        _,
                    )) if !rescanned => {
                        // Destroyed by another process since our last scan.
                        self.scan(session)?;
                        rescanned = true;
                        continue 'scan;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Err(KeyServiceError::UnwrapFailed.into());
        }
    }

    /// Generates version `newest + 1` in the token and retires the previous
    /// newest (`CKA_ENCRYPT = false`).
    fn rotate(&self, session: &Session) -> Result<(), Fail> {
        self.scan(session)?;
        let (newest, previous) = {
            let keks = self.read_keks();
            let n = keks.newest();
            (n, keks.version(n))
        };
        let next = newest
            .checked_add(1)
            .ok_or_else(|| KeyServiceError::Other("KEK version overflow".into()))?;
        session.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::Modifiable(true),
                Attribute::Label(self.label(next).into_bytes()),
                Attribute::Id(self.id_marker()),
            ],
        )?;
        for old in previous {
            if let Err(e) = session.update_attributes(old.handle, &[Attribute::Encrypt(false)]) {
                // The new version wraps from now on either way; a token that
                // refuses the change leaves the old version able to encrypt.
                tracing::warn!(
                    kek = %self.kek_ref(old.version),
                    error = ?e,
                    "could not clear CKA_ENCRYPT on the retired KEK version"
                );
            }
        }
        self.scan(session)?;
        let duplicates = self.read_keks().version(next).len();
        if duplicates != 1 {
            return Err(KeyServiceError::Other(format!(
                "{duplicates} objects are labelled {:?} after rotation (concurrent rotation?)",
                self.label(next)
            ))
            .into());
        }
        tracing::info!(kek = %self.kek_ref(next), "KEK rotated");
        Ok(())
    }
}

/// How an index-key state is written in its label.
fn state_label(state: KeyState) -> Option<&'static str> {
    match state {
        KeyState::Active => Some("active"),
        KeyState::DecryptOnly => Some("lookup-only"),
        _ => None,
    }
}

fn parse_state(s: &str) -> Option<KeyState> {
    match s {
        "active" => Some(KeyState::Active),
        "lookup-only" => Some(KeyState::DecryptOnly),
        _ => None,
    }
}

/// Attributes of a generic-secret HMAC key generated in the token: 256
/// bits, on the token, private, sensitive, never extractable, for
/// `C_Sign`/`C_Verify` only.
fn hmac_key_template(label: String, id: Vec<u8>) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(true),
        Attribute::Label(label.into_bytes()),
        Attribute::Id(id),
    ]
}

impl Inner {
    /// `CKA_ID` shared by every index-key version of `scope`:
    /// `panseal-index/<name>/<environment>/<scope>`.
    fn index_id(&self, scope: &Scope) -> String {
        format!(
            "{INDEX_PREFIX}{}/{}/{}",
            self.kek_name, self.environment, scope
        )
    }

    /// `CKA_LABEL` of one version: `<id>/v<N>/<state>/<created>`.
    fn index_label(&self, scope: &Scope, version: u32, state: &str, created_at: u64) -> String {
        format!("{}/v{version}/{state}/{created_at}", self.index_id(scope))
    }

    fn record_mac_id(&self) -> String {
        format!("{RECORD_MAC_PREFIX}{}/{}", self.kek_name, self.environment)
    }

    /// Checks a found HMAC key object: a generic secret generated in the
    /// token (`CKA_LOCAL`), always sensitive and never extractable, so no
    /// one (not even whoever holds the PIN) knows its value; an imported
    /// key with a chosen value is refused. Returns its label.
    fn check_hmac_object(
        &self,
        session: &Session,
        handle: ObjectHandle,
        what: &str,
    ) -> Result<String, Fail> {
        let attrs = session.get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::KeyType,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
            ],
        )?;
        let (mut label, mut key_type) = (String::new(), None);
        let (mut sensitive, mut extractable, mut always, mut never, mut local) =
            (false, true, false, false, false);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                Attribute::AlwaysSensitive(b) => always = b,
                Attribute::NeverExtractable(b) => never = b,
                Attribute::Local(b) => local = b,
                _ => {}
            }
        }
        if key_type != Some(KeyType::GENERIC_SECRET)
            || !sensitive
            || extractable
            || !always
            || !never
            || !local
        {
            return Err(KeyServiceError::Other(format!(
                "{what} {label:?} is not a generic secret generated in the token, always \
                 sensitive and never extractable; refusing it"
            ))
            .into());
        }
        Ok(label)
    }

    /// Lists `scope`'s index-key objects (every version, every live state).
    fn scan_index(&self, session: &Session, scope: &Scope) -> Result<Vec<IndexObject>, Fail> {
        let id = self.index_id(scope);
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.clone().into_bytes()),
        ];
        let mut handles = session.find_objects(&template)?;
        if handles.is_empty() && self.ensure_login(session)? {
            handles = session.find_objects(&template)?;
        }
        let prefix = format!("{id}/v");
        let mut objects = Vec::with_capacity(handles.len());
        for handle in handles {
            let label = self.check_hmac_object(session, handle, "index key")?;
            let mut parts = match label.strip_prefix(&prefix) {
                Some(rest) => rest.split('/'),
                None => continue,
            };
            let version = parts.next().and_then(|v| v.parse::<u32>().ok());
            let state = parts.next().and_then(parse_state);
            let created = parts.next().and_then(|c| c.parse::<u64>().ok());
            let (Some(version), Some(state), Some(created_at), None) =
                (version, state, created, parts.next())
            else {
                return Err(KeyServiceError::Other(format!(
                    "index key object with a malformed label {label:?}"
                ))
                .into());
            };
            objects.push(IndexObject {
                version,
                handle,
                state,
                created_at,
            });
        }
        objects.sort_by_key(|o| std::cmp::Reverse(o.version));
        if objects.windows(2).any(|w| w[0].version == w[1].version) {
            return Err(KeyServiceError::Other(format!(
                "two objects carry one index-key version of scope {scope} (a concurrent \
                 create?); a custodian must destroy one"
            ))
            .into());
        }
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.clone(), objects.clone());
        Ok(objects)
    }

    fn cached_index(&self, scope: &Scope) -> Option<Vec<IndexObject>> {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(scope)
            .cloned()
    }

    /// HMAC-SHA-256 of every PAN under every version, PAN-major, in this
    /// one session.
    fn hmac_batch(
        &self,
        session: &Session,
        scope: &Scope,
        versions: &[u32],
        pans: &[Zeroizing<Vec<u8>>],
    ) -> Result<Vec<[u8; HMAC_LEN]>, Fail> {
        let mut rescanned = false;
        'scan: loop {
            let objects = match self.cached_index(scope) {
                Some(o) if !o.is_empty() => o,
                _ => {
                    rescanned = true;
                    self.scan_index(session, scope)?
                }
            };
            let mut handles = Vec::with_capacity(versions.len());
            for v in versions {
                match objects.iter().find(|o| o.version == *v) {
                    Some(o) => handles.push(o.handle),
                    None if !rescanned => {
                        rescanned = true;
                        self.scan_index(session, scope)?;
                        continue 'scan;
                    }
                    None => {
                        return Err(KeyServiceError::UnknownIndexKey {
                            scope: scope.to_string(),
                            version: *v,
                        }
                        .into())
                    }
                }
            }
            let mut out = Vec::with_capacity(pans.len() * versions.len());
            for pan in pans {
                for h in &handles {
                    match session.sign(&Mechanism::Sha256Hmac, *h, pan) {
                        Ok(mac) if mac.len() == HMAC_LEN => {
                            let mut v = [0u8; HMAC_LEN];
                            v.copy_from_slice(&mac);
                            out.push(v);
                        }
                        Ok(mac) => {
                            return Err(KeyServiceError::Other(format!(
                                "token returned {} bytes for an HMAC-SHA-256",
                                mac.len()
                            ))
                            .into())
                        }
                        Err(CkError::Pkcs11(
                            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                            _,
                        )) if !rescanned => {
                            // Destroyed (or recreated) by another process.
                            rescanned = true;
                            self.scan_index(session, scope)?;
                            continue 'scan;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            return Ok(out);
        }
    }

    /// Generates version `newest + 1` of `scope`'s index key in the token
    /// (active) and relabels the previous active version lookup-only.
    fn create_index(&self, session: &Session, scope: &Scope) -> Result<IndexKeyInfo, Fail> {
        let objects = self.scan_index(session, scope)?;
        let next = objects
            .first()
            .map_or(0, |o| o.version)
            .checked_add(1)
            .ok_or_else(|| KeyServiceError::Other("index-key version overflow".into()))?;
        let now = unix_now();
        session.generate_key(
            &Mechanism::GenericSecretKeyGen,
            &hmac_key_template(
                self.index_label(scope, next, "active", now),
                self.index_id(scope).into_bytes(),
            ),
        )?;
        for old in objects.iter().filter(|o| o.state == KeyState::Active) {
            session.update_attributes(
                old.handle,
                &[Attribute::Label(
                    self.index_label(scope, old.version, "lookup-only", old.created_at)
                        .into_bytes(),
                )],
            )?;
        }
        let after = self.scan_index(session, scope)?;
        if after.first().map(|o| o.version) != Some(next) {
            return Err(KeyServiceError::Other(format!(
                "index key v{next} of scope {scope} not found after creation"
            ))
            .into());
        }
        tracing::info!(scope = %scope, version = next, "index key created in the token");
        Ok(IndexKeyInfo {
            scope: scope.clone(),
            version: next,
            state: KeyState::Active,
            created_at: now,
        })
    }

    fn set_index_state(
        &self,
        session: &Session,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), Fail> {
        let objects = self.scan_index(session, scope)?;
        let Some(object) = objects.iter().find(|o| o.version == version) else {
            return Err(KeyServiceError::UnknownIndexKey {
                scope: scope.to_string(),
                version,
            }
            .into());
        };
        if state == object.state {
            return Ok(());
        }
        if !object.state.can_become(state) {
            return Err(KeyServiceError::Other(format!(
                "index key v{version}: state may only move forward ({:?} -> {state:?} refused)",
                object.state
            ))
            .into());
        }
        match state {
            KeyState::Destroyed => {
                if objects.first().map(|o| o.version) == Some(version) {
                    // Versions are numbered from the newest live one: keep it.
                    return Err(KeyServiceError::Other(
                        "the newest index-key version cannot be destroyed; create a new one first"
                            .into(),
                    )
                    .into());
                }
                session.destroy_object(object.handle)?;
            }
            KeyState::DecryptOnly => {
                let label = state_label(state).unwrap_or("lookup-only");
                session.update_attributes(
                    object.handle,
                    &[Attribute::Label(
                        self.index_label(scope, version, label, object.created_at)
                            .into_bytes(),
                    )],
                )?;
            }
            other => {
                return Err(KeyServiceError::Other(format!(
                    "index keys are active, lookup-only or destroyed ({other:?} refused)"
                ))
                .into())
            }
        }
        self.scan_index(session, scope)?;
        tracing::info!(scope = %scope, version, state = ?state, "index key state changed");
        Ok(())
    }

    /// The record-MAC key objects (normally one), generating it if asked
    /// and none exists.
    fn record_keys(&self, session: &Session, create: bool) -> Result<Vec<ObjectHandle>, Fail> {
        let id = self.record_mac_id();
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.clone().into_bytes()),
        ];
        let mut handles = session.find_objects(&template)?;
        if handles.is_empty() && self.ensure_login(session)? {
            handles = session.find_objects(&template)?;
        }
        if handles.is_empty() && create {
            session.generate_key(
                &Mechanism::GenericSecretKeyGen,
                &hmac_key_template(id.clone(), id.clone().into_bytes()),
            )?;
            handles = session.find_objects(&template)?;
            tracing::info!(key = %id, "record-MAC key created in the token");
        }
        for h in &handles {
            self.check_hmac_object(session, *h, "record-MAC key")?;
        }
        Ok(handles)
    }

    fn mac(&self, session: &Session, key: ObjectHandle, data: &[u8]) -> Result<[u8; 32], Fail> {
        let mac = session.sign(&Mechanism::Sha256Hmac, key, data)?;
        if mac.len() != HMAC_LEN {
            return Err(KeyServiceError::Other("token returned a short HMAC".into()).into());
        }
        let mut out = [0u8; HMAC_LEN];
        out.copy_from_slice(&mac);
        Ok(out)
    }

    /// Whether `record`'s tag verifies under the (any) record-MAC key.
    fn record_verifies(&self, session: &Session, record: &WrappedDek) -> Result<bool, Fail> {
        let Some(tag) = record.tag else {
            return Ok(false);
        };
        let bytes = record.signed_bytes();
        for key in self.record_keys(session, false)? {
            if RecordTag(self.mac(session, key, &bytes)?) == tag {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

// ----- write-only ingest: P-256 key pairs generated in the token ------------

/// `CKA_ID` prefix of ingest key-pair objects.
const INGEST_PREFIX: &str = "panseal-ingest/";
/// DER of the OID prime256v1 (1.2.840.10045.3.1.7): `CKA_EC_PARAMS` of P-256.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// One ingest-key version as found in the token: the private key (never
/// extractable, `CKA_DERIVE` only) and its public point.
#[derive(Clone, Debug)]
struct IngestObject {
    version: u32,
    private: ObjectHandle,
    public: IngestPublicKey,
    state: KeyState,
    created_at: u64,
}

fn ingest_state_label(state: KeyState) -> Option<&'static str> {
    match state {
        KeyState::Active => Some("active"),
        KeyState::DecryptOnly => Some("retired"),
        _ => None,
    }
}

fn parse_ingest_state(s: &str) -> Option<KeyState> {
    match s {
        "active" => Some(KeyState::Active),
        "retired" => Some(KeyState::DecryptOnly),
        _ => None,
    }
}

/// The 65-byte uncompressed point of a `CKA_EC_POINT`: DER `OCTET STRING`
/// (what PKCS#11 specifies and SoftHSM2 returns) or the raw point.
fn ec_point(value: &[u8]) -> Option<[u8; INGEST_PUBLIC_KEY_LEN]> {
    let raw = match value {
        [0x04, 0x41, rest @ ..] if rest.len() == INGEST_PUBLIC_KEY_LEN => rest,
        raw if raw.len() == INGEST_PUBLIC_KEY_LEN => raw,
        _ => return None,
    };
    raw.try_into().ok()
}

/// What one ingest ciphertext became inside the token.
enum IngestOpen {
    Pan(Pan),
    Refused(AdmitItemError),
}

impl Inner {
    /// `CKA_ID` of every object of `scope`'s ingest keys:
    /// `panseal-ingest/<name>/<environment>/<scope>`.
    fn ingest_id(&self, scope: &Scope) -> String {
        format!(
            "{INGEST_PREFIX}{}/{}/{}",
            self.kek_name, self.environment, scope
        )
    }

    /// `CKA_LABEL` of a private key: `<id>/v<N>/<active|retired>/<created>`.
    fn ingest_label(&self, scope: &Scope, version: u32, state: &str, created_at: u64) -> String {
        format!("{}/v{version}/{state}/{created_at}", self.ingest_id(scope))
    }

    /// `CKA_LABEL` of a public key: `<id>/v<N>/public`, or
    /// `<id>/v<N>/destroyed` once its private key is destroyed (kept so a
    /// version number is never used twice).
    fn ingest_public_label(&self, scope: &Scope, version: u32, destroyed: bool) -> String {
        let tail = if destroyed { "destroyed" } else { "public" };
        format!("{}/v{version}/{tail}", self.ingest_id(scope))
    }

    /// Checks a found private key: P-256, generated in the token
    /// (`CKA_LOCAL`), always sensitive, never extractable, usable for
    /// derivation. A key imported with a known value is refused.
    fn check_ingest_private(
        &self,
        session: &Session,
        handle: ObjectHandle,
    ) -> Result<String, Fail> {
        let attrs = session.get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Local,
                AttributeType::Derive,
            ],
        )?;
        let (mut label, mut key_type, mut params) = (String::new(), None, Vec::new());
        let (mut sensitive, mut extractable, mut always, mut never, mut local, mut derive) =
            (false, true, false, false, false, false);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => params = p,
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                Attribute::AlwaysSensitive(b) => always = b,
                Attribute::NeverExtractable(b) => never = b,
                Attribute::Local(b) => local = b,
                Attribute::Derive(b) => derive = b,
                _ => {}
            }
        }
        if key_type != Some(KeyType::EC)
            || params != P256_PARAMS
            || !sensitive
            || extractable
            || !always
            || !never
            || !local
            || !derive
        {
            return Err(KeyServiceError::Other(format!(
                "ingest key {label:?} is not a P-256 key generated in the token, always \
                 sensitive, never extractable and able to derive; refusing it"
            ))
            .into());
        }
        Ok(label)
    }

    /// Lists `scope`'s live ingest keys (newest first) and the highest
    /// version ever made (destroyed ones included).
    fn scan_ingest(
        &self,
        session: &Session,
        scope: &Scope,
    ) -> Result<(Vec<IngestObject>, u32), Fail> {
        let id = self.ingest_id(scope).into_bytes();
        let private_template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.clone()),
        ];
        let mut privates = session.find_objects(&private_template)?;
        if privates.is_empty() && self.ensure_login(session)? {
            privates = session.find_objects(&private_template)?;
        }
        let publics = session
            .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id)])?;
        let prefix = format!("{}/v", self.ingest_id(scope));
        // Public points by version; the highest version ever made.
        let mut points: HashMap<u32, [u8; INGEST_PUBLIC_KEY_LEN]> = HashMap::new();
        let mut highest = 0u32;
        for handle in publics {
            let attrs = session.get_attributes(
                handle,
                &[
                    AttributeType::Label,
                    AttributeType::EcPoint,
                    AttributeType::EcParams,
                    AttributeType::Local,
                ],
            )?;
            let (mut label, mut point, mut params, mut local) =
                (String::new(), None, Vec::new(), false);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::EcPoint(p) => point = ec_point(&p),
                    Attribute::EcParams(p) => params = p,
                    Attribute::Local(b) => local = b,
                    _ => {}
                }
            }
            let Some((version, tail)) = label
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(v, t)| Some((v.parse::<u32>().ok()?, t)))
            else {
                continue;
            };
            highest = highest.max(version);
            if tail != "public" {
                continue;
            }
            let (Some(point), true, true) = (point, params == P256_PARAMS, local) else {
                return Err(KeyServiceError::Other(format!(
                    "ingest public key {label:?} is not a P-256 point generated in the token; \
                     refusing it"
                ))
                .into());
            };
            if points.insert(version, point).is_some() {
                return Err(KeyServiceError::Other(format!(
                    "two public objects carry ingest-key version {version} of scope {scope}; a \
                     custodian must destroy one"
                ))
                .into());
            }
        }
        let mut objects = Vec::with_capacity(privates.len());
        for handle in privates {
            let label = self.check_ingest_private(session, handle)?;
            let Some(rest) = label.strip_prefix(&prefix) else {
                continue;
            };
            let mut parts = rest.split('/');
            let version = parts.next().and_then(|v| v.parse::<u32>().ok());
            let state = parts.next().and_then(parse_ingest_state);
            let created = parts.next().and_then(|c| c.parse::<u64>().ok());
            let (Some(version), Some(state), Some(created_at), None) =
                (version, state, created, parts.next())
            else {
                return Err(KeyServiceError::Other(format!(
                    "ingest key object with a malformed label {label:?}"
                ))
                .into());
            };
            let Some(point) = points.get(&version) else {
                return Err(KeyServiceError::Other(format!(
                    "ingest key v{version} of scope {scope} has no public key object"
                ))
                .into());
            };
            let public = IngestPublicKey::from_parts(&self.environment, scope, version, point)
                .map_err(|_| {
                    KeyServiceError::Other(format!(
                        "ingest key v{version} of scope {scope}: public point not on P-256"
                    ))
                })?;
            highest = highest.max(version);
            objects.push(IngestObject {
                version,
                private: handle,
                public,
                state,
                created_at,
            });
        }
        objects.sort_by_key(|o| std::cmp::Reverse(o.version));
        if objects.windows(2).any(|w| w[0].version == w[1].version) {
            return Err(KeyServiceError::Other(format!(
                "two private objects carry one ingest-key version of scope {scope} (a \
                 concurrent create?); a custodian must destroy one"
            ))
            .into());
        }
        self.ingest
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.clone(), objects.clone());
        Ok((objects, highest))
    }

    /// The object of `version`, from the cache or a fresh scan.
    fn ingest_object(
        &self,
        session: &Session,
        scope: &Scope,
        version: u32,
        rescan: bool,
    ) -> Result<Option<IngestObject>, Fail> {
        if !rescan {
            let cached = self
                .ingest
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(scope)
                .and_then(|o| o.iter().find(|o| o.version == version).cloned());
            if cached.is_some() {
                return Ok(cached);
            }
        }
        let (objects, _) = self.scan_ingest(session, scope)?;
        Ok(objects.into_iter().find(|o| o.version == version))
    }

    /// Generates the next P-256 key pair of `scope` in the token
    /// (`CKM_EC_KEY_PAIR_GEN`): active; the previous active version is
    /// relabelled retired.
    fn create_ingest(&self, session: &Session, scope: &Scope) -> Result<IngestKeyInfo, Fail> {
        let (objects, highest) = self.scan_ingest(session, scope)?;
        let next = highest
            .checked_add(1)
            .ok_or_else(|| KeyServiceError::Other("ingest-key version overflow".into()))?;
        let now = unix_now();
        let id = self.ingest_id(scope).into_bytes();
        session.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Derive(false),
                Attribute::Modifiable(true),
                Attribute::Label(self.ingest_public_label(scope, next, false).into_bytes()),
                Attribute::Id(id.clone()),
            ],
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
                Attribute::Sign(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Modifiable(true),
                Attribute::Label(self.ingest_label(scope, next, "active", now).into_bytes()),
                Attribute::Id(id),
            ],
        )?;
        for old in objects.iter().filter(|o| o.state == KeyState::Active) {
            session.update_attributes(
                old.private,
                &[Attribute::Label(
                    self.ingest_label(scope, old.version, "retired", old.created_at)
                        .into_bytes(),
                )],
            )?;
        }
        let (after, _) = self.scan_ingest(session, scope)?;
        let Some(created) = after.into_iter().find(|o| o.version == next) else {
            return Err(KeyServiceError::Other(format!(
                "ingest key v{next} of scope {scope} not found after creation"
            ))
            .into());
        };
        tracing::info!(scope = %scope, version = next, "ingest key pair created in the token");
        Ok(IngestKeyInfo {
            public_key: created.public,
            state: KeyState::Active,
            created_at: created.created_at,
        })
    }

    fn set_ingest_state(
        &self,
        session: &Session,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), Fail> {
        let (objects, _) = self.scan_ingest(session, scope)?;
        let Some(object) = objects.iter().find(|o| o.version == version) else {
            return Err(KeyServiceError::UnknownIngestKey {
                scope: scope.to_string(),
                version,
            }
            .into());
        };
        if state == object.state {
            return Ok(());
        }
        if !object.state.can_become(state) {
            return Err(KeyServiceError::Other(format!(
                "ingest key v{version}: state may only move forward ({:?} -> {state:?} refused)",
                object.state
            ))
            .into());
        }
        match state {
            KeyState::Destroyed => {
                session.destroy_object(object.private)?;
                // The public half stays as a tombstone: version numbers
                // are never reused.
                let publics = session.find_objects(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::Id(self.ingest_id(scope).into_bytes()),
                    Attribute::Label(self.ingest_public_label(scope, version, false).into_bytes()),
                ])?;
                for p in publics {
                    session.update_attributes(
                        p,
                        &[Attribute::Label(
                            self.ingest_public_label(scope, version, true).into_bytes(),
                        )],
                    )?;
                }
            }
            KeyState::DecryptOnly => {
                let label = ingest_state_label(state).unwrap_or("retired");
                session.update_attributes(
                    object.private,
                    &[Attribute::Label(
                        self.ingest_label(scope, version, label, object.created_at)
                            .into_bytes(),
                    )],
                )?;
            }
            other => {
                return Err(KeyServiceError::Other(format!(
                    "ingest keys are active, retired or destroyed ({other:?} refused)"
                ))
                .into())
            }
        }
        self.scan_ingest(session, scope)?;
        tracing::info!(scope = %scope, version, state = ?state, "ingest key state changed");
        Ok(())
    }

    /// `Z` = x(skR · enc) by `CKM_ECDH1_DERIVE` (`CKD_NULL`) into a session
    /// object (a 32-byte generic secret, not on the token, extractable
    /// because it must be read: a per-message secret), read and destroyed
    /// at once.
    ///
    /// The peer point goes as the raw 65 bytes, which every token must
    /// accept; a token that refuses it as a parameter error gets the DER
    /// `OCTET STRING` form (`CKA_EC_POINT` encoding) once.
    fn ecdh(
        &self,
        session: &Session,
        private: ObjectHandle,
        enc: &[u8],
    ) -> Result<DhSecret, CkError> {
        match self.ecdh_with(session, private, enc) {
            Err(CkError::Pkcs11(
                RvError::ArgumentsBad
                | RvError::MechanismParamInvalid
                | RvError::DomainParamsInvalid,
                _,
            )) if enc.len() == INGEST_PUBLIC_KEY_LEN => {
                let mut der = Vec::with_capacity(2 + enc.len());
                der.extend_from_slice(&[0x04, 0x41]);
                der.extend_from_slice(enc);
                self.ecdh_with(session, private, &der)
            }
            other => other,
        }
    }

    fn ecdh_with(
        &self,
        session: &Session,
        private: ObjectHandle,
        public_data: &[u8],
    ) -> Result<DhSecret, CkError> {
        let params = Ecdh1DeriveParams::new(EcKdf::null(), public_data);
        let handle = session.derive_key(
            &Mechanism::Ecdh1Derive(params),
            private,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ],
        )?;
        let read = session.get_attributes(handle, &[AttributeType::Value]);
        let destroyed = session.destroy_object(handle);
        let mut z = None;
        for a in read? {
            if let Attribute::Value(v) = a {
                let v = Zeroizing::new(v);
                z = DhSecret::from_slice(&v).ok();
            }
        }
        destroyed?;
        z.ok_or(CkError::Pkcs11(
            RvError::GeneralError,
            cryptoki::context::Function::GetAttributeValue,
        ))
    }

    /// Opens one ingest ciphertext of `scope` in this session: the token
    /// derives `Z`, the split receiver does the rest. A refusal is typed as
    /// an admission item error; token failures are `Fail`.
    fn open_ingest_item(
        &self,
        session: &Session,
        scope: &Scope,
        sealed: &IngestSealed,
        context: &Context,
    ) -> Result<IngestOpen, Fail> {
        let version = sealed.key_version();
        let mut rescanned = false;
        loop {
            let Some(object) = self.ingest_object(session, scope, version, rescanned)? else {
                if !rescanned {
                    rescanned = true;
                    continue;
                }
                return Ok(IngestOpen::Refused(AdmitItemError::UnknownIngestKey(
                    version,
                )));
            };
            match split::check(&object.public, sealed) {
                Ok(()) => {}
                Err(Error::Key(KeyError::IngestKeyMismatch)) => {
                    return Ok(IngestOpen::Refused(AdmitItemError::KeyMismatch))
                }
                Err(_) => return Ok(IngestOpen::Refused(AdmitItemError::OpenFailed)),
            }
            let z = match self.ecdh(session, object.private, sealed.enc()) {
                Ok(z) => z,
                Err(CkError::Pkcs11(
                    RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                    _,
                )) if !rescanned => {
                    // Destroyed (or recreated) by another process.
                    rescanned = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            return Ok(match split::open_pan(&object.public, sealed, context, &z) {
                Ok(pan) => IngestOpen::Pan(pan),
                Err(Error::Format(_)) => IngestOpen::Refused(AdmitItemError::Malformed),
                Err(Error::Key(KeyError::IngestKeyMismatch)) => {
                    IngestOpen::Refused(AdmitItemError::KeyMismatch)
                }
                Err(_) => IngestOpen::Refused(AdmitItemError::OpenFailed),
            });
        }
    }

    /// The whole admission in one session: the record verified, its DEK
    /// unwrapped into this process's memory (wiped on return), every item
    /// opened through the token and sealed compact, the blind index of the
    /// admitted PANs computed with the token's HMAC keys.
    fn admit_batch(
        &self,
        session: &Session,
        record: &WrappedDek,
        versions: &[u32],
        items: &[(IngestSealed, Context)],
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, Fail> {
        if !self.record_verifies(session, record)? {
            return Err(KeyServiceError::RecordTampered(record.id.to_string()).into());
        }
        if !versions.is_empty() {
            // Unknown versions fail the whole request before any item is
            // opened.
            let mut live = self.scan_index(session, &record.scope)?;
            live.retain(|o| versions.contains(&o.version));
            if let Some(v) = versions
                .iter()
                .find(|v| !live.iter().any(|o| o.version == **v))
            {
                return Err(KeyServiceError::UnknownIndexKey {
                    scope: record.scope.to_string(),
                    version: *v,
                }
                .into());
            }
        }
        let key = self.unwrap_key(session, &record.key_request(), &record.wrapped)?;
        let dek = Dek::from_unwrapped(&key);
        drop(key);
        let cipher = dek.cipher();
        let mut results = Vec::with_capacity(items.len());
        let mut digits = Vec::new();
        for (sealed, context) in items {
            match self.open_ingest_item(session, &record.scope, sealed, context)? {
                IngestOpen::Pan(pan) => {
                    let (nonce, _) = crate::seal::fresh_nonce();
                    let compact = crate::seal::seal_raw(&cipher, record.id, nonce, &pan, context);
                    digits.push(Zeroizing::new(pan.expose_digits().as_bytes().to_vec()));
                    results.push(Ok(compact));
                }
                IngestOpen::Refused(e) => results.push(Err(e)),
            }
        }
        let mut macs = if versions.is_empty() || digits.is_empty() {
            Vec::new()
        } else {
            self.hmac_batch(session, &record.scope, versions, &digits)?
        }
        .into_iter();
        Ok(results
            .into_iter()
            .map(|r| {
                r.map(|sealed| {
                    AdmitOutput::new(sealed, macs.by_ref().take(versions.len()).collect())
                })
            })
            .collect())
    }
}

fn load_module(path: &Path) -> Result<Pkcs11, KeyServiceError> {
    let ctx = Pkcs11::new(path).map_err(|e| {
        KeyServiceError::Other(format!(
            "cannot load PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another service (or library) in this process initialized it; the
        // module is process-wide, so share it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(KeyServiceError::Other(format!(
            "cannot initialize PKCS#11 module {}: {}",
            path.display(),
            describe(&e)
        ))),
    }
}

fn validate_kek_name(name: &str) -> Result<(), KeyServiceError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(KeyServiceError::Other(
            "KEK name must be 1 to 64 characters from A-Z a-z 0-9 . _ -".into(),
        ));
    }
    Ok(())
}

/// Return values a GCM decryption gives for a wrong tag, IV, AAD or length.
/// SoftHSM2 reports a failed tag as `CKR_GENERAL_ERROR`; the standard says
/// `CKR_ENCRYPTED_DATA_INVALID`.
fn is_auth_failure(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::GeneralError
            | RvError::FunctionFailed
    )
}

/// The session itself is gone; a fresh one may work.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::UserNotLoggedIn,
            _
        )
    )
}

/// The device or token is gone; every session with it is.
fn device_gone(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

fn session_survives(e: &CkError) -> bool {
    !session_lost(e) && !device_gone(e)
}

fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f:?}: {rv:?}"),
        other => other.to_string(),
    }
}

/// Maps a token error to the key-service error callers act on. Never
/// includes the PIN or key material (PKCS#11 errors carry neither).
fn map_ck(e: &CkError) -> KeyServiceError {
    let detail = format!("PKCS#11 {}", describe(e));
    match e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::SessionCount
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::CryptokiNotInitialized
            | RvError::FunctionCanceled
            | RvError::HostMemory => KeyServiceError::Unavailable(detail),
            RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::PinLocked
            | RvError::UserNotLoggedIn
            | RvError::UserPinNotInitialized
            | RvError::UserTypeInvalid
            | RvError::UserAnotherAlreadyLoggedIn
            | RvError::KeyFunctionNotPermitted
            | RvError::TokenWriteProtected
            | RvError::SessionReadOnly
            | RvError::ActionProhibited => KeyServiceError::PermissionDenied(detail),
            _ => KeyServiceError::Other(detail),
        },
        _ => KeyServiceError::Other(detail),
    }
}

impl sealed::Sealed for Pkcs11KeyService {}

#[async_trait]
impl KeyService for Pkcs11KeyService {
    async fn kek_info(&self) -> Result<KekInfo, KeyServiceError> {
        self.run(|inner, session| {
            inner.scan(session)?;
            Ok(inner.info()?)
        })
        .await
    }

    async fn wrap(&self, request: &KeyRequest, dek: &Dek) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.inner.permissions.wrap, "wrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        let request = request.clone();
        // Copied straight into a wiping buffer (no stack temporary).
        let mut key = Zeroizing::new([0u8; DEK_LEN]);
        key.copy_from_slice(dek.expose_secret());
        self.run(move |inner, session| inner.wrap_key(session, &request, &key))
            .await
    }

    /// Draws the DEK from the token's generator (`C_GenerateRandom`) and
    /// wraps it in the same session.
    async fn generate(&self, request: &KeyRequest) -> Result<(Dek, WrappedKey), KeyServiceError> {
        self.require(self.inner.permissions.wrap, "wrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        let request = request.clone();
        self.run(move |inner, session| {
            let mut key = Zeroizing::new([0u8; DEK_LEN]);
            session.generate_random_slice(&mut key[..])?;
            let wrapped = inner.wrap_key(session, &request, &key)?;
            Ok((Dek::from_unwrapped(&key), wrapped))
        })
        .await
    }

    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        _access: &Access,
    ) -> Result<Dek, KeyServiceError> {
        self.require(self.inner.permissions.unwrap, "unwrap")?;
        self.check_env(request)?;
        super::refuse_index_purpose(request)?;
        self.check_kek_id(wrapped)?;
        let request = request.clone();
        let wrapped = wrapped.clone();
        self.run(move |inner, session| {
            let key = inner.unwrap_key(session, &request, &wrapped)?;
            Ok(Dek::from_unwrapped(&key))
        })
        .await
    }

    async fn rewrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.inner.permissions.rewrap, "rewrap")?;
        self.check_env(request)?;
        self.check_kek_id(wrapped)?;
        let request = request.clone();
        let wrapped = wrapped.clone();
        self.run(move |inner, session| {
            let key = inner.unwrap_key(session, &request, &wrapped)?;
            inner.wrap_key(session, &request, &key)
        })
        .await
    }

    async fn permissions(&self) -> Result<Permissions, KeyServiceError> {
        Ok(self.inner.permissions)
    }

    /// The scope's index-key objects in the token, newest first.
    async fn index_keys(&self, scope: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
        self.require(self.inner.permissions.index, "index")?;
        let scope = scope.clone();
        self.run(move |inner, session| {
            Ok(inner
                .scan_index(session, &scope)?
                .into_iter()
                .map(|o| IndexKeyInfo {
                    scope: scope.clone(),
                    version: o.version,
                    state: o.state,
                    created_at: o.created_at,
                })
                .collect())
        })
        .await
    }

    /// `C_Sign` with `CKM_SHA256_HMAC` for every (PAN, version), in one
    /// pooled session.
    async fn blind_index(
        &self,
        scope: &Scope,
        versions: &[u32],
        pans: &[&Pan],
        _access: &Access,
    ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
        self.require(self.inner.permissions.index, "index")?;
        if pans.is_empty() || versions.is_empty() {
            return Ok(Vec::new());
        }
        let scope = scope.clone();
        let versions = versions.to_vec();
        let digits: Vec<Zeroizing<Vec<u8>>> = pans
            .iter()
            .map(|p| Zeroizing::new(p.expose_digits().as_bytes().to_vec()))
            .collect();
        self.run(move |inner, session| inner.hmac_batch(session, &scope, &versions, &digits))
            .await
    }

    async fn create_index_key(&self, scope: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let scope = scope.clone();
        self.run(move |inner, session| inner.create_index(session, &scope))
            .await
    }

    async fn set_index_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let scope = scope.clone();
        self.run(move |inner, session| inner.set_index_state(session, &scope, version, state))
            .await
    }

    /// Verifies `previous`'s tag, applies [`WrappedDek::check_transition`]
    /// with this service's configured permissions, and signs
    /// `record.signed_bytes()` with `CKM_SHA256_HMAC` under the record-MAC
    /// key (generated in the token on first use).
    async fn authenticate_record(
        &self,
        previous: Option<&WrappedDek>,
        record: &WrappedDek,
    ) -> Result<RecordTag, KeyServiceError> {
        let perms = self.inner.permissions;
        WrappedDek::check_transition(previous, record, &perms, unix_now())
            .map_err(KeyServiceError::RecordTransition)?;
        let previous = previous.cloned();
        let bytes = record.signed_bytes();
        self.run(move |inner, session| {
            if let Some(p) = &previous {
                if !inner.record_verifies(session, p)? {
                    return Err(KeyServiceError::RecordTampered(p.id.to_string()).into());
                }
            }
            let keys = inner.record_keys(session, true)?;
            match keys.as_slice() {
                [key] => Ok(RecordTag(inner.mac(session, *key, &bytes)?)),
                _ => Err(KeyServiceError::Other(format!(
                    "{} record-MAC key objects in the token (a concurrent creation?); a \
                     custodian must destroy all but one",
                    keys.len()
                ))
                .into()),
            }
        })
        .await
    }

    /// Recomputes the tag in the token and compares in constant time.
    /// Stateless: a rolled-back record that once verified still does
    /// (only keyd remembers sequences).
    async fn verify_record(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        let record = record.clone();
        self.run(move |inner, session| {
            if inner.record_verifies(session, &record)? {
                Ok(())
            } else {
                Err(KeyServiceError::RecordTampered(record.id.to_string()).into())
            }
        })
        .await
    }

    // ----- write-only ingest ----------------------------------------------

    /// The scope's ingest key pairs in the token, newest first, with their
    /// public points (read from the public-key objects). Any principal.
    async fn ingest_keys(&self, scope: &Scope) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
        let scope = scope.clone();
        self.run(move |inner, session| {
            let (objects, _) = inner.scan_ingest(session, &scope)?;
            Ok(objects
                .into_iter()
                .map(|o| IngestKeyInfo {
                    public_key: o.public,
                    state: o.state,
                    created_at: o.created_at,
                })
                .collect())
        })
        .await
    }

    /// Generates a P-256 key pair in the token (`CKM_EC_KEY_PAIR_GEN`; the
    /// private key sensitive, never extractable, `CKA_DERIVE` only).
    async fn create_ingest_key(&self, scope: &Scope) -> Result<IngestKeyInfo, KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let scope = scope.clone();
        self.run(move |inner, session| inner.create_ingest(session, &scope))
            .await
    }

    /// Retired relabels the private key; destroyed destroys it
    /// (`C_DestroyObject`) and keeps the public object as a tombstone so
    /// the version number is never reused.
    async fn set_ingest_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        let scope = scope.clone();
        self.run(move |inner, session| inner.set_ingest_state(session, &scope, version, state))
            .await
    }

    /// `CKM_ECDH1_DERIVE` with the token's private key and `enc`, then the
    /// rest of HPKE in this process (`FORMAT.md` §17; the split receiver).
    /// Needs `unwrap`: this service hands DEKs to its callers, so a
    /// credential that may unwrap may open ingest ciphertexts too.
    async fn open_ingest(
        &self,
        request: &IngestOpenRequest<'_>,
        _access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        self.require(self.inner.permissions.unwrap, "unwrap")?;
        let scope = request.scope.clone();
        let sealed = *request.sealed;
        let context = request.context.clone();
        let opened = self
            .run(move |inner, session| inner.open_ingest_item(session, &scope, &sealed, &context))
            .await?;
        match opened {
            IngestOpen::Pan(pan) => Ok(Opened {
                pan,
                needs_reseal: true,
            }),
            IngestOpen::Refused(AdmitItemError::UnknownIngestKey(version)) => {
                Err(KeyServiceError::UnknownIngestKey {
                    scope: request.scope.to_string(),
                    version,
                })
            }
            IngestOpen::Refused(_) => Err(KeyServiceError::OpenFailed),
        }
    }

    /// Opens each item through the token, seals it compact under the
    /// record's DEK (unwrapped in the token, held in this process's memory
    /// for the batch, never returned) and computes its blind index with the
    /// token's HMAC keys, all in one pooled session.
    async fn admit(
        &self,
        request: &AdmitRequest<'_>,
        _access: &Access,
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, KeyServiceError> {
        self.require(self.inner.permissions.admit, "admit")?;
        if request.items.len() > MAX_ADMIT_BATCH {
            return Err(KeyServiceError::Other(format!(
                "an admit request carries at most {MAX_ADMIT_BATCH} items ({} sent)",
                request.items.len()
            )));
        }
        let record = request.record;
        if record.environment != self.inner.environment {
            return Err(KeyServiceError::Environment {
                service: self.inner.environment.to_string(),
                request: record.environment.to_string(),
            });
        }
        if record.purpose != KeyPurpose::Data
            || record.state != KeyState::Active
            || unix_now() >= record.encrypt_until
        {
            return Err(KeyServiceError::PermissionDenied(format!(
                "admit seals only under an active data DEK within its encrypt period ({} is \
                 {:?}, {:?})",
                record.id, record.purpose, record.state
            )));
        }
        self.check_kek_id(&record.wrapped)?;
        if request.items.is_empty() {
            return Ok(Vec::new());
        }
        let record = record.clone();
        let versions = request.index_versions.to_vec();
        let items: Vec<(IngestSealed, Context)> = request
            .items
            .iter()
            .map(|i| (*i.sealed, i.context.clone()))
            .collect();
        let count = items.len();
        let results = self
            .run(move |inner, session| inner.admit_batch(session, &record, &versions, &items))
            .await?;
        tracing::info!(
            items = count,
            admitted = results.iter().filter(|r| r.is_ok()).count(),
            "ingest ciphertexts admitted through the token"
        );
        Ok(results)
    }

    async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError> {
        self.require(self.inner.permissions.custodian, "custodian")?;
        self.run(|inner, session| {
            inner.rotate(session)?;
            Ok(inner.info()?)
        })
        .await
    }
}
