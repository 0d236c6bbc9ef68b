//! `panseal-python`: the compiled half of the `panseal` Python package
//! (`panseal._native`), on the panseal library directly (not through the
//! C ABI). The Python half (`python/panseal/`) holds the exception
//! classes, the result codes and the documentation.
//!
//! Secrets: PANs given to a call are parsed into `panseal::Pan` (wiped on
//! drop); PANs returned by `Client.open` are `RevealedPan` objects whose
//! digits stay in Rust memory until `wipe()`, the end of a `with` block or
//! garbage collection, and leave only into a caller's `bytearray` or as an
//! explicit copy. Messages never contain a PAN. No `unsafe` here (PyO3's
//! macros hold it).

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod client;
mod error;
mod ingest;
mod pan;

use pyo3::prelude::*;

/// The library version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The masked form of a PAN (PCI DSS 3.4.1): `'last4'`
/// (`************1111`), `'bin6'` (`411111******1111`) or `'bin8'`
/// (`41111111****1111`).
#[pyfunction]
#[pyo3(signature = (pan, style = "last4"))]
fn mask(pan: &Bound<'_, PyAny>, style: &str) -> PyResult<String> {
    let style = pan::mask_style(style)?;
    Ok(pan::pan_arg(pan)?.with(|p| Ok(p.mask(style)))?)
}

/// The compiled module `panseal._native`.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(mask, m)?)?;
    m.add_class::<pan::Pan>()?;
    m.add_class::<pan::RevealedPan>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<ingest::IngestSealer>()?;
    Ok(())
}
