//! The crate's one error type and its parts.
//!
//! No message here ever contains a PAN, a CVV or key material. Every
//! authentication failure — wrong key, wrong context, flipped bit — is the
//! one opaque [`Error::Decryption`]; errors that describe misuse, configuration
//! or transport carry detail and say whether a retry can help
//! ([`Error::is_retryable`]).

use crate::ids::{KeyId, KeyState};

/// Everything that can go wrong in panseal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is not an acceptable PAN.
    #[error("invalid PAN: {0}")]
    Pan(#[from] PanError),
    /// The context (table, column, row key) is not acceptable.
    #[error("invalid context: {0}")]
    Context(#[from] ContextError),
    /// The ciphertext is malformed (wrong length, unknown version, bad text).
    #[error("malformed ciphertext: {0}")]
    Format(#[from] FormatError),
    /// Authentication failed: the ciphertext was altered, moved to another
    /// context, or sealed under another key. Deliberately without detail.
    #[error("decryption failed")]
    Decryption,
    /// The key the ciphertext names cannot be used.
    #[error("key error: {0}")]
    Key(#[from] KeyError),
    /// The key service failed or refused.
    #[error("key service: {0}")]
    KeyService(#[from] KeyServiceError),
    /// The key store failed.
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
    /// The audit sink failed; the operation was not performed (fail closed).
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
}

impl Error {
    /// Whether repeating the same call later may succeed (a transient key
    /// service or key store failure). Authentication, format and policy errors
    /// are never retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::KeyService(e) => e.is_retryable(),
            Error::KeyStore(e) => matches!(e, KeyStoreError::Io(_) | KeyStoreError::Conflict),
            _ => false,
        }
    }
}

/// Why a string is not an acceptable PAN. Never contains the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PanError {
    /// No digits at all.
    #[error("no digits")]
    Empty,
    /// A character other than a digit, space or dash.
    #[error("character at position {position} is not a digit, space or dash")]
    InvalidCharacter {
        /// Zero-based character position.
        position: usize,
    },
    /// A space or dash that is not between two digits: leading, trailing,
    /// or next to another separator.
    #[error("separator at position {position} is not between two digits")]
    MisplacedSeparator {
        /// Zero-based character position.
        position: usize,
    },
    /// Fewer digits than the configured minimum.
    #[error("{digits} digits; at least {min} required")]
    TooShort {
        /// Digits found.
        digits: usize,
        /// Minimum accepted.
        min: usize,
    },
    /// More than 19 digits.
    #[error("{digits} digits; at most {max} allowed")]
    TooLong {
        /// Digits found.
        digits: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// The Luhn check digit does not match.
    #[error("Luhn check failed")]
    Luhn,
    /// The input looks like magnetic-stripe track data, which must never be
    /// stored (PCI DSS 3.3.1.1).
    #[error("input looks like magnetic-stripe track data; refused")]
    TrackData,
    /// A card verification code must be 3 or 4 digits.
    #[error("card verification code must be 3 or 4 digits")]
    InvalidCvv,
    /// A parsing rule outside what ISO/IEC 7812 allows.
    #[error("minimum PAN length must be between 8 and 19")]
    InvalidRule,
}

/// Why a context cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A part (table, column or row key) is empty.
    #[error("context {0} is empty")]
    Empty(&'static str),
    /// A part is longer than allowed.
    #[error("context {part} is {len} bytes; at most {max}")]
    TooLong {
        /// Which part.
        part: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why bytes or text are not a well-formed ciphertext. Structural only: these
/// are decided before any key is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Input is empty.
    #[error("empty input")]
    Empty,
    /// The version byte (or text prefix) is not one this library reads.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// The algorithm byte is not defined for this version.
    #[error("unknown algorithm {0} for this version")]
    UnknownAlgorithm(u8),
    /// Wrong total length for the version.
    #[error("length {actual} bytes; version requires {expected}")]
    Length {
        /// Required length.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// The text form has a wrong prefix, length or alphabet.
    #[error("text form is not valid")]
    Text,
    /// The decrypted payload is not a packed PAN (only possible if the
    /// ciphertext was made with the right key by something other than a
    /// conforming writer).
    #[error("decrypted payload is not a packed PAN")]
    Payload,
    /// A key-store record is malformed.
    #[error("key-store record: {0}")]
    Record(&'static str),
    /// Not an ingest public key: wrong length, compressed, or not a point
    /// on P-256 (or a private scalar out of range).
    #[error("not a valid P-256 ingest key")]
    PublicKey,
}

/// Problems with the key a ciphertext or operation names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No record with this id in the key store.
    #[error("unknown key id {0}")]
    UnknownKey(KeyId),
    /// The key was destroyed: everything it protected is unrecoverable.
    #[error("key {0} destroyed")]
    Destroyed(KeyId),
    /// The key's recipient-usage period ended; it may no longer decrypt.
    #[error("key {0} is past its decrypt-until date")]
    Expired(KeyId),
    /// The key is marked compromised (PCI DSS 3.7.5): data under it opens
    /// only on the re-encryption path ([`crate::Panseal::reseal`], used by
    /// [`crate::reencrypt`] jobs), which seals the PAN again under the
    /// active key at once and never hands it out; every other open is
    /// refused.
    #[error("key {0} is compromised: it opens only to be re-sealed (reseal / reencrypt)")]
    Compromised(KeyId),
    /// The key is in a state that forbids this operation.
    #[error("key {id} is {state:?}; operation not allowed")]
    State {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
    },
    /// The key belongs to another environment (e.g. prod vs test).
    #[error("key {id} belongs to environment {key_env:?}, not {our_env:?}")]
    Environment {
        /// The key.
        id: KeyId,
        /// The key's environment tag.
        key_env: String,
        /// This client's environment tag.
        our_env: String,
    },
    /// The key belongs to another scope (tenant/merchant) than this handle.
    #[error("key {0} belongs to another scope")]
    Scope(KeyId),
    /// The key was made for another purpose (data vs blind index).
    #[error("key {0} has the wrong purpose for this operation")]
    Purpose(KeyId),
    /// The key's record failed the key service's authentication: a
    /// lifecycle field (state, dates, use count, version, purpose, wrapped
    /// key) was edited outside panseal. Never sealed with; opens refused.
    #[error("key record failed authentication (edited outside panseal): {0}")]
    RecordTampered(KeyId),
    /// The key's record is older than one the key service already saw for
    /// the same key (a rolled-back row). Never sealed with; opens refused.
    #[error("key record rolled back to an older version: {0}")]
    RecordStale(KeyId),
    /// The key's record is an unauthenticated version-1 record and the
    /// policy refuses those ([`crate::Policy::require_signed_records`]);
    /// run the upgrade step ([`crate::Panseal::upgrade_records`]).
    #[error("key record {0} is unsigned (version 1); run the record upgrade")]
    Untagged(KeyId),
    /// The scope has no blind-index key in the key service yet, and this
    /// credential may not create one: a custodian creates it
    /// ([`crate::Panseal::rotate_index_key`] or the key service's tools).
    #[error("scope {0} has no index key; a custodian must create one (rotate_index_key)")]
    NoIndexKey(String),
    /// An ingest ciphertext names another ingest key than the one asked
    /// to open it: another scope, environment or key pair.
    #[error("ingest ciphertext was sealed for another ingest key (scope or environment)")]
    IngestKeyMismatch,
    /// The ingest key version is not live in this scope (never created,
    /// or destroyed).
    #[error("unknown ingest key version {version} in scope {scope}")]
    UnknownIngestKey {
        /// The scope.
        scope: String,
        /// The version.
        version: u32,
    },
    /// The ingest key is retired: it still opens and admits, never seals.
    #[error("ingest key version {version} in scope {scope} is retired (opens, never seals)")]
    IngestKeyRetired {
        /// The scope.
        scope: String,
        /// The version.
        version: u32,
    },
}

/// Failures of a key service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyServiceError {
    /// The service cannot be reached or timed out; retry later.
    #[error("key service unavailable: {0}")]
    Unavailable(String),
    /// The service is sealed and serves nothing until unsealed.
    #[error("key service is sealed")]
    Sealed,
    /// This credential may not perform the operation.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A quota or rate limit was exceeded; retry after the window.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The named KEK (or version) does not exist.
    #[error("unknown KEK {0}")]
    UnknownKek(String),
    /// The KEK version was destroyed.
    #[error("KEK {0} destroyed")]
    KekDestroyed(String),
    /// The KEK version is disabled in its key service (a KMS key that is
    /// disabled, a PKCS#11 object with `CKA_DECRYPT` cleared): it neither
    /// wraps nor unwraps until a custodian enables it again.
    #[error("KEK {0} is disabled")]
    KekDisabled(String),
    /// The KEK version may only unwrap (retired), not wrap.
    #[error("KEK {0} is retired: decrypt only")]
    KekRetired(String),
    /// The KEK is weaker than the keys it would wrap (PCI DSS 3.6.1).
    #[error("KEK strength {kek_bits} bits is below DEK strength {dek_bits} bits")]
    WeakKek {
        /// KEK strength.
        kek_bits: u32,
        /// DEK strength.
        dek_bits: u32,
    },
    /// The request's environment does not match the service's.
    #[error("environment mismatch: key service is {service:?}, request is {request:?}")]
    Environment {
        /// The service's environment.
        service: String,
        /// The request's environment.
        request: String,
    },
    /// The wrapped key failed to authenticate: altered, swapped between
    /// records, or rolled back. No further detail.
    #[error("wrapped key failed to unwrap")]
    UnwrapFailed,
    /// The service does not offer this operation (e.g. `reveal` on a
    /// service that hands DEKs to its callers).
    #[error("key service does not support {0}")]
    Unsupported(&'static str),
    /// The index-key version is not live in this scope (never created,
    /// or destroyed).
    #[error("unknown index key version {version} in scope {scope}")]
    UnknownIndexKey {
        /// The scope.
        scope: String,
        /// The version asked for.
        version: u32,
    },
    /// One item of a batch was refused; nothing in the batch was computed.
    /// Names its position, never its content.
    #[error("batch item {index} refused: {reason}")]
    BatchItem {
        /// Position in the batch, from 0.
        index: usize,
        /// Why (no PAN digits).
        reason: String,
    },
    /// A key-store record's MAC does not verify: a lifecycle field (state,
    /// dates, use count, version, purpose) was edited outside the library.
    #[error("key record failed authentication (edited outside panseal): {0}")]
    RecordTampered(String),
    /// A key-store record is older than one the service has already signed
    /// for the same key (a rollback of the row).
    #[error("key record rolled back to an older version: {0}")]
    RecordStale(String),
    /// The change asked to sign is not one the key lifecycle allows
    /// (reactivation, an extended date, a lowered use count, a relabel).
    #[error("key record change refused: {0}")]
    RecordTransition(String),
    /// The ingest key version is not live in this scope (never created,
    /// or destroyed).
    #[error("unknown ingest key version {version} in scope {scope}")]
    UnknownIngestKey {
        /// The scope.
        scope: String,
        /// The version asked for.
        version: u32,
    },
    /// The service could not open the sealed record: altered, sealed under
    /// another key or bound to another context. No further detail.
    #[error("sealed record failed to open")]
    OpenFailed,
    /// Any other failure reported by the service.
    #[error("{0}")]
    Other(String),
}

impl KeyServiceError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KeyServiceError::Unavailable(_) | KeyServiceError::QuotaExceeded(_)
        )
    }
}

/// Failures of a key store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// Reading or writing the backing storage failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The stored data failed its integrity check or does not parse; it was
    /// left as it is (never truncated or rewritten).
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// A record with this id already exists.
    #[error("key id {0} already exists")]
    Duplicate(KeyId),
    /// No record with this id.
    #[error("no record {0}")]
    NotFound(KeyId),
    /// The lifecycle does not allow this state change (e.g. destroyed back to
    /// active).
    #[error("key {id}: transition {from:?} -> {to:?} not allowed")]
    Transition {
        /// The key.
        id: KeyId,
        /// Its current state.
        from: KeyState,
        /// The requested state.
        to: KeyState,
    },
    /// A concurrent change won; re-read and retry.
    #[error("concurrent modification")]
    Conflict,
    /// Backend-specific failure.
    #[error("{0}")]
    Backend(String),
    /// The TLS connection to the database was refused or cannot be set up:
    /// its certificate does not verify (another CA, a name that does not
    /// match), the server does not offer TLS where the connection string
    /// requires it, or the TLS options are refused or name a file that
    /// cannot be read. Retrying does not help: the configuration or the
    /// server must change. The message says which, and holds no password.
    #[error("{0}")]
    Tls(String),
}

