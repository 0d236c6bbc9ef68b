//! A client configuration that names the key service, key store, audit sink
//! and policy in one JSON document, for callers that cannot build a
//! [`crate::Panseal`] in code (the C ABI, command-line tools).
//!
//! ```json
//! {
//!   "environment": "dev",
//!   "scope": "merchant-42",
//!   "key_service": { "type": "local" },
//!   "key_store": { "type": "file", "path": "/var/lib/app/panseal-keys.pks" },
//!   "audit": { "type": "jsonl", "path": "/var/log/app/panseal-audit.jsonl" },
//!   "policy": { "max_uses": 16777216, "encrypt_period_secs": 2592000 }
//! }
//! ```
//!
//! Key material never appears in a configuration: the key service holds the
//! KEKs and the key store holds only wrapped keys (PCI DSS 3.7.2–3).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::PansealBuilder;
use crate::audit::{JsonLinesAuditSink, MemoryAuditSink};
use crate::error::{ConfigError, Error};
use crate::keys::{Environment, Policy};
use crate::keyservice::LocalKeyService;
use crate::keystore::{FileKeyStore, MemoryKeyStore};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Environment tag (`prod`, `test`, …).
    pub environment: String,
    /// Key scope of the client.
    pub scope: String,
    /// Which key service holds the KEKs.
    pub key_service: KeyServiceConfig,
    /// Where wrapped-key records live.
    pub key_store: KeyStoreConfig,
    /// Where audit events go; without one, opening is refused.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Rotation and cache policy; omitted fields keep their defaults.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// Key service choice, the `type` field of `key_service`: `local`, `keyd`,
/// `pkcs11`, `aws-kms` (and, for tests, `insecure-local`). A type whose
/// cargo feature is off in this build is refused naming the feature; an
/// unknown type is refused naming the types this build knows.
///
/// No secret is ever part of a configuration: a PKCS#11 PIN given inline
/// (`"pin": …`) or AWS credentials given inline (`"secret_access_key": …`)
/// are refused (the value is never echoed); a PIN is named by `pin_file` or
/// `pin_env` and read when the client connects, AWS credentials come from
/// the SDK's standard chain. Its `Debug` never prints key material
/// (`kek_hex` shows as `..`).
#[derive(Clone)]
#[non_exhaustive]
pub enum KeyServiceConfig {
    /// The in-process key service with a fresh KEK: **tests and development
    /// only** (the KEK lives in this process and is lost at exit, so data
    /// sealed under it cannot be opened by the next process).
    Local,
    /// **Hazardous, tests only** (feature `hazmat-test-keys`): the local key
    /// service with KEK version 1 given in the clear, so that several test
    /// processes share it. Never use with real card data: a key in a
    /// configuration file violates PCI DSS 3.7.2–3.
    #[cfg(feature = "hazmat-test-keys")]
    InsecureLocal {
        /// The KEK, 64 hex digits.
        kek_hex: String,
    },
    /// `panseal-keyd` over mutual TLS (feature `keyd-client`). The
    /// configuration names files; the client key is read at start and kept
    /// in memory only.
    #[cfg(feature = "keyd-client")]
    Keyd {
        /// `host:port` of the server.
        address: String,
        /// The name in the server certificate (default: the host).
        server_name: Option<String>,
        /// PEM file of the CA that signed the server certificate.
        ca_file: PathBuf,
        /// PEM file of this client's certificate (its principal).
        client_cert_file: PathBuf,
        /// PEM file of this client's private key.
        client_key_file: PathBuf,
        /// Per-request deadline in milliseconds (default 5,000).
        request_timeout_ms: Option<u64>,
    },
    /// A PKCS#11 token (an HSM, or SoftHSM2 in tests; feature `pkcs11`).
    #[cfg(feature = "pkcs11")]
    Pkcs11(Pkcs11ServiceConfig),
    /// AWS KMS or a KMS-compatible endpoint (feature `aws-kms`).
    #[cfg(feature = "aws-kms")]
    AwsKms(AwsKmsServiceConfig),
}

/// `{"type": "pkcs11", …}`: where the KEK lives and where the PIN is read
/// from. Holds no secret (the PIN is read by [`ClientConfig::connect`]).
#[cfg(feature = "pkcs11")]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Pkcs11ServiceConfig {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Label of the token (HSM partition) that holds the KEK.
    pub token: String,
    /// The KEK's name (objects `panseal-kek:<name>:v<N>`).
    pub kek: String,
    /// A file holding the user PIN (one line; a trailing newline is
    /// dropped). It must not be readable or writable by group or others
    /// (mode `0600` or `0400`), as ssh requires of a private key.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Most sessions open at once (default 8).
    #[serde(default)]
    pub max_sessions: Option<usize>,
    /// How long one token call may take, milliseconds (default 10,000).
    #[serde(default)]
    pub operation_timeout_ms: Option<u64>,
    /// Generate KEK version 1 in the token if none exists (default `false`).
    #[serde(default)]
    pub create_kek_if_missing: bool,
}

/// `{"type": "aws-kms", …}`: the KEK's name and how to reach KMS.
/// Credentials come from the AWS SDK's standard chain (environment
/// variables `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
/// the shared config and credentials files with `AWS_PROFILE`, web
/// identity, ECS and EC2 instance roles), never from the configuration.
#[cfg(feature = "aws-kms")]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AwsKmsServiceConfig {
    /// The KEK's name (versions `alias/panseal/<name>/v<N>`).
    pub kek: String,
    /// AWS region (default: the standard chain, e.g. `AWS_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override (a VPC endpoint, or a KMS-compatible server such
    /// as `http://127.0.0.1:5000` in tests).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// TCP/TLS connect timeout, milliseconds (default 3,000).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Time for one call including retries, milliseconds (default 10,000).
    #[serde(default)]
    pub operation_timeout_ms: Option<u64>,
    /// Attempts per call, the first included (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// How long version lists and key states are trusted, seconds
    /// (default 60).
    #[serde(default)]
    pub key_cache_ttl_secs: Option<u64>,
    /// Create KEK version 1 if none exists (default `false`).
    #[serde(default)]
    pub create_kek_if_missing: bool,
}

