//! Request handling: identity, policy, quotas, KEK operations, unsealing,
//! and one audit record per request.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::state_file::{
    self as v3, Acknowledgement, Approval, CustodianShare, DekRecord, IndexKeyRecord,
    IndexScopeRecord, KekRecord, RecordKeyRecord, RegistryEntry, ScopeRecord, State, StateKeys,
};
use aes_gcm::{Aes256Gcm, KeyInit};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use panseal::keyd::server::protocol::{
    self as proto, AcknowledgeRequest, AuditReadRequest, AuditReadResponse, CollectRequest,
    CollectResponse, DekDestroyResponse, DekTarget, DestroyResponse, ErrorBody, ErrorKind,
    GenerateRequest, GenerateResponse, KekStatus, KekTarget, KekVersionInfo, KekVersionTarget,
    KeyMaterial, Permission, ReshareRequest, ReshareResponse, RewrapRequest, ShareText,
    StatusResponse, UnsealRequest, UnwrapRequest, UnwrapResponse, WireKeyRequest, WireWrapped,
    WithdrawRequest, WithdrawResponse, WrapRequest, WrappedResponse,
};
use panseal::{
    ChainedAuditLog, Environment, KekRef, KeyId, KeyPurpose, KeyRequest, KeyServiceError, KeyState,
    Scope, WrappedDek,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::config::{Config, Principal};
use crate::seal::{self, MasterKey};
use crate::state::{StateError, StateStore};

mod ingest;
mod reveal;

/// Approvals needed to destroy a KEK version (dual control).
const DESTROY_APPROVALS: usize = 2;

/// One audit record: who, what, where from, on which keys, and the outcome.
/// Never holds key material or a PAN.
#[derive(Serialize, Default)]
struct AuditRecord {
    time: f64,
    principal: String,
    origin: String,
    operation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose_of_key: Option<KeyPurpose>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kek: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_behalf_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<String>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// `reveal`: where the revealed record lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<reveal::AuditContext>,
    /// Index-key versions of a keyed-hash request.
    #[serde(skip_serializing_if = "Option::is_none")]
    index_versions: Option<Vec<u32>>,
    /// PANs in a keyed-hash request (never the PANs).
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    /// Sequence of a key-store record signed or verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
}

/// A refusal: the error body keyd answers (boxed: results stay small).
pub(crate) struct Failure(pub(crate) Box<ErrorBody>);

impl Failure {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure(Box::new(ErrorBody::new(kind, message)))
    }
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        eprintln!("panseal-keyd: {e}");
        Failure::new(
            ErrorKind::Internal,
            "state could not be written; change not made",
        )
    }
}

impl From<KeyServiceError> for Failure {
    fn from(e: KeyServiceError) -> Self {
        let kind = match &e {
            KeyServiceError::UnwrapFailed => ErrorKind::UnwrapFailed,
            KeyServiceError::UnknownKek(_) => ErrorKind::UnknownKek,
            KeyServiceError::KekDestroyed(_) => ErrorKind::KekDestroyed,
            _ => ErrorKind::Internal,
        };
        Failure::new(kind, e.to_string())
    }
}

type Answer = Result<Zeroizing<Vec<u8>>, Failure>;

/// Answers may hold a key or a share: one exact allocation, wiped on drop.
fn json<T: Serialize>(v: &T) -> Answer {
    proto::to_json_wiped(v).map_err(|_| Failure::new(ErrorKind::Internal, "encoding answer"))
}

/// The unsealed KEKs of one (environment, scope).
struct ScopeKeks {
    active: u32,
    ciphers: BTreeMap<u32, Aes256Gcm>,
    destroyed: BTreeSet<u32>,
}

enum Vault {
    Sealed {
        submitted: BTreeMap<String, Zeroizing<Vec<u8>>>,
    },
    Open {
        master: Box<MasterKey>,
        keks: HashMap<String, ScopeKeks>,
    },
}

/// New shares waiting to be collected, one per new custodian.
struct NewShares {
    master: Zeroizing<[u8; 32]>,
    salt: String,
    checks: Vec<CustodianShare>,
    texts: BTreeMap<String, Zeroizing<String>>,
}

/// A re-share in progress: votes of current custodians, then new shares.
struct Reshare {
    threshold: u8,
    custodians: Vec<String>,
    votes: BTreeMap<String, Zeroizing<Vec<u8>>>,
    ready: Option<NewShares>,
}

pub(crate) struct Server {
    cfg: Config,
    state: StateStore,
    vault: RwLock<Vault>,
    audit: std::sync::Arc<ChainedAuditLog>,
    audit_key_id: String,
    reshare: Mutex<Option<Reshare>>,
    /// keyd's own DEK cache for `reveal` (never returned).
    reveal_cache: reveal::RevealCache,
    /// Durable `reveal` and `index` quota counters.
    quotas: crate::quota::QuotaStore,
    /// Keys this keyd wrapped or generated in the last
    /// [`FRESH_WRAP_SECONDS`]: registry key → SHA-256 of the wrapped bytes.
    /// A `wrap` credential may have a *new* key-store record signed only for
    /// one of these (so it cannot pass an old record off as new).
    fresh_wraps: Mutex<HashMap<String, ([u8; 32], Instant)>>,
}

/// How long after a wrap its new key-store record may be signed.
const FRESH_WRAP_SECONDS: u64 = 600;
/// Most fresh wraps remembered (older ones are dropped first).
const MAX_FRESH_WRAPS: usize = 100_000;

/// The part of a signed state that binds at once, stored or not.
fn floor_of(s: KeyState) -> KeyState {
    match s {
        KeyState::Compromised | KeyState::Destroyed => s,
        _ => KeyState::Active,
    }
}

/// Lifecycle rank: a registry's state floor only moves up.
fn state_rank(s: KeyState) -> u8 {
    match s {
        KeyState::Active => 0,
        KeyState::DecryptOnly => 1,
        KeyState::Compromised => 2,
        KeyState::Destroyed => 3,
    }
}

fn later_state(a: KeyState, b: KeyState) -> KeyState {
    if state_rank(b) > state_rank(a) {
        b
    } else {
        a
    }
}

fn slot(environment: &str, scope: &str) -> String {
    crate::state_file::scope_key(environment, scope)
}

fn dek_key(environment: &str, scope: &str, id: &str) -> String {
    format!("{environment}/{scope}/{id}")
}

/// Checks `2 <= threshold <= n <= 255`, distinct custodians with the
/// custodian permission.
pub(crate) fn validate_custodians(
    cfg: &Config,
    threshold: u8,
    custodians: &[String],
) -> Result<(), String> {
    let n = custodians.len();
    if threshold < 2 || usize::from(threshold) > n || n > 255 {
        return Err(format!(
            "need 2 <= threshold <= custodians <= 255 (split knowledge); got {threshold} of {n}"
        ));
    }
    for (i, c) in custodians.iter().enumerate() {
        let p = cfg
            .principal(c)
            .ok_or_else(|| format!("custodian {c:?} is not a principal in the configuration"))?;
        if !p.may(Permission::Custodian) {
            return Err(format!("principal {c:?} lacks the custodian permission"));
        }
        if custodians[..i].contains(c) {
            return Err(format!("custodian {c:?} named twice"));
        }
    }
    Ok(())
}

fn acknowledgement(p: &Principal, statement: &str) -> Result<Acknowledgement, Failure> {
    if statement.trim().is_empty() || statement.len() > 8192 {
        return Err(Failure::new(
            ErrorKind::BadRequest,
            "statement must be 1 to 8192 bytes",
        ));
    }
    Ok(Acknowledgement {
        custodian: p.name.clone(),
        statement_sha256: hex::encode(Sha256::digest(statement.as_bytes())),
        at: now_secs(),
    })
}

/// Parses a share and checks it against its holder's record.
fn check_share(
    state: &State,
    holder: &CustodianShare,
    text: &str,
) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let refused = || Failure::new(ErrorKind::ShareRefused, "share refused");
    let share = seal::parse_share(text).map_err(|_| refused())?;
    let check = seal::share_check(&state.share_salt, &share);
    let matches = share.first() == Some(&holder.x)
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            check.as_bytes(),
            holder.check.as_bytes(),
        ));
    if matches {
        Ok(share)
    } else {
        Err(refused())
    }
}

