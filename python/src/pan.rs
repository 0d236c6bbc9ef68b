//! `Pan` and `RevealedPan`: the digits live in Rust memory, are wiped in
//! place (`wipe()`, the end of a `with` block, garbage collection), print
//! masked, and leave only through `copy_into(bytearray)` or the explicit
//! copy `expose_digits()`.

use std::sync::{Mutex, MutexGuard};

use panseal::{MaskStyle, PanRules};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Failure, Kind, Outcome};

/// A primary account number held in Rust memory.
///
/// `Pan(value)` parses and checks a PAN (12-19 digits, Luhn; one space or
/// dash allowed between two digits and removed, none leading, trailing or
/// doubled; track data refused) from a `str`, `bytes`,
/// `bytearray` or `int`, raising `InvalidPan` (whose message never holds
/// the input). `str()` and `repr()` show only the masked form
/// (`************1111`). The digits are wiped by `wipe()`, at the end of a
/// `with` block and when the object is freed; they leave only into a
/// caller's `bytearray` (`copy_into`) or as an explicit, unwipeable Python
/// `str` (`expose_digits`). Equality with another `Pan`, a `str` or
/// `bytes` is constant-time. Cannot be pickled.
#[pyclass(module = "panseal", subclass, frozen)]
pub(crate) struct Pan {
    /// Wiped in place (`Zeroize`): all zero bytes and length 0, which no
    /// parsed PAN has. (Assigning a new value instead, such as `None` to
    /// an `Option`, may copy stack bytes over the old ones rather than
    /// zeros.)
    digits: Mutex<panseal::Pan>,
}

/// A PAN returned by `Client.open` (an audited access): a `Pan` whose
/// holder is expected to `wipe()` it (or use it in a `with` block) as
/// soon as it has been used.
#[pyclass(module = "panseal", extends = Pan, frozen)]
pub(crate) struct RevealedPan;

impl Pan {
    pub(crate) fn from_pan(pan: panseal::Pan) -> Self {
        Pan {
            digits: Mutex::new(pan),
        }
    }

    fn lock(&self) -> MutexGuard<'_, panseal::Pan> {
        // A panic while holding the lock leaves the digits as they were:
        // still wipeable, so recover the guard.
        self.digits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the digits (without the GIL if the caller released it).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&panseal::Pan) -> Outcome<R>) -> Outcome<R> {
        let guard = self.lock();
        if guard.is_empty() {
            return Err(wiped());
        }
        f(&guard)
    }
}

fn wiped() -> Failure {
    Failure::new(Kind::InvalidArgument, "the PAN has been wiped")
}

pub(crate) fn mask_style(style: &str) -> Outcome<MaskStyle> {
    match style {
        "last4" => Ok(MaskStyle::LastFour),
        "bin6" => Ok(MaskStyle::Bin6LastFour),
        "bin8" => Ok(MaskStyle::Bin8LastFour),
        _ => Err(Failure::new(
            Kind::InvalidArgument,
            "unknown mask style (expected 'last4', 'bin6' or 'bin8')",
        )),
    }
}

fn parse(text: &str) -> Outcome<panseal::Pan> {
    panseal::Pan::parse_with(text, &PanRules::default())
        .map_err(|e| Failure::from(panseal::Error::from(e)))
}

fn parse_bytes(bytes: &[u8]) -> Outcome<panseal::Pan> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Failure::new(Kind::InvalidPan, "PAN is not UTF-8"))?;
    parse(text)
}

/// A PAN argument: its own copy of the digits (wiped on drop). A `Pan`
/// object's digits are copied under its lock while the GIL is held, so the
/// lock is never held across a library call that runs with the GIL
/// released (another thread printing the same `Pan` would wait for it with
/// the GIL held, stalling the interpreter).
pub(crate) struct PanArg(panseal::Pan);

impl PanArg {
    /// Runs `f` on the digits.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&panseal::Pan) -> Outcome<R>) -> Outcome<R> {
        f(&self.0)
    }
}

/// Reads a PAN argument: `Pan`, `str`, `bytes`, `bytearray` or `int`.
/// Python's own copy of a `str` or `int` cannot be wiped; the copies made
/// here are.
pub(crate) fn pan_arg(value: &Bound<'_, PyAny>) -> PyResult<PanArg> {
    if let Ok(pan) = value.cast::<Pan>() {
        return Ok(PanArg(pan.get().with(|p| Ok(p.clone()))?));
    }
    Ok(PanArg(parse_any(value)?))
}

