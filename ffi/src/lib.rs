//! `panseal-ffi`: the C ABI of panseal (`libpanseal`, `include/panseal.h`),
//! the only crate of panseal with `unsafe`. Built as a `cdylib` and a
//! `staticlib`; `scripts/cinstall.sh` installs them with the header and a
//! pkg-config file.
//!
//! Conventions (after rustls-ffi):
//!
//! * Opaque handles: `panseal_client_new*` / `panseal_client_free` (free
//!   accepts NULL). A handle is thread-safe: any number of threads may use
//!   one handle at once. `panseal_client_close` may be called at any time,
//!   from any thread, even while other threads are inside calls on the
//!   handle: those calls finish normally, later ones return
//!   `PANSEAL_CLIENT_CLOSED`, and the client's keys are wiped when the last
//!   in-flight call returns. `panseal_client_free` releases the handle
//!   itself and must not race with any other use of it.
//! * Every function returns a [`panseal_result`]; outputs go through `*_out`
//!   parameters and caller-supplied buffers with their capacity. A buffer
//!   that is too small gets nothing written; the function returns
//!   `PANSEAL_BUFFER_TOO_SMALL` and stores the needed size (including the
//!   terminating NUL for text) in the `*_len_out` parameter.
//! * Text outputs are NUL-terminated; `*_len_out` excludes the NUL.
//! * Inputs are (pointer, length) pairs of bytes, never NUL-terminated
//!   strings, except the configuration text and file path.
//! * On failure a message is kept per thread (`panseal_last_error`); it never
//!   contains a PAN. Every call clears it on success, so the message always
//!   describes the calling thread's latest call.
//! * No panic crosses into C: every entry point catches unwinding and
//!   returns `PANSEAL_PANIC`.
//! * Plaintext PANs are written only into buffers the caller supplies; the
//!   library's own copies are wiped.
//!
//! Write-only ingest (`panseal_ingest_*`): a front end that must never
//! hold anything able to open a stored PAN builds a
//! `panseal_ingest_sealer` from a scope's ingest **public** key (its
//! `PIK1/...` text form) and seals with it (HPKE, `FORMAT.md` §17). No key
//! service, key store, credential or audit sink is involved; the private
//! key stays in the key service, which admits or reveals the ciphertexts.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use sha2::Digest as _;

use panseal::config::ClientConfig;
use panseal::{blocking, Access, Context, IngestPublicKey, IngestSealed, IngestSealer, SealedPan};
use panseal::{ConfigError, Error, FormatError, KeyError, KeyServiceError};
use panseal::{MaskStyle, Pan, PanRules};

/// Result of every panseal C function.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum panseal_result {
    /// Success.
    PANSEAL_OK = 0,
    /// A required pointer was NULL.
    PANSEAL_NULL_ARGUMENT = 1,
    /// An argument is malformed (bad UTF-8, bad length, unknown enum value).
    PANSEAL_INVALID_ARGUMENT = 2,
    /// The input is not an acceptable PAN (Luhn, length, characters, track data).
    PANSEAL_INVALID_PAN = 3,
    /// The context (table, column, row key) is not acceptable.
    PANSEAL_INVALID_CONTEXT = 4,
    /// The ciphertext is malformed.
    PANSEAL_MALFORMED_CIPHERTEXT = 5,
    /// Authentication failed: altered, moved to another context, or sealed
    /// under another key.
    PANSEAL_DECRYPTION_FAILED = 6,
    /// The ciphertext's key is unknown, expired, or of another scope or
    /// environment.
    PANSEAL_KEY_REFUSED = 7,
    /// The ciphertext's key was destroyed.
    PANSEAL_KEY_DESTROYED = 8,
    /// The key service is unreachable or over quota: retry later.
    PANSEAL_KEY_SERVICE_UNAVAILABLE = 9,
    /// The key service refused (permission, sealed, destroyed KEK, …).
    PANSEAL_KEY_SERVICE_REFUSED = 10,
    /// The key store failed.
    PANSEAL_KEY_STORE_ERROR = 11,
    /// The audit sink failed or none is configured: opening refused.
    PANSEAL_AUDIT_ERROR = 12,
    /// The configuration is unusable.
    PANSEAL_CONFIG_ERROR = 13,
    /// The output buffer is too small; the needed size was stored.
    PANSEAL_BUFFER_TOO_SMALL = 14,
    /// A bug: a Rust panic was caught at the boundary.
    PANSEAL_PANIC = 15,
    /// The client was closed (`panseal_client_close`); nothing was done.
    PANSEAL_CLIENT_CLOSED = 16,
    /// The ingest public key's text form is malformed (not
    /// `PIK1/<environment>/<scope>/<version>/<base64url point>`, not UTF-8,
    /// a bad name or version, bad base64url).
    PANSEAL_MALFORMED_PUBLIC_KEY = 17,
    /// The ingest public key is not a point on P-256 (off the curve, the
    /// identity, compressed, or not 65 bytes): refused, nothing sealed.
    PANSEAL_INVALID_PUBLIC_KEY = 18,
    /// The ingest public key is well formed but not the one pinned by
    /// fingerprint (`panseal_ingest_sealer_new_pinned`): refused.
    PANSEAL_PUBLIC_KEY_NOT_PINNED = 19,
}

