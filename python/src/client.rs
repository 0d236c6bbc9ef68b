//! `Client`: a panseal client from a JSON configuration (the one the C
//! ABI takes), shared by threads; every call runs without the GIL.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, SealedPan};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyInt, PyString, PyTuple};
use pyo3::PyClassInitializer;

use crate::error::{Failure, Kind, Outcome};
use crate::pan::{pan_arg, Pan, RevealedPan};

/// A panseal client: seals, opens (audited), blind-indexes and rotates.
///
/// `Client(config)` takes the configuration as a `dict` or JSON text
/// (`environment`, `scope`, `key_service`, `key_store`, `audit`,
/// `policy`: the document of the C ABI and the README);
/// `Client.from_file(path)` reads it from a file. `key_service` is
/// `local`, `keyd`, `pkcs11` (PIN from `pin_file` or `pin_env`, never
/// inline) or `aws-kms` (credentials from the AWS standard chain): all in
/// the stock wheel. Raises `ConfigError` (or the key service's, key
/// store's error) if it cannot be used; no error repeats a PIN.
///
/// Thread-safe: share one client between threads. Every call releases the
/// GIL while it works. `close()` (also at the end of a `with` block)
/// refuses new calls at once with `ClientClosed`, waits for the calls
/// already running on other threads, then drops the client, whose keys
/// are wiped.
#[pyclass(module = "panseal", frozen)]
pub(crate) struct Client {
    state: Mutex<State>,
    idle: Condvar,
}

struct State {
    inner: Option<Arc<blocking::Panseal>>,
    in_flight: usize,
}

/// Holds the client for one call; the count goes down on drop, even if
/// the call panics.
struct Hold<'a> {
    client: &'a Client,
    inner: Arc<blocking::Panseal>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut state = self.client.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.client.idle.notify_all();
        }
    }
}

impl Client {
    fn from_config(
        py: Python<'_>,
        load: impl FnOnce() -> Outcome<ClientConfig> + Send,
    ) -> PyResult<Self> {
        let inner = py.detach(|| -> Outcome<blocking::Panseal> {
            Ok(blocking::Panseal::from_config(&load()?)?)
        })?;
        Ok(Client {
            state: Mutex::new(State {
                inner: Some(Arc::new(inner)),
                in_flight: 0,
            }),
            idle: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(&self) -> Outcome<Hold<'_>> {
        let mut state = self.lock();
        let inner = state
            .inner
            .clone()
            .ok_or_else(|| Failure::new(Kind::ClientClosed, "client is closed"))?;
        state.in_flight += 1;
        Ok(Hold {
            client: self,
            inner,
        })
    }

    /// Runs `f` on the client without the GIL.
    fn call<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&blocking::Panseal) -> Outcome<R> + Send,
    ) -> PyResult<R> {
        let hold = self.hold()?;
        Ok(py.detach(|| f(&hold.inner))?)
    }
}

/// A context part that must be text (table, column).
fn text_part(value: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    if let Ok(s) = value.cast::<PyString>() {
        return s.extract();
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        return match std::str::from_utf8(b.as_bytes()) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(Failure::new(
                Kind::InvalidArgument,
                format!("context {what} is not UTF-8"),
            )
            .into()),
        };
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "context {what}: expected str or bytes"
    )))
}

/// Bytes of a row key, ciphertext or key text: `bytes`, `bytearray`,
/// `str` (UTF-8) or `int` (its decimal digits).
pub(crate) fn byte_arg(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = value.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(s.extract::<String>()?.into_bytes());
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(value.str()?.extract::<String>()?.into_bytes());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "{what}: expected str, bytes, bytearray or int"
    )))
}

/// The context a field is bound to.
pub(crate) fn context_arg(
    table: &Bound<'_, PyAny>,
    column: &Bound<'_, PyAny>,
    row_key: &Bound<'_, PyAny>,
) -> PyResult<Context> {
    let table = text_part(table, "table")?;
    let column = text_part(column, "column")?;
    let row = byte_arg(row_key, "row key")?;
    Ok(Context::new(&table, &column, &row).map_err(|e| Failure::from(panseal::Error::from(e)))?)
}

fn sealed_arg(value: &Bound<'_, PyAny>) -> PyResult<SealedPan> {
    let bytes = byte_arg(value, "ciphertext")?;
    let parsed = match bytes.first() {
        Some(b'P') => match std::str::from_utf8(&bytes) {
            Ok(text) => SealedPan::from_text(text),
            Err(_) => {
                return Err(
                    Failure::new(Kind::MalformedCiphertext, "text form is not UTF-8").into(),
                )
            }
        },
        _ => SealedPan::from_bytes(&bytes),
    };
    Ok(parsed.map_err(Failure::from)?)
}

