//! A key store in PostgreSQL (feature `postgres`).
//!
//! One row per wrapped-key record. The row's `record` column holds the
//! record in its specified binary encoding (`FORMAT.md`, "Key-store
//! record"); `scope`, `purpose`, `state` and the KEK reference are copied
//! into columns for queries (the library reads only `record`: its lifecycle
//! fields are signed by the key service, the copies are not). Every change
//! is one compare-and-swap `UPDATE … WHERE record = <previous>`, so any
//! number of application instances can share the store: two instances
//! never lose each other's updates, and
//! the primary key makes a duplicate id (including the deterministic
//! index-key ids) fail for the second inserter.
//!
//! The schema is created and upgraded by the library (versioned migrations
//! under a transaction-level advisory lock, so instances starting at once
//! apply each migration exactly once).
//!
//! [`Inventory`] counts, per DEK and per index-key version, the stored fields
//! that still use it, over the sealed-PAN columns the application registers
//! (PCI DSS 3.6.1.1 inventory; 3.7.5 retirement: a key whose count reaches
//! zero can be destroyed).
//!
//! TLS to the database: see [`PostgresKeyStore`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::KeyStore;
use crate::error::KeyStoreError;
use crate::keys::{KeyId, KeyState, Scope, WrappedDek};

/// Schema migrations, applied in order; each entry is one version.
const MIGRATIONS: &[&str] = &[
    // v1: key records and registered columns.
    r#"
    CREATE TABLE panseal_keys (
        id          bytea PRIMARY KEY CHECK (length(id) = 8),
        scope       text NOT NULL,
        purpose     smallint NOT NULL,
        state       smallint NOT NULL,
        kek_id      text NOT NULL,
        kek_version bigint NOT NULL,
        record      bytea NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX panseal_keys_scope ON panseal_keys (scope, purpose, state);
    CREATE TABLE panseal_columns (
        table_name  text NOT NULL,
        column_name text NOT NULL,
        kind        text NOT NULL CHECK (kind IN ('sealed-text', 'sealed-binary', 'index')),
        version_column text,
        PRIMARY KEY (table_name, column_name)
    );
    "#,
    // v2: checkpoints of re-encryption jobs.
    r#"
    CREATE TABLE panseal_reencrypt_checkpoints (
        job        text PRIMARY KEY,
        last_id    bigint NOT NULL,
        scanned    bigint NOT NULL,
        resealed   bigint NOT NULL,
        skipped    bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    "#,
];

/// Advisory lock key for migrations ("panseal" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_616e_7365_616c;

/// A key store in PostgreSQL. Cheap to clone (a connection pool).
///
/// # TLS
///
/// The connection string takes libpq's TLS options, in a URL's query
/// (`postgresql://app@db.internal/payments?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem`)
/// or as `key=value` settings; certificates are verified by rustls (ring
/// provider):
///
/// | `sslmode` | TLS | server certificate |
/// | --- | --- | --- |
/// | `verify-full` (recommended) | required | chains to `sslrootcert` **and** names the host |
/// | `verify-ca` | required | chains to `sslrootcert` (any name) |
/// | `require` | required | as `verify-ca`; refused without `sslrootcert` (libpq's `require` accepts any certificate) |
/// | `disable`, or no `sslmode` | plain TCP | none: a Unix socket or a loopback address only (another host is refused) |
/// | `prefer`, `allow` | refused | they fall back to plain TCP when the server, or a man in the middle, declines TLS |
///
/// `sslrootcert` is a PEM file of CA certificates, or `system` for the
/// operating system's roots (with `verify-full` only, as in libpq).
/// `sslcert` and `sslkey` (PEM) give a client certificate for PostgreSQL's
/// `cert` authentication. No fallback exists: a server that does not offer
/// TLS, or whose certificate does not verify, is refused with
/// [`KeyStoreError::Tls`] before any statement is sent.
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool,
    migrated: std::sync::Arc<tokio::sync::OnceCell<()>>,
    /// The TLS settings in force, for error messages (no secret).
    tls: Arc<str>,
}

impl std::fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresKeyStore")
    }
}

fn backend(e: impl std::fmt::Display) -> KeyStoreError {
    KeyStoreError::Backend(e.to_string())
}

