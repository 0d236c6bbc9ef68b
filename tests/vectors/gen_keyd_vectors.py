#!/usr/bin/env python3
"""Independent implementation of panseal-keyd's state format version 2
(FORMAT.md sections 13 and 14: subkeys, state.bin, state.journal,
state.anchor, audit anchor and key id), and the generator of
tests/vectors/keyd_state_v2.json.

Written from FORMAT.md, not from the Rust sources. Deterministic: every key
and nonce is derived from a label with SHA-256 (test values only; never
choose a nonce like this outside test vectors).

    python3 tests/vectors/gen_keyd_vectors.py [--out DIR]

Needs Python 3.9+ and the `cryptography` package.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


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


if __name__ == "__main__":
    main()
