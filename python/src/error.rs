//! panseal errors as Python exceptions: one class per kind, all
//! subclasses of `panseal.PansealError` (defined in
//! `python/panseal/errors.py`), each with the C ABI's result code.

use panseal::{ConfigError, Error, FormatError, KeyError, KeyServiceError};
use pyo3::prelude::*;

/// The kind of a failure; the value is the C ABI's `panseal_result` code,
/// so `PansealError.code` means the same in C and in Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    InvalidArgument = 2,
    InvalidPan = 3,
    InvalidContext = 4,
    MalformedCiphertext = 5,
    DecryptionFailed = 6,
    KeyRefused = 7,
    KeyDestroyed = 8,
    KeyServiceUnavailable = 9,
    KeyServiceRefused = 10,
    KeyStoreError = 11,
    AuditError = 12,
    ConfigError = 13,
    BufferTooSmall = 14,
    ClientClosed = 16,
    MalformedPublicKey = 17,
    InvalidPublicKey = 18,
    PublicKeyNotPinned = 19,
}

/// A failure on its way to Python: a kind and a message that never
/// contains a PAN (the library's messages never do; ours name only what
/// was wrong, never the value).
#[derive(Debug)]
pub(crate) struct Failure {
    kind: Kind,
    message: String,
}

impl Failure {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Pan(_) => Kind::InvalidPan,
            Error::Context(_) => Kind::InvalidContext,
            Error::Format(_) => Kind::MalformedCiphertext,
            Error::Decryption => Kind::DecryptionFailed,
            Error::Key(KeyError::Destroyed(_)) => Kind::KeyDestroyed,
            Error::Key(_) => Kind::KeyRefused,
            Error::KeyService(k) if k.is_retryable() => Kind::KeyServiceUnavailable,
            Error::KeyService(KeyServiceError::KekDestroyed(_)) => Kind::KeyDestroyed,
            Error::KeyService(_) => Kind::KeyServiceRefused,
            Error::KeyStore(_) => Kind::KeyStoreError,
            Error::Audit(_) | Error::Config(ConfigError::NoAuditSink) => Kind::AuditError,
            Error::Config(_) => Kind::ConfigError,
            // `Error` is non-exhaustive; a kind added later is refused, with
            // its message, until it gets a class of its own (as in the C ABI).
            _ => Kind::KeyRefused,
        };
        Failure::new(kind, e.to_string())
    }
}

/// An error of the ingest public key's text or point.
pub(crate) fn public_key_failure(e: Error) -> Failure {
    match e {
        Error::Format(FormatError::PublicKey) => Failure::new(
            Kind::InvalidPublicKey,
            "ingest public key is not a point on P-256",
        ),
        other => Failure::new(
            Kind::MalformedPublicKey,
            format!("ingest public key text is malformed: {other}"),
        ),
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        Python::attach(|py| {
            let made = py
                .import("panseal.errors")
                .and_then(|m| m.getattr("_from_code"))
                .and_then(|make| make.call1((f.kind as u32, f.message.as_str())));
            match made {
                Ok(value) => PyErr::from_value(value),
                // The package's Python half is missing (the extension
                // imported on its own): still a typed, PAN-free error.
                Err(e) => e,
            }
        })
    }
}

/// What every fallible call returns.
pub(crate) type Outcome<T> = Result<T, Failure>;
