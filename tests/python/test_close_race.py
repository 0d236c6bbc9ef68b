"""Closing a client while other threads are inside calls on it.

Written against the public Python API only (Client, its methods, close,
PansealError, Result), so it runs unchanged against any implementation of
the module. The hammering runs in a child interpreter so that a crash (a
use-after-free of the native handle) fails this test with its signal
instead of killing pytest.

What must hold: a call racing with close() either completes with the right
answer or raises PansealError with code Result.CLIENT_CLOSED; close() may be
called from several threads at once; nothing crashes.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")

CHILD = textwrap.dedent(
    r"""
    import json, os, random, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import panseal
    from panseal import Client, PansealError, Result

    ROUNDS = int(sys.argv[2])
    DEADLINE = time.monotonic() + float(sys.argv[3])
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
                    s = client.seal(PAN, "cards", "pan", row)
                    pan, _ = client.open(s, "cards", "pan", row, "racer", "close-race")
                    good = pan == PAN
                elif op == 1:
                    idx, version = client.blind_index(PAN)
                    good = len(idx) == 64 and version >= 1
                else:
                    good = len(client.seal_binary(PAN, "cards", "pan", row)) == 48
                with lock:
                    counts["ok" if good else "wrong"] += 1
            except PansealError as e:
                with lock:
                    counts["closed" if e.code == Result.CLIENT_CLOSED else "other"] += 1
                    if e.code != Result.CLIENT_CLOSED:
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
            client.seal(PAN, "cards", "pan", "after")
            counts["other"] += 1
        except PansealError as e:
            counts["closed" if e.code == Result.CLIENT_CLOSED else "other"] += 1
    counts["rounds"] = rounds
    print(json.dumps(counts))
    sys.exit(0 if counts["wrong"] == 0 and counts["other"] == 0 else 2)
    """
)


def run_child(rounds=300, seconds=30, env=None):
    return subprocess.run(
        [sys.executable, "-c", CHILD, PYTHON_DIR, str(rounds), str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        env=env,
    )


def test_close_while_other_threads_call():
    out = run_child()
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
        import pytest

        pytest.skip("PANSEAL_ASAN_LIB / PANSEAL_ASAN_RUNTIME not set")
    env = dict(os.environ, PANSEAL_LIB=lib, LD_PRELOAD=runtime,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86")
    out = run_child(rounds=100, seconds=60, env=env)
    assert out.returncode == 0, (
        f"child exited with {out.returncode}\nstdout: {out.stdout[-2000:]}\n"
        f"stderr: {out.stderr[-6000:]}"
    )
    assert "AddressSanitizer" not in out.stderr, out.stderr[-6000:]
