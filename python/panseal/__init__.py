"""panseal from Python, through the C ABI with ctypes (no compiled extension).

    import panseal
    with panseal.Client({"environment": "dev", "scope": "merchant-42",
                         "key_service": {"type": "local"},
                         "key_store": {"type": "memory"},
                         "audit": {"type": "memory"}}) as client:
        sealed = client.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
        pan, needs_reseal = client.open(sealed, "cards", "pan", "row-1",
                                        principal="agent-7", purpose="refund")

A front end that must hold nothing able to open a stored PAN seals with
a scope's ingest *public* key only (write-only ingest, HPKE; no key
service, no credential):

    sealer = panseal.IngestSealer("PIK1/prod/merchant-42/1/BPq...")
    stored = sealer.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
    # 134 characters, "I1..."; the key service admits or reveals it.

The shared library is found through the PANSEAL_LIB environment variable
(path to libpanseal.so), else next to this package, else in the crate's
target/{release,debug}/ directories.

A Client may be shared by threads. close() (also by `with` and on garbage
collection) refuses new calls at once with PansealError(Result.CLIENT_CLOSED),
waits for the calls already running on other threads to return, then frees
the native handle: a call never runs on a freed handle.

Python strings are immutable and cannot be wiped: the PAN returned by
`open` lives until the garbage collector frees it. The library wipes its
own copies; the buffer it writes into is zeroed by this module after the
string is made.
"""

import ctypes
import json
import os
import threading
from ctypes import (POINTER, Structure, byref, c_bool, c_char, c_char_p,
                    c_size_t, c_uint8, c_uint32, c_void_p)
from pathlib import Path

__all__ = ["Client", "IngestSealer", "PansealError", "mask", "version", "Result"]


class Result:
    """Result codes of the C ABI (panseal_result)."""
    OK = 0
    NULL_ARGUMENT = 1
    INVALID_ARGUMENT = 2
    INVALID_PAN = 3
    INVALID_CONTEXT = 4
    MALFORMED_CIPHERTEXT = 5
    DECRYPTION_FAILED = 6
    KEY_REFUSED = 7
    KEY_DESTROYED = 8
    KEY_SERVICE_UNAVAILABLE = 9
    KEY_SERVICE_REFUSED = 10
    KEY_STORE_ERROR = 11
    AUDIT_ERROR = 12
    CONFIG_ERROR = 13
    BUFFER_TOO_SMALL = 14
    PANIC = 15
    CLIENT_CLOSED = 16
    MALFORMED_PUBLIC_KEY = 17
    INVALID_PUBLIC_KEY = 18
    PUBLIC_KEY_NOT_PINNED = 19


SEALED_TEXT_BUFFER = 65
SEALED_BINARY_LEN = 48
PAN_BUFFER = 20
INDEX_BUFFER = 65
INGEST_TEXT_BUFFER = 135
INGEST_BINARY_LEN = 101
FINGERPRINT_BUFFER = 65
MASK_STYLES = {"last4": 0, "bin6": 1, "bin8": 2}


class PansealError(Exception):
    """A panseal call failed. `code` is a `Result` value; the message never
    contains a PAN."""

    def __init__(self, code, message):
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message

    @property
    def retryable(self):
        return self.code == Result.KEY_SERVICE_UNAVAILABLE


class _Context(Structure):
    _fields_ = [
        ("table", POINTER(c_uint8)), ("table_len", c_size_t),
        ("column", POINTER(c_uint8)), ("column_len", c_size_t),
        ("row_key", POINTER(c_uint8)), ("row_key_len", c_size_t),
    ]


def _find_library():
    env = os.environ.get("PANSEAL_LIB")
    if env:
        return env
    here = Path(__file__).resolve().parent
    candidates = [here / "libpanseal.so"]
    root = here.parent.parent
    for profile in ("release", "debug"):
        candidates.append(root / "target" / profile / "libpanseal.so")
    for c in candidates:
        if c.exists():
            return str(c)
    raise OSError("libpanseal.so not found: build with `cargo build --features ffi` "
                  "or set PANSEAL_LIB")