/// Maps a database error: connection problems are retryable I/O.
fn db(e: tokio_postgres::Error) -> KeyStoreError {
    if e.is_closed() || e.as_db_error().is_none() {
        KeyStoreError::Io(std::io::Error::other(e.to_string()))
    } else {
        KeyStoreError::Backend(e.to_string())
    }
}

/// Maps a failure to get a connection: a refused TLS handshake is
/// [`KeyStoreError::Tls`] (retrying does not help), the rest retryable I/O
/// or the server's own refusal.
fn pool_err(e: deadpool_postgres::PoolError, tls: &str) -> KeyStoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            if let Some(e) = tls_error(&e, tls) {
                return e;
            }
            match e.as_db_error() {
                // The server's refusal (pg_hba.conf, authentication): its
                // message, without detail.
                Some(d) => KeyStoreError::Backend(format!(
                    "PostgreSQL refused the connection ({tls}): {}: {}",
                    d.severity(),
                    d.message()
                )),
                None => db(e),
            }
        }
        e => KeyStoreError::Io(std::io::Error::other(e.to_string())),
    }
}

/// The TLS failure inside a connection error, if it is one.
fn tls_error(e: &tokio_postgres::Error, tls: &str) -> Option<KeyStoreError> {
    // tokio-postgres does not expose its error kind: a rustls error
    // anywhere in the chain is a TLS failure whatever the outer message
    // says (so a reworded message cannot turn a certificate that does not
    // verify into a retryable I/O error); then its own TLS messages.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // An `io::Error`'s `source` skips the error it wraps.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map_or(s, |i| i as &(dyn std::error::Error + 'static));
        if let Some(r) = inner.downcast_ref::<rustls::Error>() {
            return Some(KeyStoreError::Tls(match r {
                rustls::Error::InvalidCertificate(c) => {
                    format!("TLS certificate does not verify ({tls}): {c}")
                }
                r => format!("TLS handshake with the database failed ({tls}): {r}"),
            }));
        }
        if s.to_string() == "server does not support TLS" {
            return Some(KeyStoreError::Tls(format!(
                "the database server does not offer TLS and {tls} requires it \
                 (no fallback to plain TCP)"
            )));
        }
        source = s.source();
    }
    if !e.to_string().starts_with("error performing TLS handshake") {
        return None;
    }
    Some(KeyStoreError::Tls(format!(
        "TLS handshake with the database failed ({tls}): {}",
        error_chain(e)
    )))
}

/// Plain TCP only to this machine: with `sslmode=disable` (or none) every
/// host (and `hostaddr`) must be a Unix socket or a loopback address, so a
/// configuration that forgot `sslmode` never sends the password and the
/// wrapped keys across a network in the clear.
fn check_plain_hosts(config: &tokio_postgres::Config, tls: &str) -> Result<(), KeyStoreError> {
    use std::net::IpAddr;
    let loopback_name = |h: &str| {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    // With `hostaddr` the connection goes to those addresses (the host
    // names only name the server); else to the hosts.
    let remote = if config.get_hostaddrs().is_empty() {
        config.get_hosts().iter().find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) if !loopback_name(name) => Some(name.clone()),
            _ => None,
        })
    } else {
        config
            .get_hostaddrs()
            .iter()
            .find(|a| !a.is_loopback())
            .map(|a| a.to_string())
    };
    match remote {
        Some(host) => Err(KeyStoreError::Tls(format!(
            "plain TCP ({tls}) to the database host {host} is refused: it is not this \
             machine, so the password and the wrapped keys would cross the network in the \
             clear; use sslmode=verify-full with sslrootcert"
        ))),
        None => Ok(()),
    }
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What `sslmode` asks of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsMode {
    /// Plain TCP (`disable`, or no `sslmode`).
    Disable,
    /// TLS, the chain verified against `sslrootcert` (`require`, `verify-ca`).
    VerifyCa,
    /// TLS, the chain and the host name verified (`verify-full`).
    VerifyFull,
}

