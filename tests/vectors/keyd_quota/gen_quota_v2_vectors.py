#!/usr/bin/env python3
"""Independent generator of the quota.state version 2 vector (FORMAT.md
section 16.4), written from the specification alone (HKDF-SHA-256 of
RFC 5869 written out here, not taken from a library):

* the quota key K = HKDF-SHA-256(salt = none, IKM = master key,
  info = "panseal-keyd quota state v2 authentication", 32 bytes);
* one quota.state version 2 file under K, for the master key 00 01 .. 1f;
* for cross-checking, the state authentication subkey (section 13.1) and
  the version 1 quota key HMAC(state_mac, "panseal-keyd quota state v1").

    python3 tests/vectors/keyd_quota/gen_quota_v2_vectors.py [--out DIR]

writes DIR/quota_state_v2.json (default: this folder).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAGIC = "panseal-keyd-quota 2"
QUOTA_INFO = b"panseal-keyd quota state v2 authentication"
STATE_MAC_INFO = b"panseal-keyd v2 state authentication"
V1_LABEL = b"panseal-keyd quota state v1"


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with no salt (a string of HashLen zeros)."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def quota_file(key: bytes) -> str:
    records = sorted(hashlib.sha256(f"record {i}".encode()).hexdigest() for i in range(3))
    # Field order as FORMAT.md section 16.4 lists it; maps sorted by name.
    body = {
        "generation": 12,
        "written_at": 1764600000,
        "reveal": {
            "clerk": {
                "started": 1764599000,
                "window_seconds": 3600,
                "requests": 6,
                "distinct_records": 3,
                "records": records,
            }
        },
        "index": {
            "front": {"started": 1764599990, "window_seconds": 60, "hashes": 21}
        },
        "unwrap": {
            "batch": {
                "started": 1764599500,
                "window_seconds": 600,
                "requests": 2,
                "distinct_records": 1,
                "records": [
                    hashlib.sha256(b"panseal-keyd unwrap key id" + bytes(range(8))).hexdigest()
                ],
            }
        },
    }
    line = json.dumps(body, separators=(",", ":"))
    tag = hmac.new(key, (MAGIC + "\n" + line).encode(), hashlib.sha256).hexdigest()
    return f"{MAGIC}\n{line}\nhmac-sha256 {tag}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    master = bytes(range(32))
    key = hkdf_sha256(master, QUOTA_INFO)
    state_mac = hkdf_sha256(master, STATE_MAC_INFO)
    v1 = hmac.new(state_mac, V1_LABEL, hashlib.sha256).digest()
    doc = {
        "format": "keyd quota.state version 2 (FORMAT.md section 16.4)",
        "quota_state": {
            "master_key_hex": master.hex(),
            "quota_info": QUOTA_INFO.decode(),
            "quota_key_hex": key.hex(),
            "state_mac_hex": state_mac.hex(),
            "quota_key_v1_hex": v1.hex(),
            "file": quota_file(key),
            "reveal_principal": "clerk",
            "requests": 6,
            "index_principal": "front",
            "hashes": 21,
        },
    }
    (args.out / "quota_state_v2.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