/// The `key_service` types, the cargo feature each needs (`None`: always
/// built) and whether this build has it.
const KEY_SERVICE_TYPES: [(&str, Option<&str>, bool); 5] = [
    ("local", None, true),
    ("keyd", Some("keyd-client"), cfg!(feature = "keyd-client")),
    ("pkcs11", Some("pkcs11"), cfg!(feature = "pkcs11")),
    ("aws-kms", Some("aws-kms"), cfg!(feature = "aws-kms")),
    (
        "insecure-local",
        Some("hazmat-test-keys"),
        cfg!(feature = "hazmat-test-keys"),
    ),
];

/// Field names that would put AWS credentials in the configuration.
const INLINE_AWS_SECRETS: [&str; 7] = [
    "access_key_id",
    "secret_access_key",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "credentials",
];

/// The types this build knows, and those it was built without, for an
/// error message.
fn known_types() -> String {
    let built: Vec<String> = KEY_SERVICE_TYPES
        .iter()
        .filter(|(_, _, on)| *on)
        .map(|(t, _, _)| format!("`{t}`"))
        .collect();
    let off: Vec<String> = KEY_SERVICE_TYPES
        .iter()
        .filter(|(_, _, on)| !*on)
        .map(|(t, f, _)| format!("`{t}` (cargo feature `{}`)", f.unwrap_or("")))
        .collect();
    let mut text = format!("this build knows {}", built.join(", "));
    if !off.is_empty() {
        text.push_str(&format!("; not in this build: {}", off.join(", ")));
    }
    text
}

/// The fields of one variant, parsed strictly (`deny_unknown_fields`), with
/// serde's echo of the input withheld.
fn fields<T: serde::de::DeserializeOwned>(
    ty: &str,
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| format!("key_service `{ty}`: {}", withhold_input(&e.to_string())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[cfg(feature = "hazmat-test-keys")]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InsecureLocalFields {
    kek_hex: String,
}

#[cfg(feature = "keyd-client")]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeydFields {
    address: String,
    #[serde(default)]
    server_name: Option<String>,
    ca_file: PathBuf,
    client_cert_file: PathBuf,
    client_key_file: PathBuf,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
}

impl KeyServiceConfig {
    /// Parses the `key_service` object. Errors name fields and types, never
    /// a value.
    fn from_map(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        // Secrets first, whatever the type: the message must not depend on
        // anything else being right.
        if map.keys().any(|k| {
            let k = k.to_ascii_lowercase();
            k.contains("pin") && k != "pin_file" && k != "pin_env"
        }) {
            return Err(
                "key_service: a PIN is never given inline in the configuration \
                 (PCI DSS 8.3.2): name a file holding it with `pin_file` (mode 0600) or an \
                 environment variable with `pin_env`"
                    .into(),
            );
        }
        if let Some(k) = INLINE_AWS_SECRETS
            .iter()
            .find(|s| map.keys().any(|k| k.eq_ignore_ascii_case(s)))
        {
            return Err(format!(
                "key_service: AWS credentials are never given inline in the configuration \
                 (`{k}`): they come from the standard chain (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY in the environment, a profile chosen with AWS_PROFILE, \
                 or an instance or task role)"
            ));
        }
        let ty = match map.remove("type") {
            Some(serde_json::Value::String(t)) => t,
            Some(_) => return Err("key_service: `type` must be a string".into()),
            None => {
                return Err(format!(
                    "key_service: missing field `type`; {}",
                    known_types()
                ))
            }
        };
        let Some((_, feature, built)) = KEY_SERVICE_TYPES.iter().find(|(t, _, _)| *t == ty) else {
            // A type is not secret, but a misplaced value might be: echo it
            // only if it cannot be a number or a PIN.
            let shown = if !ty.is_empty()
                && ty.len() <= 32
                && ty
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
            {
                format!("`{ty}`")
            } else {
                "(withheld)".to_owned()
            };
            return Err(format!(
                "unknown key_service type {shown}; {}",
                known_types()
            ));
        };
        if !built {
            return Err(format!(
                "key_service type `{ty}` is not in this build: it needs the cargo feature \
                 `{}` of panseal (the stock panseal-ffi and panseal-python builds enable \
                 `keyd-client`, `pkcs11` and `aws-kms`)",
                feature.unwrap_or("")
            ));
        }
        match ty.as_str() {
            "local" => {
                let NoFields {} = fields(&ty, map)?;
                Ok(KeyServiceConfig::Local)
            }
            #[cfg(feature = "hazmat-test-keys")]
            "insecure-local" => {
                let f: InsecureLocalFields = fields(&ty, map)?;
                Ok(KeyServiceConfig::InsecureLocal { kek_hex: f.kek_hex })
            }
            #[cfg(feature = "keyd-client")]
            "keyd" => {
                let f: KeydFields = fields(&ty, map)?;
                Ok(KeyServiceConfig::Keyd {
                    address: f.address,
                    server_name: f.server_name,
                    ca_file: f.ca_file,
                    client_cert_file: f.client_cert_file,
                    client_key_file: f.client_key_file,
                    request_timeout_ms: f.request_timeout_ms,
                })
            }
            #[cfg(feature = "pkcs11")]
            "pkcs11" => {
                let f: Pkcs11ServiceConfig = fields(&ty, map)?;
                match (&f.pin_file, &f.pin_env) {
                    (Some(_), None) | (None, Some(_)) => Ok(KeyServiceConfig::Pkcs11(f)),
                    _ => Err(
                        "key_service `pkcs11`: give exactly one of `pin_file` (a file \
                         holding the PIN) and `pin_env` (an environment variable holding it)"
                            .into(),
                    ),
                }
            }
            #[cfg(feature = "aws-kms")]
            "aws-kms" => Ok(KeyServiceConfig::AwsKms(fields(&ty, map)?)),
            _ => Err(format!("unknown key_service type; {}", known_types())),
        }
    }
}

impl<'de> Deserialize<'de> for KeyServiceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        KeyServiceConfig::from_map(map).map_err(serde::de::Error::custom)
    }
}

