"""ctypes declarations of the C ABI (ffi/include/panseal.h) for the tests
that exercise it directly: test_capi.py and test_close_race.py. Not a
wrapper: the tests call the `panseal_*` functions themselves.

The library is PANSEAL_LIB (scripts/test.sh sets it), else the crate's
target/{debug,release}/libpanseal_ffi.so (`cargo build -p panseal-ffi`)."""

import ctypes
import os
from ctypes import POINTER, Structure, c_bool, c_char, c_char_p, c_size_t, c_uint8, c_uint32, c_void_p
from pathlib import Path

OK = 0
BUFFER_TOO_SMALL = 14
CLIENT_CLOSED = 16


class Context(Structure):
    _fields_ = [
        ("table", POINTER(c_uint8)), ("table_len", c_size_t),
        ("column", POINTER(c_uint8)), ("column_len", c_size_t),
        ("row_key", POINTER(c_uint8)), ("row_key_len", c_size_t),
    ]


def library_path():
    env = os.environ.get("PANSEAL_LIB")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    for profile in ("debug", "release"):
        p = root / "target" / profile / "libpanseal_ffi.so"
        if p.exists():
            return str(p)
    raise OSError("libpanseal_ffi.so not found: `cargo build -p panseal-ffi` or set PANSEAL_LIB")


def load(path=None):
    lib = ctypes.CDLL(path or library_path())
    u8p = POINTER(c_uint8)
    sig = {
        "panseal_last_error": (c_uint32, [POINTER(c_char), c_size_t, POINTER(c_size_t)]),
        "panseal_client_new": (c_uint32, [c_char_p, POINTER(c_void_p)]),
        "panseal_client_close": (c_uint32, [c_void_p]),
        "panseal_client_free": (None, [c_void_p]),
        "panseal_seal": (c_uint32, [c_void_p, u8p, c_size_t, POINTER(Context),
                                    POINTER(c_char), c_size_t, POINTER(c_size_t)]),
        "panseal_seal_binary": (c_uint32, [c_void_p, u8p, c_size_t, POINTER(Context),
                                           u8p, c_size_t, POINTER(c_size_t)]),
        "panseal_open": (c_uint32, [c_void_p, u8p, c_size_t, POINTER(Context), c_char_p,
                                    c_char_p, POINTER(c_char), c_size_t, POINTER(c_size_t),
                                    POINTER(c_bool)]),
        "panseal_blind_index": (c_uint32, [c_void_p, u8p, c_size_t, POINTER(c_char), c_size_t,
                                           POINTER(c_size_t), POINTER(c_uint32)]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def buf(data):
    """A ctypes uint8 array holding `data` (kept alive by the caller)."""
    return (c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")


def context(table, column, row_key):
    """A panseal_context and the buffers it points into (keep both alive)."""
    parts = [p if isinstance(p, bytes) else p.encode() for p in (table, column, row_key)]
    bufs = [buf(p) for p in parts]
    return Context(bufs[0], len(parts[0]), bufs[1], len(parts[1]), bufs[2], len(parts[2])), bufs
