"""Seal and open throughput from Python through ctypes.

    cargo build --release --features ffi --lib
    PANSEAL_LIB=target/release/libpanseal.so python3 python/bench.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import panseal  # noqa: E402

CONFIG = {"environment": "bench", "scope": "m", "key_service": {"type": "local"},
          "key_store": {"type": "memory"}, "audit": {"type": "memory"}}


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
    print(f"python ctypes: seal {seal:,.0f} ops/s, open {opn:,.0f} ops/s, mask {mask:,.0f} ops/s")


if __name__ == "__main__":
    main()
