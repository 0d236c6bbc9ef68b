//! The configuration file (TOML) and the principals it defines.
//!
//! ```toml
//! listen = "127.0.0.1:8443"          # default
//! data_dir = "data"                   # state.bin, state.journal, audit.log
//! audit_key_file = "/etc/panseal-keyd/audit.key"  # default data_dir/audit.key
//! anchor_dir = "/var/lib/panseal-anchor"          # default data_dir
//! audit_fsync = "every-record"        # or "periodic" (once a second)
//! approval_ttl_seconds = 86400        # destroy approvals expire
//! auto_create_scopes = ["merchant-*"] # scopes `wrap` may create KEKs for
//! max_scopes = 10000                  # cap on auto-created scopes
//! max_connections = 256
//! request_timeout_seconds = 10        # TLS handshake, headers, body
//! max_connections_per_client = 32     # per client certificate
//! environments = ["prod"]             # environment tags this server serves
//! tls_cert = "certs/server.pem"
//! tls_key = "certs/server.key.pem"
//! client_ca = "certs/ca.pem"          # client certificates must chain to it
//! allow_bearer_tokens = false         # development only
//!
//! [[principal]]
//! name = "checkout"                   # encrypt-only front end
//! cert = "certs/checkout.pem"         # or cert_sha256 = "<hex of DER>"
//! environment = "prod"
//! scopes = ["merchant-42"]            # or ["*"]
//! permissions = ["wrap"]
//!
//! [[principal]]
//! name = "refunds"
//! cert = "certs/refunds.pem"
//! environment = "prod"
//! scopes = ["*"]
//! permissions = ["wrap", "unwrap", "index"]
//! quota = { window_seconds = 60, unwrap_requests = 600, distinct_keys = 50 }
//!
//! [[principal]]
//! name = "admin-screen"               # reads one card at a time, inside keyd
//! cert = "certs/admin.pem"
//! environment = "prod"
//! scopes = ["*"]
//! permissions = ["reveal"]
//! reveal_quota = { window_seconds = 3600, distinct_records = 20, requests = 200 }
//!
//! [[principal]]
//! name = "ingest-frontend"            # fetches ingest public keys only
//! cert = "certs/ingest-fe.pem"
//! environment = "prod"
//! scopes = ["merchant-42"]
//! permissions = []
//!
//! [[principal]]
//! name = "admission"                  # admits ingest ciphertexts inside keyd
//! cert = "certs/admission.pem"
//! environment = "prod"
//! scopes = ["*"]
//! permissions = ["admit", "wrap"]
//! admit_quota = { window_seconds = 3600, items = 200000 }
//!
//! [default_quotas]                    # principals without their own (these are the defaults)
//! reveal = { window_seconds = 3600, distinct_records = 100, requests = 1000 }
//! index = { window_seconds = 60, hashes = 1000 }
//! admit = { window_seconds = 3600, items = 100000 }
//! [[record_cap]]                      # caps on new key-store records keyd signs
//! scopes = ["merchant-*"]             # patterns as in auto_create_scopes
//! max_uses = 1000000                  # per-DEK budget (records one DEK covers)
//! max_encrypt_period_seconds = 7776000
//! max_decrypt_period_seconds = 63072000
//! ```
//!
//! `reveal`, `index` and `admit` quotas are always on (see `quota.rs`); a
//! principal's `reveal_quota` / `index_quota` / `admit_quota` replaces the
//! default.
//!
//! Relative paths are resolved against the configuration file's folder.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use panseal::keyd::server::protocol::Permission;
use panseal::{Environment, Scope};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    data_dir: PathBuf,
    environments: Vec<String>,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    client_ca: PathBuf,
    #[serde(default)]
    allow_bearer_tokens: bool,
    #[serde(default)]
    audit_key_file: Option<PathBuf>,
    #[serde(default)]
    anchor_dir: Option<PathBuf>,
    #[serde(default)]
    audit_fsync: FsyncPolicy,
    #[serde(default = "default_ttl")]
    approval_ttl_seconds: u64,
    #[serde(default)]
    auto_create_scopes: Vec<String>,
    #[serde(default = "default_max_scopes")]
    max_scopes: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_request_timeout")]
    request_timeout_seconds: u64,
    #[serde(default = "default_per_client")]
    max_connections_per_client: usize,
    #[serde(default, rename = "principal")]
    principals: Vec<RawPrincipal>,
    #[serde(default)]
    default_quotas: crate::quota::Defaults,
    #[serde(default, rename = "record_cap")]
    record_caps: Vec<RecordCap>,
}

