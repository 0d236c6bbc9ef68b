//! Request handling: identity, policy, quotas, KEK operations, unsealing,
//! and one audit record per request.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::{Aes256Gcm, KeyInit};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use panseal::keyd::protocol::{
    self as proto, AcknowledgeRequest, AuditReadRequest, AuditReadResponse, DestroyResponse,
    ErrorBody, ErrorKind, GenerateRequest, GenerateResponse, KekStatus, KekTarget, KekVersionInfo,
    KekVersionTarget, KeyMaterial, Permission, RewrapRequest, StatusResponse, UnsealRequest,
    UnwrapRequest, UnwrapResponse, WireKeyRequest, WireWrapped, WrapRequest, WrappedResponse,
};
use panseal::{
    ChainedAuditLog, Environment, KekRef, KeyId, KeyPurpose, KeyRequest, KeyServiceError, KeyState,
    Scope,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::config::{Config, Principal};
use crate::seal::{self, MasterKey};
use crate::state::{KekRecord, State, StateError, StateStore};

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
}

struct Failure(ErrorBody);

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure(ErrorBody::new(kind, message))
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

type Answer = Result<Vec<u8>, Failure>;

fn json<T: Serialize>(v: &T) -> Answer {
    serde_json::to_vec(v).map_err(|_| Failure::new(ErrorKind::Internal, "encoding answer"))
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

struct Window {
    started: Instant,
    requests: u64,
    keys: HashSet<KeyId>,
}

pub(crate) struct Server {
    cfg: Config,
    state: StateStore,
    vault: RwLock<Vault>,
    audit: ChainedAuditLog,
    windows: Mutex<HashMap<String, Window>>,
}

fn slot(environment: &str, scope: &str) -> String {
    format!("{environment}/{scope}")
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
    pub(crate) fn new(cfg: Config, state: StateStore, audit: ChainedAuditLog) -> Self {
        Server {
            cfg,
            state,
            vault: RwLock::new(Vault::Sealed {
                submitted: BTreeMap::new(),
            }),
            audit,
            windows: Mutex::new(HashMap::new()),
        }
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
        let result = match self.audit.append(&rec) {
            Ok(_) => result,
            Err(e) => {
                eprintln!("panseal-keyd: audit log write failed: {e}");
                Err(Failure::new(ErrorKind::Internal, "audit log unavailable"))
            }
        };
        match result {
            Ok(body) => respond(StatusCode::OK, Bytes::from_owner(Zeroizing::new(body))),
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
        let body = read_body(req).await?;
        match path.as_str() {
            proto::STATUS => self.status(p),
            proto::ACKNOWLEDGE => self.acknowledge(p, &body),
            proto::UNSEAL => self.unseal(p, &body),
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
            return Err(Failure(b));
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
            acknowledged: state.acknowledged(&p.name),
        })
    }

    fn acknowledge(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: AcknowledgeRequest = parse(body)?;
        if r.statement.trim().is_empty() || r.statement.len() > 8192 {
            return Err(Failure::new(
                ErrorKind::BadRequest,
                "statement must be 1 to 8192 bytes",
            ));
        }
        let digest = hex::encode(Sha256::digest(r.statement.as_bytes()));
        self.state.mutate(|s| {
            s.acknowledgements.retain(|a| a.custodian != p.name);
            s.acknowledgements.push(crate::state::Acknowledgement {
                custodian: p.name.clone(),
                statement_sha256: digest,
                at: now_secs(),
            });
            Ok::<_, Failure>(())
        })?;
        self.status(p)
    }

    fn unseal(&self, p: &Principal, body: &[u8]) -> Answer {
        require(p, Permission::Custodian)?;
        let r: UnsealRequest = parse(body)?;
        // Holding the change lock keeps the state (and KEK list) stable
        // while the vault opens.
        self.state.exclusive(|| -> Result<(), Failure> {
            let state = self.state.read();
            if !state.acknowledged(&p.name) {
                return Err(denied(format!(
                    "custodian {:?} has no acknowledgement on record (PCI DSS 3.7.8)",
                    p.name
                )));
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
            let refused = || Failure::new(ErrorKind::ShareRefused, "share refused");
            let share = seal::parse_share(r.share.expose_secret()).map_err(|_| refused())?;
            let check = seal::share_check(&state.share_salt, &share);
            let matches = share.first() == Some(&holder.x)
                && bool::from(subtle::ConstantTimeEq::ct_eq(
                    check.as_bytes(),
                    holder.check.as_bytes(),
                ));
            if !matches {
                return Err(refused());
            }
            submitted.insert(p.name.clone(), share);
            if submitted.len() < usize::from(state.threshold) {
                return Ok(());
            }
            let shares: Vec<_> = std::mem::take(submitted).into_values().collect();
            let opened = open_vault(&state, &shares);
            match opened {
                Ok(v) => {
                    *vault = v;
                    Ok(())
                }
                Err(f) => Err(f),
            }
        })?;
        self.status(p)
    }

    fn seal(&self, p: &Principal) -> Answer {
        require(p, Permission::Custodian)?;
        *self.vault.write().unwrap_or_else(|e| e.into_inner()) = Vault::Sealed {
            submitted: BTreeMap::new(),
        };
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
        let versions: Vec<KekVersionInfo> = state
            .versions(env.as_str(), scope.as_str())
            .map(|k| KekVersionInfo {
                version: k.version,
                state: k.state,
                created_at: k.created_at,
                destroy_approvals: k.destroy_approvals.clone(),
            })
            .collect();
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
    /// version 1 if the scope has none yet.
    fn wrap_now(&self, request: &KeyRequest, key: &[u8; 32]) -> Result<WireWrapped, Failure> {
        let (env, scope) = (request.environment.as_str(), request.scope.as_str());
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
                    let bytes = panseal::keyd::wrap_key(cipher, &kek_ref, request, key);
                    return Ok(WireWrapped {
                        kek_id: kek_ref.id,
                        kek_version: kek_ref.version,
                        bytes,
                    });
                }
            }
            self.create_first_kek(env, scope)?;
        }
        Err(Failure::new(
            ErrorKind::Internal,
            "KEK creation did not take",
        ))
    }

    fn create_first_kek(&self, env: &str, scope: &str) -> Result<(), Failure> {
        self.add_version(env, scope, true)
    }

    /// Adds a KEK version to a scope, durably, then makes it live. With
    /// `only_if_none`, does nothing if the scope has a KEK already.
    fn add_version(&self, env: &str, scope: &str, only_if_none: bool) -> Result<(), Failure> {
        let kek = seal::new_kek();
        let created = self.state.mutate(|s| -> Result<Option<u32>, Failure> {
            let newest = s.versions(env, scope).map(|k| k.version).max();
            if only_if_none && newest.is_some() {
                return Ok(None);
            }
            let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
            let Vault::Open { master, .. } = &*vault else {
                return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
            };
            let version = newest.unwrap_or(0) + 1;
            for k in s.keks.iter_mut() {
                if k.environment == env && k.scope == scope && k.state == KeyState::Active {
                    k.state = KeyState::DecryptOnly;
                }
            }
            s.keks.push(KekRecord {
                environment: env.to_owned(),
                scope: scope.to_owned(),
                version,
                state: KeyState::Active,
                created_at: now_secs(),
                sealed: Some(master.seal_kek(env, scope, version, &kek)),
                destroy_approvals: Vec::new(),
            });
            Ok(Some(version))
        })?;
        if let Some(version) = created {
            let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
            if let Vault::Open { keks, .. } = &mut *vault {
                let sk = keks.entry(slot(env, scope)).or_insert_with(|| ScopeKeks {
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
        Ok(panseal::keyd::unwrap_key(
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
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        let wrapped = self.wrap_now(&request, r.dek.expose_secret())?;
        rec.kek = Some(format!("{}#v{}", wrapped.kek_id, wrapped.kek_version));
        json(&WrappedResponse { wrapped })
    }

    fn generate(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: GenerateRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        require(p, Permission::Wrap)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        let key = seal::new_kek();
        let wrapped = self.wrap_now(&request, &key)?;
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
        match r.key.purpose {
            KeyPurpose::Data => require(p, Permission::Unwrap)?,
            KeyPurpose::Index => require(p, Permission::Index)?,
        }
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
        let wrapped = self.wrap_now(&request, &key)?;
        rec.kek = Some(format!(
            "{}#v{} -> v{}",
            wrapped.kek_id, r.wrapped.kek_version, wrapped.kek_version
        ));
        json(&WrappedResponse { wrapped })
    }

    fn charge_quota(&self, p: &Principal, key: KeyId) -> Result<(), Failure> {
        let Some(q) = p.quota else { return Ok(()) };
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let w = windows.entry(p.name.clone()).or_insert_with(|| Window {
            started: now,
            requests: 0,
            keys: HashSet::new(),
        });
        if now.duration_since(w.started) >= q.window {
            *w = Window {
                started: now,
                requests: 0,
                keys: HashSet::new(),
            };
        }
        let retry = q
            .window
            .saturating_sub(now.duration_since(w.started))
            .as_secs()
            + 1;
        if w.requests >= q.requests {
            return Err(Failure::new(
                ErrorKind::QuotaExceeded,
                format!(
                    "principal {:?} reached {} unwraps per {} s; retry in {retry} s",
                    p.name,
                    q.requests,
                    q.window.as_secs()
                ),
            ));
        }
        if !w.keys.contains(&key) && w.keys.len() as u64 >= q.distinct_keys {
            return Err(Failure::new(
                ErrorKind::QuotaExceeded,
                format!(
                    "principal {:?} reached {} distinct keys per {} s; retry in {retry} s",
                    p.name,
                    q.distinct_keys,
                    q.window.as_secs()
                ),
            ));
        }
        w.requests += 1;
        w.keys.insert(key);
        Ok(())
    }

    // ---- KEK lifecycle -------------------------------------------------

    fn rotate(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        self.add_version(t.environment.as_str(), t.scope.as_str(), false)?;
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
        Self::note_target(rec, &t.environment, &t.scope);
        rec.kek = Some(format!(
            "{}#v{}",
            kek_id(t.environment.as_str(), t.scope.as_str()),
            t.version
        ));
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        Ok(t)
    }

    fn retire(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t = self.custodian_version_target(p, body, rec)?;
        let (env, scope) = (t.environment.as_str(), t.scope.as_str());
        self.state.mutate(|s| -> Result<(), Failure> {
            let newest = s.versions(env, scope).map(|k| k.version).max();
            let k = s
                .version_mut(env, scope, t.version)
                .ok_or_else(|| Failure::new(ErrorKind::UnknownKek, "no such KEK version"))?;
            if Some(t.version) == newest {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "the newest KEK version cannot be retired; rotate first",
                ));
            }
            if k.state != KeyState::DecryptOnly {
                if !k.state.can_become(KeyState::DecryptOnly) {
                    return Err(Failure::new(
                        ErrorKind::Conflict,
                        format!("KEK version is {:?}", k.state),
                    ));
                }
                k.state = KeyState::DecryptOnly;
            }
            Ok(())
        })?;
        json(&self.kek_status(&t.environment, &t.scope))
    }

    fn destroy(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t = self.custodian_version_target(p, body, rec)?;
        let (env, scope) = (t.environment.as_str(), t.scope.as_str());
        let (destroyed, approvals) = self.state.mutate(|s| -> Result<_, Failure> {
            let newest = s.versions(env, scope).map(|k| k.version).max();
            let k = s
                .version_mut(env, scope, t.version)
                .ok_or_else(|| Failure::new(ErrorKind::UnknownKek, "no such KEK version"))?;
            if Some(t.version) == newest {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "the newest KEK version cannot be destroyed; rotate first",
                ));
            }
            if k.state == KeyState::Destroyed {
                return Err(Failure::new(ErrorKind::KekDestroyed, "already destroyed"));
            }
            if k.destroy_approvals.contains(&p.name) {
                return Err(Failure::new(
                    ErrorKind::Conflict,
                    "this custodian already approved; a second, different custodian must approve (dual control)",
                ));
            }
            k.destroy_approvals.push(p.name.clone());
            let done = k.destroy_approvals.len() >= DESTROY_APPROVALS;
            if done {
                k.state = KeyState::Destroyed;
                k.sealed = None;
            }
            Ok((done, k.destroy_approvals.clone()))
        })?;
        if destroyed {
            let mut vault = self.vault.write().unwrap_or_else(|e| e.into_inner());
            if let Vault::Open { keks, .. } = &mut *vault {
                if let Some(sk) = keks.get_mut(&slot(env, scope)) {
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

/// Rebuilds the master key from `shares`, checks it, and opens every KEK.
fn open_vault(state: &State, shares: &[Zeroizing<Vec<u8>>]) -> Result<Vault, Failure> {
    let internal = |m: &str| Failure::new(ErrorKind::Internal, m.to_owned());
    let key = seal::combine(state.threshold, shares)
        .map_err(|_| internal("shares did not rebuild the master key"))?;
    let master = MasterKey::from_bytes(&key);
    if !master.verify_check(&state.master_check) {
        return Err(internal("shares did not rebuild the master key"));
    }
    let mut keks: HashMap<String, ScopeKeks> = HashMap::new();
    for k in &state.keks {
        let sk = keks
            .entry(slot(&k.environment, &k.scope))
            .or_insert_with(|| ScopeKeks {
                active: 0,
                ciphers: BTreeMap::new(),
                destroyed: BTreeSet::new(),
            });
        match &k.sealed {
            Some(sealed) => {
                let kek = master
                    .open_kek(&k.environment, &k.scope, k.version, sealed)
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

async fn read_body(req: Request<Incoming>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut body = Limited::new(req.into_body(), proto::MAX_BODY_BYTES);
    let mut buf = Zeroizing::new(Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|_| Failure::new(ErrorKind::BadRequest, "body unreadable or too large"))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
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