/// Key store choice. Its `Debug` never prints a database password (the
/// URL's password, a `password=` setting).
#[derive(Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum KeyStoreConfig {
    /// In memory, lost at exit.
    Memory,
    /// One crash-safe file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// PostgreSQL (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres {
        /// libpq-style URL, e.g. `postgresql://app@127.0.0.1/payments`. TLS
        /// options (`?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem`,
        /// `sslcert`/`sslkey`): see `PostgresKeyStore`.
        url: String,
        /// Connections to keep (default 4).
        #[serde(default)]
        pool_size: Option<usize>,
    },
}

impl std::fmt::Debug for KeyServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyServiceConfig::Local => f.write_str("Local"),
            #[cfg(feature = "hazmat-test-keys")]
            KeyServiceConfig::InsecureLocal { .. } => f
                .debug_struct("InsecureLocal")
                .field("kek_hex", &format_args!(".."))
                .finish(),
            #[cfg(feature = "keyd-client")]
            KeyServiceConfig::Keyd {
                address,
                server_name,
                ca_file,
                client_cert_file,
                client_key_file,
                request_timeout_ms,
            } => f
                .debug_struct("Keyd")
                .field("address", address)
                .field("server_name", server_name)
                .field("ca_file", ca_file)
                .field("client_cert_file", client_cert_file)
                .field("client_key_file", client_key_file)
                .field("request_timeout_ms", request_timeout_ms)
                .finish(),
            // Neither holds a secret (a PIN is named, never held).
            #[cfg(feature = "pkcs11")]
            KeyServiceConfig::Pkcs11(c) => f.debug_tuple("Pkcs11").field(c).finish(),
            #[cfg(feature = "aws-kms")]
            KeyServiceConfig::AwsKms(c) => f.debug_tuple("AwsKms").field(c).finish(),
        }
    }
}

impl std::fmt::Debug for KeyStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyStoreConfig::Memory => f.write_str("Memory"),
            KeyStoreConfig::File { path } => f.debug_struct("File").field("path", path).finish(),
            #[cfg(feature = "postgres")]
            KeyStoreConfig::Postgres { url, pool_size } => f
                .debug_struct("Postgres")
                .field("url", &redact_password(url))
                .field("pool_size", pool_size)
                .finish(),
        }
    }
}

/// A `serde_json` message with the input it echoes withheld: "invalid type:
/// integer `4111111111111111`, expected a string" would put a card number
/// (or a password, or a key) from a misplaced value into a log. The parts
/// that come from this crate (what was expected, the position) stay.
fn withhold_input(message: &str) -> String {
    const ECHOING: [&str; 4] = [
        "invalid type",
        "invalid value",
        "unknown field",
        "unknown variant",
    ];
    if !ECHOING.iter().any(|p| message.starts_with(p)) {
        return message.to_owned();
    }
    let (input, ours) = message
        .find(", expected")
        .map_or((message, ""), |i| message.split_at(i));
    let mut out = String::with_capacity(message.len());
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            '`' | '"' => {
                out.push(c);
                out.push_str("(withheld)");
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push_str(ours);
    out
}

/// A PostgreSQL connection string with every password replaced by `***`:
/// the password of a URL's user information
/// (`postgresql://user:pw-example-1@host/db`), and any `password=` setting, in a
/// URL's query or a libpq `key=value` string (quoted or not).
pub fn redact_password(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    // `password=...` anywhere (query parameter or key=value pair).
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(i) = lower.find("password") else {
            result.push_str(rest);
            break;
        };
        let after = &rest[i + "password".len()..];
        let trimmed = after.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            result.push_str(&rest[..i + "password".len()]);
            rest = after;
            continue;
        };
        result.push_str(&rest[..i]);
        result.push_str("password=***");
        let value = value.trim_start();
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            // libpq quoting: up to the next unescaped quote.
            let mut end = None;
            let mut escaped = false;
            for (j, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = Some(j + 2);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            end.unwrap_or(value.len())
        } else {
            value
                .find(['&', ' ', '\t', '\n', '#'])
                .unwrap_or(value.len())
        };
        rest = &value[end..];
    }
    result
}

/// Audit sink choice.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum AuditConfig {
    /// Kept in memory (tests).
    Memory,
    /// One JSON object per line, appended to a file.
    Jsonl {
        /// The file.
        path: PathBuf,
    },
    /// The hash-chained (HMAC) tamper-evident log (PCI DSS 10.3.2, 10.3.4);
    /// verify it with `audit_verify`. The key file is created (64 hex
    /// digits, mode 0600) if missing: keep it away from the log.
    Chained {
        /// The log file.
        path: PathBuf,
        /// The chain key file.
        key_file: PathBuf,
    },
}

/// Policy overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Seals per DEK.
    pub max_uses: Option<u64>,
    /// Originator-usage period of a DEK, seconds.
    pub encrypt_period_secs: Option<u64>,
    /// Recipient-usage period after it, seconds.
    pub decrypt_period_secs: Option<u64>,
    /// Unwrapped keys kept in memory.
    pub cache_capacity: Option<usize>,
    /// Seconds an unwrapped key stays cached.
    pub cache_ttl_secs: Option<u64>,
    /// Seconds between re-reads of the active DEK's state.
    pub recheck_interval_secs: Option<u64>,
}

impl ClientConfig {
    /// Parses a JSON configuration.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming what is wrong (never echoing values
    /// beyond the JSON position).
    pub fn from_json(text: &str) -> Result<Self, Error> {
        serde_json::from_str(text)
            .map_err(|e| ConfigError::Invalid(withhold_input(&e.to_string())).into())
    }