use panseal_result::*;

/// Where a sealed PAN lives. Each part is a (pointer, length) byte string;
/// table and column must be UTF-8.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct panseal_context {
    /// Table name.
    pub table: *const u8,
    /// Its length in bytes.
    pub table_len: usize,
    /// Column name.
    pub column: *const u8,
    /// Its length in bytes.
    pub column_len: usize,
    /// Row key bytes.
    pub row_key: *const u8,
    /// Its length in bytes.
    pub row_key_len: usize,
}

/// Bytes `panseal_seal` needs in its output buffer (64 characters + NUL).
pub const PANSEAL_SEALED_TEXT_BUFFER: usize = 65;
/// Bytes `panseal_seal_binary` writes.
pub const PANSEAL_SEALED_BINARY_LEN: usize = 48;
/// Bytes `panseal_open` and `panseal_mask` need in their output buffer (19
/// digits + NUL).
pub const PANSEAL_PAN_BUFFER: usize = 20;
/// Bytes `panseal_blind_index` needs in its output buffer (64 hex + NUL).
pub const PANSEAL_INDEX_BUFFER: usize = 65;

// The C constants are literals (cbindgen cannot evaluate paths); keep them
// equal to the Rust ones.
const _: () = assert!(PANSEAL_SEALED_TEXT_BUFFER == panseal::V1_TEXT_LEN + 1);
const _: () = assert!(PANSEAL_SEALED_BINARY_LEN == panseal::V1_LEN);
const _: () = assert!(PANSEAL_PAN_BUFFER == panseal::MAX_PAN_DIGITS + 1);

/// Bytes `panseal_ingest_seal` needs in its output buffer (134 characters +
/// NUL).
pub const PANSEAL_INGEST_TEXT_BUFFER: usize = 135;
/// Bytes `panseal_ingest_seal_binary` writes.
pub const PANSEAL_INGEST_BINARY_LEN: usize = 101;
/// Bytes `panseal_ingest_sealer_fingerprint` needs in its output buffer (64
/// hex digits + NUL).
pub const PANSEAL_FINGERPRINT_BUFFER: usize = 65;

const _: () = assert!(PANSEAL_INGEST_TEXT_BUFFER == panseal::INGEST_TEXT_LEN + 1);
const _: () = assert!(PANSEAL_INGEST_BINARY_LEN == panseal::INGEST_LEN);

/// Mask styles for `panseal_mask` (PCI DSS 3.4.1).
pub const PANSEAL_MASK_LAST_FOUR: u32 = 0;
/// BIN (6 digits) and last four.
pub const PANSEAL_MASK_BIN6_LAST_FOUR: u32 = 1;
/// BIN (8 digits) and last four.
pub const PANSEAL_MASK_BIN8_LAST_FOUR: u32 = 2;

/// A panseal client: key service, key store, audit sink and policy.
///
/// Each call takes its own reference to the client for its duration, so
/// `panseal_client_close` from another thread never frees the client under
/// a running call.
pub struct panseal_client {
    inner: ArcSwapOption<blocking::Panseal>,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

fn clear_error() {
    LAST_ERROR.with(|e| e.borrow_mut().clear());
}

/// Runs `f` behind the panic boundary and records any error message; a
/// success clears the calling thread's last error.
fn guard(f: impl FnOnce() -> Result<(), (panseal_result, String)>) -> panseal_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            clear_error();
            PANSEAL_OK
        }
        Ok(Err((code, message))) => {
            set_error(message);
            code
        }
        Err(_) => {
            set_error("internal error (panic caught at the C boundary)".into());
            PANSEAL_PANIC
        }
    }
}

type FfiResult<T> = Result<T, (panseal_result, String)>;

fn err(code: panseal_result, message: &str) -> (panseal_result, String) {
    (code, message.to_owned())
}