/// Caps on new key-store records keyd signs for matching scopes.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecordCap {
    /// Scope patterns (a name, or a prefix followed by one `*`).
    pub(crate) scopes: Vec<String>,
    /// Largest `max_uses` of a new record.
    #[serde(default)]
    pub(crate) max_uses: Option<u64>,
    /// Longest `encrypt_until - created_at`, seconds.
    #[serde(default)]
    pub(crate) max_encrypt_period_seconds: Option<u64>,
    /// Longest `decrypt_until - created_at`, seconds.
    #[serde(default)]
    pub(crate) max_decrypt_period_seconds: Option<u64>,
}

fn pattern_matches(p: &str, scope: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => scope.starts_with(prefix),
        None => p == scope,
    }
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_ttl() -> u64 {
    86_400
}
fn default_max_scopes() -> usize {
    10_000
}
fn default_max_connections() -> usize {
    256
}
fn default_request_timeout() -> u64 {
    10
}
fn default_per_client() -> usize {
    32
}

/// When audit records reach stable storage.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FsyncPolicy {
    /// `fdatasync` before each answer (default).
    #[default]
    EveryRecord,
    /// `fdatasync` once a second (and before each anchor and state change).
    Periodic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    cert_sha256: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    environment: String,
    scopes: Vec<String>,
    permissions: Vec<Permission>,
    #[serde(default)]
    quota: Option<RawQuota>,
    #[serde(default)]
    reveal_quota: Option<crate::quota::RevealLimit>,
    #[serde(default)]
    index_quota: Option<crate::quota::IndexLimit>,
    #[serde(default)]
    admit_quota: Option<crate::quota::AdmitLimit>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    window_seconds: u64,
    unwrap_requests: u64,
    distinct_keys: u64,
}

/// Unwrap limits per principal and window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quota {
    pub(crate) window: Duration,
    pub(crate) requests: u64,
    pub(crate) distinct_keys: u64,
}

impl Quota {
    /// The quota as `quota.state` counts it (an `unwrap` window: unwraps
    /// as requests, distinct keys as distinct records).
    pub(crate) fn as_limit(&self) -> crate::quota::RevealLimit {
        crate::quota::RevealLimit {
            window_seconds: self.window.as_secs().max(1),
            distinct_records: self.distinct_keys,
            requests: self.requests,
        }
    }
}

/// Which scopes a principal may use.
#[derive(Clone, Debug)]
pub(crate) enum Scopes {
    All,
    Only(BTreeSet<String>),
}

impl Scopes {
    pub(crate) fn allows(&self, scope: &Scope) -> bool {
        match self {
            Scopes::All => true,
            Scopes::Only(s) => s.contains(scope.as_str()),
        }
    }
}

/// An identity the server knows and what it may do.
#[derive(Clone, Debug)]
pub(crate) struct Principal {
    pub(crate) name: String,
    pub(crate) environment: Environment,
    pub(crate) scopes: Scopes,
    pub(crate) permissions: BTreeSet<Permission>,
    pub(crate) quota: Option<Quota>,
    /// `reveal` limits (configured or the default).
    pub(crate) reveal_quota: crate::quota::RevealLimit,
    /// `index` limits (configured or the default).
    pub(crate) index_quota: crate::quota::IndexLimit,
    /// `admit` limits (configured or the default).
    pub(crate) admit_quota: crate::quota::AdmitLimit,
}

impl Principal {
    pub(crate) fn may(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }
}