    /// Reads and parses a JSON configuration file.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] if the file cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path.as_ref()).map_err(|e| {
            ConfigError::Invalid(format!("cannot read {}: {e}", path.as_ref().display()))
        })?;
        Self::from_json(&text)
    }

    fn policy(&self) -> Policy {
        let p = &self.policy;
        let mut policy = Policy::default();
        if let Some(n) = p.max_uses {
            policy = policy.max_uses(n);
        }
        if let Some(s) = p.encrypt_period_secs {
            policy = policy.encrypt_period(Duration::from_secs(s));
        }
        if let Some(s) = p.decrypt_period_secs {
            policy = policy.decrypt_period(Duration::from_secs(s));
        }
        if let Some(n) = p.cache_capacity {
            policy = policy.cache_capacity(n);
        }
        if let Some(s) = p.cache_ttl_secs {
            policy = policy.cache_ttl(Duration::from_secs(s));
        }
        if let Some(s) = p.recheck_interval_secs {
            policy = policy.recheck_interval(Duration::from_secs(s));
        }
        policy
    }

    /// The `panseal-keyd` client the configuration names, for tools that
    /// call its custodian operations.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] if the key service is not keyd, or the
    /// client cannot be built (unreadable certificate or key).
    #[cfg(feature = "keyd-client")]
    pub fn keyd_client(&self) -> Result<crate::RemoteKeyService, Error> {
        #[allow(irrefutable_let_patterns)]
        let KeyServiceConfig::Keyd {
            address,
            server_name,
            ca_file,
            client_cert_file,
            client_key_file,
            request_timeout_ms,
        } = &self.key_service
        else {
            return Err(ConfigError::Invalid("the key service is not panseal-keyd".into()).into());
        };
        let mut b = crate::RemoteKeyService::builder()
            .address(address)
            .ca_pem_file(ca_file)
            .client_identity_pem_files(client_cert_file, client_key_file)
            .environment(&self.environment)
            .scope(&self.scope);
        if let Some(name) = server_name {
            b = b.server_name(name);
        }
        if let Some(ms) = request_timeout_ms {
            b = b.request_timeout(Duration::from_millis(*ms));
        }
        b.build()
    }

    /// A builder with everything the configuration names, for the key
    /// services that need no connection to start (`local`, `keyd`): a
    /// PKCS#11 or AWS KMS key service connects asynchronously, so use
    /// [`ClientConfig::connect`] (async) or
    /// [`crate::blocking::Panseal::from_config`] for those (both work for
    /// every key service).
    ///
    /// # Errors
    ///
    /// Invalid names, a file the configuration names that does not exist
    /// ([`ConfigError::Invalid`] naming the path), a key store or audit
    /// file that cannot be opened, or a `pkcs11`/`aws-kms` key service.
    pub fn builder(&self) -> Result<PansealBuilder, Error> {
        self.check_files()?;
        let Some(ks) = self.key_service_now()? else {
            return Err(ConfigError::Invalid(format!(
                "the {} key service connects asynchronously: use ClientConfig::connect() \
                 or blocking::Panseal::from_config()",
                self.key_service.type_name()
            ))
            .into());
        };
        self.rest(ks)
    }

    /// A builder with everything the configuration names, every key service
    /// connected: a PKCS#11 token logged in (the PIN read from its file or
    /// environment variable, kept in a wiped-on-drop [`crate::Pkcs11Pin`]),
    /// AWS KMS reached and the KEK's versions listed. Call it within a Tokio
    /// runtime with timers enabled; the key service then runs on whatever
    /// runtime calls it (use the same one).
    ///
    /// # Errors
    ///
    /// Those of [`ClientConfig::builder`]; for `pkcs11`, a PIN file or
    /// variable that is missing, empty or (a file) readable by group or
    /// others ([`ConfigError::Invalid`], naming the file or variable,
    /// never the PIN); the key service's own connection errors.
    pub async fn connect(&self) -> Result<PansealBuilder, Error> {
        self.check_files()?;
        let ks: std::sync::Arc<dyn crate::KeyService> = match self.key_service_now()? {
            Some(ks) => ks,
            None => self.connect_key_service().await?,
        };
        self.rest(ks)
    }

    /// Every file the configuration names that must exist now, and the
    /// directory of each file it creates: a missing one is named.
    fn check_files(&self) -> Result<(), Error> {
        match &self.key_service {
            #[cfg(feature = "keyd-client")]
            KeyServiceConfig::Keyd {
                ca_file,
                client_cert_file,
                client_key_file,
                ..
            } => {
                require_file("keyd CA certificate (ca_file)", ca_file)?;
                require_file(
                    "keyd client certificate (client_cert_file)",
                    client_cert_file,
                )?;
                require_file("keyd client key (client_key_file)", client_key_file)?;
            }
            #[cfg(feature = "pkcs11")]
            KeyServiceConfig::Pkcs11(c) => {
                require_file("PKCS#11 module (module)", &c.module)?;
                if let Some(path) = &c.pin_file {
                    if path.to_string_lossy().contains('/') {
                        require_file("PKCS#11 PIN file (pin_file)", path)?;
                    } else if !path.exists() {
                        return Err(ConfigError::Invalid(format!(
                            "the {} does not exist",
                            shown_pin_file(path)
                        ))
                        .into());
                    }
                }
            }
            _ => {}
        }
        if let KeyStoreConfig::File { path } = &self.key_store {
            require_parent("key store file", path)?;
        }
        match &self.audit {
            Some(AuditConfig::Jsonl { path }) => require_parent("audit log", path)?,
            Some(AuditConfig::Chained { path, key_file }) => {
                require_parent("audit log", path)?;
                require_parent("audit chain key file", key_file)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The key service if it needs no connection to start, else `None`.
    fn key_service_now(&self) -> Result<Option<std::sync::Arc<dyn crate::KeyService>>, Error> {
        let environment = Environment::new(&self.environment)?;
        Ok(match &self.key_service {
            KeyServiceConfig::Local => Some(std::sync::Arc::new(LocalKeyService::new(environment))),
            #[cfg(feature = "hazmat-test-keys")]
            KeyServiceConfig::InsecureLocal { kek_hex } => {
                let mut kek = [0u8; 32];
                hex::decode_to_slice(kek_hex, &mut kek)
                    .map_err(|_| ConfigError::Invalid("kek_hex must be 64 hex digits".into()))?;
                let ks = LocalKeyService::from_kek_bytes_insecure(environment, kek);
                zeroize::Zeroize::zeroize(&mut kek);
                Some(std::sync::Arc::new(ks))
            }
            #[cfg(feature = "keyd-client")]
            KeyServiceConfig::Keyd { .. } => Some(std::sync::Arc::new(self.keyd_client()?)),
            #[cfg(any(feature = "pkcs11", feature = "aws-kms"))]
            _ => None,
        })
    }

    /// Connects a key service that needs it (PKCS#11, AWS KMS).
    async fn connect_key_service(&self) -> Result<std::sync::Arc<dyn crate::KeyService>, Error> {
        #[allow(unused_variables)]
        let environment = Environment::new(&self.environment)?;
        match &self.key_service {
            #[cfg(feature = "pkcs11")]
            KeyServiceConfig::Pkcs11(c) => {
                let mut config = crate::Pkcs11Config::new(&c.module, &c.token, &c.kek, environment)
                    .create_kek_if_missing(c.create_kek_if_missing);
                if let Some(n) = c.max_sessions {
                    config = config.max_sessions(n);
                }
                if let Some(ms) = c.operation_timeout_ms {
                    config = config.operation_timeout(Duration::from_millis(ms));
                }
                let pin = read_pin(c)?;
                Ok(std::sync::Arc::new(
                    crate::Pkcs11KeyService::connect(config, pin).await?,
                ))
            }
            #[cfg(feature = "aws-kms")]
            KeyServiceConfig::AwsKms(c) => {
                let mut config = crate::AwsKmsConfig::new(&c.kek, environment)
                    .create_kek_if_missing(c.create_kek_if_missing);
                if let Some(region) = &c.region {
                    config = config.region(region);
                }
                if let Some(url) = &c.endpoint_url {
                    config = config.endpoint_url(url);
                }
                let connect = c
                    .connect_timeout_ms
                    .map_or(config.connect_timeout, Duration::from_millis);
                let operation = c
                    .operation_timeout_ms
                    .map_or(config.operation_timeout, Duration::from_millis);
                config = config.timeouts(connect, operation);
                if let Some(n) = c.max_attempts {
                    config = config.max_attempts(n);
                }
                if let Some(s) = c.key_cache_ttl_secs {
                    config = config.key_cache_ttl(Duration::from_secs(s));
                }
                Ok(std::sync::Arc::new(
                    crate::AwsKmsKeyService::connect(config).await?,
                ))
            }
            _ => Err(ConfigError::Invalid(format!(
                "the {} key service needs no connection",
                self.key_service.type_name()
            ))
            .into()),
        }
    }

    /// The builder around `key_service`, with the key store and audit sink.
    fn rest(
        &self,
        key_service: std::sync::Arc<dyn crate::KeyService>,
    ) -> Result<PansealBuilder, Error> {
        let mut b = crate::Panseal::builder()
            .environment(&self.environment)
            .scope(&self.scope)
            .policy(self.policy())
            .key_service_arc(key_service);
        b = match &self.key_store {
            KeyStoreConfig::Memory => b.key_store(MemoryKeyStore::new()),
            KeyStoreConfig::File { path } => b.key_store(FileKeyStore::open(path)?),
            #[cfg(feature = "postgres")]
            KeyStoreConfig::Postgres { url, pool_size } => b.key_store(
                crate::keystore::postgres::PostgresKeyStore::new(url, pool_size.unwrap_or(4))?,
            ),
        };
        b = match &self.audit {
            None => b,
            Some(AuditConfig::Memory) => b.audit(MemoryAuditSink::new()),
            Some(AuditConfig::Jsonl { path }) => b.audit(JsonLinesAuditSink::open(path)?),
            Some(AuditConfig::Chained { path, key_file }) => {
                let key = if key_file.exists() {
                    crate::AuditKey::load_file(key_file)?
                } else {
                    crate::AuditKey::create_file(key_file)?
                };
                b.audit(crate::ChainedAuditLog::open(path, key)?)
            }
        };
        Ok(b)
    }
}

impl KeyServiceConfig {
    /// The `type` this variant is written as.
    pub fn type_name(&self) -> &'static str {
        match self {
            KeyServiceConfig::Local => "local",
            #[cfg(feature = "hazmat-test-keys")]
            KeyServiceConfig::InsecureLocal { .. } => "insecure-local",
            #[cfg(feature = "keyd-client")]
            KeyServiceConfig::Keyd { .. } => "keyd",
            #[cfg(feature = "pkcs11")]
            KeyServiceConfig::Pkcs11(_) => "pkcs11",
            #[cfg(feature = "aws-kms")]
            KeyServiceConfig::AwsKms(_) => "aws-kms",
        }
    }
}

/// `path` must exist: else an error naming `what` and the path.
#[cfg_attr(
    not(any(feature = "keyd-client", feature = "pkcs11")),
    allow(dead_code)
)]
fn require_file(what: &str, path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ConfigError::Invalid(format!("{what} {} does not exist", path.display())).into())
        }
        Err(e) => Err(ConfigError::Invalid(format!("{what} {}: {e}", path.display())).into()),
    }
}