/// Maps a library error to a result code; the message is the error's
/// display, which never contains a PAN.
fn map(e: Error) -> (panseal_result, String) {
    let code = match &e {
        Error::Pan(_) => PANSEAL_INVALID_PAN,
        Error::Context(_) => PANSEAL_INVALID_CONTEXT,
        Error::Format(_) => PANSEAL_MALFORMED_CIPHERTEXT,
        Error::Decryption => PANSEAL_DECRYPTION_FAILED,
        Error::Key(KeyError::Destroyed(_)) => PANSEAL_KEY_DESTROYED,
        Error::Key(_) => PANSEAL_KEY_REFUSED,
        Error::KeyService(k) if k.is_retryable() => PANSEAL_KEY_SERVICE_UNAVAILABLE,
        Error::KeyService(KeyServiceError::KekDestroyed(_)) => PANSEAL_KEY_DESTROYED,
        Error::KeyService(_) => PANSEAL_KEY_SERVICE_REFUSED,
        Error::KeyStore(_) => PANSEAL_KEY_STORE_ERROR,
        Error::Audit(_) | Error::Config(ConfigError::NoAuditSink) => PANSEAL_AUDIT_ERROR,
        Error::Config(_) => PANSEAL_CONFIG_ERROR,
        // `Error` is non-exhaustive; a kind added later is refused, with
        // its message, until it gets a code of its own.
        _ => PANSEAL_KEY_REFUSED,
    };
    (code, e.to_string())
}

/// Borrows `len` bytes at `ptr`; NULL is allowed only when `len` is 0.
///
/// # Safety
///
/// `ptr` must be valid for reads of `len` bytes for the returned lifetime.
unsafe fn bytes<'a>(ptr: *const u8, len: usize, what: &str) -> FfiResult<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err((PANSEAL_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    if len > isize::MAX as usize {
        return Err((PANSEAL_INVALID_ARGUMENT, format!("{what} length too large")));
    }
    // SAFETY: the caller promises `ptr` is valid for `len` bytes; we checked
    // it is non-NULL and the length fits a slice.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// # Safety
///
/// As [`bytes`].
unsafe fn utf8<'a>(ptr: *const u8, len: usize, what: &str) -> FfiResult<&'a str> {
    // SAFETY: forwarded contract.
    let b = unsafe { bytes(ptr, len, what) }?;
    std::str::from_utf8(b).map_err(|_| (PANSEAL_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// # Safety
///
/// `p` must be NULL or a valid NUL-terminated string.
unsafe fn cstr<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err((PANSEAL_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| (PANSEAL_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// # Safety
///
/// `ctx` must be NULL or point to a valid `panseal_context` whose pointers
/// are valid for their lengths.
unsafe fn context(ctx: *const panseal_context) -> FfiResult<Context> {
    if ctx.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "context is NULL"));
    }
    // SAFETY: non-NULL and valid per the caller's contract.
    let c = unsafe { &*ctx };
    // SAFETY: the caller promises each (pointer, length) pair is valid.
    let (table, column, row) = unsafe {
        (
            utf8(c.table, c.table_len, "context table")?,
            utf8(c.column, c.column_len, "context column")?,
            bytes(c.row_key, c.row_key_len, "context row key")?,
        )
    };
    Context::new(table, column, row).map_err(|e| map(e.into()))
}

/// Parses a PAN from bytes without copying it anywhere that is not wiped.
fn pan_from(b: &[u8]) -> FfiResult<Pan> {
    let s = std::str::from_utf8(b).map_err(|_| err(PANSEAL_INVALID_PAN, "PAN is not UTF-8"))?;
    // Accept the ISO minimum here; the client's rules are the defaults
    // unless configured otherwise.
    Pan::parse_with(s, &PanRules::default()).map_err(|e| map(e.into()))
}

/// The client behind a handle, held for the duration of one call (a
/// concurrent `panseal_client_close` waits for nothing and frees nothing
/// under it: the last holder drops it).
///
/// # Safety
///
/// `client` must be NULL or a pointer from `panseal_client_new*` not yet freed.
unsafe fn client_ref(client: *const panseal_client) -> FfiResult<Arc<blocking::Panseal>> {
    if client.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "client is NULL"));
    }
    // SAFETY: a handle not yet freed per the caller's contract.
    let handle = unsafe { &*client };
    handle
        .inner
        .load_full()
        .ok_or_else(|| err(PANSEAL_CLIENT_CLOSED, "client is closed"))
}