def _load():
    lib = ctypes.CDLL(_find_library())
    u8p = POINTER(c_uint8)
    lib.panseal_version.restype = c_char_p
    lib.panseal_version.argtypes = []
    lib.panseal_last_error.restype = c_uint32
    lib.panseal_last_error.argtypes = [POINTER(c_char), c_size_t, POINTER(c_size_t)]
    lib.panseal_client_new.restype = c_uint32
    lib.panseal_client_new.argtypes = [c_char_p, POINTER(c_void_p)]
    lib.panseal_client_new_from_file.restype = c_uint32
    lib.panseal_client_new_from_file.argtypes = [c_char_p, POINTER(c_void_p)]
    lib.panseal_client_close.restype = c_uint32
    lib.panseal_client_close.argtypes = [c_void_p]
    lib.panseal_client_free.restype = None
    lib.panseal_client_free.argtypes = [c_void_p]
    lib.panseal_seal.restype = c_uint32
    lib.panseal_seal.argtypes = [c_void_p, u8p, c_size_t, POINTER(_Context),
                                 POINTER(c_char), c_size_t, POINTER(c_size_t)]
    lib.panseal_seal_binary.restype = c_uint32
    lib.panseal_seal_binary.argtypes = [c_void_p, u8p, c_size_t, POINTER(_Context),
                                        u8p, c_size_t, POINTER(c_size_t)]
    lib.panseal_open.restype = c_uint32
    lib.panseal_open.argtypes = [c_void_p, u8p, c_size_t, POINTER(_Context),
                                 c_char_p, c_char_p, POINTER(c_char), c_size_t,
                                 POINTER(c_size_t), POINTER(c_bool)]
    lib.panseal_blind_index.restype = c_uint32
    lib.panseal_blind_index.argtypes = [c_void_p, u8p, c_size_t, POINTER(c_char),
                                        c_size_t, POINTER(c_size_t), POINTER(c_uint32)]
    lib.panseal_mask.restype = c_uint32
    lib.panseal_mask.argtypes = [u8p, c_size_t, c_uint32, POINTER(c_char), c_size_t,
                                 POINTER(c_size_t)]
    lib.panseal_rotate_dek.restype = c_uint32
    lib.panseal_rotate_dek.argtypes = [c_void_p]
    lib.panseal_ingest_sealer_new.restype = c_uint32
    lib.panseal_ingest_sealer_new.argtypes = [u8p, c_size_t, POINTER(c_void_p)]
    lib.panseal_ingest_sealer_new_pinned.restype = c_uint32
    lib.panseal_ingest_sealer_new_pinned.argtypes = [u8p, c_size_t, u8p, c_size_t,
                                                     POINTER(c_void_p)]
    lib.panseal_ingest_sealer_free.restype = None
    lib.panseal_ingest_sealer_free.argtypes = [c_void_p]
    lib.panseal_ingest_sealer_fingerprint.restype = c_uint32
    lib.panseal_ingest_sealer_fingerprint.argtypes = [c_void_p, POINTER(c_char), c_size_t,
                                                      POINTER(c_size_t)]
    lib.panseal_ingest_seal.restype = c_uint32
    lib.panseal_ingest_seal.argtypes = [c_void_p, u8p, c_size_t, POINTER(_Context),
                                        POINTER(c_char), c_size_t, POINTER(c_size_t)]
    lib.panseal_ingest_seal_binary.restype = c_uint32
    lib.panseal_ingest_seal_binary.argtypes = [c_void_p, u8p, c_size_t, POINTER(_Context),
                                               u8p, c_size_t, POINTER(c_size_t)]
    return lib


_lib = _load()


def _bytes(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int):
        return str(value).encode()
    raise TypeError("expected str, bytes or int")


