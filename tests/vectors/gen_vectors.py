#!/usr/bin/env python3
"""Independent implementation of panseal's FORMAT.md, and the generator of the
committed test vectors in tests/vectors/.

Written from the specification (FORMAT.md), not from the Rust sources, so the
committed vectors cross-check the Rust implementation against a second one.

Usage:

    python3 tests/vectors/gen_vectors.py              # rewrite tests/vectors/*.json
    python3 tests/vectors/gen_vectors.py --out DIR    # write into DIR instead

Output is deterministic: every key, id and nonce is a fixed value (derived
from a label with SHA-256, see `fixed`), never random. Before writing, the
program decodes every positive vector with its own decoders and checks that
every negative vector is refused with the class it states.

Needs Python 3.11+ and the `cryptography` package.

Test keys only: nothing here belongs in a production path, and a nonce must
never be chosen like this outside of test vectors.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# ---------------------------------------------------------------------------
# Errors: the classes FORMAT.md names.
# ---------------------------------------------------------------------------


class FormatError(Exception):
    """Structurally malformed ciphertext (binary or text); no key involved."""

    kind = "format"


class DecryptionError(Exception):
    """AES-GCM authentication failed. Opaque: one class for every cause."""

    kind = "decryption"


class PayloadError(Exception):
    """Authenticated plaintext that is not a valid packed PAN."""

    kind = "payload"


class UnwrapError(Exception):
    """A wrapped key did not unwrap (any mismatch)."""


class RecordError(Exception):
    """A key-store record does not decode."""


class CorruptError(Exception):
    """A key-store file is refused as corrupt."""


# ---------------------------------------------------------------------------
# Small encoders.
# ---------------------------------------------------------------------------


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def fixed(label: str, n: int) -> bytes:
    """A fixed test value: the first n bytes of SHA-256("panseal-test-vector:" + label)."""
    assert n <= 32
    return sha256(b"panseal-test-vector:" + label.encode())[:n]


# ---------------------------------------------------------------------------
# Context encoding (FORMAT.md "Context encoding").
# ---------------------------------------------------------------------------


def encode_context(table: str, column: str, row_key: bytes) -> bytes:
    parts = [
        ("table", table.encode("utf-8"), 255),
        ("column", column.encode("utf-8"), 255),
        ("row key", bytes(row_key), 512),
    ]
    out = b""
    for what, part, limit in parts:
        if not 1 <= len(part) <= limit:
            raise ValueError(f"context {what} must be 1..{limit} bytes")
        out += u16(len(part)) + part
    return out


# ---------------------------------------------------------------------------
# Packed PAN (FORMAT.md "Packed PAN").
# ---------------------------------------------------------------------------

PACKED_LEN = 10  # 20 nibbles
MIN_DIGITS = 8
MAX_DIGITS = 19


def luhn_valid(digits: str) -> bool:
    total = 0
    # Rightmost digit is position 0 and is not doubled.
    for position, ch in enumerate(reversed(digits)):
        d = ord(ch) - ord("0")
        if position % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def pack_nibbles(nibbles: list[int]) -> bytes:
    """Packs exactly 20 nibbles, high nibble first (no validation)."""
    assert len(nibbles) == 2 * PACKED_LEN and all(0 <= x <= 15 for x in nibbles)
    return bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles), 2))


def pack_pan(pan: str) -> bytes:
    if not (pan.isascii() and pan.isdigit() and MIN_DIGITS <= len(pan) <= MAX_DIGITS):
        raise ValueError("a PAN is 8..19 ASCII digits")
    if not luhn_valid(pan):
        raise ValueError("PAN fails the Luhn check")
    nibbles = [int(c) for c in pan] + [0xF] * (2 * PACKED_LEN - len(pan))
    return pack_nibbles(nibbles)


def unpack_pan(packed: bytes) -> str:
    if len(packed) != PACKED_LEN:
        raise PayloadError("packed PAN must be 10 bytes")
    nibbles = []
    for b in packed:
        nibbles += [b >> 4, b & 0x0F]
    n = 0
    while n < len(nibbles) and nibbles[n] <= 9:
        n += 1
    # The first nibble above 9 and every nibble after it must be 0xF.
    if any(x != 0xF for x in nibbles[n:]):
        raise PayloadError("bad padding")
    if not MIN_DIGITS <= n <= MAX_DIGITS:
        raise PayloadError("bad digit count")
    digits = "".join(chr(ord("0") + x) for x in nibbles[:n])
    if not luhn_valid(digits):
        raise PayloadError("Luhn check fails")
    return digits


# ---------------------------------------------------------------------------
# Ciphertext v1 (FORMAT.md "Ciphertext v1").
# ---------------------------------------------------------------------------

V1 = 0x01
ALG_AES256GCM_PACKED = 0x01
HEADER_LEN = 10
NONCE_LEN = 12
TAG_LEN = 16
V1_LEN = HEADER_LEN + NONCE_LEN + PACKED_LEN + TAG_LEN  # 48
TEXT_PREFIX = "P1"
TEXT_LEN = 64


def seal_packed(dek: bytes, dek_id: bytes, nonce: bytes, packed: bytes, context: bytes) -> bytes:
    """Seals an arbitrary 10-byte plaintext (used to build payload-error vectors)."""
    assert len(dek) == 32 and len(dek_id) == 8 and len(nonce) == NONCE_LEN
    assert len(packed) == PACKED_LEN
    header = u8(V1) + u8(ALG_AES256GCM_PACKED) + dek_id
    ct_and_tag = AESGCM(dek).encrypt(nonce, packed, header + context)
    out = header + nonce + ct_and_tag
    assert len(out) == V1_LEN
    return out


def seal(dek: bytes, dek_id: bytes, nonce: bytes, pan: str, context: bytes) -> bytes:
    return seal_packed(dek, dek_id, nonce, pack_pan(pan), context)


def parse_binary(data: bytes) -> bytes:
    """Structural checks, in the order FORMAT.md gives them."""
    if len(data) == 0:
        raise FormatError("empty")
    if data[0] != V1:
        raise FormatError("unknown version")
    if len(data) < 2:
        raise FormatError("length")
    if data[1] != ALG_AES256GCM_PACKED:
        raise FormatError("unknown algorithm")
    if len(data) != V1_LEN:
        raise FormatError("length")
    return bytes(data)


def open_sealed(dek: bytes, sealed: bytes, context: bytes) -> str:
    sealed = parse_binary(sealed)
    header = sealed[:HEADER_LEN]
    nonce = sealed[HEADER_LEN : HEADER_LEN + NONCE_LEN]
    ct_and_tag = sealed[HEADER_LEN + NONCE_LEN :]
    try:
        packed = AESGCM(dek).decrypt(nonce, ct_and_tag, header + context)
    except InvalidTag:
        raise DecryptionError() from None
    return unpack_pan(packed)


# Base64url without padding (RFC 4648 section 5), written out so that the
# canonical-form rules are explicit.
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64url_encode(data: bytes) -> str:
    out = []
    for i in range(0, len(data), 3):
        chunk = data[i : i + 3]
        n = int.from_bytes(chunk + b"\0" * (3 - len(chunk)), "big")
        chars = [B64URL[(n >> s) & 63] for s in (18, 12, 6, 0)]
        out += chars[: len(chunk) + 1]
    return "".join(out)


def b64url_decode_canonical(text: str) -> bytes:
    if len(text) % 4 == 1:
        raise FormatError("text length")
    values = []
    for ch in text:
        i = B64URL.find(ch) if len(ch) == 1 else -1
        if i < 0:
            raise FormatError("text alphabet")
        values.append(i)
    bits = 0
    nbits = 0
    out = bytearray()
    for v in values:
        bits = (bits << 6) | v
        nbits += 6
        if nbits >= 8:
            nbits -= 8
            out.append((bits >> nbits) & 0xFF)
            bits &= (1 << nbits) - 1
    if bits != 0:
        raise FormatError("text trailing bits")
    return bytes(out)


def to_text(sealed: bytes) -> str:
    sealed = parse_binary(sealed)
    return TEXT_PREFIX + b64url_encode(sealed[2:])


def parse_text(text: str) -> bytes:
    if text == "":
        raise FormatError("empty")
    if not text.startswith(TEXT_PREFIX):
        raise FormatError("text prefix")
    if len(text) != TEXT_LEN or not text.isascii():
        raise FormatError("text length")
    body = b64url_decode_canonical(text[len(TEXT_PREFIX) :])
    if len(body) != V1_LEN - 2:
        raise FormatError("text length")
    return u8(V1) + u8(ALG_AES256GCM_PACKED) + body


# ---------------------------------------------------------------------------
# Wrap binding (FORMAT.md "Wrap binding").
# ---------------------------------------------------------------------------

PURPOSES = {"data": 1, "index": 2}
WRAP_LABEL = b"panseal-wrap-v1"
WRAPPED_LEN = 12 + 32 + 16


def wrap_aad(request: dict, kek_id: str, kek_version: int) -> bytes:
    key_id = bytes.fromhex(request["id_hex"])
    assert len(key_id) == 8
    out = WRAP_LABEL + u8(PURPOSES[request["purpose"]]) + key_id
    for part in (request["scope"], request["environment"], kek_id):
        b = part.encode("utf-8")
        out += u16(len(b)) + b
    return out + u32(kek_version)


def wrap(kek: bytes, kek_id: str, kek_version: int, request: dict, key: bytes, nonce: bytes) -> bytes:
    assert len(kek) == 32 and len(key) == 32 and len(nonce) == 12
    return nonce + AESGCM(kek).encrypt(nonce, key, wrap_aad(request, kek_id, kek_version))


def unwrap(kek: bytes, kek_id: str, kek_version: int, request: dict, wrapped: bytes) -> bytes:
    if len(wrapped) != WRAPPED_LEN:
        raise UnwrapError()
    try:
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], wrap_aad(request, kek_id, kek_version))
    except InvalidTag:
        raise UnwrapError() from None


# ---------------------------------------------------------------------------
# Key-store record v1 (FORMAT.md "Key-store record").
# ---------------------------------------------------------------------------

RECORD_V1 = 1
STATES = {"active": 1, "decrypt-only": 2, "compromised": 3, "destroyed": 4}
NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_KEK_ID_LEN = 1024
MAX_WRAPPED_LEN = 4096


def encode_record(f: dict) -> bytes:
    """Encodes fields as given, without validating them (so negative vectors
    can be built with the same function)."""
    scope = f["scope"].encode("utf-8")
    env = f["environment"].encode("utf-8")
    kek_id = f["kek_id"].encode("utf-8") if isinstance(f["kek_id"], str) else f["kek_id"]
    wrapped = bytes.fromhex(f["wrapped_hex"])
    purpose = PURPOSES[f["purpose"]] if isinstance(f["purpose"], str) else f["purpose"]
    state = STATES[f["state"]] if isinstance(f["state"], str) else f["state"]
    return (
        u8(f.get("record_version", RECORD_V1))
        + u8(purpose)
        + bytes.fromhex(f["id_hex"])
        + u32(f["version"])
        + u8(state)
        + u8(len(scope))
        + scope
        + u8(len(env))
        + env
        + u16(len(kek_id))
        + kek_id
        + u32(f["kek_version"])
        + u64(f["created_at"])
        + u64(f["encrypt_until"])
        + u64(f["decrypt_until"])
        + u64(f["max_uses"])
        + u64(f["uses"])
        + u16(len(wrapped))
        + wrapped
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        if len(self.data) - self.at < n:
            raise RecordError(f"{what}: truncated")
        b = self.data[self.at : self.at + n]
        self.at += n
        return b

    def int(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def name(self, what: str) -> str:
        n = self.int(1, what)
        raw = self.take(n, what)
        try:
            s = raw.decode("ascii")
        except UnicodeDecodeError:
            raise RecordError(what) from None
        if not NAME_RE.fullmatch(s):
            raise RecordError(what)
        return s


def decode_record(data: bytes) -> dict:
    r = _Reader(data)
    if r.int(1, "record version") != RECORD_V1:
        raise RecordError("record version")
    purpose_names = {v: k for k, v in PURPOSES.items()}
    state_names = {v: k for k, v in STATES.items()}
    purpose = purpose_names.get(r.int(1, "purpose"))
    if purpose is None:
        raise RecordError("purpose")
    key_id = r.take(8, "id")
    version = r.int(4, "key version")
    state = state_names.get(r.int(1, "state"))
    if state is None:
        raise RecordError("state")
    scope = r.name("scope")
    environment = r.name("environment")
    n = r.int(2, "kek id")
    if not 1 <= n <= MAX_KEK_ID_LEN:
        raise RecordError("kek id length")
    try:
        kek_id = r.take(n, "kek id").decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("kek id not UTF-8") from None
    kek_version = r.int(4, "kek version")
    created_at = r.int(8, "created_at")
    encrypt_until = r.int(8, "encrypt_until")
    decrypt_until = r.int(8, "decrypt_until")
    max_uses = r.int(8, "max_uses")
    uses = r.int(8, "uses")
    n = r.int(2, "wrapped")
    if n > MAX_WRAPPED_LEN:
        raise RecordError("wrapped length")
    wrapped = r.take(n, "wrapped")
    if r.at != len(data):
        raise RecordError("trailing bytes")
    if (state == "destroyed") != (len(wrapped) == 0):
        raise RecordError("wrapped bytes must be empty iff destroyed")
    if not created_at <= encrypt_until <= decrypt_until:
        raise RecordError("dates out of order")
    return {
        "id_hex": key_id.hex(),
        "purpose": purpose,
        "version": version,
        "state": state,
        "scope": scope,
        "environment": environment,
        "kek_id": kek_id,
        "kek_version": kek_version,
        "created_at": created_at,
        "encrypt_until": encrypt_until,
        "decrypt_until": decrypt_until,
        "max_uses": max_uses,
        "uses": uses,
        "wrapped_hex": wrapped.hex(),
    }


# ---------------------------------------------------------------------------
# Key-store file v1 (FORMAT.md "Key-store file").
# ---------------------------------------------------------------------------

FILE_MAGIC = b"PANSEALK"
FILE_V1 = 1
DIGEST_LEN = 32


def encode_file_body(records: list[bytes], magic: bytes = FILE_MAGIC, version: int = FILE_V1,
                     count: int | None = None) -> bytes:
    body = magic + u8(version) + u32(len(records) if count is None else count)
    for rec in records:
        body += u32(len(rec)) + rec
    return body


def with_checksum(body: bytes) -> bytes:
    return body + sha256(body)


def encode_file(records: list[bytes]) -> bytes:
    """Records are written in ascending order of their key id (bytes 2..10)."""
    ordered = sorted(records, key=lambda rec: rec[2:10])
    return with_checksum(encode_file_body(ordered))


def decode_file(data: bytes) -> list[dict]:
    if len(data) < len(FILE_MAGIC) + 1 + 4 + DIGEST_LEN:
        raise CorruptError("too short")
    body, digest = data[:-DIGEST_LEN], data[-DIGEST_LEN:]
    if body[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise CorruptError("magic")
    if sha256(body) != digest:
        raise CorruptError("checksum")
    if body[len(FILE_MAGIC)] != FILE_V1:
        raise CorruptError("file version")
    at = len(FILE_MAGIC) + 1
    count = int.from_bytes(body[at : at + 4], "big")
    at += 4
    records = []
    seen = set()
    for _ in range(count):
        if len(body) - at < 4:
            raise CorruptError("record length")
        n = int.from_bytes(body[at : at + 4], "big")
        at += 4
        if len(body) - at < n:
            raise CorruptError("record length")
        try:
            rec = decode_record(body[at : at + n])
        except RecordError as e:
            raise CorruptError(f"record: {e}") from None
        at += n
        if rec["id_hex"] in seen:
            raise CorruptError("duplicate record id")
        seen.add(rec["id_hex"])
        records.append(rec)
    if at != len(body):
        raise CorruptError("trailing bytes")
    return records


# ---------------------------------------------------------------------------
# Blind index (FORMAT.md "Blind index").
# ---------------------------------------------------------------------------


def blind_index(key: bytes, pan: str) -> bytes:
    assert len(key) == 32 and pan.isascii() and pan.isdigit()
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(pan.encode("ascii"))
    return h.finalize()


def index_key_id(environment: str, scope: str, version: int) -> bytes:
    assert NAME_RE.fullmatch(environment) and NAME_RE.fullmatch(scope)
    return sha256(
        b"panseal-index-key-id-v1"
        + environment.encode("ascii")
        + b"\x00"
        + scope.encode("ascii")
        + b"\x00"
        + u32(version)
    )[:8]


# ---------------------------------------------------------------------------
# Fixed test material.
# ---------------------------------------------------------------------------

DEK_A = fixed("dek A", 32)
DEK_A_ID = fixed("dek A id", 8)
DEK_B = fixed("dek B", 32)
DEK_B_ID = fixed("dek B id", 8)
DEK_C = fixed("dek C", 32)
DEK_C_ID = fixed("dek C id", 8)
DEK_D_ID = fixed("dek D id", 8)
INDEX_KEY_1 = fixed("index key merchant-42 v1", 32)
INDEX_KEY_2 = fixed("index key merchant-42 v2", 32)
KEK_1 = fixed("kek local v1", 32)
KEK_2 = fixed("kek local v2", 32)


def nonce_for(label: str) -> bytes:
    return fixed("nonce:" + label, NONCE_LEN)


def ctx(table: str, column: str, row_key: bytes) -> dict:
    return {"table": table, "column": column, "row_key_hex": row_key.hex()}


def ctx_bytes(c: dict) -> bytes:
    return encode_context(c["table"], c["column"], bytes.fromhex(c["row_key_hex"]))


CTX_CARDS = ctx("cards", "pan", b"42")
CTX_CUSTOMERS = ctx("customers", "card_number", b"cust-000017")
CTX_UTF8 = ctx("支払いカード", "カード番号", b"\xe6\x97\xa5-7")  # row key "日-7"
CTX_BINARY = ctx("payments", "pan", bytes.fromhex("00ff10807f0102fe9a3c5d6e7f8091a2"))
CTX_MAX = ctx("t" * 255, "c" * 255, bytes(range(256)) * 2)


# ---------------------------------------------------------------------------
# Vector builders.
# ---------------------------------------------------------------------------


def build_ciphertext() -> dict:
    positives = [
        # name, dek, dek id, pan, context
        ("visa-16", DEK_A, DEK_A_ID, "4111111111111111", CTX_CARDS),
        ("mastercard-16", DEK_A, DEK_A_ID, "5555555555554444", CTX_CARDS),
        ("amex-15", DEK_A, DEK_A_ID, "378282246310005", CTX_CUSTOMERS),
        ("discover-16", DEK_B, DEK_B_ID, "6011111111111117", CTX_CUSTOMERS),
        ("jcb-16 utf8-context", DEK_B, DEK_B_ID, "3530111333300000", CTX_UTF8),
        ("length-8 (decoder minimum)", DEK_A, DEK_A_ID, "12345674", CTX_CARDS),
        ("length-12", DEK_A, DEK_A_ID, "123456789015", CTX_CARDS),
        ("length-13 visa", DEK_B, DEK_B_ID, "4222222222222", CTX_BINARY),
        ("length-14 diners", DEK_B, DEK_B_ID, "30569309025904", CTX_BINARY),
        ("length-17", DEK_C, DEK_C_ID, "62123456789012347", CTX_CARDS),
        ("length-18", DEK_C, DEK_C_ID, "621234567890123457", CTX_UTF8),
        ("length-19", DEK_C, DEK_C_ID, "4571234567890123450", CTX_CUSTOMERS),
        ("length-19 binary row key", DEK_A, DEK_A_ID, "6200000000000000000", CTX_BINARY),
        ("visa-16 same pan other row", DEK_A, DEK_A_ID, "4111111111111111",
         ctx("cards", "pan", b"43")),
        ("visa-16 max-length context", DEK_C, DEK_C_ID, "4111111111111111", CTX_MAX),
    ]
    vectors = []
    for name, dek, dek_id, pan, c in positives:
        nonce = nonce_for(name)
        context = ctx_bytes(c)
        binary = seal(dek, dek_id, nonce, pan, context)
        vectors.append({
            "name": name,
            "dek_hex": dek.hex(),
            "dek_id_hex": dek_id.hex(),
            "nonce_hex": nonce.hex(),
            "context": c,
            "pan": pan,
            "packed_hex": pack_pan(pan).hex(),
            "aad_hex": (binary[:HEADER_LEN] + context).hex(),
            "binary_hex": binary.hex(),
            "text": to_text(binary),
        })

    base = bytes.fromhex(vectors[0]["binary_hex"])  # visa-16 under DEK A, cards/pan/42
    base_text = vectors[0]["text"]
    assert vectors[0]["context"] == CTX_CARDS

    def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
        b = bytearray(data)
        b[at] ^= mask
        return bytes(b)

    def set_char(text: str, at: int, ch: str) -> str:
        return text[:at] + ch + text[at + 1 :]

    negatives: list[dict] = []

    def neg_bin(name: str, data: bytes, expect: str, c: dict = CTX_CARDS, dek: bytes = DEK_A) -> None:
        negatives.append({"name": name, "dek_hex": dek.hex(), "context": c,
                          "binary_hex": data.hex(), "expect": expect})

    def neg_text(name: str, text: str, expect: str, c: dict = CTX_CARDS, dek: bytes = DEK_A) -> None:
        negatives.append({"name": name, "dek_hex": dek.hex(), "context": c,
                          "text": text, "expect": expect})

    # Structural (format) errors, binary.
    neg_bin("empty input", b"", "format")
    neg_bin("unknown version byte 0x02", b"\x02" + base[1:], "format")
    neg_bin("unknown version byte 0x00", b"\x00" + base[1:], "format")
    neg_bin("unknown version byte, wrong length too", b"\x02" + base[1:20], "format")
    neg_bin("version byte only", base[:1], "format")
    neg_bin("unknown algorithm byte 0x02", base[:1] + b"\x02" + base[2:], "format")
    neg_bin("unknown algorithm byte 0x00", base[:1] + b"\x00" + base[2:], "format")
    neg_bin("truncated to 47 bytes", base[:47], "format")
    neg_bin("truncated to the 10-byte header", base[:10], "format")
    neg_bin("extended to 49 bytes", base + b"\x00", "format")

    # Authentication (decryption) errors, binary.
    neg_bin("tag bit flipped", flip(base, 47), "decryption")
    neg_bin("tag first byte flipped", flip(base, 32, 0x80), "decryption")
    neg_bin("ciphertext bit flipped", flip(base, 22), "decryption")
    neg_bin("ciphertext last bit flipped", flip(base, 31, 0x80), "decryption")
    neg_bin("nonce bit flipped", flip(base, 10), "decryption")
    neg_bin("nonce last byte flipped", flip(base, 21, 0xFF), "decryption")
    neg_bin("dek id byte changed (opened with the same dek)", flip(base, 9), "decryption")
    neg_bin("dek id first byte changed (opened with the same dek)", flip(base, 2, 0xFF), "decryption")
    neg_bin("opened with another dek", base, "decryption", dek=DEK_B)
    neg_bin("wrong context: row key changed", base, "decryption", c=ctx("cards", "pan", b"43"))
    neg_bin("wrong context: column changed", base, "decryption", c=ctx("cards", "pan_old", b"42"))
    neg_bin("wrong context: table changed", base, "decryption", c=ctx("cards_archive", "pan", b"42"))
    shifted = seal(DEK_A, DEK_A_ID, nonce_for("shifted context"), "4111111111111111",
                   encode_context("ab", "c", b"42"))
    neg_bin("context parts shifted (sealed ab/c, opened a/bc)", shifted, "decryption",
            c=ctx("a", "bc", b"42"))

    # Text form.
    neg_text("text: empty", "", "format")
    neg_text("text: wrong prefix P2", "P2" + base_text[2:], "format")
    neg_text("text: lowercase prefix p1", "p1" + base_text[2:], "format")
    neg_text("text: no prefix (base64url of all 48 bytes)", b64url_encode(base), "format")
    neg_text("text: too short (63 chars)", base_text[:63], "format")
    neg_text("text: too long (65 chars)", base_text + "A", "format")
    neg_text("text: padded with '='", base_text[:63] + "=", "format")
    neg_text("text: non-alphabet char '+'", set_char(base_text, 20, "+"), "format")
    neg_text("text: non-alphabet char '/'", set_char(base_text, 40, "/"), "format")
    neg_text("text: non-ASCII char", set_char(base_text, 30, "é"), "format")
    last = B64URL.index(base_text[-1])
    assert last & 0x0F == 0
    neg_text("text: non-zero trailing bits", set_char(base_text, 63, B64URL[last | 0x01]), "format")
    neg_text("text: non-zero trailing bits (high unused bit)",
             set_char(base_text, 63, B64URL[last | 0x08]), "format")
    # A canonical but altered text parses and then fails authentication.
    tag_char = B64URL[B64URL.index(base_text[50]) ^ 0x01]
    neg_text("text: one tag character changed", set_char(base_text, 50, tag_char), "decryption")
    neg_text("text: opened with wrong context", base_text, "decryption",
             c=ctx("cards", "pan", b"4"))

    # Payload errors: authenticated with the right key, but not a packed PAN.
    def nib(s: str) -> list[int]:
        assert len(s) == 20
        return [int(ch, 16) for ch in s]

    payloads = [
        ("payload: nibble 0xA inside the digits", nib("4111111A11111111FFFF")),
        ("payload: nibble 0xE ends the digits", nib("4111111111111111EFFF")),
        ("payload: digit after the 0xF padding", nib("411111111111111F1FFF")),
        ("payload: digit in the last nibble", nib("4111111111111111FFF1")),
        ("payload: Luhn check fails", nib("4111111111111112FFFF")),
        ("payload: 7 digits (Luhn-valid)", nib("1234566FFFFFFFFFFFFF")),
        ("payload: 20 digits, no padding (Luhn-valid)", nib("12345678901234567894")),
        ("payload: no digits (all padding)", nib("FFFFFFFFFFFFFFFFFFFF")),
        ("payload: all zero bytes (20 zero digits)", nib("00000000000000000000")),
    ]
    assert luhn_valid("1234566") and luhn_valid("12345678901234567894")
    for name, nibbles in payloads:
        binary = seal_packed(DEK_A, DEK_A_ID, nonce_for(name), pack_nibbles(nibbles),
                             ctx_bytes(CTX_CARDS))
        neg_bin(name, binary, "payload")
    # The same kind of payload in text form.
    bad = seal_packed(DEK_A, DEK_A_ID, nonce_for("payload text"),
                      pack_nibbles(nib("4111111111111112FFFF")), ctx_bytes(CTX_CARDS))
    neg_text("payload: Luhn check fails (text form)", to_text(bad), "payload")

    return {"format": "panseal ciphertext v1", "vectors": vectors, "negative": negatives}


def request(key_id: bytes, scope: str, environment: str, purpose: str) -> dict:
    return {"id_hex": key_id.hex(), "scope": scope, "environment": environment, "purpose": purpose}


IDX_TEST_1 = index_key_id("test", "merchant-42", 1)
IDX_TEST_2 = index_key_id("test", "merchant-42", 2)

WRAPS = [
    # name, kek, kek id, kek version, request, key
    ("data key, kek v1", KEK_1, "local", 1,
     request(DEK_A_ID, "merchant-42", "test", "data"), DEK_A),
    ("index key v1, kek v1", KEK_1, "local", 1,
     request(IDX_TEST_1, "merchant-42", "test", "index"), INDEX_KEY_1),
    ("index key v2, kek v1", KEK_1, "local", 1,
     request(IDX_TEST_2, "merchant-42", "test", "index"), INDEX_KEY_2),
    ("data key, kek v2, prod", KEK_2, "local", 2,
     request(DEK_B_ID, "tenant:eu.west_1", "prod", "data"), DEK_B),
    ("data key C, kek v1", KEK_1, "local", 1,
     request(DEK_C_ID, "merchant-42", "test", "data"), DEK_C),
    ("data key, kms-style kek id", KEK_2, "arn:aws:kms:eu-west-1:111122223333:key/pan-kek", 7,
     request(DEK_A_ID, "merchant-42", "test", "data"), DEK_A),
]


def build_wrap() -> dict:
    vectors = []
    for name, kek, kek_id, kek_version, req, key in WRAPS:
        nonce = nonce_for("wrap:" + name)
        wrapped = wrap(kek, kek_id, kek_version, req, key, nonce)
        vectors.append({
            "name": name,
            "kek_hex": kek.hex(),
            "kek_id": kek_id,
            "kek_version": kek_version,
            "request": req,
            "dek_hex": key.hex(),
            "nonce_hex": nonce.hex(),
            "aad_hex": wrap_aad(req, kek_id, kek_version).hex(),
            "wrapped_hex": wrapped.hex(),
        })

    base = vectors[0]
    req = base["request"]
    wrapped = bytes.fromhex(base["wrapped_hex"])
    negatives = []

    def neg(name: str, *, kek: str = base["kek_hex"], kek_id: str = base["kek_id"],
            kek_version: int = base["kek_version"], req: dict = req, data: bytes = wrapped) -> None:
        negatives.append({"name": name, "kek_hex": kek, "kek_id": kek_id,
                          "kek_version": kek_version, "request": req, "wrapped_hex": data.hex()})

    neg("another key id", req={**req, "id_hex": DEK_B_ID.hex()})
    neg("another scope", req={**req, "scope": "merchant-43"})
    neg("another environment", req={**req, "environment": "prod"})
    neg("another purpose", req={**req, "purpose": "index"})
    neg("another kek version (rolled back or forward)", kek_version=2)
    neg("another kek id", kek_id="local2")
    neg("another kek", kek=KEK_2.hex())
    # A record swapped in from another key: its wrap, presented under this request.
    neg("wrap of another key (record swapped)", data=bytes.fromhex(vectors[4]["wrapped_hex"]))
    b = bytearray(wrapped)
    b[-1] ^= 0x01
    neg("tag bit flipped", data=bytes(b))
    b = bytearray(wrapped)
    b[20] ^= 0x01
    neg("ciphertext bit flipped", data=bytes(b))
    neg("truncated to 59 bytes", data=wrapped[:59])
    neg("extended to 61 bytes", data=wrapped + b"\x00")
    neg("empty", data=b"")

    return {"format": "panseal wrap binding v1", "vectors": vectors, "negative": negatives}


def build_record(wrap_doc: dict) -> dict:
    wraps = {v["name"]: v for v in wrap_doc["vectors"]}

    def fields(wrap_name: str | None, *, key_id: bytes, purpose: str, version: int, state: str,
               scope: str, environment: str, kek_id: str = "local", kek_version: int = 1,
               created_at: int, encrypt_until: int, decrypt_until: int, max_uses: int,
               uses: int) -> dict:
        if wrap_name is not None:
            w = wraps[wrap_name]
            assert w["request"] == request(key_id, scope, environment, purpose)
            assert (w["kek_id"], w["kek_version"]) == (kek_id, kek_version)
            wrapped_hex = w["wrapped_hex"]
        else:
            wrapped_hex = ""
        return {
            "id_hex": key_id.hex(), "purpose": purpose, "version": version, "state": state,
            "scope": scope, "environment": environment, "kek_id": kek_id,
            "kek_version": kek_version, "created_at": created_at,
            "encrypt_until": encrypt_until, "decrypt_until": decrypt_until,
            "max_uses": max_uses, "uses": uses, "wrapped_hex": wrapped_hex,
        }

    t0 = 1_700_000_000  # 2023-11-14T22:13:20Z
    day = 86_400
    U64_MAX = 2**64 - 1
    specs = [
        ("active data key", fields(
            "data key, kek v1", key_id=DEK_A_ID, purpose="data", version=0, state="active",
            scope="merchant-42", environment="test", created_at=t0,
            encrypt_until=t0 + 30 * day, decrypt_until=t0 + 30 * day + 3 * 365 * day,
            max_uses=1 << 24, uses=17)),
        ("decrypt-only data key, kek v2", fields(
            "data key, kek v2, prod", key_id=DEK_B_ID, purpose="data", version=0,
            state="decrypt-only", scope="tenant:eu.west_1", environment="prod", kek_version=2,
            created_at=t0 - 60 * day, encrypt_until=t0 - 30 * day,
            decrypt_until=t0 - 30 * day + 3 * 365 * day, max_uses=1 << 24, uses=16_777_216)),
        ("compromised data key", fields(
            "data key C, kek v1", key_id=DEK_C_ID, purpose="data", version=0,
            state="compromised", scope="merchant-42", environment="test",
            created_at=t0 + day, encrypt_until=t0 + day, decrypt_until=t0 + day,
            max_uses=1 << 32, uses=0)),
        ("destroyed data key", fields(
            None, key_id=DEK_D_ID, purpose="data", version=0, state="destroyed",
            scope="merchant-42", environment="test", created_at=t0 - 400 * day,
            encrypt_until=t0 - 370 * day, decrypt_until=t0 - 5 * day,
            max_uses=1 << 24, uses=123_456)),
        ("index key v1 (decrypt-only)", fields(
            "index key v1, kek v1", key_id=IDX_TEST_1, purpose="index", version=1,
            state="decrypt-only", scope="merchant-42", environment="test",
            created_at=t0 - 100 * day, encrypt_until=t0 - 70 * day,
            decrypt_until=U64_MAX, max_uses=U64_MAX, uses=0)),
        ("index key v2 (active)", fields(
            "index key v2, kek v1", key_id=IDX_TEST_2, purpose="index", version=2,
            state="active", scope="merchant-42", environment="test",
            created_at=t0, encrypt_until=t0 + 30 * day, decrypt_until=t0 + 30 * day,
            max_uses=U64_MAX, uses=0)),
        ("data key, kms-style kek id", fields(
            "data key, kms-style kek id", key_id=DEK_A_ID, purpose="data", version=0,
            state="active", scope="merchant-42", environment="test",
            kek_id="arn:aws:kms:eu-west-1:111122223333:key/pan-kek", kek_version=7,
            created_at=0, encrypt_until=0, decrypt_until=0, max_uses=1, uses=0)),
    ]
    records = [{"name": name, "fields": f, "record_hex": encode_record(f).hex()} for name, f in specs]

    base_f = records[0]["fields"]
    base = bytes.fromhex(records[0]["record_hex"])
    negatives = []

    def neg(name: str, data: bytes) -> None:
        negatives.append({"name": name, "record_hex": data.hex()})

    def neg_f(name: str, **changes) -> None:
        neg(name, encode_record({**base_f, **changes}))

    neg("empty", b"")
    neg_f("record version 2", record_version=2)
    neg_f("record version 0", record_version=0)
    neg_f("unknown purpose 3", purpose=3)
    neg_f("unknown purpose 0", purpose=0)
    neg_f("unknown state 5", state=5)
    neg_f("unknown state 0", state=0)
    neg("truncated by one byte", base[:-1])
    neg("truncated inside the id", base[:6])
    neg("trailing byte", base + b"\x00")
    neg_f("destroyed with wrapped bytes", state="destroyed")
    neg_f("active with empty wrapped", wrapped_hex="")
    neg_f("decrypt-only with empty wrapped", state="decrypt-only", wrapped_hex="")
    neg_f("encrypt_until before created_at", created_at=base_f["encrypt_until"] + 1)
    neg_f("decrypt_until before encrypt_until", decrypt_until=base_f["encrypt_until"] - 1)
    neg_f("scope with a space", scope="merchant 42")
    neg_f("empty scope", scope="")
    neg_f("scope of 65 characters", scope="s" * 65)
    neg_f("scope with non-ASCII letter", scope="händler")
    neg_f("environment with a slash", environment="prod/eu")
    neg_f("empty environment", environment="")
    neg_f("empty kek id", kek_id="")
    neg_f("kek id of 1025 bytes", kek_id="k" * 1025)
    neg_f("kek id not UTF-8", kek_id=b"local\xff")
    neg_f("wrapped of 4097 bytes", wrapped_hex="00" * 4097)
    # The length prefix claims one byte more than is present.
    b = bytearray(base)
    wrapped_len_at = len(base) - 60 - 2
    assert b[wrapped_len_at : wrapped_len_at + 2] == u16(60)
    b[wrapped_len_at : wrapped_len_at + 2] = u16(61)
    neg("wrapped length prefix too large", bytes(b))

    # The key-store file: every record but the one that repeats an id.
    in_file = [r for r in records if r["name"] != "data key, kms-style kek id"]
    rec_bytes = [bytes.fromhex(r["record_hex"]) for r in in_file]
    file_bytes = encode_file(rec_bytes)
    order = sorted(in_file, key=lambda r: bytes.fromhex(r["fields"]["id_hex"]))
    file_doc = {"records": [r["name"] for r in order], "file_hex": file_bytes.hex()}

    ordered = sorted(rec_bytes, key=lambda rec: rec[2:10])
    body = file_bytes[:-DIGEST_LEN]
    file_neg = []

    def fneg(name: str, data: bytes) -> None:
        file_neg.append({"name": name, "file_hex": data.hex()})

    b = bytearray(file_bytes)
    b[len(b) // 2] ^= 0x01
    fneg("flipped byte in a record (checksum mismatch)", bytes(b))
    b = bytearray(file_bytes)
    b[-1] ^= 0x80
    fneg("flipped byte in the checksum", bytes(b))
    fneg("truncated by one byte (torn write)", file_bytes[:-1])
    fneg("truncated to half (torn write)", file_bytes[: len(file_bytes) // 2])
    fneg("checksum missing", body)
    fneg("empty file", b"")
    fneg("wrong magic (checksum recomputed)", with_checksum(b"PANSEALX" + body[8:]))
    fneg("wrong magic, checksum not recomputed", b"PANSEALX" + file_bytes[8:])
    fneg("unknown file version 2 (checksum recomputed)",
         with_checksum(encode_file_body(ordered, version=2)))
    fneg("record count one too high (checksum recomputed)",
         with_checksum(encode_file_body(ordered, count=len(ordered) + 1)))
    fneg("record count one too low (checksum recomputed)",
         with_checksum(encode_file_body(ordered, count=len(ordered) - 1)))
    fneg("trailing byte before the checksum (checksum recomputed)", with_checksum(body + b"\x00"))
    fneg("duplicate record id (checksum recomputed)",
         with_checksum(encode_file_body(ordered + [bytes.fromhex(records[-1]["record_hex"])])))
    bad_record = bytes.fromhex(negatives[1]["record_hex"])  # record version 2
    fneg("invalid record inside (checksum recomputed)",
         with_checksum(encode_file_body(ordered[:1] + [bad_record] + ordered[1:])))

    return {"format": "panseal key-store record v1", "records": records, "negative": negatives,
            "file": file_doc, "file_negative": file_neg}


def build_blind_index() -> dict:
    cases = [
        ("visa-16, index key v1", INDEX_KEY_1, "4111111111111111"),
        ("visa-16, index key v2", INDEX_KEY_2, "4111111111111111"),
        ("mastercard-16, index key v1", INDEX_KEY_1, "5555555555554444"),
        ("amex-15, index key v1", INDEX_KEY_1, "378282246310005"),
        ("length-8, index key v1", INDEX_KEY_1, "12345674"),
        ("length-19, index key v1", INDEX_KEY_1, "4571234567890123450"),
    ]
    vectors = [{"name": n, "key_hex": k.hex(), "pan": p, "index_hex": blind_index(k, p).hex()}
               for n, k, p in cases]
    ids = [
        ("test", "merchant-42", 1),
        ("test", "merchant-42", 2),
        ("prod", "merchant-42", 1),
        ("prod", "tenant:eu.west_1", 1),
        ("test", "merchant-4", 21),
        ("prod", "m", 4294967295),
    ]
    index_key_ids = [{"environment": e, "scope": s, "version": v,
                      "id_hex": index_key_id(e, s, v).hex()} for e, s, v in ids]
    return {"format": "panseal blind index v1", "vectors": vectors, "index_key_ids": index_key_ids}


# ---------------------------------------------------------------------------
# Issue 10: key-store record version 2 (FORMAT.md §9) and blind-index values
# computed inside the key service (FORMAT.md §11), under the keys
# LocalKeyService::from_kek_bytes_insecure derives from its KEK bytes.
# ---------------------------------------------------------------------------

RECORD_V2 = 2
RECORD_MAC_LABEL = b"panseal-record-v2"
SERVICE_KEK = fixed("local service kek", 32)


def hkdf32(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def local_record_key(kek: bytes) -> bytes:
    return hkdf32(kek, b"panseal-local-record-key-v1")


def local_index_key(kek: bytes, environment: str, scope: str, version: int) -> bytes:
    e, sc = environment.encode("ascii"), scope.encode("ascii")
    return hkdf32(kek, b"panseal-local-index-key-v1" + u8(len(e)) + e + u8(len(sc)) + sc
                  + u32(version))


def service_index_key_id(environment: str, scope: str, version: int) -> bytes:
    return sha256(b"panseal-index-key-id-v2" + environment.encode("ascii") + b"\x00"
                  + scope.encode("ascii") + b"\x00" + u32(version))[:8]


def record_v2_body(f: dict, sequence: int) -> bytes:
    """Version 2 without the tag: version 1's fields with version byte 2 and
    the sequence (u64) between `uses` and the wrapped key."""
    v1 = encode_record(dict(f, record_version=RECORD_V2))
    wrapped = bytes.fromhex(f["wrapped_hex"])
    tail = u16(len(wrapped)) + wrapped
    assert v1.endswith(tail)
    return v1[: len(v1) - len(tail)] + u64(sequence) + tail


def record_tag(record_key: bytes, body: bytes) -> bytes:
    h = hmac.HMAC(record_key, hashes.SHA256())
    h.update(RECORD_MAC_LABEL + body)
    return h.finalize()


def build_record_v2(record_doc: dict) -> dict:
    rk = local_record_key(SERVICE_KEK)
    base = next(v for v in record_doc["records"] if v["name"] == "active data key")["fields"]
    assert base["environment"] == "test"
    positives = [
        ("active, sequence 0", dict(base, uses=0), 0),
        ("use count reported, sequence 1", dict(base, uses=4096), 1),
        ("retired, sequence 7", dict(base, state="decrypt-only", uses=70000), 7),
        ("destroyed, sequence 8", dict(base, state="destroyed", uses=70000, wrapped_hex=""), 8),
    ]
    vectors = []
    for name, f, seq in positives:
        body = record_v2_body(f, seq)
        tag = record_tag(rk, body)
        vectors.append({"name": name, "fields": f, "sequence": seq,
                        "signed_hex": (RECORD_MAC_LABEL + body).hex(),
                        "tag_hex": tag.hex(), "record_hex": (body + tag).hex()})
    # Negative: a database writer edits one field of the signed record and
    # keeps the tag. Each still decodes; each fails verification.
    signed_f, signed_seq = positives[2][1], positives[2][2]
    tag = record_tag(rk, record_v2_body(signed_f, signed_seq))
    edits = [
        ("state decrypt-only -> active", {"state": "active"}, None),
        ("state -> compromised", {"state": "compromised"}, None),
        ("encrypt_until extended", {"encrypt_until": signed_f["encrypt_until"] + 86_400}, None),
        ("decrypt_until extended", {"decrypt_until": signed_f["decrypt_until"] + 86_400}, None),
        ("uses reset", {"uses": 0}, None),
        ("max_uses raised", {"max_uses": signed_f["max_uses"] * 2}, None),
        ("version relabel", {"version": 1}, None),
        ("purpose relabel", {"purpose": "index"}, None),
        ("scope relabel", {"scope": "merchant-43"}, None),
        ("created_at moved", {"created_at": signed_f["created_at"] - 1}, None),
        ("kek version relabel", {"kek_version": 2}, None),
        ("wrapped key swapped", {"wrapped_hex": "00" * 60}, None),
        ("sequence rolled back", {}, signed_seq - 1),
        ("sequence bumped", {}, signed_seq + 1),
    ]
    negative = []
    for name, change, seq in edits:
        body = record_v2_body(dict(signed_f, **change), signed_seq if seq is None else seq)
        assert record_tag(rk, body) != tag
        negative.append({"name": name, "record_hex": (body + tag).hex()})
    flipped = bytearray(tag)
    flipped[31] ^= 1
    negative.append({"name": "tag bit flipped",
                     "record_hex": (record_v2_body(signed_f, signed_seq) + bytes(flipped)).hex()})
    return {"format": "panseal key-store record v2", "kek_hex": SERVICE_KEK.hex(),
            "environment": "test", "record_key_hex": rk.hex(), "vectors": vectors,
            "negative": negative}


def verify_record_v2(doc: dict) -> None:
    rk = local_record_key(bytes.fromhex(doc["kek_hex"]))
    assert rk.hex() == doc["record_key_hex"]
    for v in doc["vectors"]:
        body = record_v2_body(v["fields"], v["sequence"])
        assert (RECORD_MAC_LABEL + body).hex() == v["signed_hex"], v["name"]
        assert record_tag(rk, body).hex() == v["tag_hex"], v["name"]
    for v in doc["negative"]:
        raw = bytes.fromhex(v["record_hex"])
        assert record_tag(rk, raw[:-32]) != raw[-32:], v["name"]


def build_blind_index_v2() -> dict:
    env, scopes = "test", ["merchant-42", "tenant:eu.west_1"]
    pans = ["4111111111111111", "5555555555554444", "378282246310005", "4571234567890123450"]
    keys, vectors = [], []
    for scope in scopes:
        for version in (1, 2):
            k = local_index_key(SERVICE_KEK, env, scope, version)
            keys.append({"scope": scope, "version": version, "index_key_hex": k.hex(),
                         "key_id_hex": service_index_key_id(env, scope, version).hex(),
                         "legacy_key_id_hex": index_key_id(env, scope, version).hex()})
            for pan in pans:
                vectors.append({"scope": scope, "version": version, "pan": pan,
                                "index_hex": blind_index(k, pan).hex()})
    return {"format": "panseal blind index v2 (computed in the key service)",
            "kek_hex": SERVICE_KEK.hex(), "environment": env, "index_keys": keys,
            "vectors": vectors}


def verify_blind_index_v2(doc: dict) -> None:
    kek = bytes.fromhex(doc["kek_hex"])
    for k in doc["index_keys"]:
        key = local_index_key(kek, doc["environment"], k["scope"], k["version"])
        assert key.hex() == k["index_key_hex"]
        assert k["key_id_hex"] != k["legacy_key_id_hex"]
    by = {(k["scope"], k["version"]): bytes.fromhex(k["index_key_hex"]) for k in doc["index_keys"]}
    for v in doc["vectors"]:
        assert blind_index(by[(v["scope"], v["version"])], v["pan"]).hex() == v["index_hex"]



# ---------------------------------------------------------------------------
# Verification: runs on the JSON documents (generated or committed).
# ---------------------------------------------------------------------------


def classify_ciphertext(v: dict) -> str:
    """Opens a negative (or positive) vector; returns "ok" or the error class."""
    dek = bytes.fromhex(v["dek_hex"])
    context = ctx_bytes(v["context"])
    try:
        if "binary_hex" in v:
            sealed = parse_binary(bytes.fromhex(v["binary_hex"]))
        else:
            sealed = parse_text(v["text"])
        open_sealed(dek, sealed, context)
    except (FormatError, DecryptionError, PayloadError) as e:
        return e.kind
    return "ok"


def verify_ciphertext(doc: dict) -> None:
    assert doc["format"] == "panseal ciphertext v1"
    lengths = set()
    for v in doc["vectors"]:
        dek, dek_id = bytes.fromhex(v["dek_hex"]), bytes.fromhex(v["dek_id_hex"])
        nonce, context = bytes.fromhex(v["nonce_hex"]), ctx_bytes(v["context"])
        binary = bytes.fromhex(v["binary_hex"])
        assert pack_pan(v["pan"]).hex() == v["packed_hex"], v["name"]
        assert seal(dek, dek_id, nonce, v["pan"], context) == binary, v["name"]
        assert binary[:HEADER_LEN] + context == bytes.fromhex(v["aad_hex"]), v["name"]
        assert binary[2:10] == dek_id and binary[10:22] == nonce, v["name"]
        assert parse_text(v["text"]) == binary and to_text(binary) == v["text"], v["name"]
        assert len(v["text"]) == TEXT_LEN and len(binary) == V1_LEN
        assert open_sealed(dek, parse_binary(binary), context) == v["pan"], v["name"]
        assert open_sealed(dek, parse_text(v["text"]), context) == v["pan"], v["name"]
        assert unpack_pan(bytes.fromhex(v["packed_hex"])) == v["pan"]
        lengths.add(len(v["pan"]))
    assert lengths >= {8, *range(12, 20)}, lengths
    assert len({v["dek_hex"] for v in doc["vectors"]}) >= 2
    for v in doc["negative"]:
        assert ("binary_hex" in v) != ("text" in v), v["name"]
        assert v["expect"] in ("format", "decryption", "payload"), v["name"]
        got = classify_ciphertext(v)
        assert got == v["expect"], f'{v["name"]}: expected {v["expect"]}, got {got}'


def verify_wrap(doc: dict) -> None:
    assert doc["format"] == "panseal wrap binding v1"
    for v in doc["vectors"]:
        kek = bytes.fromhex(v["kek_hex"])
        wrapped = bytes.fromhex(v["wrapped_hex"])
        aad = wrap_aad(v["request"], v["kek_id"], v["kek_version"])
        assert aad.hex() == v["aad_hex"], v["name"]
        assert wrapped[:12].hex() == v["nonce_hex"] and len(wrapped) == WRAPPED_LEN
        assert wrap(kek, v["kek_id"], v["kek_version"], v["request"],
                    bytes.fromhex(v["dek_hex"]), bytes.fromhex(v["nonce_hex"])) == wrapped
        assert unwrap(kek, v["kek_id"], v["kek_version"], v["request"], wrapped).hex() == v["dek_hex"]
    for v in doc["negative"]:
        try:
            unwrap(bytes.fromhex(v["kek_hex"]), v["kek_id"], v["kek_version"], v["request"],
                   bytes.fromhex(v["wrapped_hex"]))
        except UnwrapError:
            continue
        raise AssertionError(f'wrap negative {v["name"]} unwrapped')


def verify_record(doc: dict) -> None:
    assert doc["format"] == "panseal key-store record v1"
    by_name = {}
    for r in doc["records"]:
        data = bytes.fromhex(r["record_hex"])
        assert decode_record(data) == r["fields"], r["name"]
        assert encode_record(r["fields"]) == data, r["name"]
        by_name[r["name"]] = r
    for r in doc["negative"]:
        try:
            decode_record(bytes.fromhex(r["record_hex"]))
        except RecordError:
            continue
        raise AssertionError(f'record negative {r["name"]} decoded')
    f = doc["file"]
    data = bytes.fromhex(f["file_hex"])
    decoded = decode_file(data)
    assert decoded == [by_name[n]["fields"] for n in f["records"]]
    ids = [bytes.fromhex(r["id_hex"]) for r in decoded]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert encode_file([bytes.fromhex(by_name[n]["record_hex"]) for n in f["records"]]) == data
    for r in doc["file_negative"]:
        try:
            decode_file(bytes.fromhex(r["file_hex"]))
        except CorruptError:
            continue
        raise AssertionError(f'file negative {r["name"]} decoded')


def verify_blind_index(doc: dict) -> None:
    assert doc["format"] == "panseal blind index v1"
    for v in doc["vectors"]:
        assert blind_index(bytes.fromhex(v["key_hex"]), v["pan"]).hex() == v["index_hex"], v["name"]
    for v in doc["index_key_ids"]:
        assert index_key_id(v["environment"], v["scope"], v["version"]).hex() == v["id_hex"]


def verify_cross(docs: dict) -> None:
    """Checks that ties the files together: records hold the wraps, index keys
    have the ids the blind-index file gives."""
    wraps = {(v["request"]["id_hex"], v["kek_id"], v["kek_version"]): v
             for v in docs["wrap_v1.json"]["vectors"]}
    ids = {(v["environment"], v["scope"], v["version"]): v["id_hex"]
           for v in docs["blind_index_v1.json"]["index_key_ids"]}
    for r in docs["record_v1.json"]["records"]:
        f = r["fields"]
        if f["state"] != "destroyed":
            w = wraps[(f["id_hex"], f["kek_id"], f["kek_version"])]
            assert w["wrapped_hex"] == f["wrapped_hex"], r["name"]
        if f["purpose"] == "index":
            assert ids[(f["environment"], f["scope"], f["version"])] == f["id_hex"], r["name"]


VERIFIERS = {
    "ciphertext_v1.json": verify_ciphertext,
    "wrap_v1.json": verify_wrap,
    "record_v1.json": verify_record,
    "blind_index_v1.json": verify_blind_index,
    "record_v2.json": verify_record_v2,
    "blind_index_v2.json": verify_blind_index_v2,
}


def verify_all(docs: dict) -> None:
    for name, check in VERIFIERS.items():
        check(docs[name])
    verify_cross(docs)


def build_all() -> dict:
    wrap_doc = build_wrap()
    record_doc = build_record(wrap_doc)
    return {
        "ciphertext_v1.json": build_ciphertext(),
        "wrap_v1.json": wrap_doc,
        "record_v1.json": record_doc,
        "blind_index_v1.json": build_blind_index(),
        "record_v2.json": build_record_v2(record_doc),
        "blind_index_v2.json": build_blind_index_v2(),
    }


def render(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write the JSON files into (default: beside this script)")
    args = parser.parse_args(argv)
    docs = build_all()
    verify_all(docs)
    # Verify what will actually be on disk, too (JSON round trip).
    verify_all({name: json.loads(render(doc)) for name, doc in docs.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (args.out / name).write_bytes(render(doc))
    counts = ", ".join(
        f'{name}: {sum(len(v) for k, v in doc.items() if isinstance(v, list))} entries'
        for name, doc in docs.items()
    )
    print(f"wrote {len(docs)} files to {args.out} ({counts}); self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