/// Writes `data` and a NUL into `out` if it fits; always stores the length.
///
/// # Safety
///
/// `out` must be valid for writes of `cap` bytes (or NULL with `cap` 0);
/// `len_out` must be NULL or valid for a write.
unsafe fn write_text(data: &[u8], out: *mut u8, cap: usize, len_out: *mut usize) -> FfiResult<()> {
    if len_out.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "length output is NULL"));
    }
    // SAFETY: non-NULL, valid for a write per the contract.
    unsafe { *len_out = data.len() };
    if cap < data.len() + 1 || out.is_null() {
        // SAFETY: as above.
        unsafe { *len_out = data.len() + 1 };
        return Err((
            PANSEAL_BUFFER_TOO_SMALL,
            format!("buffer too small: {} bytes needed", data.len() + 1),
        ));
    }
    // SAFETY: `out` holds at least data.len() + 1 bytes (checked above) and
    // cannot overlap `data`, which the library owns.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len());
        *out.add(data.len()) = 0;
    }
    Ok(())
}

/// # Safety
///
/// As [`write_text`], without the NUL.
unsafe fn write_bytes(data: &[u8], out: *mut u8, cap: usize, len_out: *mut usize) -> FfiResult<()> {
    if len_out.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "length output is NULL"));
    }
    // SAFETY: non-NULL per the check, valid per the contract.
    unsafe { *len_out = data.len() };
    if cap < data.len() || out.is_null() {
        return Err((
            PANSEAL_BUFFER_TOO_SMALL,
            format!("buffer too small: {} bytes needed", data.len()),
        ));
    }
    // SAFETY: `out` holds at least data.len() bytes; no overlap.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    Ok(())
}

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn panseal_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Copies the calling thread's last error message (NUL-terminated) into
/// `buf`. Stores the message length in `*len_out`; `PANSEAL_BUFFER_TOO_SMALL`
/// if it does not fit (nothing written).
///
/// # Safety
///
/// `buf` valid for `cap` bytes; `len_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_last_error(
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> panseal_result {
    let message = LAST_ERROR.with(|e| e.borrow().clone());
    // Do not let this call overwrite the message it reports.
    match catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded contract.
        unsafe { write_text(message.as_bytes(), buf.cast(), cap, len_out) }
    })) {
        Ok(Ok(())) => PANSEAL_OK,
        Ok(Err((code, _))) => code,
        Err(_) => PANSEAL_PANIC,
    }
}

/// Builds a client from the configuration `load` returns and stores the
/// new handle in `*client_out`.
///
/// # Safety
///
/// `client_out` must be NULL or valid for a write; `load` carries its own
/// pointer contracts.
unsafe fn store_client(
    client_out: *mut *mut panseal_client,
    load: impl FnOnce() -> FfiResult<ClientConfig>,
) -> FfiResult<()> {
    if client_out.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "client_out is NULL"));
    }
    let inner = blocking::Panseal::from_config(&load()?).map_err(map)?;
    let handle = panseal_client {
        inner: ArcSwapOption::from_pointee(inner),
    };
    // SAFETY: `client_out` is non-NULL and valid for a write.
    unsafe { *client_out = Box::into_raw(Box::new(handle)) };
    Ok(())
}

/// Seals the PAN at (`pan`, `pan_len`) bound to `ctx` with `client`.
///
/// # Safety
///
/// As the arguments of `panseal_seal`.
unsafe fn seal_from(
    client: *const panseal_client,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
) -> FfiResult<SealedPan> {
    // SAFETY: forwarded contracts.
    let (c, pan, ctx) = unsafe {
        (
            client_ref(client)?,
            pan_from(bytes(pan, pan_len, "PAN")?)?,
            context(ctx)?,
        )
    };
    c.seal_pan(&pan, &ctx).map_err(map)
}

/// Builds a client from a JSON configuration (see the README: key service,
/// key store, audit sink, policy). On success stores a new handle in
/// `*client_out`; free it with `panseal_client_free`.
///
/// # Safety
///
/// `config_json` a valid NUL-terminated string; `client_out` valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn panseal_client_new(
    config_json: *const c_char,
    client_out: *mut *mut panseal_client,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        unsafe {
            store_client(client_out, || {
                ClientConfig::from_json(cstr(config_json, "configuration")?).map_err(map)
            })
        }
    })
}

/// Builds a client from a JSON configuration file.
///
/// # Safety
///
/// `path` a valid NUL-terminated string; `client_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_client_new_from_file(
    path: *const c_char,
    client_out: *mut *mut panseal_client,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        unsafe {
            store_client(client_out, || {
                ClientConfig::from_file(cstr(path, "path")?).map_err(map)
            })
        }
    })
}