#[pymethods]
impl Client {
    #[new]
    fn new(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let text: String = if let Ok(s) = config.cast::<PyString>() {
            s.extract()?
        } else {
            py.import("json")?
                .call_method1("dumps", (config,))?
                .extract()?
        };
        Client::from_config(py, move || Ok(ClientConfig::from_json(&text)?))
    }

    /// A client from a JSON configuration file.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Client::from_config(py, move || Ok(ClientConfig::from_file(&path)?))
    }

    /// Seals a PAN (`Pan`, `str`, `bytes`, `int`) bound to (table, column,
    /// row_key); returns the 64-character text form (`P1...`).
    fn seal(
        &self,
        py: Python<'_>,
        pan: &Bound<'_, PyAny>,
        table: &Bound<'_, PyAny>,
        column: &Bound<'_, PyAny>,
        row_key: &Bound<'_, PyAny>,
    ) -> PyResult<String> {
        let pan = pan_arg(pan)?;
        let ctx = context_arg(table, column, row_key)?;
        self.call(py, |c| pan.with(|p| Ok(c.seal_pan(p, &ctx)?.to_text())))
    }

    /// Seals a PAN; returns the 48-byte binary form.
    fn seal_binary<'py>(
        &self,
        py: Python<'py>,
        pan: &Bound<'py, PyAny>,
        table: &Bound<'py, PyAny>,
        column: &Bound<'py, PyAny>,
        row_key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let pan = pan_arg(pan)?;
        let ctx = context_arg(table, column, row_key)?;
        let sealed = self.call(py, |c| pan.with(|p| Ok(c.seal_pan(p, &ctx)?)))?;
        Ok(PyBytes::new(py, sealed.as_bytes()))
    }

    /// Opens a sealed PAN (text or binary form) bound to (table, column,
    /// row_key), audited under `principal` and `purpose`; returns
    /// `(RevealedPan, needs_reseal)`. `needs_reseal` is `True` when the
    /// ciphertext's key is no longer the active one: seal it again.
    /// Wrong context, altered or foreign ciphertexts all raise
    /// `DecryptionFailed`, with no detail.
    #[allow(clippy::too_many_arguments)]
    fn open<'py>(
        &self,
        py: Python<'py>,
        sealed: &Bound<'py, PyAny>,
        table: &Bound<'py, PyAny>,
        column: &Bound<'py, PyAny>,
        row_key: &Bound<'py, PyAny>,
        principal: &str,
        purpose: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let sealed = sealed_arg(sealed)?;
        let ctx = context_arg(table, column, row_key)?;
        let access =
            Access::new(principal, purpose).map_err(|e| Failure::from(panseal::Error::from(e)))?;
        let opened = self.call(py, |c| Ok(c.open_pan(&sealed, &ctx, &access)?))?;
        let needs_reseal = opened.needs_reseal;
        let init = PyClassInitializer::from(Pan::from_pan(opened.pan)).add_subclass(RevealedPan);
        let revealed = Bound::new(py, init)?;
        PyTuple::new(
            py,
            [
                revealed.into_any(),
                needs_reseal.into_pyobject(py)?.to_owned().into_any(),
            ],
        )
    }

    /// The blind index of a PAN (64 hex digits) and its index-key version.
    fn blind_index(&self, py: Python<'_>, pan: &Bound<'_, PyAny>) -> PyResult<(String, u32)> {
        let pan = pan_arg(pan)?;
        self.call(py, |c| {
            pan.with(|p| {
                let index = c.blind_index(p)?;
                Ok((index.to_hex(), index.version()))
            })
        })
    }

    /// Retires the active DEK; the next seal uses a fresh one.
    fn rotate_dek(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |c| {
            c.rotate_dek()?;
            Ok(())
        })
    }

    /// `True` once `close()` has been called.
    #[getter]
    fn closed(&self) -> bool {
        self.lock().inner.is_none()
    }

    /// Refuses new calls, waits for the calls running on other threads,
    /// then drops the client (its keys are wiped). Idempotent; safe from
    /// any thread.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            let mut state = self.lock();
            let inner = state.inner.take();
            while state.in_flight > 0 {
                state = self.idle.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            drop(state);
            drop(inner);
        });
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        if self.closed() {
            "Client(closed)".to_owned()
        } else {
            "Client(open)".to_owned()
        }
    }
}