fn kek_id(environment: &str, scope: &str) -> String {
    format!("keyd/{environment}/{scope}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn denied(message: String) -> Failure {
    Failure::new(ErrorKind::PermissionDenied, message)
}

fn require(p: &Principal, perm: Permission) -> Result<(), Failure> {
    if p.may(perm) {
        Ok(())
    } else {
        Err(denied(format!(
            "principal {:?} lacks the {} permission",
            p.name,
            perm.as_str()
        )))
    }
}

impl Server {
    pub(crate) fn new(
        cfg: Config,
        state: StateStore,
        audit: std::sync::Arc<ChainedAuditLog>,
        audit_key_id: String,
    ) -> Self {
        let lockout = cfg
            .principals
            .iter()
            .flat_map(|p| {
                [
                    p.reveal_quota.window_seconds,
                    p.index_quota.window_seconds,
                    p.admit_quota.window_seconds,
                ]
            })
            .chain([
                cfg.default_quotas.reveal.window_seconds,
                cfg.default_quotas.index.window_seconds,
                cfg.default_quotas.admit.window_seconds,
            ])
            .max()
            .unwrap_or(crate::quota::DEFAULT_REVEAL_WINDOW);
        let quotas =
            crate::quota::QuotaStore::new(&cfg.data_dir, std::time::Duration::from_secs(lockout));
        Server {
            reveal_cache: reveal::RevealCache::new(),
            fresh_wraps: Mutex::new(HashMap::new()),
            quotas,
            cfg,
            state,
            vault: RwLock::new(Vault::Sealed {
                submitted: BTreeMap::new(),
            }),
            audit,
            audit_key_id,
            reshare: Mutex::new(None),
        }
    }

    /// The configuration.
    /// The state's format on disk (1 until the first unseal migrates it).
    pub(crate) fn state_version(&self) -> u8 {
        self.state.version()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    fn is_sealed(&self) -> bool {
        matches!(
            *self.vault.read().unwrap_or_else(|p| p.into_inner()),
            Vault::Sealed { .. }
        )
    }

    /// Handles one HTTP request from a connection whose client certificate
    /// has fingerprint `cert` (if any).
    pub(crate) async fn handle(
        &self,
        cert: Option<[u8; 32]>,
        origin: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let mut rec = AuditRecord {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            principal: "-".into(),
            origin: origin.to_string(),
            operation: operation_name(req.uri().path()),
            ..AuditRecord::default()
        };
        let result = self.dispatch(cert, req, &mut rec).await;
        rec.outcome = if result.is_ok() { "success" } else { "failure" };
        if let Err(f) = &result {
            rec.error = Some(f.0.error);
            rec.detail = Some(f.0.message.clone());
        }
        // Fail closed: an answer that cannot be audited is not given.
        // The append may wait for a disk flush (audit_fsync =
        // "every-record"): let the runtime move other connections to
        // another worker meanwhile, so their records share that flush.
        let appended = tokio::task::block_in_place(|| self.audit.append(&rec));
        let result = match appended {
            Ok(_) => result,
            Err(e) => {
                eprintln!("panseal-keyd: audit log write failed: {e}");
                Err(Failure::new(ErrorKind::Internal, "audit log unavailable"))
            }
        };
        match result {
            Ok(body) => respond(StatusCode::OK, Bytes::from_owner(body)),
            Err(f) => {
                let status =
                    StatusCode::from_u16(f.0.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
                respond(
                    status,
                    Bytes::from(serde_json::to_vec(&f.0).unwrap_or_default()),
                )
            }
        }
    }

    fn identify(&self, cert: Option<[u8; 32]>, req: &Request<Incoming>) -> Option<&Principal> {
        if let Some(fp) = cert {
            return self.cfg.by_cert.get(&fp).map(|&i| &self.cfg.principals[i]);
        }
        if !self.cfg.allow_bearer_tokens {
            return None;
        }
        let token = req
            .headers()
            .get(AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cfg
            .by_token
            .get(&digest)
            .map(|&i| &self.cfg.principals[i])
    }

    async fn dispatch(
        &self,
        cert: Option<[u8; 32]>,
        req: Request<Incoming>,
        rec: &mut AuditRecord,
    ) -> Answer {
        let principal = self.identify(cert, &req);
        let Some(p) = principal else {
            return Err(Failure::new(
                ErrorKind::Unauthenticated,
                "no known client certificate or token",
            ));
        };
        rec.principal = p.name.clone();
        if req.method() != hyper::Method::POST {
            return Err(Failure::new(ErrorKind::BadRequest, "use POST"));
        }
        let path = req.uri().path().to_owned();
        // Body deadline: a client trickling its body is cut off.
        let limit = if path == proto::ADMIT {
            proto::MAX_ADMIT_BODY_BYTES
        } else {
            proto::MAX_BODY_BYTES
        };
        let body = tokio::time::timeout(self.cfg.request_timeout, read_body(req, limit))
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorKind::BadRequest,
                    "request body not received within request_timeout_seconds",
                )
            })??;
        match path.as_str() {
            proto::STATUS => self.status(p),
            proto::ACKNOWLEDGE => self.acknowledge(p, &body),
            proto::UNSEAL => self.unseal(p, &body),
            proto::WHOAMI => self.whoami(p),
            _ if self.is_sealed() => Err(Failure::new(
                ErrorKind::Sealed,
                "keyd is sealed: custodians must submit their shares",
            )),
            proto::KEK_INFO => self.kek_info(p, &body, rec),
            proto::WRAP => self.wrap(p, &body, rec),
            proto::GENERATE => self.generate(p, &body, rec),
            proto::UNWRAP => self.unwrap(p, &body, rec),
            proto::REWRAP => self.rewrap(p, &body, rec),
            proto::KEK_ROTATE => self.rotate(p, &body, rec),
            proto::KEK_RETIRE => self.retire(p, &body, rec),
            proto::KEK_DESTROY => self.destroy(p, &body, rec),
            proto::SEAL => self.seal(p),
            proto::AUDIT => self.audit_read(p, &body),
            proto::DEK_DESTROY => self.dek_destroy(p, &body, rec),
            proto::APPROVAL_WITHDRAW => self.withdraw(p, &body, rec),
            proto::RESHARE => self.reshare(p, &body),
            proto::SHARE_COLLECT => self.collect(p, &body),
            proto::REVEAL => self.reveal(p, &body, rec),
            proto::INDEX_KEYS => self.index_keys(p, &body, rec),
            proto::INDEX_HASH => self.index_hash(p, &body, rec),
            proto::INDEX_CREATE => self.index_create(p, &body, rec),
            proto::INDEX_STATE => self.index_set_state(p, &body, rec),
            proto::RECORD_SIGN => self.record_sign(p, &body, rec),
            proto::RECORD_VERIFY => self.record_verify(p, &body, rec),
            proto::INGEST_KEYS => self.ingest_keys(p, &body, rec),
            proto::INGEST_CREATE => self.ingest_create(p, &body, rec),
            proto::INGEST_STATE => self.ingest_set_state(p, &body, rec),
            proto::INGEST_OPEN => self.ingest_open(p, &body, rec),
            proto::GENERATE_WRAPPED => self.generate_wrapped(p, &body, rec),
            proto::ADMIT => self.admit(p, &body, rec),
            _ => Err(Failure::new(ErrorKind::BadRequest, "unknown path")),
        }
    }

    fn check_env(&self, p: &Principal, env: &Environment) -> Result<(), Failure> {
        if env != &p.environment || !self.cfg.environments.contains(env.as_str()) {
            let mut b = ErrorBody::new(
                ErrorKind::Environment,
                format!(
                    "principal {:?} works in environment {:?}, not {:?}",
                    p.name,
                    p.environment.as_str(),
                    env.as_str()
                ),
            );
            b.allowed_environment = Some(p.environment.to_string());
            b.requested_environment = Some(env.to_string());
            return Err(Failure(Box::new(b)));
        }
        Ok(())
    }

    fn check_scope(&self, p: &Principal, env: &Environment, scope: &Scope) -> Result<(), Failure> {
        self.check_env(p, env)?;
        if !p.scopes.allows(scope) {
            return Err(denied(format!(
                "principal {:?} may not use scope {:?}",
                p.name,
                scope.as_str()
            )));
        }
        Ok(())
    }

    fn note_key(rec: &mut AuditRecord, key: &WireKeyRequest) {
        rec.environment = Some(key.environment.to_string());
        rec.scope = Some(key.scope.to_string());
        rec.key_id = Some(key.id.to_string());
        rec.purpose_of_key = Some(key.purpose);
    }

    fn note_target(rec: &mut AuditRecord, env: &Environment, scope: &Scope) {
        rec.environment = Some(env.to_string());
        rec.scope = Some(scope.to_string());
    }

    // ---- status, acknowledgement, unseal, seal -------------------------

    fn status(&self, p: &Principal) -> Answer {
        let awaiting_collection = self
            .reshare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|r| r.ready.as_ref())
            .map(|n| n.texts.keys().cloned().collect())
            .unwrap_or_default();
        let acknowledged = self.state.acknowledged(&p.name);
        let state = self.state.read();
        let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
        let (sealed, submitted) = match &*vault {
            Vault::Sealed { submitted } => (true, submitted.keys().cloned().collect()),
            Vault::Open { .. } => (false, Vec::new()),
        };
        json(&StatusResponse {
            sealed,
            threshold: u32::from(state.threshold),
            submitted,
            principal: p.name.clone(),
            environment: p.environment.clone(),
            permissions: p.permissions.iter().copied().collect(),
            acknowledged,
            state_generation: state.generation,
            awaiting_collection,
        })
    }

    fn acknowledge(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: AcknowledgeRequest = parse(body)?;
        let ack = acknowledgement(p, &r.statement)?;
        if self.is_sealed() {
            self.state.acknowledge_sealed(ack);
        } else {
            self.state.mutate(&self.audit, |d| {
                d.acknowledge(ack);
                Ok::<_, Failure>(())
            })?;
        }
        self.status(p)
    }

    fn unseal(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: UnsealRequest = parse(body)?;
        if !self.state.acknowledged(&p.name) {
            return Err(denied(format!(
                "custodian {:?} has no acknowledgement on record (PCI DSS 3.7.8)",
                p.name
            )));
        }
        // Holding the change lock keeps the state (and KEK list) stable
        // while the vault opens.
        let opened = self.state.exclusive(|| -> Result<bool, Failure> {
            let state = self.state.read();
            if let Some(g) = r.expected_generation {
                if g != state.generation {
                    return Err(Failure::new(
                        ErrorKind::Conflict,
                        format!(
                            "state generation is {}, not the {g} you noted: the state may have \
                             been rolled back; share not accepted",
                            state.generation
                        ),
                    ));
                }
            }
            let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
            let Vault::Sealed { submitted } = &mut *vault else {
                return Err(Failure::new(ErrorKind::Conflict, "keyd is not sealed"));
            };
            let Some(holder) = state.shares.iter().find(|s| s.custodian == p.name) else {
                return Err(denied(format!("{:?} holds no unseal share", p.name)));
            };
            if submitted.contains_key(&p.name) {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "this custodian's share was already submitted",
                ));
            }
            let share = check_share(&state, holder, r.share.expose_secret())?;
            submitted.insert(p.name.clone(), share);
            if submitted.len() < usize::from(state.threshold) {
                return Ok(false);
            }
            let shares: Vec<_> = std::mem::take(submitted).into_values().collect();
            let v = open_vault(&state, self.state.version(), &shares)?;
            let Vault::Open { master, .. } = &v else {
                return Ok(false);
            };
            self.state.authenticate(master.keys()).map_err(|e| {
                eprintln!("panseal-keyd: {e}");
                Failure::new(ErrorKind::Internal, e.to_string())
            })?;
            *vault = v;
            Ok(true)
        })?;
        if opened {
            self.after_unseal()?;
        }
        self.status(p)
    }

    /// Migrates a version 1 state (one new snapshot) and folds
    /// acknowledgements given while sealed into the journal. The journal
    /// is not compacted here (only every `COMPACT_AFTER` entries and at a
    /// re-share).
    fn after_unseal(&self) -> Result<(), Failure> {
        if self.state.version() == seal::V1 && self.state.read().audit_key_id.is_empty() {
            self.state.replace_with(
                &self.audit,
                |current| -> Result<_, Failure> {
                    let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
                    let Vault::Open { master, .. } = &*vault else {
                        return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
                    };
                    let mut next = current.clone();
                    for r in next.scopes.values_mut() {
                        for k in r.versions.iter_mut() {
                            if let Some(sealed) = &k.sealed {
                                let kek = master
                                    .open_kek(seal::V1, &r.environment, &r.scope, k.version, sealed)
                                    .map_err(|_| {
                                        Failure::new(
                                            ErrorKind::Internal,
                                            "a sealed KEK failed to open",
                                        )
                                    })?;
                                k.sealed = Some(master.seal_kek(
                                    &r.environment,
                                    &r.scope,
                                    k.version,
                                    &kek,
                                ));
                            }
                        }
                    }
                    next.master_check = master.check_value();
                    next.audit_key_id = self.audit_key_id.clone();
                    Ok((next, master.keys().clone()))
                },
                || {},
            )?;
            self.audit
                .append(&system_record(
                    "state-migrate",
                    "state version 1 rewritten as version 2".into(),
                ))
                .map_err(|_| Failure::new(ErrorKind::Internal, "audit log unavailable"))?;
        }
        self.migrate_v2()?;
        self.state.fold_pending(&self.audit)?;
        Ok(())
    }

    fn seal(&self, p: &Principal) -> Answer {
        // Policy: one custodian may seal alone. Sealing destroys nothing
        // and reveals nothing; it is the emergency brake, audited like
        // every request, and undone only by k custodians unsealing.
        require(p, Permission::Custodian)?;
        self.state.exclusive(|| {
            *self.vault.write().unwrap_or_else(|e| e.into_inner()) = Vault::Sealed {
                submitted: BTreeMap::new(),
            };
            // The state and KEK-sealing subkeys go too.
            self.state.forget_keys();
            self.reveal_cache.clear();
        });
        *self.reshare.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.status(p)
    }

    // ---- key operations ------------------------------------------------

    fn kek_info(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        if ![
            Permission::Wrap,
            Permission::Unwrap,
            Permission::Index,
            Permission::Rewrap,
            Permission::Custodian,
            Permission::Reveal,
        ]
        .iter()
        .any(|&x| p.may(x))
        {
            return Err(denied(format!(
                "principal {:?} has no key permission",
                p.name
            )));
        }
        self.check_scope(p, &t.environment, &t.scope)?;
        json(&self.kek_status(&t.environment, &t.scope))
    }

    fn kek_status(&self, env: &Environment, scope: &Scope) -> KekStatus {
        let state = self.state.read();
        let ttl = self.cfg.approval_ttl.as_secs();
        let now = now_secs();
        let versions: Vec<KekVersionInfo> = state
            .scopes
            .get(&slot(env.as_str(), scope.as_str()))
            .map(|r| {
                r.versions
                    .iter()
                    .map(|k| KekVersionInfo {
                        version: k.version,
                        state: k.state,
                        created_at: k.created_at,
                        destroy_approvals: k
                            .destroy_approvals
                            .iter()
                            .filter(|a| k.state == KeyState::Destroyed || a.at + ttl > now)
                            .map(|a| a.custodian.clone())
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let active_version = versions
            .iter()
            .filter(|v| v.state == KeyState::Active)
            .map(|v| v.version)
            .max()
            .unwrap_or(0);
        KekStatus {
            kek_id: kek_id(env.as_str(), scope.as_str()),
            environment: env.clone(),
            scope: scope.clone(),
            algorithm: "AES-256-GCM".into(),
            strength_bits: 256,
            active_version,
            versions,
        }
    }

    /// Wraps `key` under the active KEK of the request's scope, creating
    /// version 1 if the scope has none yet and `auto_create_scopes` allows.
    fn wrap_now(
        &self,
        p: &Principal,
        request: &KeyRequest,
        key: &[u8; 32],
    ) -> Result<WireWrapped, Failure> {
        let (env, scope) = (request.environment.as_str(), request.scope.as_str());
        self.refuse_destroyed_dek(request)?;
        let id = kek_id(env, scope);
        for _ in 0..2 {
            {
                let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
                let Vault::Open { keks, .. } = &*vault else {
                    return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
                };
                if let Some(sk) = keks.get(&slot(env, scope)) {
                    let cipher = sk.ciphers.get(&sk.active).ok_or_else(|| {
                        Failure::new(ErrorKind::KekDestroyed, "active KEK version is missing")
                    })?;
                    let kek_ref = KekRef {
                        id,
                        version: sk.active,
                    };
                    let bytes = panseal::keyd::server::wrap_key(cipher, &kek_ref, request, key);
                    return Ok(WireWrapped {
                        kek_id: kek_ref.id,
                        kek_version: kek_ref.version,
                        bytes,
                    });
                }
            }
            if !self.cfg.may_auto_create(scope) {
                return Err(denied(format!(
                    "scope {scope:?} has no KEK yet and is not in auto_create_scopes: a \
                     custodian creates it (`panseal-keyd custodian rotate --scope {scope}`)"
                )));
            }
            if self.state.read().scopes.len() >= self.cfg.max_scopes {
                return Err(Failure::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "max_scopes ({}) reached: no new scope is created automatically",
                        self.cfg.max_scopes
                    ),
                ));
            }
            self.add_version(p, env, scope, true)?;
        }
        Err(Failure::new(
            ErrorKind::Internal,
            "KEK creation did not take",
        ))
    }

    /// Adds a KEK version to a scope, durably, then makes it live. With
    /// `only_if_none`, does nothing if the scope has a KEK already.
    fn add_version(
        &self,
        p: &Principal,
        env: &str,
        scope: &str,
        only_if_none: bool,
    ) -> Result<(), Failure> {
        let kek = seal::new_kek();
        let key = slot(env, scope);
        let created = self
            .state
            .mutate(&self.audit, |d| -> Result<Option<u32>, Failure> {
                let newest = d
                    .scope(&key)
                    .and_then(|r| r.versions.iter().map(|k| k.version).max());
                if only_if_none && newest.is_some() {
                    return Ok(None);
                }
                let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
                let Vault::Open { master, .. } = &*vault else {
                    return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
                };
                let version = newest.unwrap_or(0) + 1;
                let sealed = master.seal_kek(env, scope, version, &kek);
                if d.scope(&key).is_none() {
                    d.put_scope(
                        &key,
                        ScopeRecord {
                            environment: env.to_owned(),
                            scope: scope.to_owned(),
                            created_by: p.name.clone(),
                            versions: Vec::new(),
                        },
                    );
                }
                let r = d
                    .scope_mut(&key)
                    .ok_or_else(|| Failure::new(ErrorKind::Internal, "scope vanished"))?;
                for k in r.versions.iter_mut() {
                    if k.state == KeyState::Active {
                        k.state = KeyState::DecryptOnly;
                    }
                }
                r.versions.push(KekRecord {
                    version,
                    state: KeyState::Active,
                    created_at: now_secs(),
                    sealed: Some(sealed),
                    destroy_approvals: Vec::new(),
                });
                Ok(Some(version))
            })?;
        if let Some(version) = created {
            let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
            if let Vault::Open { keks, .. } = &mut *vault {
                let sk = keks.entry(key).or_insert_with(|| ScopeKeks {
                    active: 0,
                    ciphers: BTreeMap::new(),
                    destroyed: BTreeSet::new(),
                });
                sk.ciphers.insert(version, Aes256Gcm::new((&*kek).into()));
                sk.active = version;
            }
        }
        Ok(())
    }

    fn refuse_destroyed_dek(&self, request: &KeyRequest) -> Result<(), Failure> {
        let key = dek_key(
            request.environment.as_str(),
            request.scope.as_str(),
            &request.id.to_string(),
        );
        let state = self.state.read();
        if state
            .registry
            .get(&key)
            .is_some_and(|e| e.state == KeyState::Destroyed)
        {
            return Err(Failure::new(
                ErrorKind::KeyDestroyed,
                format!("key {} is destroyed (its signed key record)", request.id),
            ));
        }
        match state.deks.get(&key) {
            Some(d) if d.destroyed_at.is_some() => Err(Failure::new(
                ErrorKind::KeyDestroyed,
                format!(
                    "key {} was destroyed by custodians {}",
                    request.id,
                    d.destroyed_by.join(" and ")
                ),
            )),
            _ => Ok(()),
        }
    }

    fn unwrap_now(
        &self,
        request: &KeyRequest,
        wrapped: &WireWrapped,
    ) -> Result<Zeroizing<[u8; 32]>, Failure> {
        let (env, scope) = (request.environment.as_str(), request.scope.as_str());
        let name = format!("{}#v{}", wrapped.kek_id, wrapped.kek_version);
        if wrapped.kek_id != kek_id(env, scope) {
            // Another scope's or service's KEK: same answer as any other
            // substitution (PCI DSS 3.7.7).
            return Err(Failure::new(
                ErrorKind::UnwrapFailed,
                "wrapped key failed to unwrap",
            ));
        }
        self.refuse_destroyed_dek(request)?;
        let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
        let Vault::Open { keks, .. } = &*vault else {
            return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
        };
        let sk = keks
            .get(&slot(env, scope))
            .ok_or_else(|| Failure::new(ErrorKind::UnknownKek, name.clone()))?;
        let Some(cipher) = sk.ciphers.get(&wrapped.kek_version) else {
            return Err(if sk.destroyed.contains(&wrapped.kek_version) {
                Failure::new(ErrorKind::KekDestroyed, format!("KEK {name} destroyed"))
            } else {
                Failure::new(ErrorKind::UnknownKek, format!("unknown KEK {name}"))
            });
        };
        let kek_ref = KekRef {
            id: wrapped.kek_id.clone(),
            version: wrapped.kek_version,
        };
        Ok(panseal::keyd::server::unwrap_key(
            cipher,
            &kek_ref,
            request,
            &wrapped.bytes,
        )?)
    }

    fn wrap(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: WrapRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        require(p, Permission::Wrap)?;
        refuse_index_purpose(r.key.purpose)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        let wrapped = self.wrap_now(p, &request, r.dek.expose_secret())?;
        self.note_fresh_wrap(&request, &wrapped.bytes);
        rec.kek = Some(format!("{}#v{}", wrapped.kek_id, wrapped.kek_version));
        json(&WrappedResponse { wrapped })
    }

    fn generate(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: GenerateRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        require(p, Permission::Wrap)?;
        refuse_index_purpose(r.key.purpose)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        let key = seal::new_kek();
        let wrapped = self.wrap_now(p, &request, &key)?;
        self.note_fresh_wrap(&request, &wrapped.bytes);
        rec.kek = Some(format!("{}#v{}", wrapped.kek_id, wrapped.kek_version));
        json(&GenerateResponse {
            dek: KeyMaterial::new(key),
            wrapped,
        })
    }

    fn unwrap(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: UnwrapRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        rec.kek = Some(format!("{}#v{}", r.wrapped.kek_id, r.wrapped.kek_version));
        rec.on_behalf_of = Some(truncate(&r.on_behalf_of));
        rec.purpose = Some(truncate(&r.purpose));
        // An index key never leaves keyd, whatever the permission: the
        // `index` permission asks for keyed hashes (`/v1/index/hash`).
        refuse_index_purpose(r.key.purpose)?;
        require(p, Permission::Unwrap)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        self.charge_quota(p, r.key.id)?;
        let request: KeyRequest = r.key.into();
        let key = self.unwrap_now(&request, &r.wrapped)?;
        json(&UnwrapResponse {
            dek: KeyMaterial::new(key),
        })
    }

    fn rewrap(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: RewrapRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        require(p, Permission::Rewrap)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        let key = self.unwrap_now(&request, &r.wrapped)?;
        let wrapped = self.wrap_now(p, &request, &key)?;
        rec.kek = Some(format!(
            "{}#v{} -> v{}",
            wrapped.kek_id, r.wrapped.kek_version, wrapped.kek_version
        ));
        json(&WrappedResponse { wrapped })
    }

    fn charge_quota(&self, p: &Principal, key: KeyId) -> Result<(), Failure> {
        let Some(q) = p.quota else { return Ok(()) };
        // Durable across restarts, like the reveal and index quotas.
        let mac = self.quota_key()?;
        Ok(self
            .quotas
            .charge_unwrap(&mac, &p.name, &q.as_limit(), key.as_bytes())?)
    }

    // ---- KEK lifecycle -------------------------------------------------

    fn rotate(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        self.add_version(p, t.environment.as_str(), t.scope.as_str(), false)?;
        let status = self.kek_status(&t.environment, &t.scope);
        rec.kek = Some(format!("{}#v{}", status.kek_id, status.active_version));
        json(&status)
    }

    /// Parses a KEK-version request from a custodian, records its target
    /// in the audit record, and checks the custodian's permission and scope.
    fn custodian_version_target(
        &self,
        p: &Principal,
        body: &[u8],
        rec: &mut AuditRecord,
    ) -> Result<KekVersionTarget, Failure> {
        let t: KekVersionTarget = parse(body)?;
        self.check_version_target(p, &t, rec)?;
        Ok(t)
    }

    fn check_version_target(
        &self,
        p: &Principal,
        t: &KekVersionTarget,
        rec: &mut AuditRecord,
    ) -> Result<(), Failure> {
        Self::note_target(rec, &t.environment, &t.scope);
        rec.kek = Some(format!(
            "{}#v{}",
            kek_id(t.environment.as_str(), t.scope.as_str()),
            t.version
        ));
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)
    }

    fn retire(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t = self.custodian_version_target(p, body, rec)?;
        let key = slot(t.environment.as_str(), t.scope.as_str());
        self.state.mutate(&self.audit, |d| -> Result<(), Failure> {
            let no_such = || Failure::new(ErrorKind::UnknownKek, "no such KEK version");
            let r = d.scope(&key).ok_or_else(no_such)?;
            let newest = r.versions.iter().map(|k| k.version).max();
            let k = r
                .versions
                .iter()
                .find(|k| k.version == t.version)
                .ok_or_else(no_such)?;
            if Some(t.version) == newest {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "the newest KEK version cannot be retired; rotate first",
                ));
            }
            if k.state == KeyState::DecryptOnly {
                return Ok(());
            }
            if !k.state.can_become(KeyState::DecryptOnly) {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    format!("KEK version is {:?}", k.state),
                ));
            }
            if let Some(k) = d
                .scope_mut(&key)
                .and_then(|r| r.versions.iter_mut().find(|k| k.version == t.version))
            {
                k.state = KeyState::DecryptOnly;
            }
            Ok(())
        })?;
        json(&self.kek_status(&t.environment, &t.scope))
    }

    /// Approvals still counting: distinct custodians, within the TTL.
    fn live_approvals(&self, approvals: &mut Vec<Approval>, now: u64) {
        let ttl = self.cfg.approval_ttl.as_secs();
        approvals.retain(|a| a.at.saturating_add(ttl) > now);
    }

    /// Records `custodian`'s approval among the unexpired ones (dual
    /// control: a custodian counts once) and says whether the approvals
    /// now suffice to destroy.
    fn approve(
        &self,
        approvals: &mut Vec<Approval>,
        custodian: &str,
        now: u64,
    ) -> Result<bool, Failure> {
        self.live_approvals(approvals, now);
        if approvals.iter().any(|a| a.custodian == custodian) {
            return Err(Failure::new(
                ErrorKind::Conflict,
                "this custodian already approved; a second, different custodian must approve (dual control)",
            ));
        }
        approvals.push(Approval {
            custodian: custodian.to_owned(),
            at: now,
        });
        Ok(approvals.len() >= DESTROY_APPROVALS)
    }

    fn destroy(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t = self.custodian_version_target(p, body, rec)?;
        let key = slot(t.environment.as_str(), t.scope.as_str());
        let now = now_secs();
        let (destroyed, approvals) = self.state.mutate(&self.audit, |d| -> Result<_, Failure> {
            let no_such = || Failure::new(ErrorKind::UnknownKek, "no such KEK version");
            let newest = d
                .scope(&key)
                .ok_or_else(no_such)?
                .versions
                .iter()
                .map(|k| k.version)
                .max();
            if Some(t.version) == newest {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "the newest KEK version cannot be destroyed; rotate first",
                ));
            }
            let mut r = d.scope(&key).ok_or_else(no_such)?.clone();
            let k = r
                .versions
                .iter_mut()
                .find(|k| k.version == t.version)
                .ok_or_else(no_such)?;
            if k.state == KeyState::Destroyed {
                return Err(Failure::new(ErrorKind::KekDestroyed, "already destroyed"));
            }
            let done = self.approve(&mut k.destroy_approvals, &p.name, now)?;
            if done {
                k.state = KeyState::Destroyed;
                k.sealed = None;
            }
            let names = k
                .destroy_approvals
                .iter()
                .map(|a| a.custodian.clone())
                .collect();
            d.put_scope(&key, r);
            Ok((done, names))
        })?;
        if destroyed {
            let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
            if let Vault::Open { keks, .. } = &mut *vault {
                if let Some(sk) = keks.get_mut(&key) {
                    sk.ciphers.remove(&t.version);
                    sk.destroyed.insert(t.version);
                }
            }
        }
        json(&DestroyResponse {
            destroyed,
            approvals,
            required: DESTROY_APPROVALS as u32,
            kek: self.kek_status(&t.environment, &t.scope),
        })
    }

    /// A custodian's approval to destroy one DEK: after two distinct
    /// custodians, keyd refuses every unwrap, rewrap and wrap of it.
    fn dek_destroy(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: DekTarget = parse(body)?;
        Self::note_key(rec, &t.key);
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.key.environment, &t.key.scope)?;
        let (env, scope, id) = (
            t.key.environment.as_str(),
            t.key.scope.as_str(),
            t.key.id.to_string(),
        );
        let key = dek_key(env, scope, &id);
        let now = now_secs();
        let ttl = self.cfg.approval_ttl.as_secs();
        let answer = self.state.mutate(&self.audit, |d| -> Result<_, Failure> {
            let mut r = d.dek(&key).cloned().unwrap_or_else(|| DekRecord {
                environment: env.to_owned(),
                scope: scope.to_owned(),
                id: id.clone(),
                approvals: Vec::new(),
                destroyed_at: None,
                destroyed_by: Vec::new(),
            });
            if r.destroyed_at.is_some() {
                return Err(Failure::new(ErrorKind::KeyDestroyed, "already destroyed"));
            }
            let done = self.approve(&mut r.approvals, &p.name, now)?;
            let approvals: Vec<String> = r.approvals.iter().map(|a| a.custodian.clone()).collect();
            let expires_at = r.approvals.iter().map(|a| a.at + ttl).min();
            if done {
                r.destroyed_at = Some(now);
                r.destroyed_by = approvals.clone();
                r.approvals.clear();
            }
            d.put_dek(&key, r);
            Ok(DekDestroyResponse {
                destroyed: done,
                approvals,
                required: DESTROY_APPROVALS as u32,
                expires_at: if done { None } else { expires_at },
            })
        })?;
        json(&answer)
    }

    fn withdraw(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let w: WithdrawRequest = parse(body)?;
        require(p, Permission::Custodian)?;
        let not_pending = || {
            Failure::new(
                ErrorKind::Conflict,
                "no pending approval of yours to withdraw",
            )
        };
        let now = now_secs();
        let approvals = match (w.kek, w.dek) {
            (Some(t), None) => {
                self.check_version_target(p, &t, rec)?;
                let key = slot(t.environment.as_str(), t.scope.as_str());
                self.state.mutate(&self.audit, |d| -> Result<_, Failure> {
                    let mut r = d.scope(&key).ok_or_else(not_pending)?.clone();
                    let k = r
                        .versions
                        .iter_mut()
                        .find(|k| k.version == t.version && k.state != KeyState::Destroyed)
                        .ok_or_else(not_pending)?;
                    self.live_approvals(&mut k.destroy_approvals, now);
                    let before = k.destroy_approvals.len();
                    k.destroy_approvals.retain(|a| a.custodian != p.name);
                    if k.destroy_approvals.len() == before {
                        return Err(not_pending());
                    }
                    let names = k
                        .destroy_approvals
                        .iter()
                        .map(|a| a.custodian.clone())
                        .collect();
                    d.put_scope(&key, r);
                    Ok(names)
                })?
            }
            (None, Some(k)) => {
                Self::note_key(rec, &k);
                self.check_scope(p, &k.environment, &k.scope)?;
                let key = dek_key(k.environment.as_str(), k.scope.as_str(), &k.id.to_string());
                self.state.mutate(&self.audit, |d| -> Result<_, Failure> {
                    let mut r = d.dek(&key).ok_or_else(not_pending)?.clone();
                    if r.destroyed_at.is_some() {
                        return Err(not_pending());
                    }
                    self.live_approvals(&mut r.approvals, now);
                    let before = r.approvals.len();
                    r.approvals.retain(|a| a.custodian != p.name);
                    if r.approvals.len() == before {
                        return Err(not_pending());
                    }
                    let names = r.approvals.iter().map(|a| a.custodian.clone()).collect();
                    d.put_dek(&key, r);
                    Ok(names)
                })?
            }
            _ => {
                return Err(Failure::new(
                    ErrorKind::BadRequest,
                    "name exactly one of kek or dek",
                ))
            }
        };
        json(&WithdrawResponse { approvals })
    }

    // ---- re-sharing and share collection --------------------------------

    fn reshare(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: ReshareRequest = parse(body)?;
        validate_custodians(&self.cfg, r.threshold, &r.custodians)
            .map_err(|m| Failure::new(ErrorKind::BadRequest, m))?;
        let state = self.state.read().clone();
        let Some(holder) = state.shares.iter().find(|s| s.custodian == p.name) else {
            return Err(denied(format!("{:?} holds no current share", p.name)));
        };
        let share = check_share(&state, holder, r.share.expose_secret())?;
        let mut pending = self.reshare.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the re-share lock: a seal clears the proposal
        // under it, so no vote lands after a seal.
        if self.is_sealed() {
            return Err(Failure::new(
                ErrorKind::Sealed,
                "keyd is sealed: unseal it before re-sharing (the running master key must \
                 re-seal every KEK)",
            ));
        }
        let proposal = (r.threshold, r.custodians.clone());
        let fresh = match pending.as_ref() {
            None => true,
            Some(x) if x.ready.is_some() => {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "new shares are waiting to be collected",
                ))
            }
            Some(x) if (x.threshold, x.custodians.clone()) != proposal => {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "another re-share proposal is pending (threshold and custodians must match)",
                ))
            }
            Some(_) => false,
        };
        if fresh {
            *pending = Some(Reshare {
                threshold: r.threshold,
                custodians: r.custodians.clone(),
                votes: BTreeMap::new(),
                ready: None,
            });
        }
        let Some(x) = pending.as_mut() else {
            return Err(Failure::new(ErrorKind::Internal, "re-share vanished"));
        };
        if x.votes.contains_key(&p.name) {
            return Err(Failure::new(
                ErrorKind::Conflict,
                "this custodian already voted",
            ));
        }
        x.votes.insert(p.name.clone(), share);
        if x.votes.len() >= usize::from(state.threshold) {
            // The current shares must rebuild the running master key.
            let shares: Vec<_> = std::mem::take(&mut x.votes).into_values().collect();
            let old = seal::combine(state.threshold, &shares)
                .map_err(|_| Failure::new(ErrorKind::ShareRefused, "share refused"))?;
            if !MasterKey::from_bytes(&old).verify_check(&state.master_check, seal::V2) {
                return Err(Failure::new(ErrorKind::ShareRefused, "share refused"));
            }
            let (_, key) = MasterKey::generate();
            let n = x.custodians.len() as u8;
            let split = seal::split(&key, x.threshold, n);
            let salt = seal::new_salt();
            let mut texts = BTreeMap::new();
            let mut checks = Vec::new();
            for (c, (xc, text, bytes)) in x.custodians.iter().zip(split) {
                checks.push(CustodianShare {
                    custodian: c.clone(),
                    x: xc,
                    check: seal::share_check(&salt, &bytes),
                });
                texts.insert(c.clone(), text);
            }
            x.ready = Some(NewShares {
                master: key,
                salt,
                checks,
                texts,
            });
        }
        let answer = ReshareResponse {
            submitted: x.votes.keys().cloned().collect(),
            threshold: u32::from(state.threshold),
            awaiting_collection: x
                .ready
                .as_ref()
                .map(|n| n.texts.keys().cloned().collect())
                .unwrap_or_default(),
        };
        json(&answer)
    }

    fn collect(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: CollectRequest = parse(body)?;
        let ack = match &r.statement {
            Some(s) => Some(acknowledgement(p, s)?),
            None => None,
        };
        let mut pending = self.reshare.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ready) = pending.as_mut().and_then(|x| x.ready.as_mut()) else {
            return Err(Failure::new(ErrorKind::Conflict, "no share waits for you"));
        };
        let Some(text) = ready.texts.remove(&p.name) else {
            return Err(Failure::new(
                ErrorKind::Conflict,
                "no share waits for you (collected already, or not named)",
            ));
        };
        if let Some(a) = ack {
            self.state.mutate(&self.audit, |d| {
                d.acknowledge(a);
                Ok::<_, Failure>(())
            })?;
        }
        let awaiting: Vec<String> = ready.texts.keys().cloned().collect();
        if awaiting.is_empty() {
            // Everyone holds a new share: re-seal under the new master key.
            let Some(x) = pending.take() else {
                return Err(Failure::new(ErrorKind::Internal, "re-share vanished"));
            };
            if let Some(n) = x.ready {
                self.commit_reshare(x.threshold, n)?;
            }
        }
        json(&CollectResponse {
            share: ShareText::new(text.to_string()),
            awaiting_collection: awaiting,
        })
    }

    /// Rewrites the state under a new master key: every KEK re-sealed, new
    /// share checks and salt; old shares no longer rebuild anything in it.
    fn commit_reshare(&self, threshold: u8, n: NewShares) -> Result<(), Failure> {
        let internal = |m: &str| Failure::new(ErrorKind::Internal, m.to_owned());
        let new_master = MasterKey::from_bytes(&n.master);
        let keys = new_master.keys().clone();
        let new_master = std::cell::RefCell::new(Some(new_master));
        self.state.replace_with(
            &self.audit,
            |current| -> Result<_, Failure> {
                let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
                let Vault::Open { master, .. } = &*vault else {
                    return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
                };
                let guard = new_master.borrow();
                let Some(new_master) = guard.as_ref() else {
                    return Err(internal("re-share vanished"));
                };
                let mut next = current.clone();
                for r in next.scopes.values_mut() {
                    for k in r.versions.iter_mut() {
                        if let Some(sealed) = &k.sealed {
                            let kek = master
                                .open_kek(seal::V2, &r.environment, &r.scope, k.version, sealed)
                                .map_err(|_| internal("a sealed KEK failed to open"))?;
                            k.sealed = Some(new_master.seal_kek(
                                &r.environment,
                                &r.scope,
                                k.version,
                                &kek,
                            ));
                        }
                    }
                }
                reseal_v3(master.keys(), new_master.keys(), &mut next)
                    .map_err(|_| internal("a sealed index or record key failed to open"))?;
                next.threshold = threshold;
                next.share_salt = n.salt;
                next.shares = n.checks;
                next.share_epoch += 1;
                next.master_check = new_master.check_value();
                Ok((next, keys))
            },
            || {
                // Still under the change lock: no KEK is sealed under the
                // old master key after the new state is written.
                let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
                let taken = new_master.borrow_mut().take();
                if let (Vault::Open { master, .. }, Some(m)) = (&mut *vault, taken) {
                    **master = m;
                }
            },
        )?;
        self.audit
            .append(&system_record(
                "reshare",
                format!("state re-sealed under a new master key, {threshold}-of-n"),
            ))
            .map_err(|_| internal("audit log unavailable"))?;
        Ok(())
    }

    fn audit_read(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::AuditRead)?;
        let r: AuditReadRequest = parse(body)?;
        let limit = r.limit.min(1000) as usize;
        let from = r.from.max(1) as usize;
        let text = std::fs::read_to_string(self.audit.path())
            .map_err(|_| Failure::new(ErrorKind::Internal, "audit log unreadable"))?;
        let records = text
            .lines()
            .skip(from - 1)
            .take(limit)
            .map(str::to_owned)
            .collect();
        json(&AuditReadResponse { records })
    }
}

