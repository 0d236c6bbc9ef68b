#!/usr/bin/env python3
"""Independent implementation of panseal-keyd's state formats version 2, 3
and 4 (FORMAT.md sections 13 and 14: subkeys, state.bin, state.journal,
state.anchor, audit anchor and key id; version 3: sealed index and record
keys, the record registry, record tags and keyed hashes; version 4, section
18: sealed ingest (P-256) private scalars and their public keys), and the
generator of tests/vectors/keyd_state_v2.json, keyd_state_v3.json and
keyd_state_v4.json.

Written from FORMAT.md, not from the Rust sources. Deterministic: every key
and nonce is derived from a label with SHA-256 (test values only; never
choose a nonce like this outside test vectors).

    python3 tests/vectors/gen_keyd_vectors.py [--out DIR]

Needs Python 3.9+ and the `cryptography` package.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import struct

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def fixed(label: str, n: int = 32) -> bytes:
    return hashlib.sha256(b"panseal-keyd test vector " + label.encode()).digest()[:n]


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()  # RFC 5869, no salt
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def hm(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def seal(key: bytes, nonce: bytes, aad: bytes, plain: bytes) -> str:
    return (nonce + AESGCM(key).encrypt(nonce, plain, aad)).hex()


def kek_aad(env: str, scope: str, version: int) -> bytes:
    out = b"panseal-keyd-kek-v2"
    for p in (env.encode(), scope.encode()):
        out += struct.pack(">H", len(p)) + p
    return out + struct.pack(">I", version)


def compact(v) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    out_dir = ap.parse_args().out

    master = fixed("master")
    keys = {
        "state_mac": hkdf_sha256(master, b"panseal-keyd v2 state authentication"),
        "anchor_mac": hkdf_sha256(master, b"panseal-keyd v2 rollback anchor"),
        "kek_seal": hkdf_sha256(master, b"panseal-keyd v2 kek sealing"),
        "check": hkdf_sha256(master, b"panseal-keyd v2 master check"),
    }
    audit_key = fixed("audit key")
    audit_key_id = hm(audit_key, b"panseal-audit-key-id-v1")[:16].hex()
    kek = fixed("kek test/m-1 v1")
    state = {
        "threshold": 2,
        "share_salt": fixed("salt").hex(),
        "master_check": seal(keys["check"], fixed("check nonce", 12), b"check-v2",
                             b"panseal-keyd master key check v1"),
        "shares": [
            {"custodian": "alice", "x": 1, "check": "00" * 32},
            {"custodian": "bob", "x": 2, "check": "11" * 32},
        ],
        "share_epoch": 0,
        "acknowledgements": {},
        "scopes": {
            "test/m-1": {
                "environment": "test",
                "scope": "m-1",
                "created_by": "alice",
                "versions": [{
                    "version": 1,
                    "state": "active",
                    "created_at": 1700000000,
                    "sealed": seal(keys["kek_seal"], fixed("kek nonce", 12),
                                   kek_aad("test", "m-1", 1), kek),
                    "destroy_approvals": [],
                }],
            }
        },
        "deks": {},
        "generation": 5,
        "audit": {"records": 0, "head": "0" * 64},
        "audit_key_id": audit_key_id,
    }
    body = b"PANSEALD\x02" + compact(state)
    snap_mac = hm(keys["state_mac"], b"panseal-keyd-state-v2\n", body)
    snapshot = body + snap_mac
    snapshot += hashlib.sha256(snapshot).digest()

    entry = {
        "generation": 6,
        "prev": snap_mac.hex(),
        "audit": {"records": 3, "head": "ab" * 32},
        "changes": [{
            "kind": "acknowledgement",
            "value": {"custodian": "alice", "statement_sha256": "cd" * 32, "at": 1700000001},
        }],
    }
    line = compact(entry)[:-1]  # without the closing brace
    entry_mac = hm(keys["state_mac"], b"panseal-keyd-journal-v2\n", line)
    journal = line + b',"mac":"' + entry_mac.hex().encode() + b'"}\n'

    anchor_head = entry_mac.hex()
    anchor = {
        "v": 2,
        "generation": 6,
        "head": anchor_head,
        "mac": hm(keys["anchor_mac"], b"panseal-keyd-anchor-v2\n", b"\x02",
                  struct.pack(">Q", 6), anchor_head.encode()).hex(),
    }
    audit_head = "ef" * 32
    audit_anchor = {
        "v": 1,
        "records": 3,
        "head": audit_head,
        "mac": hm(audit_key, b"panseal-audit-anchor-v1\n", struct.pack(">Q", 3),
                  audit_head.encode()).hex(),
    }
    doc = {
        "description": "panseal-keyd state v2 (FORMAT.md 13-14), from gen_keyd_vectors.py",
        "master_key": master.hex(),
        "subkeys": {k: v.hex() for k, v in keys.items()},
        "kek": {"environment": "test", "scope": "m-1", "version": 1, "key": kek.hex()},
        "state_bin": snapshot.hex(),
        "snapshot_mac": snap_mac.hex(),
        "state_journal": journal.decode(),
        "journal_mac": entry_mac.hex(),
        "state_anchor": compact(anchor).decode(),
        "audit_key": audit_key.hex(),
        "audit_key_id": audit_key_id,
        "audit_anchor": compact(audit_anchor).decode(),
    }
    with open(os.path.join(out_dir, "keyd_state_v2.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    write_v3(out_dir, master, keys, state)


def aad_parts(label: bytes, parts, version=None) -> bytes:
    out = label
    for p in parts:
        p = p.encode()
        out += struct.pack(">H", len(p)) + p
    if version is not None:
        out += struct.pack(">I", version)
    return out


def record_v2_body(r: dict) -> bytes:
    """FORMAT.md 9 (record v1 fields) plus u64be sequence before the
    wrapped length; version byte 2."""
    out = bytes([2, r["purpose"]]) + bytes.fromhex(r["id"]) + struct.pack(">I", r["version"])
    out += bytes([r["state"]])
    for name in (r["scope"], r["environment"]):
        out += bytes([len(name)]) + name.encode()
    out += struct.pack(">H", len(r["kek_id"])) + r["kek_id"].encode()
    out += struct.pack(">I", r["kek_version"])
    for f in ("created_at", "encrypt_until", "decrypt_until", "max_uses", "uses", "sequence"):
        out += struct.pack(">Q", r[f])
    w = bytes.fromhex(r["wrapped"])
    return out + struct.pack(">H", len(w)) + w


def v3_snapshot(keys: dict, state: dict, version_byte: int = 3,
                label: bytes = b"panseal-keyd-state-v3\n") -> tuple[bytes, bytes]:
    body = b"PANSEALD" + bytes([version_byte]) + compact(state)
    mac = hm(keys["state_mac"], label, body)
    snap = body + mac
    return snap + hashlib.sha256(snap).digest(), mac


def write_v3(out_dir: str, master: bytes, keys2: dict, state2: dict) -> None:
    keys = dict(keys2)
    keys["index_seal"] = hkdf_sha256(master, b"panseal-keyd v3 index-key sealing")
    keys["record_seal"] = hkdf_sha256(master, b"panseal-keyd v3 record-key sealing")
    index_key = fixed("index key test/m-1 v1")
    index_aad = aad_parts(b"panseal-keyd-index-key-v3", ["test", "m-1"], 1)
    index_sealed = seal(keys["index_seal"], fixed("index nonce", 12), index_aad, index_key)
    record_key = fixed("record key test")
    record_sealed = seal(keys["record_seal"], fixed("record nonce", 12),
                         aad_parts(b"panseal-keyd-record-key-v3", ["test"]), record_key)
    rec = {
        "purpose": 1, "id": "0102030405060708", "version": 0, "state": 1,
        "scope": "m-1", "environment": "test", "kek_id": "keyd/test/m-1", "kek_version": 1,
        "created_at": 1700000000, "encrypt_until": 1702592000, "decrypt_until": 1797200000,
        "max_uses": 16777216, "uses": 17, "sequence": 3, "wrapped": "ab" * 60,
    }
    body = record_v2_body(rec)
    tag = hm(record_key, b"panseal-record-v2", body)
    edited = dict(rec, uses=0)
    state = dict(state2)
    state["index_keys"] = {"test/m-1": {"environment": "test", "scope": "m-1", "versions": [
        {"version": 1, "state": "active", "created_at": 1700000000, "created_by": "alice",
         "sealed": index_sealed}]}}
    state["record_keys"] = {"test": {"environment": "test", "created_at": 1700000000,
                                     "sealed": record_sealed}}
    state["registry"] = {"test/m-1/0102030405060708": {
        "sequence": 3, "state": "active", "tag": tag.hex(), "signed_at": 1700000001}}
    snapshot, snap_mac = v3_snapshot(keys, state)
    entry = {
        "generation": 6,
        "prev": snap_mac.hex(),
        "audit": {"records": 3, "head": "ab" * 32},
        "changes": [{"kind": "registry", "key": "test/m-1/0102030405060708", "value": {
            "sequence": 4, "state": "decrypt-only", "tag": "cd" * 32, "signed_at": 1700000002}}],
    }
    line = compact(entry)[:-1]
    entry_mac = hm(keys["state_mac"], b"panseal-keyd-journal-v2\n", line)
    journal = line + b',"mac":"' + entry_mac.hex().encode() + b'"}\n'
    pan = "4111111111111111"
    negatives = [
        # A version 3 body MACed with the version 2 label: fails at unseal.
        {"name": "v3 snapshot under the v2 label", "expect": "unauthentic",
         "state_bin": v3_snapshot(keys, state, 3, b"panseal-keyd-state-v2\n")[0].hex()},
        # A version 2 file carrying version 3 fields: refused when read.
        {"name": "v2 snapshot with v3 fields", "expect": "corrupt",
         "state_bin": v3_snapshot(keys, state, 2, b"panseal-keyd-state-v2\n")[0].hex()},
        # A version byte past the newest (4 since issue 11).
        {"name": "unknown version 5", "expect": "corrupt",
         "state_bin": v3_snapshot(keys, state, 5)[0].hex()},
    ]
    moved = seal(keys["index_seal"], fixed("index nonce", 12),
                 aad_parts(b"panseal-keyd-index-key-v3", ["test", "m-2"], 1), index_key)
    doc = {
        "description": "panseal-keyd state v3 (FORMAT.md 13.7), from gen_keyd_vectors.py",
        "master_key": master.hex(),
        "subkeys": {k: v.hex() for k, v in keys.items()},
        "index_key": {"environment": "test", "scope": "m-1", "version": 1,
                      "key": index_key.hex(), "sealed": index_sealed,
                      "sealed_for_m_2": moved},
        "record_key": {"environment": "test", "key": record_key.hex(), "sealed": record_sealed},
        "blind_index": {"pan": pan, "hmac": hm(index_key, pan.encode()).hex()},
        "record": {"fields": rec, "record_hex": (body + tag).hex(), "tag": tag.hex(),
                   "signed_bytes_hex": (b"panseal-record-v2" + body).hex(),
                   "edited_uses_0_hex": (record_v2_body(edited) + tag).hex()},
        "state_bin": snapshot.hex(),
        "snapshot_mac": snap_mac.hex(),
        "state_journal": journal.decode(),
        "journal_mac": entry_mac.hex(),
        "negative": negatives,
    }
    with open(os.path.join(out_dir, "keyd_state_v3.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    write_v4(out_dir, master, keys, state, snapshot)


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def write_v4(out_dir: str, master: bytes, keys3: dict, state3: dict, v3_bin: bytes) -> None:
    """FORMAT.md 18.1: version 3 plus `ingest_keys`; MAC label
    `panseal-keyd-state-v4`; scalars sealed under their own HKDF subkey."""
    keys = dict(keys3)
    keys["ingest_seal"] = hkdf_sha256(master, b"panseal-keyd v4 ingest-key sealing")
    n = ec.SECP256R1()
    versions = []
    pairs = {}
    for version, st in ((1, "decrypt-only"), (2, "active")):
        scalar = fixed(f"ingest key test/m-1 v{version}")
        sk = ec.derive_private_key(int.from_bytes(scalar, "big"), n)
        point = sk.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        aad = aad_parts(b"panseal-keyd-ingest-key-v4", ["test", "m-1"], version)
        sealed = seal(keys["ingest_seal"], fixed(f"ingest nonce v{version}", 12), aad, scalar)
        text = f"PIK1/test/m-1/{version}/{b64url(point)}"
        pairs[version] = {"scalar": scalar.hex(), "point": point.hex(), "public_key": text,
                          "aad_hex": aad.hex(), "sealed": sealed}
        versions.append({"version": version, "state": st, "created_at": 1700000000 + version,
                         "created_by": "alice", "public_key": text, "sealed": sealed})
    state = dict(state3)
    state["ingest_keys"] = {"test/m-1": {"environment": "test", "scope": "m-1",
                                         "versions": versions}}
    snapshot, snap_mac = v3_snapshot(keys, state, 4, b"panseal-keyd-state-v4\n")
    # A journal entry destroying version 1: the scalar is gone.
    destroyed = [dict(versions[0], state="destroyed", sealed=None), versions[1]]
    entry = {
        "generation": 6,
        "prev": snap_mac.hex(),
        "audit": {"records": 3, "head": "ab" * 32},
        "changes": [{"kind": "ingest-scope", "key": "test/m-1", "value": {
            "environment": "test", "scope": "m-1", "versions": destroyed}}],
    }
    line = compact(entry)[:-1]
    entry_mac = hm(keys["state_mac"], b"panseal-keyd-journal-v2\n", line)
    journal = line + b',"mac":"' + entry_mac.hex().encode() + b'"}\n'
    moved = seal(keys["ingest_seal"], fixed("ingest nonce v2", 12),
                 aad_parts(b"panseal-keyd-ingest-key-v4", ["test", "m-2"], 2),
                 bytes.fromhex(pairs[2]["scalar"]))
    under_index_key = seal(keys["index_seal"], fixed("ingest nonce v2", 12),
                           bytes.fromhex(pairs[2]["aad_hex"]), bytes.fromhex(pairs[2]["scalar"]))
    negatives = [
        {"name": "v4 snapshot under the v3 label", "expect": "unauthentic",
         "state_bin": v3_snapshot(keys, state, 4, b"panseal-keyd-state-v3\n")[0].hex()},
        {"name": "v3 snapshot with v4 fields", "expect": "corrupt",
         "state_bin": v3_snapshot(keys, state, 3)[0].hex()},
        {"name": "unknown version 5", "expect": "corrupt",
         "state_bin": v3_snapshot(keys, state, 5, b"panseal-keyd-state-v4\n")[0].hex()},
    ]
    doc = {
        "description": "panseal-keyd state v4 (FORMAT.md 18), from gen_keyd_vectors.py",
        "master_key": master.hex(),
        "subkeys": {k: v.hex() for k, v in keys.items()},
        "ingest_keys": {"environment": "test", "scope": "m-1", "pairs": pairs},
        "sealed_v2_for_m_2": moved,
        "sealed_v2_under_index_subkey": under_index_key,
        "state_bin": snapshot.hex(),
        "snapshot_mac": snap_mac.hex(),
        "state_journal": journal.decode(),
        "journal_mac": entry_mac.hex(),
        "v3_state_bin": v3_bin.hex(),
        "negative": negatives,
    }
    with open(os.path.join(out_dir, "keyd_state_v4.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
