"""The C ABI (libpanseal_ffi.so) called directly from Python through
ctypes: a buffer that is too small gets nothing written and the needed
size back. (The Python package itself is a PyO3 extension: test_ffi.py.)"""

import ctypes
import json

import pytest

import capi

CONFIG = json.dumps({"environment": "test", "scope": "merchant-1",
                     "key_service": {"type": "local"}, "key_store": {"type": "memory"},
                     "audit": {"type": "memory"}}).encode()
PAN = b"4111111111111111"


@pytest.fixture(scope="module")
def lib():
    return capi.load()


@pytest.fixture
def handle(lib):
    h = ctypes.c_void_p()
    assert lib.panseal_client_new(CONFIG, ctypes.byref(h)) == capi.OK
    yield h
    lib.panseal_client_free(h)


def test_small_buffers_write_nothing(lib, handle):
    ctx, keep = capi.context("cards", "pan", "1")
    out = ctypes.create_string_buffer(b"untouched", 10)
    need = ctypes.c_size_t(0)
    code = lib.panseal_seal(handle, capi.buf(PAN), len(PAN), ctypes.byref(ctx),
                            out, len(out), ctypes.byref(need))
    assert code == capi.BUFFER_TOO_SMALL
    assert need.value == 65
    assert out.value == b"untouched"
    text = ctypes.create_string_buffer(65)
    assert lib.panseal_seal(handle, capi.buf(PAN), len(PAN), ctypes.byref(ctx),
                            text, len(text), ctypes.byref(need)) == capi.OK
    sealed = text.value
    small = ctypes.create_string_buffer(b"keep", 8)
    code = lib.panseal_open(handle, capi.buf(sealed), len(sealed), ctypes.byref(ctx),
                            b"py", b"small", small, len(small), ctypes.byref(need), None)
    assert code == capi.BUFFER_TOO_SMALL
    assert need.value == 20
    assert small.value == b"keep"
    del keep