/// The TLS options of a connection string, taken out of it (tokio-postgres
/// knows only `disable`, `prefer` and `require`, and no certificate files).
#[derive(Debug)]
struct TlsOptions {
    mode: TlsMode,
    /// `sslmode` as written, for messages.
    mode_name: String,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// The options panseal handles itself.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

fn tls_config(message: String) -> KeyStoreError {
    KeyStoreError::Tls(format!(
        "TLS options of the PostgreSQL connection string: {message}"
    ))
}

impl TlsOptions {
    /// Splits the TLS options out of `url`; returns the rest of the
    /// connection string (unchanged otherwise) and the checked options.
    fn split(url: &str) -> Result<(String, TlsOptions), KeyStoreError> {
        let (rest, pairs) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_key_value(url)?
        };
        let mut mode = None;
        let (mut root, mut cert, mut key) = (None, None, None);
        // A setting given twice: the last one counts, as in libpq.
        for (k, v) in pairs {
            match k.as_str() {
                "sslmode" => mode = Some(v),
                "sslrootcert" => root = Some(v),
                "sslcert" => cert = Some(v),
                _ => key = Some(v),
            }
        }
        let mode_name = mode.clone().unwrap_or_else(|| "disable".into());
        let parsed = match mode.as_deref() {
            None | Some("disable") => TlsMode::Disable,
            Some("require") | Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(m @ ("prefer" | "allow")) => {
                return Err(tls_config(format!(
                    "sslmode={m} is refused: it falls back to plain TCP when the server (or a \
                     man in the middle) declines TLS; use sslmode=verify-full with sslrootcert"
                )))
            }
            Some(m) => {
                return Err(tls_config(format!(
                    "unknown sslmode {m:?} (disable, require, verify-ca or verify-full)"
                )))
            }
        };
        if parsed == TlsMode::Disable {
            if let Some(k) = [("sslrootcert", &root), ("sslcert", &cert), ("sslkey", &key)]
                .iter()
                .find_map(|(k, v)| v.as_ref().map(|_| *k))
            {
                return Err(tls_config(format!(
                    "{k} is given but sslmode is {mode_name} (plain TCP); write \
                     sslmode=verify-full to use TLS"
                )));
            }
        } else if root.is_none() {
            return Err(tls_config(if mode_name == "require" {
                "sslmode=require needs sslrootcert: without it the server's certificate \
                 would not be verified (libpq's require accepts any certificate); name the \
                 CA with sslrootcert and use sslmode=verify-full"
                    .to_owned()
            } else {
                format!(
                    "sslmode={mode_name} needs sslrootcert (a PEM file of CA certificates, or \
                     `system`)"
                )
            }));
        }
        if root.as_deref() == Some("system") && parsed != TlsMode::VerifyFull {
            return Err(tls_config(format!(
                "sslrootcert=system needs sslmode=verify-full (any holder of a public \
                 certificate could pose as the server otherwise), not {mode_name}"
            )));
        }
        if cert.is_some() != key.is_some() {
            return Err(tls_config(
                "sslcert and sslkey go together (a client certificate and its key)".into(),
            ));
        }
        Ok((
            rest,
            TlsOptions {
                mode: parsed,
                mode_name,
                root,
                cert,
                key,
            },
        ))
    }

    fn ssl_mode(&self) -> SslMode {
        match self.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        }
    }

    /// The settings in force, for messages: no secret (paths and modes).
    fn describe(&self) -> String {
        match &self.root {
            None => format!("sslmode={}", self.mode_name),
            Some(root) => format!("sslmode={}, sslrootcert={root}", self.mode_name),
        }
    }

    /// The rustls configuration: the roots, the verifier the mode asks for,
    /// the client certificate. Files are read now.
    fn client_config(&self) -> Result<rustls::ClientConfig, KeyStoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| KeyStoreError::Tls(format!("TLS configuration: {e}")))?;
        let roots = match self.root.as_deref() {
            None => RootCertStore::empty(),
            Some("system") => system_roots()?,
            Some(path) => pem_roots(path)?,
        };
        let builder = match self.mode {
            // No TLS is attempted in this mode; the configuration is unused.
            TlsMode::Disable | TlsMode::VerifyFull => builder.with_root_certificates(roots),
            TlsMode::VerifyCa => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier {
                    roots: Arc::new(roots),
                    provider,
                })),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| tls_config(format!("sslcert {cert}: {e}")))?;
                if chain.is_empty() {
                    return Err(tls_config(format!("sslcert {cert} holds no certificate")));
                }
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_config(format!("sslkey {key}: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| tls_config(format!("sslcert/sslkey: {e}")))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn pem_roots(path: &str) -> Result<RootCertStore, KeyStoreError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_config(format!("sslrootcert {path}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| tls_config(format!("sslrootcert {path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| tls_config(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(tls_config(format!(
            "sslrootcert {path} holds no certificate"
        )));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, KeyStoreError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(tls_config(format!(
            "sslrootcert=system: no usable certificate among the system's roots ({} errors)",
            found.errors.len()
        )));
    }
    Ok(roots)
}

