"""Write-only ingest from Python (panseal.IngestSealer, the PyO3 package),
checked by an independent HPKE receiver.

The receiver below is written from RFC 9180 (base mode, DHKEM(P-256,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM: labeled extract/expand, Decap,
KeySchedule) and FORMAT.md (section 17: header, info, associated data;
sections 2 and 3: context encoding, packed PAN), on the `cryptography`
package only: it shares no code with the Rust crate or the `hpke` crate.
The key pair is generated here; the library only ever sees the public key.

Needs the panseal package installed (scripts/test.sh: `maturin build` +
`pip install`).
"""

import base64
import hashlib
import hmac
import re
import struct
import threading

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import panseal
from panseal import IngestSealer, Pan, PansealError, Result

ENV, SCOPE, VERSION = "test", "merchant-1", 7
PANS = [
    "4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
    "36227206271667", "4222222222222", "4000000000000000006", "500000000009",
    "4111 1111 1111 1111", "5555-5555-5555-4444",
]

# ---- RFC 9180, base mode, suite (0x0010, 0x0001, 0x0002) -------------------

KEM_ID, KDF_ID, AEAD_ID = 0x0010, 0x0001, 0x0002
KEM_SUITE = b"KEM" + struct.pack(">H", KEM_ID)
HPKE_SUITE = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)


def hkdf_extract(salt, ikm):
    return hmac.new(salt or b"\0" * 32, ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, length):
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def labeled_extract(suite, salt, label, ikm):
    return hkdf_extract(salt, b"HPKE-v1" + suite + label + ikm)


def labeled_expand(suite, prk, label, info, length):
    return hkdf_expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info,
                       length)


def point_of(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def decap(enc, private_key):
    pk_e = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)
    dh = private_key.exchange(ec.ECDH(), pk_e)
    kem_context = enc + point_of(private_key)
    eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE, eae_prk, b"shared_secret", kem_context, 32)


def key_schedule_base(shared_secret, info):
    psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = labeled_extract(HPKE_SUITE, shared_secret, b"secret", b"")
    key = labeled_expand(HPKE_SUITE, secret, b"key", context, 32)
    nonce = labeled_expand(HPKE_SUITE, secret, b"base_nonce", context, 12)
    return key, nonce


# ---- FORMAT.md ---------------------------------------------------------------


def info_for(env, scope, version):
    return (b"panseal ingest v1\x00" + bytes([len(env)]) + env.encode()
            + bytes([len(scope)]) + scope.encode() + struct.pack(">I", version))


def encode_context(table, column, row_key):
    out = b""
    for part in (table.encode(), column.encode(), row_key):
        out += struct.pack(">H", len(part)) + part
    return out


def unpack_pan(packed):
    nibbles = []
    for b in packed:
        nibbles += [b >> 4, b & 0xF]
    digits = []
    for i, n in enumerate(nibbles):
        if n > 9:
            assert all(x == 0xF for x in nibbles[i:]), "bad padding"
            break
        digits.append(str(n))
    assert 8 <= len(digits) <= 19
    return "".join(digits)


def from_text(text):
    assert len(text) == 134 and text.startswith("I1")
    return b"\x01\x02" + base64.urlsafe_b64decode(text[2:] + "=" * (-len(text[2:]) % 4))


def hpke_open(sealed, private_key, env, scope, version, table, column, row_key):
    """Opens one ingest ciphertext (binary form); returns the PAN digits.
    Raises InvalidTag if it does not authenticate."""
    assert len(sealed) == 101
    header, enc, ct, tag = sealed[:10], sealed[10:75], sealed[75:85], sealed[85:]
    assert header[0] == 0x01 and header[1] == 0x02
    point = point_of(private_key)
    assert header[2:6] == hashlib.sha256(b"panseal ingest key" + point).digest()[:4]
    assert header[6:10] == struct.pack(">I", version)
    key, nonce = key_schedule_base(decap(enc, private_key), info_for(env, scope, version))
    aad = header + encode_context(table, column, row_key)
    return unpack_pan(AESGCM(key).decrypt(nonce, ct + tag, aad))