/// Closes a client: calls already running on other threads finish
/// normally; every later call on the handle returns
/// `PANSEAL_CLIENT_CLOSED`; the client (its cached keys wiped) is released
/// when the last running call returns. Safe to call at any time from any
/// thread, any number of times, concurrently with other calls on the same
/// handle. The handle itself stays valid until `panseal_client_free`.
/// NULL is refused with `PANSEAL_NULL_ARGUMENT`.
///
/// # Safety
///
/// `client` NULL or a handle from `panseal_client_new*` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn panseal_client_close(client: *const panseal_client) -> panseal_result {
    guard(|| {
        if client.is_null() {
            return Err(err(PANSEAL_NULL_ARGUMENT, "client is NULL"));
        }
        // SAFETY: a handle not yet freed per the caller's contract.
        let handle = unsafe { &*client };
        handle.inner.store(None);
        Ok(())
    })
}

/// Closes (as `panseal_client_close`) and frees a client. NULL is accepted
/// and ignored. The handle must not be used afterwards, and **this call
/// must not race with any other call on the handle** (including another
/// free): the memory of the handle itself is released. A program that
/// cannot guarantee that — several threads sharing one handle, one of them
/// deciding to stop — calls `panseal_client_close` first (safe at any
/// time) and `panseal_client_free` once no thread can use the pointer.
///
/// # Safety
///
/// `client` NULL or a live handle from `panseal_client_new*`, used by no
/// other thread during and after this call.
#[no_mangle]
pub unsafe extern "C" fn panseal_client_free(client: *mut panseal_client) {
    if client.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a live handle created by Box::into_raw, freed once, by
        // the caller's contract not in use elsewhere.
        drop(unsafe { Box::from_raw(client) });
    }));
}

/// Seals a PAN bound to `ctx` and writes the 64-character text form
/// (NUL-terminated, so `out` needs 65 bytes) for a VARCHAR column.
///
/// # Safety
///
/// `client` a live handle; `pan` valid for `pan_len` bytes; `ctx` a valid
/// context; `out` valid for `out_cap` bytes; `out_len` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_seal(
    client: *const panseal_client,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
    out: *mut c_char,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let sealed = unsafe { seal_from(client, pan, pan_len, ctx) }?;
        let mut text = [0u8; panseal::V1_TEXT_LEN];
        text.copy_from_slice(sealed.to_text().as_bytes());
        // SAFETY: forwarded contract.
        unsafe { write_text(&text, out.cast(), out_cap, out_len) }
    })
}

/// Seals a PAN bound to `ctx` and writes the 48-byte binary form (for a
/// BYTEA/BLOB column).
///
/// # Safety
///
/// As `panseal_seal`.
#[no_mangle]
pub unsafe extern "C" fn panseal_seal_binary(
    client: *const panseal_client,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let sealed = unsafe { seal_from(client, pan, pan_len, ctx) }?;
        // SAFETY: forwarded contract.
        unsafe { write_bytes(sealed.as_bytes(), out, out_cap, out_len) }
    })
}

/// Opens a sealed PAN (text or binary form, told apart by the first byte)
/// bound to `ctx`, on behalf of `principal` for `purpose` (both
/// NUL-terminated; audited). Writes the digits NUL-terminated into
/// `pan_out` (20 bytes always suffice) and, if `needs_reseal_out` is not
/// NULL, whether the PAN should be re-sealed under the active key.
///
/// # Safety
///
/// `client` a live handle; `sealed` valid for `sealed_len` bytes; `ctx` a
/// valid context; `principal`/`purpose` NUL-terminated strings; `pan_out`
/// valid for `pan_cap` bytes; `pan_len_out` valid for a write;
/// `needs_reseal_out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_open(
    client: *const panseal_client,
    sealed: *const u8,
    sealed_len: usize,
    ctx: *const panseal_context,
    principal: *const c_char,
    purpose: *const c_char,
    pan_out: *mut c_char,
    pan_cap: usize,
    pan_len_out: *mut usize,
    needs_reseal_out: *mut bool,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let (c, input, ctx, principal, purpose) = unsafe {
            (
                client_ref(client)?,
                bytes(sealed, sealed_len, "ciphertext")?,
                context(ctx)?,
                cstr(principal, "principal")?,
                cstr(purpose, "purpose")?,
            )
        };
        let sealed = parse_sealed(input)?;
        let access = Access::new(principal, purpose).map_err(|e| map(e.into()))?;
        if pan_len_out.is_null() {
            return Err(err(PANSEAL_NULL_ARGUMENT, "pan_len_out is NULL"));
        }
        // Check the buffer before decrypting, so a too-small buffer costs
        // no audited access.
        if pan_out.is_null() || pan_cap < PANSEAL_PAN_BUFFER {
            // SAFETY: non-NULL, valid for a write.
            unsafe { *pan_len_out = PANSEAL_PAN_BUFFER };
            return Err((
                PANSEAL_BUFFER_TOO_SMALL,
                format!("buffer too small: {PANSEAL_PAN_BUFFER} bytes needed"),
            ));
        }
        let opened = c.open_pan(&sealed, &ctx, &access).map_err(map)?;
        // SAFETY: forwarded contract; the buffer is large enough.
        unsafe {
            write_text(
                opened.pan.expose_digits().as_bytes(),
                pan_out.cast(),
                pan_cap,
                pan_len_out,
            )?;
            if !needs_reseal_out.is_null() {
                *needs_reseal_out = opened.needs_reseal;
            }
        }
        // `opened.pan` is wiped when it drops here.
        Ok(())
    })
}

