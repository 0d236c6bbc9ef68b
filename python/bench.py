"""Seal and open throughput from Python through ctypes (and write-only
ingest sealing with a public key).

    cargo build --release --features ffi --lib
    PANSEAL_LIB=target/release/libpanseal.so python3 python/bench.py
"""
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import panseal  # noqa: E402

CONFIG = {"environment": "bench", "scope": "m", "key_service": {"type": "local"},
          "key_store": {"type": "memory"}, "audit": {"type": "memory"}}


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


def main():
    with panseal.Client(CONFIG) as c:
        sealed = c.seal("4111111111111111", "cards", "pan", "row-1")
        seal = rate(lambda: c.seal("4111111111111111", "cards", "pan", "row-1"))
        opn = rate(lambda: c.open(sealed, "cards", "pan", "row-1", "bench", "benchmark"))
        mask = rate(lambda: panseal.mask("4111111111111111"))
    with panseal.IngestSealer(INGEST_KEY) as sealer:
        ingest = rate(lambda: sealer.seal("4111111111111111", "cards", "pan", "row-1"))
    print(f"python ctypes: seal {seal:,.0f} ops/s, open {opn:,.0f} ops/s, mask {mask:,.0f} ops/s, "
          f"ingest seal {ingest:,.0f} ops/s")


if __name__ == "__main__":
    main()