/// The loaded configuration.
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    pub(crate) data_dir: PathBuf,
    pub(crate) environments: BTreeSet<String>,
    pub(crate) tls_cert: PathBuf,
    pub(crate) tls_key: PathBuf,
    pub(crate) client_ca: PathBuf,
    pub(crate) allow_bearer_tokens: bool,
    pub(crate) audit_key_file: PathBuf,
    pub(crate) anchor_dir: PathBuf,
    pub(crate) audit_fsync: FsyncPolicy,
    pub(crate) approval_ttl: Duration,
    /// Patterns (`*` only at the end) of scopes whose first KEK a `wrap`
    /// principal may create; other scopes need a custodian's `rotate`.
    pub(crate) auto_create_scopes: Vec<String>,
    pub(crate) max_scopes: usize,
    pub(crate) max_connections: usize,
    pub(crate) request_timeout: Duration,
    /// Open connections per client certificate (or token-less peer address).
    pub(crate) max_connections_per_client: usize,
    pub(crate) principals: Vec<Principal>,
    /// SHA-256 of a client certificate (DER) → index into `principals`.
    pub(crate) by_cert: HashMap<[u8; 32], usize>,
    /// SHA-256 of a bearer token → index into `principals`.
    pub(crate) by_token: HashMap<[u8; 32], usize>,
    /// `[default_quotas]`.
    pub(crate) default_quotas: crate::quota::Defaults,
    /// Caps on new key-store records, first match wins.
    pub(crate) record_caps: Vec<RecordCap>,
}