fn parse_sealed(input: &[u8]) -> FfiResult<SealedPan> {
    let parsed = match input.first() {
        Some(b'P') => std::str::from_utf8(input)
            .map_err(|_| err(PANSEAL_MALFORMED_CIPHERTEXT, "text form is not UTF-8"))
            .and_then(|t| SealedPan::from_text(t).map_err(map))?,
        _ => SealedPan::from_bytes(input).map_err(map)?,
    };
    Ok(parsed)
}

/// Computes the blind index of a PAN under the scope's active index key and
/// writes it as 64 lowercase hex digits (NUL-terminated: 65 bytes); stores
/// the index-key version in `*version_out` if not NULL.
///
/// # Safety
///
/// `client` a live handle; `pan` valid for `pan_len` bytes; `out` valid for
/// `out_cap` bytes; `out_len` valid for a write; `version_out` NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_blind_index(
    client: *const panseal_client,
    pan: *const u8,
    pan_len: usize,
    out: *mut c_char,
    out_cap: usize,
    out_len: *mut usize,
    version_out: *mut u32,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let (c, pan) = unsafe { (client_ref(client)?, pan_from(bytes(pan, pan_len, "PAN")?)?) };
        let index = c.blind_index(&pan).map_err(map)?;
        // SAFETY: forwarded contract.
        unsafe {
            write_text(index.to_hex().as_bytes(), out.cast(), out_cap, out_len)?;
            if !version_out.is_null() {
                *version_out = index.version();
            }
        }
        Ok(())
    })
}

/// Writes the masked form of a PAN (NUL-terminated; 20 bytes always
/// suffice) in `style` (`PANSEAL_MASK_*`). Needs no client.
///
/// # Safety
///
/// `pan` valid for `pan_len` bytes; `out` valid for `out_cap` bytes;
/// `out_len` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_mask(
    pan: *const u8,
    pan_len: usize,
    style: u32,
    out: *mut c_char,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        let style = match style {
            PANSEAL_MASK_LAST_FOUR => MaskStyle::LastFour,
            PANSEAL_MASK_BIN6_LAST_FOUR => MaskStyle::Bin6LastFour,
            PANSEAL_MASK_BIN8_LAST_FOUR => MaskStyle::Bin8LastFour,
            _ => return Err(err(PANSEAL_INVALID_ARGUMENT, "unknown mask style")),
        };
        // SAFETY: forwarded contract.
        let pan = pan_from(unsafe { bytes(pan, pan_len, "PAN") }?)?;
        let masked = pan.mask(style);
        // SAFETY: forwarded contract.
        unsafe { write_text(masked.as_bytes(), out.cast(), out_cap, out_len) }
    })
}

/// Retires the client's active DEK now; the next seal uses a fresh one.
///
/// # Safety
///
/// `client` a live handle.
#[no_mangle]
pub unsafe extern "C" fn panseal_rotate_dek(client: *const panseal_client) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { client_ref(client) }?;
        c.rotate_dek().map_err(map)?;
        Ok(())
    })
}

/// A write-only ingest sealer: one scope's ingest **public** key and nothing
/// else (no key service, no key store, no credential, no DEK). Nothing in
/// its memory opens a PAN, not even the ones it sealed.
///
/// Immutable once built: any number of threads may seal with one handle at
/// once. It holds no secret and no per-process state (every seal draws
/// fresh randomness from the operating system), so it is also safe to use
/// in a child after `fork()`, unlike a DEK-holding client.
pub struct panseal_ingest_sealer {
    sealer: IngestSealer,
}

// The handle is shared between C threads: the sealer must allow it.
const _: fn() = || {
    fn thread_safe<T: Send + Sync>() {}
    thread_safe::<IngestSealer>();
};

