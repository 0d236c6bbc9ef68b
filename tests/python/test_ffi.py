"""The C ABI from Python (ctypes): round trip, wrong context, bad input, small
buffers, concurrent use from threads. Needs libpanseal.so built with the `ffi`
feature (scripts/test.sh sets PANSEAL_LIB)."""

import ctypes
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
import panseal  # noqa: E402
from panseal import Client, PansealError, Result  # noqa: E402

CONFIG = {
    "environment": "test",
    "scope": "merchant-1",
    "key_service": {"type": "local"},
    "key_store": {"type": "memory"},
    "audit": {"type": "memory"},
}
PAN = "4111111111111111"


@pytest.fixture
def client():
    with Client(CONFIG) as c:
        yield c


def test_version():
    assert panseal.version()


def test_round_trip_text_and_binary(client):
    sealed = client.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
    assert len(sealed) == 64 and sealed.startswith("P1") and PAN not in sealed
    pan, reseal = client.open(sealed, "cards", "pan", "row-1", "py", "test")
    assert pan == PAN and reseal is False
    binary = client.seal_binary("378282246310005", "cards", "pan", b"\x00\x01")
    assert len(binary) == 48 and binary[0] == 1
    assert client.open(binary, "cards", "pan", b"\x00\x01", "py", "test")[0] == "378282246310005"


def test_every_length(client):
    # Luhn-valid PANs of 12..19 digits.
    def luhn(prefix, n):
        digits = [int(d) for d in prefix.ljust(n - 1, "7")]
        s = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
                for i, d in enumerate(reversed(digits)))
        return "".join(map(str, digits)) + str((10 - s % 10) % 10)
    for n in range(12, 20):
        pan = luhn("4", n)
        sealed = client.seal(pan, "t", "c", str(n))
        assert len(sealed) == 64
        assert client.open(sealed, "t", "c", str(n), "py", "len")[0] == pan


def test_wrong_context_is_opaque(client):
    sealed = client.seal(PAN, "cards", "pan", "row-1")
    for ctx in [("cards", "pan", "row-2"), ("cards", "pan2", "row-1"), ("card", "pan", "row-1")]:
        with pytest.raises(PansealError) as e:
            client.open(sealed, *ctx, "py", "test")
        assert e.value.code == Result.DECRYPTION_FAILED
        assert e.value.message == "decryption failed"


def test_bad_input(client):
    for bad in ["4111111111111112", ";4111111111111111=2512?", "41111x1111111111", ""]:
        with pytest.raises(PansealError) as e:
            client.seal(bad, "cards", "pan", "1")
        assert e.value.code == Result.INVALID_PAN
        assert "411111" not in str(e.value)
    with pytest.raises(PansealError) as e:
        client.open("P1" + "A" * 10, "cards", "pan", "1", "py", "t")
    assert e.value.code == Result.MALFORMED_CIPHERTEXT
    with pytest.raises(PansealError) as e:
        client.seal(PAN, "", "pan", "1")
    assert e.value.code == Result.INVALID_CONTEXT
    with pytest.raises(PansealError) as e:
        Client({"environment": "test"})
    assert e.value.code == Result.CONFIG_ERROR


def test_small_buffers_write_nothing(client):
    lib = panseal._lib
    data = PAN.encode()
    ctx, keep = client._ctx("cards", "pan", "1")
    out = ctypes.create_string_buffer(b"untouched", 10)
    need = ctypes.c_size_t(0)
    code = lib.panseal_seal(client._h(), panseal._buf(data), len(data), ctypes.byref(ctx),
                            out, len(out), ctypes.byref(need))
    assert code == Result.BUFFER_TOO_SMALL
    assert need.value == 65
    assert out.value == b"untouched"
    sealed = client.seal(PAN, "cards", "pan", "1").encode()
    small = ctypes.create_string_buffer(b"keep", 8)
    code = lib.panseal_open(client._h(), panseal._buf(sealed), len(sealed), ctypes.byref(ctx),
                            b"py", b"small", small, len(small), ctypes.byref(need), None)
    assert code == Result.BUFFER_TOO_SMALL
    assert need.value == 20
    assert small.value == b"keep"
    del keep


def test_mask_and_blind_index(client):
    assert panseal.mask(PAN) == "************1111"
    assert panseal.mask(PAN, "bin6") == "411111******1111"
    assert panseal.mask(PAN, "bin8") == "41111111****1111"
    idx, version = client.blind_index(PAN)
    assert len(idx) == 64 and version == 1
    assert client.blind_index(PAN)[0] == idx
    assert client.blind_index("5555555555554444")[0] != idx


def test_rotation_marks_old_ciphertexts(client):
    old = client.seal(PAN, "cards", "pan", "1")
    client.rotate_dek()
    new = client.seal(PAN, "cards", "pan", "1")
    assert old[:13] != new[:13]
    assert client.open(old, "cards", "pan", "1", "py", "t") == (PAN, True)
    assert client.open(new, "cards", "pan", "1", "py", "t") == (PAN, False)


def test_concurrent_threads(client):
    errors = []

    def work(t):
        try:
            for i in range(200):
                row = f"{t}-{i}"
                s = client.seal(PAN, "cards", "pan", row)
                assert client.open(s, "cards", "pan", row, "thread", "concurrency")[0] == PAN
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_config_file_and_audit_log(tmp_path):
    audit = tmp_path / "audit.jsonl"
    cfg = tmp_path / "panseal.json"
    cfg.write_text(
        '{"environment": "test", "scope": "m", "key_service": {"type": "local"},'
        f' "key_store": {{"type": "file", "path": "{tmp_path / "keys.pks"}"}},'
        f' "audit": {{"type": "jsonl", "path": "{audit}"}}}}'
    )
    with Client.from_file(cfg) as c:
        s = c.seal(PAN, "cards", "pan", "1")
        c.open(s, "cards", "pan", "1", "alice", "refund")
    log = audit.read_text()
    assert '"principal":"alice"' in log and '"purpose":"refund"' in log
    assert PAN not in log and PAN not in (tmp_path / "keys.pks").read_bytes().decode("latin-1")