def _buf(data):
    """A ctypes uint8 array holding `data` (kept alive by the caller)."""
    return (c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")


def _last_error():
    buf = ctypes.create_string_buffer(512)
    n = c_size_t(0)
    if _lib.panseal_last_error(buf, len(buf), byref(n)) != Result.OK:
        return "unknown error"
    return buf.value.decode("utf-8", "replace")


def _check(code):
    if code != Result.OK:
        raise PansealError(code, _last_error())


def version():
    """The library version."""
    return _lib.panseal_version().decode()


def mask(pan, style="last4"):
    """The masked form of a PAN (PCI DSS 3.4.1): 'last4', 'bin6' or 'bin8'."""
    data = _bytes(pan)
    out = ctypes.create_string_buffer(PAN_BUFFER)
    n = c_size_t(0)
    _check(_lib.panseal_mask(_buf(data), len(data), MASK_STYLES[style], out,
                             len(out), byref(n)))
    return out.value.decode()


class Client:
    """A panseal client (thread-safe: share one between threads).

    Every call holds the client for its duration (an in-flight count under a
    lock); close() refuses new calls, waits for running ones, then frees the
    native handle."""

    def __init__(self, config):
        self._init_state()
        text = config if isinstance(config, str) else json.dumps(config)
        handle = c_void_p()
        _check(_lib.panseal_client_new(text.encode(), byref(handle)))
        self._handle = handle

    @classmethod
    def from_file(cls, path):
        self = cls.__new__(cls)
        self._init_state()
        handle = c_void_p()
        _check(_lib.panseal_client_new_from_file(os.fsencode(path), byref(handle)))
        self._handle = handle
        return self

    def _init_state(self):
        self._handle = None
        self._in_flight = 0
        self._idle = threading.Condition(threading.Lock())

    def close(self):
        """Refuses new calls, waits for calls running on other threads, then
        frees the native handle. Idempotent; safe from any thread."""
        idle = getattr(self, "_idle", None)
        if idle is None:
            return
        with idle:
            handle, self._handle = self._handle, None
            if handle:
                # The C side refuses later calls too, whatever holds the handle.
                _lib.panseal_client_close(handle)
            while self._in_flight:
                idle.wait()
        if handle:
            _lib.panseal_client_free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _h(self):
        """The native handle, without holding it (tests of the raw ABI)."""
        if not self._handle:
            raise PansealError(Result.CLIENT_CLOSED, "client is closed")
        return self._handle

    def _enter(self):
        """Holds the client for one call; pair with _leave()."""
        with self._idle:
            if not self._handle:
                raise PansealError(Result.CLIENT_CLOSED, "client is closed")
            self._in_flight += 1
            return self._handle

    def _leave(self):
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _call(self, fn, *args):
        handle = self._enter()
        try:
            return fn(handle, *args)
        finally:
            self._leave()

    @staticmethod
    def _ctx(table, column, row_key):
        parts = [_bytes(table), _bytes(column), _bytes(row_key)]
        bufs = [_buf(p) for p in parts]
        ctx = _Context(bufs[0], len(parts[0]), bufs[1], len(parts[1]),
                       bufs[2], len(parts[2]))
        return ctx, bufs

    def seal(self, pan, table, column, row_key):
        """Seals a PAN bound to (table, column, row_key); returns the
        64-character text form."""
        data = _bytes(pan)
        ctx, keep = self._ctx(table, column, row_key)
        out = ctypes.create_string_buffer(SEALED_TEXT_BUFFER)
        n = c_size_t(0)
        _check(self._call(_lib.panseal_seal, _buf(data), len(data), byref(ctx), out,
                          len(out), byref(n)))
        del keep
        return out.value.decode()

    def seal_binary(self, pan, table, column, row_key):
        """Seals a PAN; returns the 48-byte binary form."""
        data = _bytes(pan)
        ctx, keep = self._ctx(table, column, row_key)
        out = (c_uint8 * SEALED_BINARY_LEN)()
        n = c_size_t(0)
        _check(self._call(_lib.panseal_seal_binary, _buf(data), len(data), byref(ctx),
                          out, len(out), byref(n)))
        del keep
        return bytes(out[: n.value])

    def open(self, sealed, table, column, row_key, principal, purpose):
        """Opens a sealed PAN (text or binary); returns (pan, needs_reseal).
        Audited under `principal` and `purpose`."""
        data = _bytes(sealed)
        ctx, keep = self._ctx(table, column, row_key)
        out = ctypes.create_string_buffer(PAN_BUFFER)
        n = c_size_t(0)
        reseal = c_bool(False)
        try:
            _check(self._call(_lib.panseal_open, _buf(data), len(data), byref(ctx),
                              principal.encode(), purpose.encode(), out,
                              len(out), byref(n), byref(reseal)))
            return out.value.decode(), bool(reseal.value)
        finally:
            ctypes.memset(out, 0, len(out))
            del keep

    def blind_index(self, pan):
        """The blind index (64 hex digits) and its index-key version."""
        data = _bytes(pan)
        out = ctypes.create_string_buffer(INDEX_BUFFER)
        n = c_size_t(0)
        v = c_uint32(0)
        _check(self._call(_lib.panseal_blind_index, _buf(data), len(data), out,
                          len(out), byref(n), byref(v)))
        return out.value.decode(), v.value

    def rotate_dek(self):
        """Retires the active DEK; the next seal uses a fresh one."""
        _check(self._call(_lib.panseal_rotate_dek))


class IngestSealer:
    """Write-only ingest: seals PANs with a scope's ingest public key (its
    text form, `PIK1/<environment>/<scope>/<version>/<base64url point>`)
    and holds nothing else: no key service, no credential, nothing that
    opens a PAN. Only the key service holding the private key opens or
    admits what it seals.

    `fingerprint` (64 hex digits, SHA-256 of the public point), if given,
    pins the key: a substituted public key raises
    PansealError(Result.PUBLIC_KEY_NOT_PINNED). A public key that is not a
    point on P-256 raises Result.INVALID_PUBLIC_KEY; malformed text,
    Result.MALFORMED_PUBLIC_KEY.

    Thread-safe like Client: share one between threads; close() waits for
    running calls before freeing the native handle. Holds no secret, so it
    may also be used after os.fork()."""

    def __init__(self, public_key, fingerprint=None):
        self._handle = None
        self._in_flight = 0
        self._idle = threading.Condition(threading.Lock())
        key = _bytes(public_key)
        handle = c_void_p()
        if fingerprint is None:
            _check(_lib.panseal_ingest_sealer_new(_buf(key), len(key), byref(handle)))
        else:
            pin = _bytes(fingerprint)
            _check(_lib.panseal_ingest_sealer_new_pinned(_buf(key), len(key), _buf(pin),
                                                         len(pin), byref(handle)))
        self._handle = handle

    def close(self):
        """Refuses new calls, waits for running ones, frees the native
        handle. Idempotent; safe from any thread."""
        idle = getattr(self, "_idle", None)
        if idle is None:
            return
        with idle:
            handle, self._handle = self._handle, None
            while self._in_flight:
                idle.wait()
        if handle:
            _lib.panseal_ingest_sealer_free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _call(self, fn, *args):
        with self._idle:
            if not self._handle:
                raise PansealError(Result.CLIENT_CLOSED, "sealer is closed")
            self._in_flight += 1
            handle = self._handle
        try:
            return fn(handle, *args)
        finally:
            with self._idle:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    @property
    def fingerprint(self):
        """SHA-256 of the public point, 64 lowercase hex digits: what a
        deployment pins."""
        out = ctypes.create_string_buffer(FINGERPRINT_BUFFER)
        n = c_size_t(0)
        _check(self._call(_lib.panseal_ingest_sealer_fingerprint, out, len(out), byref(n)))
        return out.value.decode()

    def seal(self, pan, table, column, row_key):
        """Seals a PAN bound to (table, column, row_key); returns the
        134-character text form ("I1...")."""
        data = _bytes(pan)
        ctx, keep = Client._ctx(table, column, row_key)
        pan_buf = _buf(data)
        out = ctypes.create_string_buffer(INGEST_TEXT_BUFFER)
        n = c_size_t(0)
        try:
            _check(self._call(_lib.panseal_ingest_seal, pan_buf, len(data), byref(ctx), out,
                              len(out), byref(n)))
            return out.value.decode()
        finally:
            ctypes.memset(pan_buf, 0, ctypes.sizeof(pan_buf))
            del keep

    def seal_binary(self, pan, table, column, row_key):
        """Seals a PAN; returns the 101-byte binary form."""
        data = _bytes(pan)
        ctx, keep = Client._ctx(table, column, row_key)
        pan_buf = _buf(data)
        out = (c_uint8 * INGEST_BINARY_LEN)()
        n = c_size_t(0)
        try:
            _check(self._call(_lib.panseal_ingest_seal_binary, pan_buf, len(data),
                              byref(ctx), out, len(out), byref(n)))
            return bytes(out[: n.value])
        finally:
            ctypes.memset(pan_buf, 0, ctypes.sizeof(pan_buf))
            del keep