/// Maps a failure to parse an ingest public key to its result code.
fn map_public_key(e: Error) -> (panseal_result, String) {
    match e {
        Error::Format(FormatError::PublicKey) => (
            PANSEAL_INVALID_PUBLIC_KEY,
            "ingest public key is not a point on P-256".to_owned(),
        ),
        other => (
            PANSEAL_MALFORMED_PUBLIC_KEY,
            format!("ingest public key text is malformed: {other}"),
        ),
    }
}

/// Parses the text form of an ingest public key at (`text`, `len`).
///
/// # Safety
///
/// `text` valid for reads of `len` bytes.
unsafe fn public_key_from(text: *const u8, len: usize) -> FfiResult<IngestPublicKey> {
    // SAFETY: forwarded contract.
    let b = unsafe { bytes(text, len, "public key") }?;
    let s = std::str::from_utf8(b).map_err(|_| {
        err(
            PANSEAL_MALFORMED_PUBLIC_KEY,
            "ingest public key text is malformed: not UTF-8",
        )
    })?;
    IngestPublicKey::from_text(s).map_err(map_public_key)
}

/// Stores a new sealer handle for `key` in `*sealer_out`.
///
/// # Safety
///
/// `sealer_out` non-NULL (checked by the caller) and valid for a write.
unsafe fn store_sealer(sealer_out: *mut *mut panseal_ingest_sealer, key: IngestPublicKey) {
    let handle = panseal_ingest_sealer {
        sealer: IngestSealer::new(key),
    };
    // SAFETY: non-NULL and valid for a write per the contract.
    unsafe { *sealer_out = Box::into_raw(Box::new(handle)) };
}

/// The sealer behind a handle.
///
/// # Safety
///
/// `sealer` NULL or a live handle from `panseal_ingest_sealer_new*`.
unsafe fn sealer_ref<'a>(sealer: *const panseal_ingest_sealer) -> FfiResult<&'a IngestSealer> {
    if sealer.is_null() {
        return Err(err(PANSEAL_NULL_ARGUMENT, "sealer is NULL"));
    }
    // SAFETY: a live handle per the caller's contract; it is never mutated.
    Ok(unsafe { &(*sealer).sealer })
}

/// Builds a write-only ingest sealer from a scope's ingest public key in
/// its text form, `PIK1/<environment>/<scope>/<version>/<base64url point>`
/// (`public_key_len` bytes, not NUL-terminated; surrounding whitespace is
/// ignored), and stores the new handle in `*sealer_out`; free it with
/// `panseal_ingest_sealer_free`. On failure `*sealer_out` is left as is.
///
/// Returns `PANSEAL_MALFORMED_PUBLIC_KEY` for text that is not a public
/// key and `PANSEAL_INVALID_PUBLIC_KEY` for a point that is not on P-256.
/// The sealer needs no key service and no credential; see
/// `panseal_ingest_sealer_new_pinned` to refuse a substituted key.
///
/// # Safety
///
/// `public_key` valid for `public_key_len` bytes; `sealer_out` valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_sealer_new(
    public_key: *const u8,
    public_key_len: usize,
    sealer_out: *mut *mut panseal_ingest_sealer,
) -> panseal_result {
    guard(|| {
        if sealer_out.is_null() {
            return Err(err(PANSEAL_NULL_ARGUMENT, "sealer_out is NULL"));
        }
        // SAFETY: forwarded contracts; `sealer_out` checked non-NULL.
        unsafe {
            let key = public_key_from(public_key, public_key_len)?;
            store_sealer(sealer_out, key);
        }
        Ok(())
    })
}

/// As `panseal_ingest_sealer_new`, and refuses the key with
/// `PANSEAL_PUBLIC_KEY_NOT_PINNED` unless its fingerprint (SHA-256 of the
/// SEC1 point, what `panseal_ingest_sealer_fingerprint` writes) equals
/// `fingerprint_hex` (64 hex digits, `fingerprint_len` bytes, either case).
/// A front end that pins the fingerprint in its build or deployment cannot
/// be made to seal to a public key an attacker substituted in its
/// configuration.
///
/// # Safety
///
/// `public_key` valid for `public_key_len` bytes; `fingerprint_hex` valid
/// for `fingerprint_len` bytes; `sealer_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_sealer_new_pinned(
    public_key: *const u8,
    public_key_len: usize,
    fingerprint_hex: *const u8,
    fingerprint_len: usize,
    sealer_out: *mut *mut panseal_ingest_sealer,
) -> panseal_result {
    guard(|| {
        if sealer_out.is_null() {
            return Err(err(PANSEAL_NULL_ARGUMENT, "sealer_out is NULL"));
        }
        // SAFETY: forwarded contract.
        let pin = unsafe { bytes(fingerprint_hex, fingerprint_len, "fingerprint") }?;
        let mut pinned = [0u8; 32];
        hex::decode_to_slice(pin, &mut pinned)
            .map_err(|_| err(PANSEAL_INVALID_ARGUMENT, "fingerprint is not 64 hex digits"))?;
        // SAFETY: forwarded contract.
        let key = unsafe { public_key_from(public_key, public_key_len) }?;
        let actual = sha2::Sha256::digest(key.as_bytes());
        if actual.as_slice() != pinned {
            return Err(err(
                PANSEAL_PUBLIC_KEY_NOT_PINNED,
                "ingest public key does not match the pinned fingerprint",
            ));
        }
        // SAFETY: `sealer_out` checked non-NULL, valid per the contract.
        unsafe { store_sealer(sealer_out, key) };
        Ok(())
    })
}