fn parse_any(value: &Bound<'_, PyAny>) -> PyResult<panseal::Pan> {
    let parsed = if let Ok(s) = value.cast::<PyString>() {
        let text = Zeroizing::new(s.extract::<String>()?);
        parse(&text)
    } else if let Ok(b) = value.cast::<PyBytes>() {
        parse_bytes(b.as_bytes())
    } else if let Ok(b) = value.cast::<PyByteArray>() {
        let bytes = Zeroizing::new(b.to_vec());
        parse_bytes(&bytes)
    } else if value.is_instance_of::<pyo3::types::PyInt>() {
        let text = Zeroizing::new(value.str()?.extract::<String>()?);
        parse(&text)
    } else {
        return Err(PyTypeError::new_err(
            "expected a PAN as Pan, str, bytes, bytearray or int",
        ));
    };
    Ok(parsed?)
}

#[pymethods]
impl Pan {
    #[new]
    fn new(value: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(pan) = value.cast::<Pan>() {
            let copy = pan.get().with(|p| Ok(p.clone()))?;
            return Ok(Pan::from_pan(copy));
        }
        Ok(Pan::from_pan(parse_any(value)?))
    }

    /// The masked form: `'last4'` (`************1111`, the default),
    /// `'bin6'` (`411111******1111`) or `'bin8'` (`41111111****1111`).
    #[pyo3(signature = (style = "last4"))]
    fn mask(&self, style: &str) -> PyResult<String> {
        let style = mask_style(style)?;
        Ok(self.with(|p| Ok(p.mask(style)))?)
    }

    /// The last four digits (shown by every masked form).
    #[getter]
    fn last_four(&self) -> PyResult<String> {
        Ok(self.with(|p| Ok(p.last_four().to_owned()))?)
    }

    /// `True` once the digits have been wiped.
    #[getter]
    fn wiped(&self) -> bool {
        self.lock().is_empty()
    }

    /// Wipes the digits in place (idempotent). Every later use raises
    /// `InvalidArgument`; `str()` shows `<wiped>`.
    fn wipe(&self) {
        self.lock().zeroize();
    }

    /// Writes the digits (ASCII) into `buffer[0:n]` (a `bytearray`) and
    /// returns `n`; the rest of the buffer is untouched. A buffer shorter
    /// than the PAN raises `BufferTooSmall` and gets nothing written. The
    /// caller wipes the buffer (`buffer[:] = bytes(len(buffer))`) when
    /// done.
    fn copy_into(&self, buffer: &Bound<'_, PyByteArray>) -> PyResult<usize> {
        // Exactly a bytearray: a subclass's Python `__setitem__` could
        // release the GIL while this thread holds the digits' lock.
        if !buffer.is_exact_instance_of::<PyByteArray>() {
            return Err(PyTypeError::new_err(
                "expected a bytearray (not a subclass)",
            ));
        }
        let guard = self.lock();
        if guard.is_empty() {
            return Err(wiped().into());
        }
        let digits = guard.expose_digits().as_bytes();
        if buffer.len() < digits.len() {
            return Err(Failure::new(
                Kind::BufferTooSmall,
                format!("buffer too small: {} bytes needed", digits.len()),
            )
            .into());
        }
        // Byte by byte: small ints are shared, so no Python object ever
        // holds the digits except the caller's buffer.
        for (i, d) in digits.iter().enumerate() {
            buffer.set_item(i, *d)?;
        }
        Ok(digits.len())
    }

    /// The digits as a new Python `str`: an explicit copy that Python
    /// cannot wipe (it lives until the garbage collector frees it). Prefer
    /// `copy_into` with a `bytearray`.
    fn expose_digits(&self) -> PyResult<String> {
        Ok(self.with(|p| Ok(p.expose_digits().to_owned()))?)
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.with(|p| Ok(p.len()))?)
    }

    fn __str__(&self) -> String {
        let guard = self.lock();
        if guard.is_empty() {
            "<wiped>".to_owned()
        } else {
            guard.masked()
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.get_type().name()?;
        Ok(format!("{name}('{}')", slf.get().__str__()))
    }

    /// Constant-time comparison with a `Pan`, `str`, `bytes`, `bytearray`
    /// or `int`; anything else (or a wiped PAN) is unequal.
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        let other = match other.cast::<Pan>() {
            Ok(p) => {
                if std::ptr::eq(p.get(), self) {
                    return !self.wiped();
                }
                match p.get().with(|p| Ok(p.clone())) {
                    Ok(p) => p,
                    Err(_) => return false,
                }
            }
            Err(_) => match parse_any(other) {
                Ok(p) => p,
                Err(_) => return false,
            },
        };
        self.with(|mine| Ok(*mine == other)).unwrap_or(false)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.wipe();
        false
    }

    fn __reduce__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err("a Pan cannot be pickled"))
    }
}

#[pymethods]
impl RevealedPan {}