/// Failures of an audit sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Writing the event failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The sink refused the event.
    #[error("{0}")]
    Rejected(String),
    /// A hash-chained audit log failed verification: the record at this
    /// 1-based position (line) is the first that was altered, removed,
    /// inserted or reordered.
    #[error("audit log fails verification at record {record}: {reason}")]
    Tampered {
        /// The first bad record, counted from 1.
        record: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Unusable configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required part was not given to the builder.
    #[error("missing {0}")]
    Missing(&'static str),
    /// Opening PANs requires an audit sink (PCI DSS 10.2.1); none configured.
    #[error("no audit sink configured: opening is refused (fail closed)")]
    NoAuditSink,
    /// A policy value is out of range.
    #[error("invalid policy: {0}")]
    Policy(String),
    /// A configuration document is malformed or names something unusable.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A scope or environment name is not acceptable.
    #[error("invalid name: {0}")]
    Name(String),
    /// A key-service client cannot be configured (address, certificates,
    /// TLS settings).
    #[error("key service client: {0}")]
    KeyServiceClient(String),
}

/// Why one item of an admission batch ([`crate::KeyService::admit`]) was
/// not admitted. The other items of the batch are unaffected; the stored
/// ingest ciphertext is left as it was. Never names a PAN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum AdmitItemError {
    /// Not a well-formed ingest ciphertext.
    #[error("not an ingest ciphertext")]
    Malformed,
    /// Sealed for another ingest key (another scope, environment or key
    /// pair).
    #[error("sealed for another ingest key")]
    KeyMismatch,
    /// The ingest key version is not live (never created, or destroyed).
    #[error("unknown ingest key version {0}")]
    UnknownIngestKey(u32),
    /// Altered, or bound to another context. No further detail.
    #[error("failed to open")]
    OpenFailed,
}
