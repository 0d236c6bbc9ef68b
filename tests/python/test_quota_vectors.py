"""tests/vectors/keyd_quota/ is reproduced by its independent generators
(FORMAT.md section 16); the Rust side decodes it (keyd/src/quota.rs and
reveal.rs unit tests)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"


def test_quota_vectors_are_reproduced_by_their_generator(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(VECTORS / "gen_quota_vectors.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    name = "quota_state_v1.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_bytes() == (VECTORS / "keyd_quota" / name).read_bytes()


def test_quota_v2_vector_is_reproduced_by_its_generator(tmp_path: Path) -> None:
    gen = VECTORS / "keyd_quota" / "gen_quota_v2_vectors.py"
    subprocess.run([sys.executable, str(gen), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    name = "quota_state_v2.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_bytes() == (VECTORS / "keyd_quota" / name).read_bytes()