/// Frees a sealer. NULL is accepted and ignored. The handle must not be
/// used afterwards, and this call must not race with any other call on the
/// handle (including another free).
///
/// # Safety
///
/// `sealer` NULL or a live handle from `panseal_ingest_sealer_new*`, used by
/// no other thread during and after this call.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_sealer_free(sealer: *mut panseal_ingest_sealer) {
    if sealer.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a live handle created by Box::into_raw, freed once, by the
        // caller's contract not in use elsewhere.
        drop(unsafe { Box::from_raw(sealer) });
    }));
}

/// Writes the sealer's public-key fingerprint (SHA-256 of the SEC1 point)
/// as 64 lowercase hex digits, NUL-terminated (`PANSEAL_FINGERPRINT_BUFFER`
/// bytes): what a deployment pins and compares with the key service's
/// listing.
///
/// # Safety
///
/// `sealer` a live handle; `out` valid for `out_cap` bytes; `out_len` valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_sealer_fingerprint(
    sealer: *const panseal_ingest_sealer,
    out: *mut c_char,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contract.
        let sealer = unsafe { sealer_ref(sealer) }?;
        let fingerprint = sealer.public_key().fingerprint();
        // SAFETY: forwarded contract.
        unsafe { write_text(fingerprint.as_bytes(), out.cast(), out_cap, out_len) }
    })
}

/// Seals the PAN at (`pan`, `pan_len`) bound to `ctx` with `sealer`.
///
/// # Safety
///
/// As the arguments of `panseal_ingest_seal`.
unsafe fn ingest_seal_from(
    sealer: *const panseal_ingest_sealer,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
) -> FfiResult<IngestSealed> {
    // SAFETY: forwarded contracts.
    let (sealer, pan, ctx) = unsafe {
        (
            sealer_ref(sealer)?,
            pan_from(bytes(pan, pan_len, "PAN")?)?,
            context(ctx)?,
        )
    };
    // `pan` (the only copy of the digits) is wiped when it drops here.
    sealer.seal(&pan, &ctx).map_err(map)
}

/// Seals a PAN bound to `ctx` with the sealer's ingest public key and
/// writes the 134-character text form (`I1...`, NUL-terminated, so `out`
/// needs `PANSEAL_INGEST_TEXT_BUFFER` = 135 bytes) for a VARCHAR column.
/// Only the key service holding the private key opens or admits it.
///
/// # Safety
///
/// `sealer` a live handle; `pan` valid for `pan_len` bytes; `ctx` a valid
/// context; `out` valid for `out_cap` bytes; `out_len` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_seal(
    sealer: *const panseal_ingest_sealer,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
    out: *mut c_char,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let sealed = unsafe { ingest_seal_from(sealer, pan, pan_len, ctx) }?;
        // SAFETY: forwarded contract.
        unsafe { write_text(sealed.to_text().as_bytes(), out.cast(), out_cap, out_len) }
    })
}

/// Seals a PAN bound to `ctx` with the sealer's ingest public key and
/// writes the 101-byte binary form (`PANSEAL_INGEST_BINARY_LEN`; for a
/// BYTEA/BLOB column).
///
/// # Safety
///
/// As `panseal_ingest_seal`.
#[no_mangle]
pub unsafe extern "C" fn panseal_ingest_seal_binary(
    sealer: *const panseal_ingest_sealer,
    pan: *const u8,
    pan_len: usize,
    ctx: *const panseal_context,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> panseal_result {
    guard(|| {
        // SAFETY: forwarded contracts.
        let sealed = unsafe { ingest_seal_from(sealer, pan, pan_len, ctx) }?;
        // SAFETY: forwarded contract.
        unsafe { write_bytes(sealed.as_bytes(), out, out_cap, out_len) }
    })
}
