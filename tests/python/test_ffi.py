"""The Python package (PyO3 extension `panseal._native` on the library):
round trip, wrong context, bad input, concurrent use from threads, masked
printing, wiping, and exceptions that never hold a PAN. Needs the package
installed (scripts/test.sh: `maturin build` + `pip install`)."""

import ctypes
import logging
import pickle
import re
import sys
import threading

import pytest

import panseal
from panseal import (Client, DecryptionFailed, InvalidArgument, InvalidPan, Pan, PansealError,
                     Result, RevealedPan)

CONFIG = {
    "environment": "test",
    "scope": "merchant-1",
    "key_service": {"type": "local"},
    "key_store": {"type": "memory"},
    "audit": {"type": "memory"},
}
PAN = "4111111111111111"
SIX_DIGITS = re.compile(r"[0-9]{6}")


@pytest.fixture
def client():
    with Client(CONFIG) as c:
        yield c


def test_version():
    assert panseal.version()


def test_is_the_compiled_extension_not_ctypes():
    assert panseal._native.__name__ == "panseal._native"
    assert panseal._native.__file__.endswith((".so", ".pyd"))
    assert "ctypes" not in panseal.__dict__


def test_round_trip_text_and_binary(client):
    sealed = client.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
    assert len(sealed) == 64 and sealed.startswith("P1") and PAN not in sealed
    pan, reseal = client.open(sealed, "cards", "pan", "row-1", "py", "test")
    assert pan == PAN and reseal is False
    assert isinstance(pan, RevealedPan) and isinstance(pan, Pan)
    binary = client.seal_binary("378282246310005", "cards", "pan", b"\x00\x01")
    assert isinstance(binary, bytes) and len(binary) == 48 and binary[0] == 1
    assert client.open(binary, "cards", "pan", b"\x00\x01", "py", "test")[0] == "378282246310005"


def test_every_input_type(client):
    for value in [PAN, PAN.encode(), bytearray(PAN.encode()), int(PAN), Pan(PAN)]:
        sealed = client.seal(value, "cards", "pan", "1")
        assert client.open(sealed, "cards", "pan", "1", "py", "types")[0] == PAN
    # A revealed PAN seals again as it is (re-sealing after rotation).
    revealed, _ = client.open(client.seal(PAN, "t", "c", 1), "t", "c", 1, "py", "types")
    again = client.seal(revealed, "t", "c", 2)
    assert client.open(again, "t", "c", 2, "py", "types")[0] == PAN
    with pytest.raises(TypeError) as e:
        client.seal(4.5, "cards", "pan", "1")
    assert "4.5" not in str(e.value)


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
        opened = client.open(sealed, "t", "c", str(n), "py", "len")[0]
        assert opened == pan and len(opened) == n


def test_wrong_context_is_opaque(client):
    sealed = client.seal(PAN, "cards", "pan", "row-1")
    for ctx in [("cards", "pan", "row-2"), ("cards", "pan2", "row-1"), ("card", "pan", "row-1")]:
        with pytest.raises(DecryptionFailed) as e:
            client.open(sealed, *ctx, "py", "test")
        assert isinstance(e.value, PansealError)
        assert e.value.code == Result.DECRYPTION_FAILED
        assert e.value.message == "decryption failed"
        assert not e.value.retryable


def test_separators_only_between_digit_groups(client):
    for good in ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111"]:
        assert Pan(good) == "4111111111111111"
    with pytest.raises(InvalidPan) as e:
        Pan("4111 1111 1111 1111 ")
    assert "separator at position 19" in str(e.value)