impl Config {
    pub(crate) fn audit_path(&self) -> PathBuf {
        self.data_dir.join("audit.log")
    }
    pub(crate) fn audit_key_path(&self) -> PathBuf {
        self.audit_key_file.clone()
    }
    pub(crate) fn audit_anchor_path(&self) -> PathBuf {
        self.anchor_dir.join("audit.anchor")
    }
    pub(crate) fn paths(&self) -> crate::state::Paths {
        crate::state::Paths::new(&self.data_dir, &self.anchor_dir)
    }
    /// Whether a `wrap` principal may create the first KEK of `scope`.
    pub(crate) fn may_auto_create(&self, scope: &str) -> bool {
        self.auto_create_scopes
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => scope.starts_with(prefix),
                None => p == scope,
            })
    }
    /// The record caps of `scope` (the first `[[record_cap]]` matching it).
    pub(crate) fn record_cap(&self, scope: &str) -> Option<&RecordCap> {
        self.record_caps
            .iter()
            .find(|c| c.scopes.iter().any(|p| pattern_matches(p, scope)))
    }

    pub(crate) fn principal(&self, name: &str) -> Option<&Principal> {
        self.principals.iter().find(|p| p.name == name)
    }

    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| invalid(format!("listen {:?} is not ip:port", raw.listen)))?;
        let mut environments = BTreeSet::new();
        for e in &raw.environments {
            Environment::new(e).map_err(|e| invalid(e.to_string()))?;
            environments.insert(e.clone());
        }
        if environments.is_empty() {
            return Err(invalid("environments must name at least one tag".into()));
        }
        let data_dir = resolve(&raw.data_dir);
        for p in &raw.auto_create_scopes {
            let body = p.strip_suffix('*').unwrap_or(p);
            if body.contains('*') || (body.is_empty() && p != "*") {
                return Err(invalid(format!(
                    "auto_create_scopes {p:?}: a scope name, or a prefix followed by one `*`"
                )));
            }
        }
        for c in &raw.record_caps {
            for p in &c.scopes {
                let body = p.strip_suffix('*').unwrap_or(p);
                if body.contains('*') || (body.is_empty() && p != "*") {
                    return Err(invalid(format!(
                        "record_cap scopes {p:?}: a scope name, or a prefix followed by one `*`"
                    )));
                }
            }
        }
        if raw.max_connections == 0 || raw.request_timeout_seconds == 0 {
            return Err(invalid(
                "max_connections and request_timeout_seconds must be > 0".into(),
            ));
        }
        let mut cfg = Config {
            listen,
            audit_key_file: raw
                .audit_key_file
                .as_deref()
                .map(&resolve)
                .unwrap_or_else(|| data_dir.join("audit.key")),
            anchor_dir: raw
                .anchor_dir
                .as_deref()
                .map(&resolve)
                .unwrap_or_else(|| data_dir.clone()),
            audit_fsync: raw.audit_fsync,
            approval_ttl: Duration::from_secs(raw.approval_ttl_seconds),
            auto_create_scopes: raw.auto_create_scopes,
            max_scopes: raw.max_scopes,
            max_connections: raw.max_connections,
            request_timeout: Duration::from_secs(raw.request_timeout_seconds),
            max_connections_per_client: raw.max_connections_per_client.max(1),
            data_dir,
            environments,
            tls_cert: resolve(&raw.tls_cert),
            tls_key: resolve(&raw.tls_key),
            client_ca: resolve(&raw.client_ca),
            allow_bearer_tokens: raw.allow_bearer_tokens,
            principals: Vec::new(),
            by_cert: HashMap::new(),
            by_token: HashMap::new(),
            default_quotas: raw.default_quotas,
            record_caps: raw.record_caps,
        };
        crate::quota::check_reveal(&cfg.default_quotas.reveal)
            .and_then(|_| crate::quota::check_index(&cfg.default_quotas.index))
            .and_then(|_| crate::quota::check_index(&cfg.default_quotas.admit.as_index()))
            .map_err(|m| invalid(format!("default_quotas: {m}")))?;
        for (i, p) in raw.principals.into_iter().enumerate() {
            let who = format!("principal {:?}", p.name);
            if p.name.is_empty()
                || p.name.len() > 64
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-@".contains(&b))
            {
                return Err(invalid(format!(
                    "{who}: name must be 1-64 of A-Z a-z 0-9 . _ : - @"
                )));
            }
            if cfg.principal(&p.name).is_some() {
                return Err(invalid(format!("{who} is defined twice")));
            }
            let environment =
                Environment::new(&p.environment).map_err(|e| invalid(format!("{who}: {e}")))?;
            if !cfg.environments.contains(environment.as_str()) {
                return Err(invalid(format!(
                    "{who}: environment {:?} is not served by this server",
                    p.environment
                )));
            }
            let scopes = if p.scopes.iter().any(|s| s == "*") {
                Scopes::All
            } else {
                let mut set = BTreeSet::new();
                for s in &p.scopes {
                    Scope::new(s).map_err(|e| invalid(format!("{who}: {e}")))?;
                    set.insert(s.clone());
                }
                Scopes::Only(set)
            };
            let mut fingerprints = Vec::new();
            if let Some(c) = &p.cert {
                let c = resolve(c);
                let der = CertificateDer::from_pem_file(&c)
                    .map_err(|e| invalid(format!("{who}: certificate {}: {e}", c.display())))?;
                fingerprints.push(Sha256::digest(der.as_ref()).into());
            }
            if let Some(h) = &p.cert_sha256 {
                fingerprints
                    .push(parse_sha256(h).map_err(|m| invalid(format!("{who}: cert_sha256 {m}")))?);
            }
            for f in fingerprints {
                if cfg.by_cert.insert(f, i).is_some() {
                    return Err(invalid(format!(
                        "{who}: certificate used by two principals"
                    )));
                }
            }
            if let Some(h) = &p.token_sha256 {
                if !cfg.allow_bearer_tokens {
                    return Err(invalid(format!(
                        "{who}: token_sha256 needs allow_bearer_tokens = true (development only)"
                    )));
                }
                let t = parse_sha256(h).map_err(|m| invalid(format!("{who}: token_sha256 {m}")))?;
                cfg.by_token.insert(t, i);
            }
            if p.cert.is_none() && p.cert_sha256.is_none() && p.token_sha256.is_none() {
                return Err(invalid(format!(
                    "{who}: needs cert, cert_sha256 or token_sha256"
                )));
            }
            let quota = match p.quota {
                Some(q) => {
                    if q.window_seconds == 0 {
                        return Err(invalid(format!("{who}: quota window_seconds must be > 0")));
                    }
                    Some(Quota {
                        window: Duration::from_secs(q.window_seconds),
                        requests: q.unwrap_requests,
                        distinct_keys: q.distinct_keys,
                    })
                }
                None => None,
            };
            let reveal_quota = p.reveal_quota.unwrap_or(cfg.default_quotas.reveal);
            let index_quota = p.index_quota.unwrap_or(cfg.default_quotas.index);
            let admit_quota = p.admit_quota.unwrap_or(cfg.default_quotas.admit);
            crate::quota::check_reveal(&reveal_quota)
                .and_then(|_| crate::quota::check_index(&index_quota))
                .and_then(|_| crate::quota::check_index(&admit_quota.as_index()))
                .map_err(|m| invalid(format!("{who}: {m}")))?;
            cfg.principals.push(Principal {
                name: p.name,
                environment,
                scopes,
                permissions: p.permissions.into_iter().collect(),
                quota,
                reveal_quota,
                index_quota,
                admit_quota,
            });
        }
        Ok(cfg)
    }
}

fn parse_sha256(h: &str) -> Result<[u8; 32], &'static str> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.trim(), &mut out).map_err(|_| "must be 64 hex digits")?;
    Ok(out)
}