/// `verify-ca`: the server's chain must lead to one of the roots, with
/// valid signatures and dates and the server-authentication usage; its
/// name is not checked (libpq's verify-ca).
#[derive(Debug)]
struct ChainOnlyVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A URL's query without the TLS options, and those options (decoded).
type Split = (String, Vec<(String, String)>);

fn split_url(url: &str) -> Result<Split, KeyStoreError> {
    let Some(q) = url.find('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let (head, query) = url.split_at(q);
    let query = &query[1..];
    let (query, fragment) = match query.find('#') {
        Some(h) => query.split_at(h),
        None => (query, ""),
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        if TLS_KEYS.contains(&k.as_str()) {
            taken.push((k, percent_decode(v)?));
        } else {
            kept.push(pair);
        }
    }
    let mut rest = head.to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    rest.push_str(fragment);
    Ok((rest, taken))
}

fn percent_decode(s: &str) -> Result<String, KeyStoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| tls_config("a bad %-escape in the URL's query".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| tls_config("a %-escape that is not UTF-8".into()))
}

/// A libpq `key=value` string without the TLS settings, and those settings.
/// Values are bare words or single-quoted (`\'` and `\\` escapes), with
/// optional spaces around `=`, as libpq parses them.
fn split_key_value(s: &str) -> Result<Split, KeyStoreError> {
    let b = s.as_bytes();
    let mut rest = String::with_capacity(s.len());
    let mut taken = Vec::new();
    let mut kept_from = 0;
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        let start = skip_ws(i);
        if start == b.len() {
            break;
        }
        let mut j = start;
        while j < b.len() && b[j] != b'=' && !b[j].is_ascii_whitespace() {
            j += 1;
        }
        let key = &s[start..j];
        j = skip_ws(j);
        if b.get(j) != Some(&b'=') {
            // tokio-postgres reports the malformed string itself.
            return Ok((s.to_owned(), taken));
        }
        j = skip_ws(j + 1);
        let mut value = Vec::new();
        if b.get(j) == Some(&b'\'') {
            j += 1;
            loop {
                match b.get(j) {
                    None => return Ok((s.to_owned(), taken)),
                    Some(b'\'') => {
                        j += 1;
                        break;
                    }
                    Some(b'\\') if j + 1 < b.len() => {
                        value.push(b[j + 1]);
                        j += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        j += 1;
                    }
                }
            }
        } else {
            while j < b.len() && !b[j].is_ascii_whitespace() {
                if b[j] == b'\\' && j + 1 < b.len() {
                    j += 1;
                }
                value.push(b[j]);
                j += 1;
            }
        }
        if TLS_KEYS.contains(&key) {
            rest.push_str(&s[kept_from..start]);
            kept_from = j;
            let value =
                String::from_utf8(value).map_err(|_| tls_config(format!("{key} is not UTF-8")))?;
            taken.push((key.to_owned(), value));
        }
        i = j;
    }
    rest.push_str(&s[kept_from..]);
    Ok((rest, taken))
}