def test_bad_input(client):
    for bad in ["4111111111111112", ";4111111111111111=2512?", "41111x1111111111", "",
                " 4111111111111111", "4111111111111111 ", "4111  1111 1111 1111",
                "4111--1111-1111-1111", "4111111111111111\n"]:
        with pytest.raises(PansealError) as e:
            client.seal(bad, "cards", "pan", "1")
        assert e.value.code == Result.INVALID_PAN
        assert isinstance(e.value, InvalidPan) and isinstance(e.value, ValueError)
        assert "411111" not in str(e.value)
    with pytest.raises(PansealError) as e:
        client.open("P1" + "A" * 10, "cards", "pan", "1", "py", "t")
    assert e.value.code == Result.MALFORMED_CIPHERTEXT
    assert isinstance(e.value, panseal.MalformedCiphertext)
    with pytest.raises(PansealError) as e:
        client.seal(PAN, "", "pan", "1")
    assert e.value.code == Result.INVALID_CONTEXT
    assert isinstance(e.value, panseal.InvalidContext)
    with pytest.raises(PansealError) as e:
        Client({"environment": "test"})
    assert e.value.code == Result.CONFIG_ERROR
    assert isinstance(e.value, panseal.ConfigError)
    with pytest.raises(panseal.InvalidArgument):
        client.seal(PAN, b"\xff", "pan", "1")


def test_small_buffer_gets_nothing_written(client):
    """The PyO3 counterpart of the C ABI's small-buffer check
    (test_capi.py): a bytearray shorter than the PAN is left as it was."""
    pan, _ = client.open(client.seal(PAN, "cards", "pan", "1"), "cards", "pan", "1", "py", "s")
    small = bytearray(b"keep" + b"\0" * 11)
    with pytest.raises(panseal.BufferTooSmall) as e:
        pan.copy_into(small)
    assert e.value.code == Result.BUFFER_TOO_SMALL
    assert "16 bytes needed" in e.value.message
    assert small == bytearray(b"keep" + b"\0" * 11)
    exact = bytearray(16)
    assert pan.copy_into(exact) == 16 and exact == PAN.encode()

    class Sub(bytearray):
        pass

    sub = Sub(19)
    with pytest.raises(TypeError):
        pan.copy_into(sub)
    assert sub == bytearray(19)
    with pytest.raises(TypeError):
        pan.copy_into(memoryview(bytearray(19)))


def test_mask_and_blind_index(client):
    assert panseal.mask(PAN) == "************1111"
    assert panseal.mask(PAN, "bin6") == "411111******1111"
    assert panseal.mask(PAN, "bin8") == "41111111****1111"
    with pytest.raises(InvalidArgument):
        panseal.mask(PAN, "all")
    idx, version = client.blind_index(PAN)
    assert len(idx) == 64 and version == 1
    assert client.blind_index(PAN)[0] == idx
    assert client.blind_index(Pan(PAN))[0] == idx
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
    for load in (lambda: Client.from_file(cfg), lambda: Client.from_file(str(cfg)),
                 lambda: Client(cfg.read_text())):
        with load() as c:
            s = c.seal(PAN, "cards", "pan", "1")
            c.open(s, "cards", "pan", "1", "alice", "refund")
    log = audit.read_text()
    assert '"principal":"alice"' in log and '"purpose":"refund"' in log
    assert PAN not in log and PAN not in (tmp_path / "keys.pks").read_bytes().decode("latin-1")


def test_closed_client_refuses(client):
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(panseal.ClientClosed) as e:
        client.seal(PAN, "cards", "pan", "1")
    assert e.value.code == Result.CLIENT_CLOSED


# ---- masked printing, wiping, no PAN in messages ----------------------------


def test_pan_prints_masked(client, caplog):
    pan = Pan("4111 1111 1111 1111")
    revealed, _ = client.open(client.seal(PAN, "cards", "pan", "1"), "cards", "pan", "1",
                              "py", "print")
    for p, name in [(pan, "Pan"), (revealed, "RevealedPan")]:
        assert str(p) == "************1111"
        assert repr(p) == f"{name}('************1111')"
        assert f"{p}" == "************1111" and "%s" % p == "************1111"
        assert p.mask("bin6") == "411111******1111" and p.last_four == "1111"
        shown = [str(p), repr(p), repr([p]), repr((p, True)), repr({"pan": p}), format(p)]
        logging.getLogger("payments").warning("card %s / %r", p, p)
        shown.append(caplog.text)
        for text in shown:
            assert PAN not in text and not SIX_DIGITS.search(text), text
    with pytest.raises(TypeError):
        pickle.dumps(revealed)


def object_bytes(obj):
    """The bytes of a Python object's own memory (header and the Rust
    struct PyO3 keeps inline): what a memory dump of the process shows."""
    return ctypes.string_at(id(obj), type(obj).__basicsize__)


