//! `IngestSealer`: write-only ingest with a scope's ingest public key.

use std::sync::{Arc, RwLock};

use panseal::{IngestPublicKey, IngestSealed};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

use crate::client::{byte_arg, context_arg};
use crate::error::{public_key_failure, Failure, Kind, Outcome};
use crate::pan::pan_arg;

/// Write-only ingest: seals PANs with a scope's ingest public key (its
/// text form, `PIK1/<environment>/<scope>/<version>/<base64url point>`)
/// and holds nothing else: no key service, no credential, nothing that
/// opens a PAN. Only the key service holding the private key opens or
/// admits what it seals.
///
/// `fingerprint` (64 hex digits, SHA-256 of the public point), if given,
/// pins the key: a substituted public key raises `PublicKeyNotPinned`. A
/// public key that is not a point on P-256 raises `InvalidPublicKey`;
/// malformed text, `MalformedPublicKey`.
///
/// Thread-safe: share one between threads; calls release the GIL.
/// `close()` refuses later calls with `ClientClosed`. Holds no secret, so
/// it may also be used after `os.fork()`.
#[pyclass(module = "panseal", frozen)]
pub(crate) struct IngestSealer {
    sealer: RwLock<Option<Arc<panseal::IngestSealer>>>,
}

impl IngestSealer {
    fn sealer(&self) -> Outcome<Arc<panseal::IngestSealer>> {
        self.sealer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Failure::new(Kind::ClientClosed, "sealer is closed"))
    }

    fn seal_with(
        &self,
        py: Python<'_>,
        pan: &Bound<'_, PyAny>,
        table: &Bound<'_, PyAny>,
        column: &Bound<'_, PyAny>,
        row_key: &Bound<'_, PyAny>,
    ) -> PyResult<IngestSealed> {
        let sealer = self.sealer()?;
        let pan = pan_arg(pan)?;
        let ctx = context_arg(table, column, row_key)?;
        Ok(py.detach(|| pan.with(|p| Ok(sealer.seal(p, &ctx)?)))?)
    }
}

fn parse_public_key(text: &[u8]) -> Outcome<IngestPublicKey> {
    let text = std::str::from_utf8(text).map_err(|_| {
        Failure::new(
            Kind::MalformedPublicKey,
            "ingest public key text is malformed: not UTF-8",
        )
    })?;
    IngestPublicKey::from_text(text).map_err(public_key_failure)
}

#[pymethods]
impl IngestSealer {
    #[new]
    #[pyo3(signature = (public_key, fingerprint = None))]
    fn new(
        public_key: &Bound<'_, PyAny>,
        fingerprint: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let text = byte_arg(public_key, "public key")?;
        let key = match fingerprint {
            None => parse_public_key(&text)?,
            Some(pin) => {
                let pin = byte_arg(pin, "fingerprint")?;
                let mut pinned = [0u8; 32];
                hex::decode_to_slice(&pin, &mut pinned).map_err(|_| {
                    Failure::new(Kind::InvalidArgument, "fingerprint is not 64 hex digits")
                })?;
                let key = parse_public_key(&text)?;
                let actual = sha2::Sha256::digest(key.as_bytes());
                if !bool::from(actual.as_slice().ct_eq(&pinned)) {
                    return Err(Failure::new(
                        Kind::PublicKeyNotPinned,
                        "ingest public key does not match the pinned fingerprint",
                    )
                    .into());
                }
                key
            }
        };
        Ok(IngestSealer {
            sealer: RwLock::new(Some(Arc::new(panseal::IngestSealer::new(key)))),
        })
    }

    /// SHA-256 of the public point, 64 lowercase hex digits: what a
    /// deployment pins.
    #[getter]
    fn fingerprint(&self) -> PyResult<String> {
        Ok(self.sealer()?.public_key().fingerprint())
    }

    /// Seals a PAN bound to (table, column, row_key); returns the
    /// 134-character text form (`I1...`).
    fn seal(
        &self,
        py: Python<'_>,
        pan: &Bound<'_, PyAny>,
        table: &Bound<'_, PyAny>,
        column: &Bound<'_, PyAny>,
        row_key: &Bound<'_, PyAny>,
    ) -> PyResult<String> {
        Ok(self.seal_with(py, pan, table, column, row_key)?.to_text())
    }

    /// Seals a PAN; returns the 101-byte binary form.
    fn seal_binary<'py>(
        &self,
        py: Python<'py>,
        pan: &Bound<'py, PyAny>,
        table: &Bound<'py, PyAny>,
        column: &Bound<'py, PyAny>,
        row_key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let sealed = self.seal_with(py, pan, table, column, row_key)?;
        Ok(PyBytes::new(py, sealed.as_bytes()))
    }

    /// Refuses later calls (idempotent; calls already running finish).
    fn close(&self) {
        *self.sealer.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }
}
