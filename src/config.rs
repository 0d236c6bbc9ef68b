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

/// Key service choice. Its `Debug` never prints key material (`kek_hex`
/// shows as `..`).
#[derive(Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
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
        #[serde(default)]
        server_name: Option<String>,
        /// PEM file of the CA that signed the server certificate.
        ca_file: PathBuf,
        /// PEM file of this client's certificate (its principal).
        client_cert_file: PathBuf,
        /// PEM file of this client's private key.
        client_key_file: PathBuf,
        /// Per-request deadline in milliseconds (default 5,000).
        #[serde(default)]
        request_timeout_ms: Option<u64>,
    },
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
        /// libpq-style URL, e.g. `postgresql://app@127.0.0.1/payments`.
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

    /// A builder with everything the configuration names.
    ///
    /// # Errors
    ///
    /// Invalid names, or a key store or audit file that cannot be opened.
    pub fn builder(&self) -> Result<PansealBuilder, Error> {
        let environment = Environment::new(&self.environment)?;
        let mut b = crate::Panseal::builder()
            .environment(&self.environment)
            .scope(&self.scope)
            .policy(self.policy());
        b = match &self.key_service {
            KeyServiceConfig::Local => b.key_service(LocalKeyService::new(environment)),
            #[cfg(feature = "hazmat-test-keys")]
            KeyServiceConfig::InsecureLocal { kek_hex } => {
                let mut kek = [0u8; 32];
                hex::decode_to_slice(kek_hex, &mut kek)
                    .map_err(|_| ConfigError::Invalid("kek_hex must be 64 hex digits".into()))?;
                let ks = LocalKeyService::from_kek_bytes_insecure(environment, kek);
                zeroize::Zeroize::zeroize(&mut kek);
                b.key_service(ks)
            }
            #[cfg(feature = "keyd-client")]
            KeyServiceConfig::Keyd { .. } => b.key_service(self.keyd_client()?),
        };
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
}
