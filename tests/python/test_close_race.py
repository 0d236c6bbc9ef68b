"""Closing a client while other threads are inside calls on it.

Run twice: against the C ABI (libpanseal_ffi.so through ctypes, called
directly by the child: `panseal_client_close` racing with calls on the
handle, `panseal_client_free` once they have returned) and against the
Python package's `Client` (PyO3: close() racing with calls that run
without the GIL). The hammering runs in a child interpreter so that a
crash (a use-after-free of the native handle) fails this test with its
signal instead of killing pytest.

What must hold: a call racing with close either completes with the right
answer or is refused as closed (PANSEAL_CLIENT_CLOSED / ClientClosed);
close may be called from several threads at once; nothing crashes.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = str(Path(__file__).resolve().parent)

CHILD = textwrap.dedent(
    r"""
    import ctypes, json, os, random, sys, threading, time
    sys.path.insert(0, sys.argv[1])

    MODE = sys.argv[4]
    ROUNDS = int(sys.argv[2])
    DEADLINE = time.monotonic() + float(sys.argv[3])

    class Closed(Exception):
        pass

    if MODE == "pyo3":
        import panseal
        from panseal import ClientClosed, PansealError

        class Client:
            def __init__(self, config):
                self.c = panseal.Client(config)

            def call(self, name, *args):
                try:
                    return getattr(self.c, name)(*args)
                except ClientClosed:
                    raise Closed()

            def close(self):
                self.c.close()

            def free(self):
                pass
    else:
        import capi
        from capi import CLIENT_CLOSED, OK
        LIB = capi.load()

        class PansealError(Exception):
            def __init__(self, code):
                super().__init__(f"code {code}")
                self.code = code

        def check(code):
            if code == CLIENT_CLOSED:
                raise Closed()
            if code != OK:
                raise PansealError(code)

        # Calls the C functions on one handle; close() is
        # panseal_client_close (may race with calls), free() runs once
        # every thread has returned.
        class Client:

            def __init__(self, config):
                self.h = ctypes.c_void_p()
                check(LIB.panseal_client_new(json.dumps(config).encode(), ctypes.byref(self.h)))

            def call(self, name, *args):
                return getattr(self, "_" + name)(*args)

            def _seal(self, pan, table, column, row):
                ctx, keep = capi.context(table, column, row)
                out, n = ctypes.create_string_buffer(65), ctypes.c_size_t(0)
                check(LIB.panseal_seal(self.h, capi.buf(pan.encode()), len(pan), ctypes.byref(ctx),
                                       out, len(out), ctypes.byref(n)))
                return out.value.decode()

            def _seal_binary(self, pan, table, column, row):
                ctx, keep = capi.context(table, column, row)
                out, n = (ctypes.c_uint8 * 48)(), ctypes.c_size_t(0)
                check(LIB.panseal_seal_binary(self.h, capi.buf(pan.encode()), len(pan),
                                              ctypes.byref(ctx), out, len(out), ctypes.byref(n)))
                return bytes(out[: n.value])

            def _open(self, sealed, table, column, row, principal, purpose):
                ctx, keep = capi.context(table, column, row)
                data = sealed.encode()
                out, n = ctypes.create_string_buffer(20), ctypes.c_size_t(0)
                try:
                    check(LIB.panseal_open(self.h, capi.buf(data), len(data), ctypes.byref(ctx),
                                           principal.encode(), purpose.encode(), out, len(out),
                                           ctypes.byref(n), None))
                    return out.value.decode(), False
                finally:
                    ctypes.memset(out, 0, len(out))

            def _blind_index(self, pan):
                out, n, v = ctypes.create_string_buffer(65), ctypes.c_size_t(0), ctypes.c_uint32(0)
                check(LIB.panseal_blind_index(self.h, capi.buf(pan.encode()), len(pan), out,
                                              len(out), ctypes.byref(n), ctypes.byref(v)))
                return out.value.decode(), v.value

            def close(self):
                check(LIB.panseal_client_close(self.h))

            def free(self):
                LIB.panseal_client_free(self.h)
    CONFIG = {"environment": "test", "scope": "m",
              "key_service": {"type": "local"},
              "key_store": {"type": "memory"},
              "audit": {"type": "memory"}}
    PAN = "4111111111111111"
    counts = {"ok": 0, "closed": 0, "wrong": 0, "other": 0, "rounds": 0}
    lock = threading.Lock()

    def worker(client, t, start):
        start.wait()
        i = 0
        while True:
            i += 1
            row = f"{t}-{i}"
            try:
                op = i % 3
                if op == 0:
                    s = client.call("seal", PAN, "cards", "pan", row)
                    pan, _ = client.call("open", s, "cards", "pan", row, "racer", "close-race")
                    good = pan == PAN
                elif op == 1:
                    idx, version = client.call("blind_index", PAN)
                    good = len(idx) == 64 and version >= 1
                else:
                    good = len(client.call("seal_binary", PAN, "cards", "pan", row)) == 48
                with lock:
                    counts["ok" if good else "wrong"] += 1
            except Closed:
                with lock:
                    counts["closed"] += 1
                return
            except PansealError as e:
                with lock:
                    counts["other"] += 1
                print("unexpected error:", e, file=sys.stderr)
                return
            except Exception as e:  # noqa: BLE001
                with lock:
                    counts["other"] += 1
                print("unexpected exception:", type(e).__name__, e, file=sys.stderr)
                return

    rounds = 0
    while rounds < ROUNDS and time.monotonic() < DEADLINE:
        rounds += 1
        client = Client(CONFIG)
        start = threading.Event()
        threads = [threading.Thread(target=worker, args=(client, t, start)) for t in range(4)]
        for th in threads:
            th.start()
        start.set()
        time.sleep(random.random() * 0.002)
        # Two closers at once: close must be idempotent and race-free too.
        closers = [threading.Thread(target=client.close) for _ in range(2)]
        for th in closers:
            th.start()
        for th in closers + threads:
            th.join(10)
            if th.is_alive():
                print("thread hung", file=sys.stderr)
                os._exit(3)
        # After close, every call refuses clearly.
        try:
            client.call("seal", PAN, "cards", "pan", "after")
            counts["other"] += 1
        except Closed:
            counts["closed"] += 1
        except PansealError:
            counts["other"] += 1
        client.free()
    counts["rounds"] = rounds
    print(json.dumps(counts))
    sys.exit(0 if counts["wrong"] == 0 and counts["other"] == 0 else 2)
    """
)


def run_child(mode, rounds=300, seconds=30, env=None):
    return subprocess.run(
        [sys.executable, "-c", CHILD, TESTS_DIR, str(rounds), str(seconds), mode],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        env=env,
    )


@pytest.mark.parametrize("mode", ["capi", "pyo3"])
def test_close_while_other_threads_call(mode):
    out = run_child(mode)
    assert out.returncode == 0, (
        f"child exited with {out.returncode} (negative = killed by that signal)\n"
        f"stdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-4000:]}"
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["rounds"] >= 50, counts
    assert counts["ok"] > 0 and counts["closed"] >= counts["rounds"], counts
    assert counts["wrong"] == 0 and counts["other"] == 0, counts


def test_close_race_under_address_sanitizer():
    """The same race with the library built with AddressSanitizer, when
    PANSEAL_ASAN_LIB names such a build (scripts/test.sh builds one);
    any use-after-free is then reported even where it would not crash."""
    lib = os.environ.get("PANSEAL_ASAN_LIB")
    runtime = os.environ.get("PANSEAL_ASAN_RUNTIME")
    if not lib or not runtime:
        pytest.skip("PANSEAL_ASAN_LIB / PANSEAL_ASAN_RUNTIME not set")
    env = dict(os.environ, PANSEAL_LIB=lib, LD_PRELOAD=runtime,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86")
    out = run_child("capi", rounds=100, seconds=60, env=env)
    assert out.returncode == 0, (
        f"child exited with {out.returncode}\nstdout: {out.stdout[-2000:]}\n"
        f"stderr: {out.stderr[-6000:]}"
    )
    assert "AddressSanitizer" not in out.stderr, out.stderr[-6000:]