# ---- the tests ---------------------------------------------------------------


def key_text(private_key, env=ENV, scope=SCOPE, version=VERSION):
    b64 = base64.urlsafe_b64encode(point_of(private_key)).rstrip(b"=").decode()
    return f"PIK1/{env}/{scope}/{version}/{b64}"


@pytest.fixture(scope="module")
def receiver():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def sealer(receiver):
    with IngestSealer(key_text(receiver)) as s:
        yield s


def digits(pan):
    return re.sub(r"[ -]", "", pan)


def test_independent_receiver_opens_everything_sealed(sealer, receiver):
    opened = 0
    for i, pan in enumerate(PANS):
        row = f"row-{i}".encode()
        text = sealer.seal(pan, "cards", "pan", row)
        assert len(text) == 134 and text.startswith("I1") and digits(pan) not in text
        binary = sealer.seal_binary(pan, "cards", "pan", row)
        assert len(binary) == 101
        for sealed in (from_text(text), binary):
            got = hpke_open(sealed, receiver, ENV, SCOPE, VERSION, "cards", "pan", row)
            opened += got == digits(pan)
    assert opened == 2 * len(PANS)


def test_bound_to_context_key_and_names(sealer, receiver):
    """Moved to another row, opened by another key pair or under another
    scope's info: 0 of N open."""
    other = ec.generate_private_key(ec.SECP256R1())
    sealed = [from_text(sealer.seal(p, "cards", "pan", f"row-{i}")) for i, p in enumerate(PANS)]
    moved = wrong_key = wrong_scope = 0
    for i, s in enumerate(sealed):
        for attempt in ("moved", "wrong_key", "wrong_scope"):
            try:
                if attempt == "moved":
                    hpke_open(s, receiver, ENV, SCOPE, VERSION, "cards", "pan", f"row-{i + 1}".encode())
                    moved += 1
                elif attempt == "wrong_key":
                    key, nonce = key_schedule_base(decap(s[10:75], other),
                                                   info_for(ENV, SCOPE, VERSION))
                    AESGCM(key).decrypt(nonce, s[75:], s[:10] + encode_context(
                        "cards", "pan", f"row-{i}".encode()))
                    wrong_key += 1
                else:
                    key, nonce = key_schedule_base(decap(s[10:75], receiver),
                                                   info_for(ENV, "merchant-2", VERSION))
                    AESGCM(key).decrypt(nonce, s[75:], s[:10] + encode_context(
                        "cards", "pan", f"row-{i}".encode()))
                    wrong_scope += 1
            except InvalidTag:
                pass
    assert (moved, wrong_key, wrong_scope) == (0, 0, 0)


def test_fingerprint_and_pinning(sealer, receiver):
    fp = hashlib.sha256(point_of(receiver)).hexdigest()
    assert sealer.fingerprint == fp
    with IngestSealer(key_text(receiver), fingerprint=fp.upper()) as pinned:
        assert len(pinned.seal(PANS[0], "cards", "pan", "1")) == 134
    attacker = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PansealError) as e:
        IngestSealer(key_text(attacker), fingerprint=fp)
    assert e.value.code == Result.PUBLIC_KEY_NOT_PINNED
    assert isinstance(e.value, panseal.PublicKeyNotPinned)
    with pytest.raises(PansealError) as e:
        IngestSealer(key_text(receiver), fingerprint="00" * 31)
    assert e.value.code == Result.INVALID_ARGUMENT
    assert isinstance(e.value, panseal.InvalidArgument)


def test_readme_fragment(receiver):
    """The README's Python ingest block (scripts/readme.py checks that it is
    the region below), opened by the independent receiver."""
    public_key_text = key_text(receiver)
    pin = hashlib.sha256(point_of(receiver)).hexdigest()
    # readme:begin python-ingest
    sealer = panseal.IngestSealer(public_key_text, fingerprint=pin)  # pin optional
    stored = sealer.seal("4111 1111 1111 1111", "cards", "pan", "card-1001")  # "I1…"
    # panseal.MalformedPublicKey, InvalidPublicKey (not on P-256),
    # PublicKeyNotPinned (a substituted key); seal_binary gives the 101 bytes;
    # sealer.fingerprint the pin to compare.
    # readme:end python-ingest
    assert stored.startswith("I1") and len(stored) == 134
    opened = hpke_open(from_text(stored), receiver, ENV, SCOPE, VERSION, "cards", "pan", b"card-1001")
    assert opened == "4111111111111111"
    assert sealer.fingerprint == pin