def test_wipe_zeroes_the_digits_in_memory(client):
    """Read the object's memory as an attacker with a core dump would:
    the digits are there before wipe() and gone (zero bytes where they
    were) after it."""
    revealed, _ = client.open(client.seal(PAN, "cards", "pan", "1"), "cards", "pan", "1",
                              "py", "wipe")
    before = object_bytes(revealed)
    where = before.find(PAN.encode())
    assert where >= 0, "digits not found inline: the layout assumption broke"
    buffer = bytearray(19)
    assert revealed.copy_into(buffer) == 16
    assert bytes(buffer[:16]) == PAN.encode() and bytes(buffer[16:]) == b"\0\0\0"
    buffer[:] = bytes(len(buffer))  # the caller's wipe
    assert buffer == bytearray(19) and all(b == 0 for b in buffer)

    revealed.wipe()
    after = object_bytes(revealed)
    assert PAN.encode() not in after
    assert after[where:where + 16] == b"\0" * 16
    assert revealed.wiped and str(revealed) == "<wiped>"
    assert repr(revealed) == "RevealedPan('<wiped>')"
    untouched = bytearray(19)
    with pytest.raises(InvalidArgument) as e:
        revealed.copy_into(untouched)
    assert untouched == bytearray(19)
    assert "wiped" in e.value.message
    for use in (revealed.expose_digits, lambda: len(revealed), lambda: client.seal(
            revealed, "cards", "pan", "1")):
        with pytest.raises(InvalidArgument):
            use()
    assert revealed != PAN
    revealed.wipe()  # idempotent


def test_with_block_wipes():
    with Pan(PAN) as pan:
        where = object_bytes(pan).find(PAN.encode())
        assert where >= 0 and pan == PAN
    assert pan.wiped and PAN.encode() not in object_bytes(pan)
    with pytest.raises(RuntimeError):
        with Pan(PAN) as pan2:
            raise RuntimeError("boom")
    assert pan2.wiped


def test_expose_digits_is_an_explicit_copy():
    pan = Pan(PAN)
    copy = pan.expose_digits()
    assert copy == PAN and isinstance(copy, str)
    pan.wipe()
    assert copy == PAN  # a Python str: the caller's to manage


def test_equality_is_by_digits():
    for same in [Pan("4111-1111-1111-1111"), PAN, PAN.encode(), bytearray(PAN.encode()), int(PAN)]:
        assert Pan(PAN) == same
    assert Pan(PAN) != "5555555555554444" and Pan(PAN) != "not a pan" and Pan(PAN) != 3.0


def test_exceptions_never_contain_the_pan(client):
    sealed = client.seal(PAN, "cards", "pan", "row-1")
    cases = [
        lambda: Pan("4111111111111112"),
        lambda: Pan("%B4111111111111111^DOE/J^2512?"),
        lambda: Pan(";4111111111111111=2512?"),
        lambda: Pan("4111111111111111x"),
        lambda: Pan("4" * 25),
        lambda: client.seal("4111111111111112", "cards", "pan", "1"),
        lambda: client.open(sealed, "cards", "pan", "row-2", "py", "t"),
        lambda: client.open(sealed[:-2] + "AA", "cards", "pan", "row-1", "py", "t"),
        lambda: client.blind_index("411111111111111"),
        lambda: panseal.mask("4111111111111113"),
    ]
    for case in cases:
        with pytest.raises(PansealError) as e:
            case()
        shown = [str(e.value), repr(e.value), e.value.message, repr(e.value.args)]
        for text in shown:
            assert not SIX_DIGITS.search(text), text


def test_gil_released_during_calls(client):
    """Other Python threads run while a call is inside Rust. With a 100 s
    switch interval the interpreter never takes the GIL from a thread by
    force: the counter thread (which gives the GIL up in each sleep) gets
    it back only when a panseal call releases it."""
    import time

    stop = threading.Event()
    ticks = [0]

    def count():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0001)

    old = sys.getswitchinterval()
    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.01)
    sys.setswitchinterval(100.0)
    try:
        start = ticks[0]
        for i in range(300):
            client.seal(PAN, "cards", "pan", str(i))
        during = ticks[0] - start
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()
    assert during > 0