/// The directory `path` is created in must exist: else an error naming it.
fn require_parent(what: &str, path: &Path) -> Result<(), Error> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(ConfigError::Invalid(format!(
                "the directory of the {what} {} does not exist ({})",
                path.display(),
                dir.display()
            ))
            .into())
        }
        _ => Ok(()),
    }
}

/// How an error names the `pin_file`: its path only when it has a `/` — a
/// value without one may be the PIN itself written in the wrong field.
#[cfg(feature = "pkcs11")]
fn shown_pin_file(path: &Path) -> String {
    if path.to_string_lossy().contains('/') {
        format!("PIN file {}", path.display())
    } else {
        "PIN file named by pin_file (withheld: a name without '/' may be a PIN in the wrong \
         field; give a path)"
            .to_owned()
    }
}

/// How an error names the `pin_env` variable: only a name like `HSM_PIN`
/// (capitals, digits, at least one `_`) is repeated — anything else may be
/// the PIN itself written in the wrong field.
#[cfg(feature = "pkcs11")]
fn shown_pin_env(var: &str) -> String {
    let b = var.as_bytes();
    let name_like = b.first().is_some_and(u8::is_ascii_uppercase)
        && b.contains(&b'_')
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    if name_like {
        format!("environment variable {var} (pin_env)")
    } else {
        "environment variable named by pin_env (withheld: not a name like HSM_PIN, so it may \
         be a PIN in the wrong field)"
            .to_owned()
    }
}

