"""Seal and open throughput from Python through the panseal package (PyO3
extension), beside the same calls through the C ABI with ctypes in the same
run (the binding layer's cost as a ratio), and write-only ingest sealing
with a public key.

    pip install maturin
    maturin build --release -m python/Cargo.toml --out target/wheels
    pip install --force-reinstall target/wheels/panseal-*.whl
    cargo build --release -p panseal-ffi       # optional: the ctypes baseline
    PANSEAL_LIB=target/release/libpanseal_ffi.so python3 python/bench.py
"""
import base64
import ctypes
import json
import os
import sys
import time
from pathlib import Path

# This file sits next to the package's Python sources (python/panseal/,
# without the compiled module): import the installed package instead.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import panseal  # noqa: E402

CONFIG = {"environment": "bench", "scope": "m", "key_service": {"type": "local"},
          "key_store": {"type": "memory"}, "audit": {"type": "memory"}}
PAN = "4111111111111111"

# The P-256 generator as an ingest public key (any valid point serves).
GENERATOR = bytes.fromhex(
    "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")
INGEST_KEY = "PIK1/bench/m/1/" + base64.urlsafe_b64encode(GENERATOR).rstrip(b"=").decode()


def rate(fn, seconds=2.0):
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


class _Ctx(ctypes.Structure):
    _fields_ = [(f, t) for name in ("table", "column", "row_key")
                for f, t in ((name, ctypes.c_char_p), (name + "_len", ctypes.c_size_t))]


def ctypes_rates(path):
    """Seal and open through the C ABI, called with ctypes directly."""
    lib = ctypes.CDLL(path)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.panseal_client_new.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.panseal_seal.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.POINTER(_Ctx), ctypes.c_char_p, ctypes.c_size_t, size_p]
    lib.panseal_open.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.POINTER(_Ctx), ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.c_char_p, ctypes.c_size_t, size_p,
                                 ctypes.POINTER(ctypes.c_bool)]
    lib.panseal_client_free.argtypes = [ctypes.c_void_p]
    handle = ctypes.c_void_p()
    assert lib.panseal_client_new(json.dumps(CONFIG).encode(), ctypes.byref(handle)) == 0
    ctx = _Ctx(b"cards", 5, b"pan", 3, b"row-1", 5)
    out, pan_out, n = ctypes.create_string_buffer(65), ctypes.create_string_buffer(20), ctypes.c_size_t()
    pan = PAN.encode()

    def seal():
        assert lib.panseal_seal(handle, pan, len(pan), ctypes.byref(ctx), out, 65,
                                ctypes.byref(n)) == 0
        return out.value

    sealed = seal()

    def open_():
        assert lib.panseal_open(handle, sealed, len(sealed), ctypes.byref(ctx), b"bench",
                                b"benchmark", pan_out, 20, ctypes.byref(n), None) == 0
        ctypes.memset(pan_out, 0, 20)

    try:
        return rate(seal), rate(open_)
    finally:
        lib.panseal_client_free(handle)


def main():
    with panseal.Client(CONFIG) as c:
        sealed = c.seal(PAN, "cards", "pan", "row-1")
        seal = rate(lambda: c.seal(PAN, "cards", "pan", "row-1"))

        def open_and_wipe():
            pan, _ = c.open(sealed, "cards", "pan", "row-1", "bench", "benchmark")
            pan.wipe()

        opn = rate(open_and_wipe)
        mask = rate(lambda: panseal.mask(PAN))
    with panseal.IngestSealer(INGEST_KEY) as sealer:
        ingest = rate(lambda: sealer.seal(PAN, "cards", "pan", "row-1"))
    print(f"python (PyO3): seal {seal:,.0f} ops/s, open {opn:,.0f} ops/s, "
          f"mask {mask:,.0f} ops/s, ingest seal {ingest:,.0f} ops/s")
    lib = os.environ.get("PANSEAL_LIB")
    if lib:
        c_seal, c_open = ctypes_rates(lib)
        print(f"same run, C ABI through ctypes: seal {c_seal:,.0f} ops/s, open {c_open:,.0f} "
              f"ops/s; PyO3/ctypes: seal {seal / c_seal:.2f}x, open {opn / c_open:.2f}x")


if __name__ == "__main__":
    main()