/// Rebuilds the master key from `shares`, checks it, and opens every KEK
/// (sealed as in state version `v`).
fn open_vault(state: &State, v: u8, shares: &[Zeroizing<Vec<u8>>]) -> Result<Vault, Failure> {
    let internal = |m: &str| Failure::new(ErrorKind::Internal, m.to_owned());
    let key = seal::combine(state.threshold, shares)
        .map_err(|_| internal("shares did not rebuild the master key"))?;
    let master = MasterKey::from_bytes(&key);
    if !master.verify_check(&state.master_check, v) {
        return Err(internal("shares did not rebuild the master key"));
    }
    let mut keks: HashMap<String, ScopeKeks> = HashMap::new();
    for (slot_key, r) in &state.scopes {
        let sk = keks.entry(slot_key.clone()).or_insert_with(|| ScopeKeks {
            active: 0,
            ciphers: BTreeMap::new(),
            destroyed: BTreeSet::new(),
        });
        for k in &r.versions {
            match &k.sealed {
                Some(sealed) => {
                    let kek = master
                        .open_kek(v, &r.environment, &r.scope, k.version, sealed)
                        .map_err(|_| internal("a sealed KEK failed to open: state altered"))?;
                    sk.ciphers.insert(k.version, Aes256Gcm::new((&*kek).into()));
                    if k.state == KeyState::Active && k.version > sk.active {
                        sk.active = k.version;
                    }
                }
                None => {
                    sk.destroyed.insert(k.version);
                }
            }
        }
    }
    Ok(Vault::Open {
        master: Box::new(master),
        keks,
    })
}