/// Longest PIN file accepted: a PIN is a line, not a document.
#[cfg(feature = "pkcs11")]
const MAX_PIN_FILE: u64 = 4096;

/// Reads the PIN from the file or environment variable the configuration
/// names, without a copy left behind by this code: the file's bytes become
/// the `String` that moves into the [`crate::Pkcs11Pin`] (wiped on drop);
/// on any error what was read is wiped. One trailing newline (`\n` or
/// `\r\n`) is dropped. A PIN file must not be readable or writable by
/// group or others (as ssh refuses a private key file). The environment
/// itself keeps its copy of a `pin_env` variable (the process cannot wipe
/// it safely): prefer `pin_file` where the platform offers secret files.
#[cfg(feature = "pkcs11")]
fn read_pin(c: &Pkcs11ServiceConfig) -> Result<crate::Pkcs11Pin, Error> {
    use std::io::Read as _;
    use zeroize::Zeroize as _;
    let invalid = |m: String| -> Error { ConfigError::Invalid(m).into() };
    let (mut pin, source) = match (&c.pin_file, &c.pin_env) {
        (Some(path), _) => {
            let source = shown_pin_file(path);
            let mut file = std::fs::File::open(path)
                .map_err(|e| invalid(format!("cannot open the {source}: {e}")))?;
            let meta = file
                .metadata()
                .map_err(|e| invalid(format!("cannot read the {source}: {e}")))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(invalid(format!(
                        "the {source} is accessible by group or others (mode {:03o}): \
                         chmod 600 it (or 400), as for an ssh key",
                        mode & 0o777
                    )));
                }
            }
            if !meta.is_file() || meta.len() > MAX_PIN_FILE {
                return Err(invalid(format!(
                    "the {source} is not a PIN file (a regular file of at most \
                     {MAX_PIN_FILE} bytes)"
                )));
            }
            // Capacity for the whole file plus the end-of-file probe: the
            // buffer is never reallocated, so no copy is left in freed memory.
            let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
            if let Err(e) = (&mut file).take(MAX_PIN_FILE + 1).read_to_end(&mut bytes) {
                bytes.zeroize();
                return Err(invalid(format!("cannot read the {source}: {e}")));
            }
            match String::from_utf8(bytes) {
                Ok(text) => (text, source),
                Err(e) => {
                    e.into_bytes().zeroize();
                    return Err(invalid(format!("the {source} is not UTF-8")));
                }
            }
        }
        (None, Some(var)) => {
            let source = shown_pin_env(var);
            match std::env::var(var) {
                Ok(text) => (text, source),
                Err(std::env::VarError::NotPresent) => {
                    return Err(invalid(format!("the {source} is not set")))
                }
                Err(std::env::VarError::NotUnicode(os)) => {
                    #[cfg(unix)]
                    std::os::unix::ffi::OsStringExt::into_vec(os).zeroize();
                    #[cfg(not(unix))]
                    drop(os);
                    return Err(invalid(format!("the {source} is not UTF-8")));
                }
            }
        }
        (None, None) => {
            return Err(invalid(
                "key_service `pkcs11`: give `pin_file` or `pin_env`".into(),
            ))
        }
    };
    if pin.ends_with('\n') {
        pin.pop();
        if pin.ends_with('\r') {
            pin.pop();
        }
    }
    if pin.is_empty() {
        pin.zeroize();
        return Err(invalid(format!("the {source} is empty")));
    }
    Ok(crate::Pkcs11Pin::new(pin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_fields() {
        let c = ClientConfig::from_json(
            r#"{"environment":"dev","scope":"m","key_service":{"type":"local"},
                "key_store":{"type":"memory"},"policy":{"max_uses":3}}"#,
        )
        .unwrap();
        assert_eq!(c.policy().max_uses, 3);
        assert!(ClientConfig::from_json(r#"{"environment":"dev"}"#).is_err());
        let e = ClientConfig::from_json(
            r#"{"environment":"dev","scope":"m","key_service":{"type":"local"},
                "key_store":{"type":"memory"},"kek":"00112233"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(
            e.to_string().contains("expected one of `environment`"),
            "{e}"
        );
    }

    #[test]
    fn parse_errors_withhold_the_input() {
        assert_eq!(
            withhold_input("invalid type: string \"s3cret\", expected u64 at line 1 column 72"),
            "invalid type: string \"(withheld)\", expected u64 at line 1 column 72"
        );
        assert_eq!(
            withhold_input("unknown variant `4111111111111111`, expected `local`"),
            "unknown variant `(withheld)`, expected `local`"
        );
        assert_eq!(
            withhold_input("missing field `scope` at line 1 column 9"),
            "missing field `scope` at line 1 column 9"
        );
    }

    /// Issue 9, item 7: the configuration's `Debug` (what a `tracing`
    /// field or a panic message would print) holds no password.
    #[test]
    fn debug_redacts_passwords() {
        for (url, secret) in [
            ("postgresql://app:Hunter2pw@127.0.0.1:5432/pay", "Hunter2pw"),
            (
                "postgres://app:p%40ss:w0rd@db/pay?sslmode=require",
                "p%40ss:w0rd",
            ),
            (
                "postgresql://app@db/pay?password=Qwerty99&sslmode=disable",
                "Qwerty99",
            ),
            ("host=db user=app password=S3cretKV dbname=pay", "S3cretKV"),
            (
                "host=db user=app password = 'quo ted\\'pw' dbname=pay",
                "quo ted",
            ),
            ("host=db PASSWORD=UpperCase1", "UpperCase1"),
        ] {
            let redacted = redact_password(url);
            assert!(!redacted.contains(secret), "{url} -> {redacted}");
            assert!(redacted.contains("***"), "{redacted}");
            #[cfg(feature = "postgres")]
            {
                let c = ClientConfig::from_json(&format!(
                    r#"{{"environment":"dev","scope":"m","key_service":{{"type":"local"}},
                        "key_store":{{"type":"postgres","url":{}}}}}"#,
                    serde_json::to_string(url).unwrap()
                ))
                .unwrap();
                for text in [format!("{c:?}"), format!("{c:#?}")] {
                    assert!(!text.contains(secret), "{text}");
                }
            }
        }
        // What is not a password stays readable.
        assert_eq!(
            redact_password("postgresql://app@127.0.0.1/pay"),
            "postgresql://app@127.0.0.1/pay"
        );
        assert_eq!(
            redact_password("postgresql://app:pw@h/db?sslmode=disable"),
            "postgresql://app:***@h/db?sslmode=disable"
        );
    }

    #[cfg(feature = "hazmat-test-keys")]
    #[test]
    fn debug_hides_an_insecure_kek() {
        let kek = "ab".repeat(32);
        let c = ClientConfig::from_json(&format!(
            r#"{{"environment":"dev","scope":"m","key_service":{{"type":"insecure-local","kek_hex":"{kek}"}},
                "key_store":{{"type":"memory"}}}}"#
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains(&kek));
    }

    /// A configuration around one `key_service` object.
    fn with_service(service: &str) -> Result<ClientConfig, Error> {
        ClientConfig::from_json(&format!(
            r#"{{"environment":"dev","scope":"m","key_service":{service},
                "key_store":{{"type":"memory"}},"audit":{{"type":"memory"}}}}"#
        ))
    }

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    fn builder_error(c: &ClientConfig) -> Error {
        match c.builder() {
            Ok(_) => panic!("built: {c:?}"),
            Err(e) => e,
        }
    }

    /// A PIN given inline, in any form and under any type, is refused
    /// pointing at `pin_file`/`pin_env`, and the value is not in the error.
    #[test]
    fn an_inline_pin_is_refused_without_echo() {
        for (field, value) in [
            ("pin", r#""Sup3rPin8642""#),
            ("pin", "86427531"),
            ("PIN", r#""Sup3rPin8642""#),
            ("user_pin", r#""Sup3rPin8642""#),
            ("pin", r#"{"value":"Sup3rPin8642"}"#),
            ("pin", r#"["Sup3rPin8642"]"#),
        ] {
            for ty in ["pkcs11", "local", "aws-kms", "nonsense"] {
                let e = with_service(&format!(
                    r#"{{"type":"{ty}","module":"{MODULE}","token":"t","kek":"k",
                        "pin_env":"X","{field}":{value}}}"#
                ))
                .unwrap_err();
                let text = format!("{e} {e:?}");
                assert!(
                    matches!(e, Error::Config(ConfigError::Invalid(_))),
                    "{text}"
                );
                assert!(
                    text.contains("pin_file") && text.contains("pin_env"),
                    "{text}"
                );
                assert!(text.contains("never given inline"), "{text}");
                assert!(
                    !text.contains("Sup3rPin8642") && !text.contains("86427531"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn inline_aws_credentials_are_refused_without_echo() {
        for field in [
            "secret_access_key",
            "access_key_id",
            "session_token",
            "credentials",
        ] {
            let e = with_service(&format!(
                r#"{{"type":"aws-kms","kek":"cards","{field}":"wJalrXUtnFEMIK7MDENG"}}"#
            ))
            .unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(text.contains("never given inline"), "{text}");
            assert!(
                text.contains(field) && text.contains("AWS_PROFILE"),
                "{text}"
            );
            assert!(!text.contains("wJalrXUtnFEMIK7MDENG"), "{text}");
        }
    }

    #[test]
    fn an_unknown_type_names_the_known_ones() {
        let e = with_service(r#"{"type":"hsm"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown key_service type `hsm`"), "{e}");
        for t in ["`local`", "`keyd`", "`pkcs11`", "`aws-kms`"] {
            assert!(e.contains(t), "{e}");
        }
        // What might be a misplaced secret is not echoed.
        let e = with_service(r#"{"type":"4111111111111111"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(withheld)") && !e.contains("4111"), "{e}");
        let e = with_service(r#"{"module":"x"}"#).unwrap_err().to_string();
        assert!(
            e.contains("missing field `type`") && e.contains("`local`"),
            "{e}"
        );
        let e = with_service(r#"{"type":7}"#).unwrap_err().to_string();
        assert!(e.contains("`type` must be a string"), "{e}");
    }

    /// A backend compiled out is named with the feature that builds it
    /// (what `cargo test -p panseal` without features checks); with the
    /// feature, the same document parses.
    #[test]
    fn a_compiled_out_type_names_its_feature() {
        for (ty, feature, on, doc) in [
            (
                "pkcs11",
                "pkcs11",
                cfg!(feature = "pkcs11"),
                format!(r#"{{"type":"pkcs11","module":"{MODULE}","token":"t","kek":"k","pin_env":"P"}}"#),
            ),
            (
                "aws-kms",
                "aws-kms",
                cfg!(feature = "aws-kms"),
                r#"{"type":"aws-kms","kek":"k"}"#.to_owned(),
            ),
            (
                "keyd",
                "keyd-client",
                cfg!(feature = "keyd-client"),
                r#"{"type":"keyd","address":"127.0.0.1:1","ca_file":"a","client_cert_file":"b","client_key_file":"c"}"#.to_owned(),
            ),
        ] {
            match with_service(&doc) {
                Ok(c) => {
                    assert!(on, "{ty} parsed without its feature");
                    assert_eq!(c.key_service.type_name(), ty);
                }
                Err(e) => {
                    assert!(!on, "{ty}: {e}");
                    let e = e.to_string();
                    assert!(e.contains("not in this build"), "{e}");
                    assert!(e.contains(&format!("cargo feature `{feature}`")), "{e}");
                }
            }
        }
    }

    #[cfg(feature = "pkcs11")]
    #[test]
    fn pkcs11_needs_exactly_one_pin_source_and_no_unknown_field() {
        for extra in ["", r#","pin_env":"P","pin_file":"/run/secrets/pin""#] {
            let e = with_service(&format!(
                r#"{{"type":"pkcs11","module":"{MODULE}","token":"t","kek":"k"{extra}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("exactly one of `pin_file`"), "{e}");
        }
        let e = with_service(&format!(
            r#"{{"type":"pkcs11","module":"{MODULE}","token":"t","kek":"k","pin_env":"P","slot":"s3cret"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("key_service `pkcs11`: unknown field"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let c = with_service(&format!(
            r#"{{"type":"pkcs11","module":"{MODULE}","token":"payments","kek":"cards",
                "pin_file":"/run/secrets/hsm-pin","max_sessions":4,"operation_timeout_ms":2500,
                "create_kek_if_missing":true}}"#
        ))
        .unwrap();
        let KeyServiceConfig::Pkcs11(p) = &c.key_service else {
            panic!("{c:?}")
        };
        assert_eq!(p.max_sessions, Some(4));
        assert_eq!(p.operation_timeout_ms, Some(2500));
        assert!(p.create_kek_if_missing);
        // `builder` (sync) points at `connect`.
        let e = builder_error(&c).to_string();
        assert!(
            e.contains("does not exist") || e.contains("ClientConfig::connect"),
            "{e}"
        );
    }

    /// A file the configuration names that is missing is named, before any
    /// connection; a PIN source that is missing, empty or open to others is
    /// named, never read out.
    #[cfg(feature = "pkcs11")]
    #[test]
    fn missing_files_and_bad_pin_sources_are_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let connect = |service: String| -> String {
            let c = with_service(&service).unwrap();
            match rt.block_on(c.connect()) {
                Ok(_) => panic!("connected: {service}"),
                Err(e) => {
                    assert!(matches!(e, Error::Config(ConfigError::Invalid(_))), "{e}");
                    e.to_string()
                }
            }
        };
        // Any existing file stands in for the module: the PIN is checked
        // before the module is loaded.
        let module = dir.path().join("libfake.so");
        std::fs::write(&module, b"not a module").unwrap();
        let missing = dir.path().join("no-such-module.so");
        let e = connect(format!(
            r#"{{"type":"pkcs11","module":{:?},"token":"t","kek":"k","pin_env":"P"}}"#,
            missing
        ));
        assert!(
            e.contains("PKCS#11 module (module)") && e.contains("no-such-module.so"),
            "{e}"
        );

        let pin_file = dir.path().join("hsm-pin");
        let service = format!(
            r#"{{"type":"pkcs11","module":{module:?},"token":"t","kek":"k","pin_file":{pin_file:?}}}"#
        );
        let e = connect(service.clone());
        assert!(
            e.contains("PIN file (pin_file)")
                && e.contains("hsm-pin")
                && e.contains("does not exist"),
            "{e}"
        );
        std::fs::write(&pin_file, "Sup3rPin8642\n").unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = connect(service.clone());
        assert!(
            e.contains("group or others (mode 644)") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains("Sup3rPin8642"), "{e}");
        std::fs::write(&pin_file, "\n").unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = connect(service.clone());
        assert!(e.contains("hsm-pin is empty"), "{e}");
        std::fs::write(&pin_file, [0xff, 0xfe, b'1']).unwrap();
        let e = connect(service);
        assert!(e.contains("not UTF-8"), "{e}");

        let var = "PANSEAL_CONFIG_TEST_UNSET_PIN";
        assert!(std::env::var_os(var).is_none());
        let e = connect(format!(
            r#"{{"type":"pkcs11","module":{module:?},"token":"t","kek":"k","pin_env":"{var}"}}"#
        ));
        assert!(
            e.contains(&format!("environment variable {var} (pin_env) is not set")),
            "{e}"
        );

        // The PIN itself written where its file or variable belongs: not
        // repeated in the error.
        for field in ["pin_env", "pin_file"] {
            let e = connect(format!(
                r#"{{"type":"pkcs11","module":{module:?},"token":"t","kek":"k","{field}":"86421357"}}"#
            ));
            assert!(!e.contains("86421357"), "{field}: {e}");
            assert!(e.contains("withheld"), "{field}: {e}");
        }
    }

    #[cfg(feature = "keyd-client")]
    #[test]
    fn missing_keyd_files_and_store_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let c = with_service(&format!(
            r#"{{"type":"keyd","address":"127.0.0.1:1","ca_file":{ca:?},
                "client_cert_file":"/nonexistent/front.pem","client_key_file":{ca:?}}}"#
        ))
        .unwrap();
        let e = builder_error(&c).to_string();
        assert!(
            e.contains(
                "keyd client certificate (client_cert_file) /nonexistent/front.pem does not exist"
            ),
            "{e}"
        );
        let c = ClientConfig::from_json(
            r#"{"environment":"dev","scope":"m","key_service":{"type":"local"},
                "key_store":{"type":"file","path":"/nonexistent-dir/keys.pks"}}"#,
        )
        .unwrap();
        let e = builder_error(&c).to_string();
        assert!(
            e.contains("key store file /nonexistent-dir/keys.pks") && e.contains("does not exist"),
            "{e}"
        );
        let c = ClientConfig::from_json(
            r#"{"environment":"dev","scope":"m","key_service":{"type":"local"},
                "key_store":{"type":"memory"},"audit":{"type":"jsonl","path":"/nonexistent-dir/a.jsonl"}}"#,
        )
        .unwrap();
        let e = builder_error(&c).to_string();
        assert!(e.contains("audit log /nonexistent-dir/a.jsonl"), "{e}");
    }

    #[cfg(feature = "aws-kms")]
    #[test]
    fn aws_kms_parses_its_settings_and_debug_holds_no_secret() {
        let c = with_service(
            r#"{"type":"aws-kms","kek":"cards","region":"eu-west-1",
                "endpoint_url":"http://127.0.0.1:5000","connect_timeout_ms":500,
                "operation_timeout_ms":4000,"max_attempts":2,"key_cache_ttl_secs":0}"#,
        )
        .unwrap();
        let KeyServiceConfig::AwsKms(a) = &c.key_service else {
            panic!("{c:?}")
        };
        assert_eq!(a.region.as_deref(), Some("eu-west-1"));
        assert_eq!(a.max_attempts, Some(2));
        let e = builder_error(&c).to_string();
        assert!(e.contains("ClientConfig::connect"), "{e}");
        let e = with_service(r#"{"type":"aws-kms","kek":"cards","profile":"prod"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
