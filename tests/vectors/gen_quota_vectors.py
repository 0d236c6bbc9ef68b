#!/usr/bin/env python3
"""Independent generator of the keyd reveal-counting and quota-state
vectors (FORMAT.md section 16), written from the specification alone:

* the distinct-record digest SHA-256(context encoding || sealed bytes),
  for the ciphertexts of ciphertext_v1.json;
* one quota.state version 1 file under a fixed state authentication key.

    python3 tests/vectors/gen_quota_vectors.py [--out DIR]

writes DIR/quota_state_v1.json (default tests/vectors/keyd_quota).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAGIC = "panseal-keyd-quota 1"
KEY_LABEL = b"panseal-keyd quota state v1"


def context_encoding(table: str, column: str, row_key: bytes) -> bytes:
    out = b""
    for part in (table.encode(), column.encode(), row_key):
        out += len(part).to_bytes(2, "big") + part
    return out


def digests() -> list[dict]:
    vectors = json.loads((HERE / "ciphertext_v1.json").read_text())["vectors"]
    out = []
    for v in vectors[:3]:
        c = v["context"]
        row_key = bytes.fromhex(c["row_key_hex"])
        sealed = bytes.fromhex(v["binary_hex"])
        enc = context_encoding(c["table"], c["column"], row_key)
        out.append({
            "name": v["name"],
            "table": c["table"],
            "column": c["column"],
            "row_key_hex": c["row_key_hex"],
            "sealed_hex": v["binary_hex"],
            "record_sha256_hex": hashlib.sha256(enc + sealed).hexdigest(),
        })
    return out


def quota_file(state_mac: bytes, records: list[str]) -> tuple[str, str]:
    key = hmac.new(state_mac, KEY_LABEL, hashlib.sha256).digest()
    # Field order as FORMAT.md section 16.4 lists it; maps sorted by name.
    body = {
        "generation": 7,
        "written_at": 1764590000,
        "reveal": {
            "clerk": {
                "started": 1764589000,
                "window_seconds": 3600,
                "requests": 5,
                "distinct_records": 3,
                "records": sorted(records),
            }
        },
        "index": {
            "front": {"started": 1764589990, "window_seconds": 60, "hashes": 40}
        },
        "unwrap": {},
    }
    line = json.dumps(body, separators=(",", ":"))
    tag = hmac.new(key, (MAGIC + "\n" + line).encode(), hashlib.sha256).hexdigest()
    return key.hex(), f"{MAGIC}\n{line}\nhmac-sha256 {tag}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "keyd_quota")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    state_mac = bytes(range(32))
    d = digests()
    key_hex, text = quota_file(state_mac, [x["record_sha256_hex"] for x in d])
    doc = {
        "format": "keyd reveal counting and quota.state version 1 (FORMAT.md section 16)",
        "record_digests": d,
        "quota_state": {
            "state_mac_hex": state_mac.hex(),
            "quota_key_hex": key_hex,
            "file": text,
            "reveal_principal": "clerk",
            "requests": 5,
            "distinct_records": 3,
            "index_principal": "front",
            "hashes": 40,
        },
    }
    (args.out / "quota_state_v1.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