fn truncate(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(256).collect()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    // serde's messages can quote input values (which may be key material):
    // report only where the body is malformed.
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            ErrorKind::BadRequest,
            format!(
                "malformed request body ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut body = Limited::new(req.into_body(), limit);
    let mut buf = Zeroizing::new(Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|_| Failure::new(ErrorKind::BadRequest, "body unreadable or too large"))?;
        if let Ok(data) = frame.into_data() {
            // The body may hold a key (wrap) or a share (unseal).
            proto::extend_wiped(&mut buf, &data);
        }
    }
    Ok(buf)
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn operation_name(path: &str) -> &'static str {
    match path {
        proto::STATUS => "status",
        proto::KEK_INFO => "kek-info",
        proto::WRAP => "wrap",
        proto::GENERATE => "generate",
        proto::UNWRAP => "unwrap",
        proto::REWRAP => "rewrap",
        proto::KEK_ROTATE => "kek-rotate",
        proto::KEK_RETIRE => "kek-retire",
        proto::KEK_DESTROY => "kek-destroy-approve",
        proto::ACKNOWLEDGE => "acknowledge",
        proto::UNSEAL => "unseal-share",
        proto::SEAL => "seal",
        proto::AUDIT => "audit-read",
        proto::DEK_DESTROY => "dek-destroy-approve",
        proto::APPROVAL_WITHDRAW => "approval-withdraw",
        proto::RESHARE => "reshare-vote",
        proto::SHARE_COLLECT => "share-collect",
        proto::REVEAL => "reveal",
        proto::WHOAMI => "whoami",
        proto::INDEX_KEYS => "index-keys",
        proto::INDEX_HASH => "index-hash",
        proto::INDEX_CREATE => "index-create",
        proto::INDEX_STATE => "index-state",
        proto::RECORD_SIGN => "record-sign",
        proto::RECORD_VERIFY => "record-verify",
        proto::INGEST_KEYS => "ingest-keys",
        proto::INGEST_CREATE => "ingest-create",
        proto::INGEST_STATE => "ingest-state",
        proto::INGEST_OPEN => "ingest-open",
        proto::GENERATE_WRAPPED => "generate-wrapped",
        proto::ADMIT => "admit",
        _ => "unknown",
    }
}