def test_bad_public_keys(receiver):
    point = bytearray(point_of(receiver))
    point[64] ^= 1
    with pytest.raises(ValueError):  # off the curve, by an independent check
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
    b64 = base64.urlsafe_b64encode(bytes(point)).rstrip(b"=").decode()
    with pytest.raises(PansealError) as e:
        IngestSealer(f"PIK1/{ENV}/{SCOPE}/{VERSION}/{b64}")
    assert e.value.code == Result.INVALID_PUBLIC_KEY
    assert isinstance(e.value, panseal.InvalidPublicKey)
    compressed = receiver.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    b64 = base64.urlsafe_b64encode(compressed).rstrip(b"=").decode()
    with pytest.raises(PansealError) as e:
        IngestSealer(f"PIK1/{ENV}/{SCOPE}/{VERSION}/{b64}")
    assert e.value.code == Result.INVALID_PUBLIC_KEY
    for bad in ["", "garbage", key_text(receiver).replace("PIK1", "PIK2"),
                key_text(receiver, version="x"), key_text(receiver, scope="bad scope"),
                key_text(receiver) + "/extra", b"PIK1/\xff"]:
        with pytest.raises(PansealError) as e:
            IngestSealer(bad)
        assert e.value.code == Result.MALFORMED_PUBLIC_KEY
        assert isinstance(e.value, panseal.MalformedPublicKey)


def test_garbage_pans_never_echoed(sealer):
    for bad in ["4111111111111112", ";4111111111111111=2512101?", "41111x1111111111", "",
                "4" * 25, b"\xff\xfe"]:
        with pytest.raises(PansealError) as e:
            sealer.seal(bad, "cards", "pan", "1")
        assert e.value.code == Result.INVALID_PAN
        assert isinstance(e.value, panseal.InvalidPan)
        for shown in (str(e.value), repr(e.value), e.value.message):
            assert not re.search(r"[0-9]{6}", shown)
    with pytest.raises(PansealError) as e:
        sealer.seal(PANS[0], "", "pan", "1")
    assert e.value.code == Result.INVALID_CONTEXT


def test_shared_between_threads(sealer, receiver):
    results, errors = [], []

    def work(t):
        try:
            for i in range(25):
                row = f"{t}-{i}".encode()
                results.append((row, sealer.seal(PANS[i % len(PANS)], "t", "c", row), i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    opened = sum(hpke_open(from_text(s), receiver, ENV, SCOPE, VERSION, "t", "c", row)
                 == digits(PANS[i % len(PANS)]) for row, s, i in results)
    assert opened == 100


def test_closed_sealer_refuses(receiver):
    s = IngestSealer(key_text(receiver))
    s.close()
    s.close()
    with pytest.raises(PansealError) as e:
        s.seal(PANS[0], "cards", "pan", "1")
    assert e.value.code == Result.CLIENT_CLOSED
    assert isinstance(e.value, panseal.ClientClosed)


def test_seals_pan_objects_and_bytearrays(sealer, receiver):
    """A Pan (or a bytearray the caller wipes) avoids an unwipeable str."""
    buf = bytearray(PANS[1].encode())
    with Pan(PANS[0]) as pan:
        sealed = [(sealer.seal_binary(pan, "cards", "pan", b"a"), PANS[0]),
                  (sealer.seal_binary(buf, "cards", "pan", b"a"), PANS[1])]
    buf[:] = bytes(len(buf))
    for s, expected in sealed:
        assert hpke_open(s, receiver, ENV, SCOPE, VERSION, "cards", "pan", b"a") == expected
