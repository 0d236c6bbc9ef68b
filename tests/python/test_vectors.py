"""The committed test vectors are reproducible from FORMAT.md by an
independent implementation (tests/vectors/gen_vectors.py).

Run from the crate root:

    pip install cryptography pytest
    python3 -m pytest tests/python
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
GENERATOR = VECTORS / "gen_vectors.py"
FILES = [
    "ciphertext_v1.json", "wrap_v1.json", "record_v1.json", "blind_index_v1.json",
    "record_v2.json", "blind_index_v2.json",
]
# keyd's state format v2 has its own independent generator.
KEYD_GENERATOR = VECTORS / "gen_keyd_vectors.py"
KEYD_FILES = ["keyd_state_v2.json", "keyd_state_v3.json", "keyd_state_v4.json"]
# The ingest (HPKE) ciphertext vectors come from a third implementation,
# @hpke/core under Node (tests/js/gen_ingest_vectors.mjs); tests/vectors.rs
# checks that the file reproduces.
NODE_FILES = ["ingest_v1.json"]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_vectors", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def test_generator_writes_exactly_the_committed_files(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == sorted(FILES)
    committed = sorted(p.name for p in VECTORS.glob("*.json"))
    assert committed == sorted(FILES + KEYD_FILES + NODE_FILES)


@pytest.mark.parametrize("name", KEYD_FILES)
def test_keyd_vectors_are_reproduced_by_their_generator(tmp_path: Path, name: str) -> None:
    subprocess.run([sys.executable, str(KEYD_GENERATOR), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEYD_FILES)
    assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), (
        f"tests/vectors/{name} differs from what gen_keyd_vectors.py produces"
    )


@pytest.mark.parametrize("name", FILES)
def test_committed_vectors_are_byte_identical(generated: Path, name: str) -> None:
    fresh = (generated / name).read_bytes()
    committed = (VECTORS / name).read_bytes()
    assert fresh == committed, (
        f"tests/vectors/{name} differs from what gen_vectors.py produces; "
        "regenerate with `python3 tests/vectors/gen_vectors.py` only if the "
        "format change is intended (and versioned)"
    )


def test_committed_vectors_pass_the_independent_decoders() -> None:
    gen = load_generator()
    docs = {name: json.loads((VECTORS / name).read_text(encoding="utf-8")) for name in FILES}
    gen.verify_all(docs)


def test_expect_values_are_the_documented_classes() -> None:
    doc = json.loads((VECTORS / "ciphertext_v1.json").read_text(encoding="utf-8"))
    kinds = {v["expect"] for v in doc["negative"]}
    assert kinds == {"format", "decryption", "payload"}


def test_format_md_worked_examples_match_the_vectors() -> None:
    """The hex in FORMAT.md's worked examples is the committed vectors' hex."""
    text = (ROOT / "FORMAT.md").read_text(encoding="utf-8")
    flat = "".join(text.split())  # hex in the spec may be wrapped or grouped
    ct = json.loads((VECTORS / "ciphertext_v1.json").read_text(encoding="utf-8"))
    visa = next(v for v in ct["vectors"] if v["name"] == "visa-16")
    for field in ("dek_hex", "dek_id_hex", "nonce_hex", "packed_hex", "aad_hex", "binary_hex", "text"):
        assert visa[field] in flat, f"FORMAT.md worked example is missing {field}"
    wrap = json.loads((VECTORS / "wrap_v1.json").read_text(encoding="utf-8"))
    first = wrap["vectors"][0]
    for field in ("aad_hex", "wrapped_hex"):
        assert first[field] in flat, f"FORMAT.md wrap example is missing {field}"
    bi = json.loads((VECTORS / "blind_index_v1.json").read_text(encoding="utf-8"))
    assert bi["vectors"][0]["index_hex"] in flat
    assert bi["index_key_ids"][0]["id_hex"] in flat