/// An audit record for events outside a request (init, start).
pub(crate) fn system_record(operation: &'static str, detail: String) -> impl Serialize {
    AuditRecord {
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        principal: "panseal-keyd".into(),
        origin: "local".into(),
        operation,
        outcome: "success",
        detail: Some(detail),
        ..AuditRecord::default()
    }
}

// ---- issue 10: blind-index keys, keyed hashes, record MACs (state v3) ----

type HmacSha256 = hmac::Hmac<Sha256>;

/// Index keys never leave keyd: no wrap, generate or unwrap of one.
fn refuse_index_purpose(purpose: KeyPurpose) -> Result<(), Failure> {
    if purpose == KeyPurpose::Index {
        return Err(denied(
            "index keys live only inside keyd: they are created by custodians \
             (`/v1/index/create`) and never wrapped, generated or unwrapped for a caller; \
             ask for keyed hashes (`/v1/index/hash`)"
                .into(),
        ));
    }
    Ok(())
}

fn random_nonce() -> [u8; 12] {
    use rand_core::RngCore;
    let mut n = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut n);
    n
}

/// Why a PAN of a batch is refused (never its digits).
fn pan_problem(digits: &str) -> Option<&'static str> {
    let b = digits.as_bytes();
    if !(8..=19).contains(&b.len()) {
        return Some("not 8 to 19 characters");
    }
    if !b.iter().all(u8::is_ascii_digit) {
        return Some("not all ASCII digits");
    }
    let mut sum = 0u32;
    for (i, &c) in b.iter().rev().enumerate() {
        let mut d = u32::from(c - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    if sum % 10 != 0 {
        return Some("fails the Luhn check");
    }
    None
}

fn batch_item(index: usize, reason: &str) -> Failure {
    let mut b = ErrorBody::new(
        ErrorKind::BatchItem,
        format!("PAN at position {index} refused: {reason}; nothing in the batch was computed"),
    );
    b.index = Some(index as u64);
    Failure(Box::new(b))
}

fn unknown_index_key(scope: &str, version: u32) -> Failure {
    let mut b = ErrorBody::new(
        ErrorKind::UnknownIndexKey,
        format!("index key version {version} of scope {scope:?} is not live"),
    );
    b.scope = Some(scope.to_owned());
    b.version = Some(version);
    Failure(Box::new(b))
}

fn keyed(key: &[u8; 32]) -> HmacSha256 {
    <HmacSha256 as hmac::Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes 32-byte keys"))
}

/// The `panseal::Permissions` a keyd principal signs records with.
fn lib_permissions(p: &Principal) -> panseal::Permissions {
    panseal::Permissions {
        wrap: p.may(Permission::Wrap),
        unwrap: p.may(Permission::Unwrap),
        index: p.may(Permission::Index),
        // Signing never depends on it.
        reveal: p.may(Permission::Reveal),
        rewrap: p.may(Permission::Rewrap),
        admit: p.may(Permission::Admit),
        custodian: p.may(Permission::Custodian),
    }
}

/// Re-seals every index key and record key of `next` from `old` to `new`
/// subkeys (a re-share).
fn reseal_v3(
    old: &StateKeys,
    new: &StateKeys,
    next: &mut State,
) -> Result<(), crate::state_file::FormatError> {
    for r in next.index_keys.values_mut() {
        for k in r.versions.iter_mut() {
            if let Some(sealed) = &k.sealed {
                let aad = v3::index_key_aad(&r.environment, &r.scope, k.version);
                let key = v3::open_secret(&old.index_seal, &aad, sealed)?;
                k.sealed = Some(v3::seal_secret(&new.index_seal, random_nonce(), &aad, &key));
            }
        }
    }
    for r in next.record_keys.values_mut() {
        let aad = v3::record_key_aad(&r.environment);
        let key = v3::open_secret(&old.record_seal, &aad, &r.sealed)?;
        r.sealed = v3::seal_secret(&new.record_seal, random_nonce(), &aad, &key);
    }
    // State version 4: ingest private scalars.
    for r in next.ingest_keys.values_mut() {
        for k in r.versions.iter_mut() {
            if let Some(sealed) = &k.sealed {
                let aad = v3::ingest_key_aad(&r.environment, &r.scope, k.version);
                let key = v3::open_secret(&old.ingest_seal, &aad, sealed)?;
                k.sealed = Some(v3::seal_secret(
                    &new.ingest_seal,
                    random_nonce(),
                    &aad,
                    &key,
                ));
            }
        }
    }
    Ok(())
}

impl Server {
    /// The master key's subkeys (unsealed only).
    fn state_keys(&self) -> Result<StateKeys, Failure> {
        let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
        match &*vault {
            Vault::Open { master, .. } => Ok(master.keys().clone()),
            Vault::Sealed { .. } => Err(Failure::new(ErrorKind::Sealed, "keyd is sealed")),
        }
    }

    /// Rewrites a version 2 or 3 state as version 4 (one atomic snapshot,
    /// as the version 1 migration; a crash before it leaves the old
    /// version, read again).
    fn migrate_v2(&self) -> Result<(), Failure> {
        let from = self.state.version();
        if from != seal::V2 && from != v3::V3 {
            return Ok(());
        }
        let keys = self.state_keys()?;
        self.state.replace_with(
            &self.audit,
            |current| -> Result<_, Failure> { Ok((current.clone(), keys)) },
            || {},
        )?;
        self.audit
            .append(&system_record(
                "state-migrate",
                format!("state version {from} rewritten as version 4"),
            ))
            .map_err(|_| Failure::new(ErrorKind::Internal, "audit log unavailable"))?;
        Ok(())
    }

    fn index_status(&self, env: &Environment, scope: &Scope) -> proto::IndexKeysResponse {
        let state = self.state.read();
        let mut versions: Vec<proto::IndexKeyVersion> = state
            .index_keys
            .get(&slot(env.as_str(), scope.as_str()))
            .map(|r| {
                r.versions
                    .iter()
                    .filter(|k| k.state != KeyState::Destroyed)
                    .map(|k| proto::IndexKeyVersion {
                        version: k.version,
                        state: k.state,
                        created_at: k.created_at,
                    })
                    .collect()
            })
            .unwrap_or_default();
        versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        proto::IndexKeysResponse {
            environment: env.clone(),
            scope: scope.clone(),
            versions,
        }
    }

    fn index_keys(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        // An admission job lists versions to name the one `admit` hashes
        // under; listing is not the keyed-hash oracle.
        if !(p.may(Permission::Index) || p.may(Permission::Custodian) || p.may(Permission::Admit)) {
            return Err(denied(format!(
                "principal {:?} lacks the index permission",
                p.name
            )));
        }
        self.check_scope(p, &t.environment, &t.scope)?;
        json(&self.index_status(&t.environment, &t.scope))
    }

    fn index_hash(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: proto::IndexHashRequest = parse(body)?;
        Self::note_target(rec, &r.environment, &r.scope);
        rec.on_behalf_of = Some(truncate(&r.on_behalf_of));
        rec.purpose = Some(truncate(&r.purpose));
        rec.index_versions = Some(r.versions.iter().copied().take(16).collect());
        rec.count = Some(r.pans.len() as u64);
        require(p, Permission::Index)?;
        self.check_scope(p, &r.environment, &r.scope)?;
        let bad = |m: String| Failure::new(ErrorKind::BadRequest, m);
        if r.versions.is_empty() || r.pans.is_empty() {
            return Err(bad("name at least one version and one PAN".into()));
        }
        let mut seen = BTreeSet::new();
        if !r.versions.iter().all(|v| seen.insert(*v)) {
            return Err(bad("a version is named twice".into()));
        }
        let n = r.pans.len().saturating_mul(r.versions.len());
        if n > proto::MAX_INDEX_BATCH {
            return Err(bad(format!(
                "{n} hashes asked; at most {} per request (PANs × versions)",
                proto::MAX_INDEX_BATCH
            )));
        }
        for (i, pan) in r.pans.iter().enumerate() {
            if let Some(reason) = pan_problem(pan.expose_digits()) {
                return Err(batch_item(i, reason));
            }
        }
        let macs = self.index_macs(r.environment.as_str(), r.scope.as_str(), &r.versions)?;
        self.charge_index(p, n as u64)?;
        let mut hashes = Vec::with_capacity(n * 32);
        for pan in &r.pans {
            for m in &macs {
                let mut m = m.clone();
                hmac::Mac::update(&mut m, pan.expose_digits().as_bytes());
                hashes.extend_from_slice(&hmac::Mac::finalize(m).into_bytes());
            }
        }
        json(&proto::IndexHashResponse {
            versions: r.versions.clone(),
            count: r.pans.len() as u64,
            hashes,
        })
    }

    /// The keyed hashes of `versions` of a scope's index key, each live
    /// (the code of `/v1/index/hash` and `/v1/admit`).
    pub(crate) fn index_macs(
        &self,
        environment: &str,
        scope: &str,
        versions: &[u32],
    ) -> Result<Vec<HmacSha256>, Failure> {
        let keys = self.state_keys()?;
        let state = self.state.read();
        let scope_rec = state.index_keys.get(&slot(environment, scope));
        let mut macs = Vec::with_capacity(versions.len());
        for &v in versions {
            let k = scope_rec
                .and_then(|s| s.versions.iter().find(|k| k.version == v))
                .filter(|k| matches!(k.state, KeyState::Active | KeyState::DecryptOnly));
            let Some(sealed) = k.and_then(|k| k.sealed.as_ref()) else {
                return Err(unknown_index_key(scope, v));
            };
            let aad = v3::index_key_aad(environment, scope, v);
            let key = v3::open_secret(&keys.index_seal, &aad, sealed).map_err(|_| {
                Failure::new(ErrorKind::Internal, "a sealed index key failed to open")
            })?;
            macs.push(keyed(&key));
        }
        Ok(macs)
    }

    fn index_create(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        let keys = self.state_keys()?;
        let (env, scope) = (t.environment.as_str(), t.scope.as_str());
        let key = slot(env, scope);
        let secret = seal::new_kek();
        let version = self
            .state
            .mutate(&self.audit, |d| -> Result<u32, Failure> {
                let mut r = d.index_scope(&key).cloned().unwrap_or(IndexScopeRecord {
                    environment: env.to_owned(),
                    scope: scope.to_owned(),
                    versions: Vec::new(),
                });
                let version = r.versions.iter().map(|k| k.version).max().unwrap_or(0) + 1;
                for k in r.versions.iter_mut() {
                    if k.state == KeyState::Active {
                        k.state = KeyState::DecryptOnly;
                    }
                }
                let aad = v3::index_key_aad(env, scope, version);
                r.versions.push(IndexKeyRecord {
                    version,
                    state: KeyState::Active,
                    created_at: now_secs(),
                    created_by: p.name.clone(),
                    sealed: Some(v3::seal_secret(
                        &keys.index_seal,
                        random_nonce(),
                        &aad,
                        &secret,
                    )),
                });
                d.put_index_scope(&key, r);
                Ok(version)
            })?;
        rec.index_versions = Some(vec![version]);
        json(&self.index_status(&t.environment, &t.scope))
    }

    fn index_set_state(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: proto::IndexStateRequest = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        rec.index_versions = Some(vec![t.version]);
        rec.detail = Some(format!("to {:?}", t.state));
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        let key = slot(t.environment.as_str(), t.scope.as_str());
        let destroyed = self
            .state
            .mutate(&self.audit, |d| -> Result<bool, Failure> {
                let no_such = || unknown_index_key(t.scope.as_str(), t.version);
                let mut r = d.index_scope(&key).cloned().ok_or_else(no_such)?;
                let k = r
                    .versions
                    .iter_mut()
                    .find(|k| k.version == t.version && k.state != KeyState::Destroyed)
                    .ok_or_else(no_such)?;
                if k.state == t.state {
                    return Ok(false);
                }
                if !k.state.can_become(t.state) {
                    return Err(Failure::new(
                        ErrorKind::Conflict,
                        format!(
                            "index key states only move forward ({:?} -> {:?} refused)",
                            k.state, t.state
                        ),
                    ));
                }
                k.state = t.state;
                let destroyed = t.state == KeyState::Destroyed;
                if destroyed {
                    k.sealed = None;
                }
                d.put_index_scope(&key, r);
                Ok(destroyed)
            })?;
        if destroyed {
            // Fold the journal into a snapshot: no older line keeps the
            // sealed key either.
            let keys = self.state_keys()?;
            self.state.replace_with(
                &self.audit,
                |current| -> Result<_, Failure> { Ok((current.clone(), keys)) },
                || {},
            )?;
        }
        json(&self.index_status(&t.environment, &t.scope))
    }

    fn open_record_key(
        keys: &StateKeys,
        r: &RecordKeyRecord,
    ) -> Result<Zeroizing<[u8; 32]>, Failure> {
        v3::open_secret(
            &keys.record_seal,
            &v3::record_key_aad(&r.environment),
            &r.sealed,
        )
        .map_err(|_| Failure::new(ErrorKind::Internal, "the sealed record key failed to open"))
    }

    fn decode_record(bytes: &[u8], what: &str) -> Result<WrappedDek, Failure> {
        WrappedDek::from_bytes(bytes).map_err(|e| {
            Failure::new(
                ErrorKind::BadRequest,
                format!("{what} does not decode as a key-store record: {e}"),
            )
        })
    }

    /// Checks a record's tag under its environment's record key and its
    /// sequence against the registry.
    /// Remembers that this keyd just wrapped `wrapped` for `request`'s id.
    fn note_fresh_wrap(&self, request: &KeyRequest, wrapped: &[u8]) {
        let key = dek_key(
            request.environment.as_str(),
            request.scope.as_str(),
            &request.id.to_string(),
        );
        let digest: [u8; 32] = sha2::Sha256::digest(wrapped).into();
        let mut m = self.fresh_wraps.lock().unwrap_or_else(|e| e.into_inner());
        let horizon = std::time::Duration::from_secs(FRESH_WRAP_SECONDS);
        if m.len() >= MAX_FRESH_WRAPS {
            m.retain(|_, (_, at)| at.elapsed() < horizon);
            if m.len() >= MAX_FRESH_WRAPS {
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        m.insert(key, (digest, Instant::now()));
    }

    /// Whether `record` holds a key this keyd wrapped for its id within
    /// [`FRESH_WRAP_SECONDS`]; consumes the entry.
    fn take_fresh_wrap(&self, record: &WrappedDek) -> bool {
        let key = dek_key(
            record.environment.as_str(),
            record.scope.as_str(),
            &record.id.to_string(),
        );
        let digest: [u8; 32] = sha2::Sha256::digest(&record.wrapped.bytes).into();
        let mut m = self.fresh_wraps.lock().unwrap_or_else(|e| e.into_inner());
        match m.remove(&key) {
            Some((d, at)) => {
                at.elapsed() < std::time::Duration::from_secs(FRESH_WRAP_SECONDS)
                    && bool::from(subtle::ConstantTimeEq::ct_eq(&d[..], &digest[..]))
            }
            None => false,
        }
    }

    /// Moves the registry of `record` forward to it (a verified successor
    /// the library has stored): from now on older sequences are stale.
    fn promote(&self, record: &WrappedDek) -> Result<(), Failure> {
        let Some(tag) = record.tag else {
            return Ok(());
        };
        let reg_key = v3::registry_key(
            record.environment.as_str(),
            record.scope.as_str(),
            &record.id.to_string(),
        );
        let now = now_secs();
        self.state.mutate(&self.audit, |d| -> Result<(), Failure> {
            let Some(e) = d.registry(&reg_key).cloned() else {
                return Ok(());
            };
            if record.sequence > e.sequence {
                d.put_registry(
                    &reg_key,
                    RegistryEntry {
                        sequence: record.sequence,
                        state: later_state(e.state, record.state),
                        tag: hex::encode(tag.0),
                        signed_at: now,
                    },
                );
            }
            Ok(())
        })
    }

    /// Verdict on `record`, and the sequence keyd has registered for it.
    /// The registry holds the newest record *stored* (verified by a
    /// reader, or the previous one of a signature): a signed successor
    /// not yet stored (the writer crashed, the answer was lost) leaves the
    /// stored record valid; a verified successor makes it stale. An
    /// untagged (version-1) copy of a registered record is stale (a
    /// downgrade), as is a record whose state is behind the registry's
    /// floor (a compromise or destruction keyd signed).
    /// Also says whether the record is a verified successor of the
    /// registered one (to promote).
    fn check_record_full(
        &self,
        record: &WrappedDek,
    ) -> Result<(proto::RecordCheck, u64, bool), Failure> {
        let keys = self.state_keys()?;
        let state = self.state.read();
        let reg = state
            .registry
            .get(&v3::registry_key(
                record.environment.as_str(),
                record.scope.as_str(),
                &record.id.to_string(),
            ))
            .cloned();
        let registered = reg.as_ref().map(|e| e.sequence).unwrap_or(0);
        let Some(tag) = record.tag else {
            // A version-1 record: genuine only if keyd never signed this id.
            let verdict = if reg.is_some() {
                proto::RecordCheck::Stale
            } else {
                proto::RecordCheck::Tampered
            };
            return Ok((verdict, registered, false));
        };
        let Some(rk) = state.record_keys.get(record.environment.as_str()) else {
            return Ok((proto::RecordCheck::Tampered, registered, false));
        };
        let rk = Self::open_record_key(&keys, rk)?;
        drop(state);
        let mut m = keyed(&rk);
        hmac::Mac::update(&mut m, &record.signed_bytes());
        if hmac::Mac::verify_slice(m, &tag.0).is_err() {
            return Ok((proto::RecordCheck::Tampered, registered, false));
        }
        let Some(e) = reg else {
            return Ok((proto::RecordCheck::Tampered, 0, false));
        };
        if state_rank(record.state) < state_rank(e.state) {
            return Ok((proto::RecordCheck::Stale, e.sequence, false));
        }
        let verdict = if record.sequence < e.sequence {
            (proto::RecordCheck::Stale, false)
        } else if record.sequence > e.sequence {
            // Signed by keyd (the MAC verifies) after the registered one.
            (proto::RecordCheck::Ok, true)
        } else if bool::from(subtle::ConstantTimeEq::ct_eq(
            hex::encode(tag.0).as_bytes(),
            e.tag.as_bytes(),
        )) {
            (proto::RecordCheck::Ok, false)
        } else {
            (proto::RecordCheck::Tampered, false)
        };
        Ok((verdict.0, e.sequence, verdict.1))
    }

    /// For `/v1/reveal`: the record's tag verifies and it is the newest
    /// keyd signed for its key.
    pub(crate) fn verify_record_for_reveal(&self, record: &WrappedDek) -> Result<(), Failure> {
        let id = record.id.to_string();
        let (verdict, _, successor) = self.check_record_full(record)?;
        if verdict == proto::RecordCheck::Ok && successor {
            self.promote(record)?;
        }
        match verdict {
            proto::RecordCheck::Ok => Ok(()),
            proto::RecordCheck::Tampered => Err(Failure::new(
                ErrorKind::RecordTampered,
                format!("key record {id} failed authentication"),
            )),
            proto::RecordCheck::Stale => Err(Failure::new(
                ErrorKind::RecordStale,
                format!("key record {id} is older than the newest keyd signed"),
            )),
        }
    }

    fn note_record(rec: &mut AuditRecord, r: &WrappedDek) {
        rec.environment = Some(r.environment.to_string());
        rec.scope = Some(r.scope.to_string());
        rec.key_id = Some(r.id.to_string());
        rec.purpose_of_key = Some(r.purpose);
        rec.sequence = Some(r.sequence);
    }

    fn record_verify(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: proto::RecordVerifyRequest = parse(body)?;
        let record = Self::decode_record(&r.record, "record")?;
        Self::note_record(rec, &record);
        if !p.permissions.iter().any(|&x| x != Permission::AuditRead) {
            return Err(denied(format!(
                "principal {:?} has no key permission",
                p.name
            )));
        }
        self.check_scope(p, &record.environment, &record.scope)?;
        let (result, registered_sequence, successor) = self.check_record_full(&record)?;
        if result == proto::RecordCheck::Ok && successor {
            self.promote(&record)?;
        }
        rec.detail = Some(format!("{result:?}"));
        json(&proto::RecordVerifyResponse {
            result,
            registered_sequence,
        })
    }

    /// The per-scope caps of a new record.
    fn check_caps(&self, next: &WrappedDek) -> Result<(), Failure> {
        let Some(c) = self.cfg.record_cap(next.scope.as_str()) else {
            return Ok(());
        };
        let over = |what: &str, got: u64, cap: u64| {
            Failure::new(
                ErrorKind::RecordTransition,
                format!("{what} {got} exceeds this scope's cap {cap} (keyd record_cap)",),
            )
        };
        if let Some(cap) = c.max_uses {
            if next.max_uses > cap {
                return Err(over("max_uses", next.max_uses, cap));
            }
        }
        let enc = next.encrypt_until.saturating_sub(next.created_at);
        if let Some(cap) = c.max_encrypt_period_seconds {
            if enc > cap {
                return Err(over("encrypt period (s)", enc, cap));
            }
        }
        let dec = next.decrypt_until.saturating_sub(next.created_at);
        if let Some(cap) = c.max_decrypt_period_seconds {
            if dec > cap {
                return Err(over("decrypt period (s)", dec, cap));
            }
        }
        Ok(())
    }

    fn record_sign(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: proto::RecordSignRequest = parse(body)?;
        let next = Self::decode_record(&r.record, "record")?;
        let previous = match &r.previous {
            Some(b) => Some(Self::decode_record(b, "previous")?),
            None => None,
        };
        Self::note_record(rec, &next);
        if ![Permission::Wrap, Permission::Rewrap, Permission::Custodian]
            .iter()
            .any(|&x| p.may(x))
        {
            return Err(denied(format!(
                "principal {:?} lacks the wrap, rewrap or custodian permission",
                p.name
            )));
        }
        self.check_scope(p, &next.environment, &next.scope)?;
        if next.purpose == KeyPurpose::Index {
            return Err(denied(
                "index keys live only inside keyd: no key-store record of one is signed".into(),
            ));
        }
        let transition = |m: String| Failure::new(ErrorKind::RecordTransition, m);
        let now = now_secs();
        if previous.is_none() {
            self.check_caps(&next)?;
            // A new record from a `wrap` credential must hold a key keyd
            // itself wrapped for that id just now: an old record (a
            // version-1 row not yet upgraded, a retired or compromised
            // key) cannot be passed off as new. Upgrades need a custodian.
            if !p.may(Permission::Custodian) && !self.take_fresh_wrap(&next) {
                return Err(transition(
                    "a new record must hold a key keyd wrapped for its id in the last 10 minutes \
                     (older records are upgraded by a custodian)"
                        .into(),
                ));
            }
        }
        WrappedDek::check_transition(previous.as_ref(), &next, &lib_permissions(p), now)
            .map_err(transition)?;
        let keys = self.state_keys()?;
        let env = next.environment.as_str().to_owned();
        let id = next.id.to_string();
        let reg_key = v3::registry_key(&env, next.scope.as_str(), &id);
        let fresh_key = seal::new_kek();
        let tag = self
            .state
            .mutate(&self.audit, |d| -> Result<[u8; 32], Failure> {
                let record_key = match d.record_key(&env) {
                    Some(rk) => Self::open_record_key(&keys, rk)?,
                    None => {
                        let sealed = v3::seal_secret(
                            &keys.record_seal,
                            random_nonce(),
                            &v3::record_key_aad(&env),
                            &fresh_key,
                        );
                        d.put_record_key(
                            &env,
                            RecordKeyRecord {
                                environment: env.clone(),
                                created_at: now,
                                sealed,
                            },
                        );
                        fresh_key.clone()
                    }
                };
                let registered = d.registry(&reg_key).cloned();
                match (&previous, &registered) {
                    (None, None) => {}
                    (None, Some(_)) => {
                        return Err(Failure::new(
                            ErrorKind::RecordStale,
                            format!(
                                "key record {id} was signed before: send the stored record as \
                             `previous`"
                            ),
                        ))
                    }
                    (Some(_), None) => {
                        return Err(Failure::new(
                            ErrorKind::RecordTampered,
                            format!("previous key record {id} was never signed by this keyd"),
                        ))
                    }
                    (Some(prev), Some(e)) => {
                        let ok = prev.tag.is_some_and(|t| {
                            let mut m = keyed(&record_key);
                            hmac::Mac::update(&mut m, &prev.signed_bytes());
                            hmac::Mac::verify_slice(m, &t.0).is_ok()
                        });
                        if !ok {
                            return Err(Failure::new(
                                ErrorKind::RecordTampered,
                                format!("previous key record {id} failed authentication"),
                            ));
                        }
                        if prev.sequence < e.sequence
                            || state_rank(prev.state) < state_rank(e.state)
                        {
                            return Err(Failure::new(
                                ErrorKind::RecordStale,
                                format!(
                                    "previous key record {id} is sequence {}, keyd registered {}: \
                                 rolled back",
                                    prev.sequence, e.sequence
                                ),
                            ));
                        }
                        let same = prev.tag.is_some_and(|t| {
                            bool::from(subtle::ConstantTimeEq::ct_eq(
                                hex::encode(t.0).as_bytes(),
                                e.tag.as_bytes(),
                            ))
                        });
                        // Equal sequence: it must be the registered record.
                        // A later one: a successor keyd signed (its MAC
                        // verified above) that the writer stored.
                        if prev.sequence == e.sequence && !same {
                            return Err(Failure::new(
                                ErrorKind::RecordTampered,
                                format!("previous key record {id} is not the one keyd registered"),
                            ));
                        }
                    }
                }
                let mut m = keyed(&record_key);
                hmac::Mac::update(&mut m, &next.signed_bytes());
                let tag: [u8; 32] = hmac::Mac::finalize(m).into_bytes().into();
                // The registry keeps the record being replaced (the one
                // stored now): if this signature is never stored (a crash,
                // a lost answer, a caller that drops it) the stored record
                // stays valid; the first verify of `next` moves it forward.
                // A compromise or destruction raises the state floor at
                // once, stored or not.
                let entry = match (&previous, &registered) {
                    (Some(prev), Some(e)) => RegistryEntry {
                        sequence: prev.sequence,
                        state: later_state(later_state(e.state, prev.state), floor_of(next.state)),
                        tag: prev.tag.map(|t| hex::encode(t.0)).unwrap_or_default(),
                        signed_at: now,
                    },
                    _ => RegistryEntry {
                        sequence: next.sequence,
                        state: next.state,
                        tag: hex::encode(tag),
                        signed_at: now,
                    },
                };
                d.put_registry(&reg_key, entry);
                Ok(tag)
            })?;
        json(&proto::RecordSignResponse {
            tag: tag.to_vec(),
            sequence: next.sequence,
        })
    }
}