impl PostgresKeyStore {
    /// Connects with a libpq-style URL or key=value string (e.g.
    /// `postgresql://app@db.internal:5432/payments?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem`;
    /// the TLS options are under "TLS" in [`PostgresKeyStore`]), keeping up
    /// to `pool_size` connections, and applies pending schema migrations.
    ///
    /// # Errors
    ///
    /// An unusable URL, an unreachable server (retryable), a refused TLS
    /// connection ([`KeyStoreError::Tls`]), or a failed migration.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, KeyStoreError> {
        let store = Self::new(url, pool_size)?;
        store.ready().await?;
        Ok(store)
    }

    /// Like [`PostgresKeyStore::connect`] without touching the server:
    /// connections are opened and migrations applied at first use (so it can
    /// be built outside an async context).
    ///
    /// # Errors
    ///
    /// An unusable URL; TLS options that are refused or name a certificate
    /// file that cannot be read ([`KeyStoreError::Tls`]).
    pub fn new(url: &str, pool_size: usize) -> Result<Self, KeyStoreError> {
        let (rest, options) = TlsOptions::split(url)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| KeyStoreError::Backend(format!("PostgreSQL connection string: {e}")))?;
        config.ssl_mode(options.ssl_mode());
        let tls = options.describe();
        if options.mode == TlsMode::Disable {
            check_plain_hosts(&config, &tls)?;
        }
        let connector = MakeRustlsConnect::new(options.client_config()?);
        let manager = Manager::from_config(
            config,
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(backend)?;
        Ok(PostgresKeyStore {
            pool,
            migrated: std::sync::Arc::new(tokio::sync::OnceCell::new()),
            tls: tls.into(),
        })
    }

    /// Applies pending migrations once per store; every operation waits
    /// for it.
    async fn ready(&self) -> Result<(), KeyStoreError> {
        self.migrated
            .get_or_try_init(|| self.migrate())
            .await
            .map(|_| ())
    }

    pub(crate) async fn ready_public(&self) -> Result<(), KeyStoreError> {
        self.ready().await
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, KeyStoreError> {
        self.ready().await?;
        self.pool.get().await.map_err(|e| pool_err(e, &self.tls))
    }

    /// The connection pool, for tools that work on application tables in
    /// the same database.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The schema version now in the database.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn schema_version(&self) -> Result<i32, KeyStoreError> {
        let c = self.conn().await?;
        let row = c
            .query_one("SELECT coalesce(max(version), 0) FROM panseal_schema", &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    async fn migrate(&self) -> Result<(), KeyStoreError> {
        let mut c = self.pool.get().await.map_err(|e| pool_err(e, &self.tls))?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS panseal_schema (
                 version int PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db)?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM panseal_schema", &[])
            .await
            .map_err(db)?
            .get(0);
        if current as usize > MIGRATIONS.len() {
            return Err(KeyStoreError::Backend(format!(
                "database schema version {current} is newer than this library ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i as i32 + 1;
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO panseal_schema (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// Registers a column of `table` that holds sealed PANs (text or binary
    /// form), or blind-index values with their index-key version in
    /// `version_column`, for the [`Inventory`].
    ///
    /// # Errors
    ///
    /// An identifier that is not a plain lower-case SQL name, or database
    /// errors.
    pub async fn register_column(&self, column: RegisteredColumn) -> Result<(), KeyStoreError> {
        let (table, name, kind, version) = match &column {
            RegisteredColumn::SealedText { table, column } => (table, column, "sealed-text", None),
            RegisteredColumn::SealedBinary { table, column } => {
                (table, column, "sealed-binary", None)
            }
            RegisteredColumn::BlindIndex {
                table,
                column,
                version_column,
            } => (table, column, "index", Some(version_column)),
        };
        for ident in [Some(table), Some(name), version].into_iter().flatten() {
            check_ident(ident)?;
        }
        let c = self.conn().await?;
        c.execute(
            "INSERT INTO panseal_columns (table_name, column_name, kind, version_column)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (table_name, column_name) DO UPDATE
               SET kind = EXCLUDED.kind, version_column = EXCLUDED.version_column",
            &[table, name, &kind, &version],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The key inventory: every record with the number of stored fields
    /// that still reference it in the registered columns.
    ///
    /// # Errors
    ///
    /// Database errors (including a registered column that no longer exists).
    pub async fn inventory(&self) -> Result<Inventory, KeyStoreError> {
        let records = self.list(None).await?;
        let c = self.conn().await?;
        let columns = c
            .query(
                "SELECT table_name, column_name, kind, version_column FROM panseal_columns
                 ORDER BY table_name, column_name",
                &[],
            )
            .await
            .map_err(db)?;
        let mut data_refs: BTreeMap<KeyId, u64> = BTreeMap::new();
        let mut index_refs: BTreeMap<u32, u64> = BTreeMap::new();
        let mut registered = Vec::new();
        for row in columns {
            let table: String = row.get(0);
            let column: String = row.get(1);
            let kind: String = row.get(2);
            let version_column: Option<String> = row.get(3);
            check_ident(&table)?;
            check_ident(&column)?;
            // Identifiers are validated above and quoted here.
            let sql = match kind.as_str() {
                "sealed-binary" => format!(
                    "SELECT substring(\"{column}\" FROM 3 FOR 8), count(*) FROM \"{table}\"
                     WHERE \"{column}\" IS NOT NULL GROUP BY 1"
                ),
                "sealed-text" => format!(
                    "SELECT substring(decode(translate(substr(\"{column}\", 3), '-_', '+/') || '==',
                                            'base64') FROM 1 FOR 8), count(*)
                     FROM \"{table}\" WHERE \"{column}\" LIKE 'P1%' AND length(\"{column}\") = 64
                     GROUP BY 1"
                ),
                _ => {
                    let v = version_column.clone().unwrap_or_default();
                    check_ident(&v)?;
                    format!(
                        "SELECT \"{v}\"::bigint, count(*) FROM \"{table}\"
                         WHERE \"{column}\" IS NOT NULL GROUP BY 1"
                    )
                }
            };
            let rows = c.query(sql.as_str(), &[]).await.map_err(db)?;
            for r in rows {
                let count: i64 = r.get(1);
                if kind == "index" {
                    let v: i64 = r.get(0);
                    *index_refs.entry(v as u32).or_default() += count as u64;
                } else {
                    let id: Vec<u8> = r.get(0);
                    if let Ok(id) = <[u8; 8]>::try_from(id.as_slice()) {
                        *data_refs.entry(KeyId::from_bytes(id)).or_default() += count as u64;
                    }
                }
            }
            registered.push(format!("{table}.{column} ({kind})"));
        }
        let keys = records
            .into_iter()
            .map(|r| {
                let references = match r.purpose {
                    crate::keys::KeyPurpose::Data => data_refs.get(&r.id).copied().unwrap_or(0),
                    crate::keys::KeyPurpose::Index => {
                        index_refs.get(&r.version).copied().unwrap_or(0)
                    }
                };
                InventoryEntry::new(&r, references)
            })
            .collect();
        Ok(Inventory {
            columns: registered,
            keys,
            index_references: index_refs,
        })
    }
}

/// A column the application registers with the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisteredColumn {
    /// Sealed PANs in the 64-character text form.
    SealedText {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
    },
    /// Sealed PANs in the 48-byte binary form.
    SealedBinary {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
    },
    /// Blind-index values, with the index-key version in another column.
    BlindIndex {
        /// Table name.
        table: String,
        /// Column with the index value.
        column: String,
        /// Column with the index-key version.
        version_column: String,
    },
}

/// The key inventory (PCI DSS 3.6.1.1).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Inventory {
    /// The registered columns that were counted.
    pub columns: Vec<String>,
    /// Every key record (DEKs, and legacy in-database index keys).
    pub keys: Vec<InventoryEntry>,
    /// Stored blind-index values per index-key version, over the
    /// registered index columns. Index keys live in the key service (its
    /// `index_keys` lists them), not in the key store; a version whose
    /// count reaches zero after the re-index job can be destroyed there.
    pub index_references: BTreeMap<u32, u64>,
}

/// One key in the inventory. No key material.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct InventoryEntry {
    /// Key id.
    pub id: KeyId,
    /// `data` or `index`.
    pub purpose: crate::keys::KeyPurpose,
    /// Index-key version (0 for DEKs).
    pub version: u32,
    /// Scope.
    pub scope: String,
    /// Environment.
    pub environment: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// Algorithm.
    pub algorithm: &'static str,
    /// Strength in bits.
    pub strength_bits: u32,
    /// KEK and version that wrap it.
    pub kek: String,
    /// Created, Unix seconds.
    pub created_at: u64,
    /// End of the encrypt period, Unix seconds.
    pub encrypt_until: u64,
    /// End of the decrypt period, Unix seconds.
    pub decrypt_until: u64,
    /// Seals reported.
    pub uses: u64,
    /// Seal budget.
    pub max_uses: u64,
    /// Stored fields that still reference it (registered columns only).
    pub references: u64,
}

impl InventoryEntry {
    fn new(r: &WrappedDek, references: u64) -> Self {
        InventoryEntry {
            id: r.id,
            purpose: r.purpose,
            version: r.version,
            scope: r.scope.to_string(),
            environment: r.environment.to_string(),
            state: r.state,
            algorithm: match r.purpose {
                crate::keys::KeyPurpose::Data => "AES-256-GCM",
                crate::keys::KeyPurpose::Index => "HMAC-SHA-256",
            },
            strength_bits: crate::keys::DEK_STRENGTH_BITS,
            kek: r.wrapped.kek.to_string(),
            created_at: r.created_at,
            encrypt_until: r.encrypt_until,
            decrypt_until: r.decrypt_until,
            uses: r.uses,
            max_uses: r.max_uses,
            references,
        }
    }
}

/// Plain lower-case SQL identifiers only: `[a-z_][a-z0-9_]{0,62}`.
pub(crate) fn check_ident(s: &str) -> Result<(), KeyStoreError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::Backend(format!(
            "{s:?} is not a plain lower-case SQL identifier"
        )))
    }
}

fn decode_row(bytes: Vec<u8>) -> Result<WrappedDek, KeyStoreError> {
    WrappedDek::from_bytes(&bytes).map_err(|e| KeyStoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn insert(&self, record: &WrappedDek) -> Result<(), KeyStoreError> {
        let c = self.conn().await?;
        let n = c
            .execute(
                "INSERT INTO panseal_keys (id, scope, purpose, state, kek_id, kek_version, record)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    &record.id.as_bytes().as_slice(),
                    &record.scope.as_str(),
                    &i16::from(record.purpose as u8),
                    &i16::from(record.state as u8),
                    &record.wrapped.kek.id,
                    &i64::from(record.wrapped.kek.version),
                    &record.to_bytes(),
                ],
            )
            .await
            .map_err(db)?;
        if n == 0 {
            return Err(KeyStoreError::Duplicate(record.id));
        }
        Ok(())
    }

    async fn fetch(&self, id: KeyId) -> Result<Option<WrappedDek>, KeyStoreError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(
                "SELECT record FROM panseal_keys WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode_row(r.get(0))).transpose()
    }

    async fn list(&self, scope: Option<&Scope>) -> Result<Vec<WrappedDek>, KeyStoreError> {
        let c = self.conn().await?;
        let rows = match scope {
            Some(s) => c
                .query(
                    "SELECT record FROM panseal_keys WHERE scope = $1 ORDER BY id",
                    &[&s.as_str()],
                )
                .await
                .map_err(db)?,
            None => c
                .query("SELECT record FROM panseal_keys ORDER BY id", &[])
                .await
                .map_err(db)?,
        };
        rows.into_iter().map(|r| decode_row(r.get(0))).collect()
    }

    async fn update(&self, previous: &WrappedDek, next: &WrappedDek) -> Result<(), KeyStoreError> {
        if previous.id != next.id {
            return Err(KeyStoreError::Backend(
                "an update must keep the record's id".into(),
            ));
        }
        let c = self.conn().await?;
        // One statement: the row changes only if it still holds exactly
        // `previous` (compare-and-swap; no lock held across round trips).
        let n = c
            .execute(
                "UPDATE panseal_keys SET state = $2, kek_id = $3, kek_version = $4, record = $5,
                     updated_at = now() WHERE id = $1 AND record = $6",
                &[
                    &next.id.as_bytes().as_slice(),
                    &i16::from(next.state as u8),
                    &next.wrapped.kek.id,
                    &i64::from(next.wrapped.kek.version),
                    &next.to_bytes(),
                    &previous.to_bytes(),
                ],
            )
            .await
            .map_err(db)?;
        if n == 1 {
            return Ok(());
        }
        // Back to the pool first: with a pool of one, `fetch` would wait
        // for this connection forever.
        drop(c);
        match self.fetch(next.id).await? {
            None => Err(KeyStoreError::NotFound(next.id)),
            Some(_) => Err(KeyStoreError::Conflict),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> Result<(String, TlsOptions), String> {
        TlsOptions::split(url).map_err(|e| e.to_string())
    }

    #[test]
    fn plain_tcp_only_to_this_machine() {
        let plain = |url: &str| {
            let config: tokio_postgres::Config = url.parse().unwrap();
            check_plain_hosts(&config, "sslmode=disable")
        };
        for ok in [
            "postgresql://app:pw@127.0.0.1:5432/payments",
            "postgresql://app@localhost/payments",
            "postgresql://app@[::1]:5432/payments",
            "host=/var/run/postgresql user=app dbname=payments",
            "user=app dbname=payments",
            "host=db.internal hostaddr=127.0.0.1 user=app",
        ] {
            assert!(plain(ok).is_ok(), "{ok}");
        }
        for remote in [
            "postgresql://app:pw-example-1@db.internal:5432/payments",
            "postgresql://app@10.0.0.7/payments",
            "host=localhost hostaddr=10.0.0.7 user=app",
            "host=127.0.0.1,db.internal user=app",
        ] {
            let e = plain(remote).unwrap_err().to_string();
            assert!(e.contains("plain TCP") && e.contains("verify-full"), "{e}");
            assert!(!e.contains("pw-example-1"), "{e}");
        }
        // Through the store's constructor: refused before any connection,
        // with or without an explicit `sslmode=disable`.
        for url in [
            "postgresql://app@db.internal/payments",
            "postgresql://app@db.internal/payments?sslmode=disable",
        ] {
            assert!(matches!(
                PostgresKeyStore::new(url, 1).err(),
                Some(KeyStoreError::Tls(_))
            ));
        }
    }

    #[test]
    fn tls_options_are_taken_out_of_a_url() {
        let (rest, o) = split(
            "postgresql://app:pw@db.internal:5433/payments?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fssl%2Fpg-ca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://app:pw@db.internal:5433/payments?application_name=x&connect_timeout=5"
        );
        assert_eq!(o.mode, TlsMode::VerifyFull);
        assert_eq!(o.root.as_deref(), Some("/etc/ssl/pg-ca.pem"));
        let (rest, o) =
            split("postgresql://app@h/db?sslmode=verify-ca&sslrootcert=ca.pem").unwrap();
        assert_eq!(rest, "postgresql://app@h/db");
        assert_eq!(o.mode, TlsMode::VerifyCa);
        let (rest, o) = split("postgresql://app@h/db").unwrap();
        assert_eq!(
            (rest.as_str(), o.mode),
            ("postgresql://app@h/db", TlsMode::Disable)
        );
        assert_eq!(o.ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn tls_options_are_taken_out_of_key_value_settings() {
        let (rest, o) = split(
            "host=db user=app sslmode = verify-full password='a b\\'c' \
             sslrootcert='/etc/my ca.pem' sslcert=c.pem sslkey=k\\ ey.pem dbname=pay",
        )
        .unwrap();
        // The TLS settings are cut out; the rest is left byte for byte.
        assert_eq!(rest, "host=db user=app  password='a b\\'c'    dbname=pay");
        assert_eq!(o.mode, TlsMode::VerifyFull);
        assert_eq!(o.root.as_deref(), Some("/etc/my ca.pem"));
        assert_eq!(o.cert.as_deref(), Some("c.pem"));
        assert_eq!(o.key.as_deref(), Some("k ey.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn weak_or_incomplete_tls_options_are_refused() {
        for (url, says) in [
            (
                "postgresql://h/db?sslmode=prefer",
                "falls back to plain TCP",
            ),
            ("host=h sslmode=allow", "falls back to plain TCP"),
            ("postgresql://h/db?sslmode=require", "needs sslrootcert"),
            ("postgresql://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgresql://h/db?sslmode=verify-ca", "needs sslrootcert"),
            ("postgresql://h/db?sslmode=Verify-Full", "unknown sslmode"),
            ("postgresql://h/db?sslrootcert=ca.pem", "plain TCP"),
            ("host=h sslmode=disable sslcert=c.pem", "plain TCP"),
            (
                "postgresql://h/db?sslmode=verify-ca&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "postgresql://h/db?sslmode=verify-full&sslrootcert=ca.pem&sslcert=c.pem",
                "go together",
            ),
        ] {
            let e = split(url).expect_err(url);
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn an_unreadable_root_file_is_a_tls_error_without_the_password() {
        let e = PostgresKeyStore::new(
            "postgresql://app:Hunter2pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            1,
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, KeyStoreError::Tls(_)), "{e:?}");
        assert!(text.contains("sslrootcert /nonexistent/ca.pem"), "{text}");
        assert!(!text.contains("Hunter2pw"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = PostgresKeyStore::new(
            &format!(
                "host=h password=Hunter2pw sslmode=verify-full sslrootcert={}",
                empty.display()
            ),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        assert!(!e.to_string().contains("Hunter2pw"));
    }
}
