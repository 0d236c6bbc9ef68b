"""scripts/scan_secrets.py, the suite-wide scan of captured outputs for test
PANs, passwords/PINs and key bytes: what it collects from the repository,
what it finds (in every disguise a log line may give a PAN), what it does
not flag, and that its own report leaks nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import scan_secrets  # noqa: E402

SCRIPT = ROOT / "scripts" / "scan_secrets.py"
PIN = "panseal-user-pin-0815"  # tests/softhsm/mod.rs


def run(*paths):
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(ROOT), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_collects_the_suites_secrets():
    s = scan_secrets.collect(ROOT)
    for pan in ["4111111111111111", "5555555555554444", "378282246310005"]:
        assert pan in s.pans
    # tests/common luhn_pan("401288", 16, 900), as the Rust helper makes it
    # (checked against the Rust function when the port was written).
    assert scan_secrets.rust_luhn_pan("401288", 16, 900) == "4012882100839090"
    assert "4012882100839090" in s.pans
    assert PIN in s.texts and "panseal-so-pin-4711" in s.texts
    # The name of the variable that holds a PIN (`pin_env="PANSEAL_PKCS11_PIN"`)
    # is not a PIN: a tool's --help may print it.
    assert "PANSEAL_PKCS11_PIN" not in s.texts
    assert scan_secrets.ENV_NAME.match("HSM_PIN") and not scan_secrets.ENV_NAME.match(PIN)
    assert len(s.hex) >= 1  # key values of the committed vectors
    assert all(scan_secrets.luhn_ok(p) for p in s.pans)


def test_finds_pans_in_every_disguise_and_reports_none(tmp_path):
    s = scan_secrets.collect(ROOT)
    key = sorted(s.hex)[0]
    planted = {
        "plain.txt": "opened 4111111111111111 for agent-7\n",
        "json.txt": '{"error":"invalid type: integer `5555555555554444`"}\n',
        "spaced.txt": "pan=4111 1111 1111 1111\n",
        "dashed.txt": "pan=3782-822463-10005\n",
        "embedded.txt": "id=94012882100839090x\n",
        "pin.txt": f"C_Login failed with pin {PIN}\n",
        "key.txt": f"kek={key.upper()}\n",
    }
    for name, text in planted.items():
        (tmp_path / name).write_text("noise line\n" + text)
    out = run(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    for name in planted:
        assert f"{name}:2:" in out.stdout, (name, out.stdout)
    # The report names file, line and kind, masked: it leaks nothing.
    for secret in ["4111111111111111", "5555555555554444", "378282246310005",
                   "4012882100839090", PIN, key, key.upper()]:
        assert secret not in out.stdout + out.stderr
    assert "************1111" in out.stdout


def test_clean_output_passes(tmp_path):
    # Masked forms, ciphertexts, timestamps, counters, Luhn-valid numbers
    # that are not test PANs, and short digit runs are not findings. (The
    # unknown number is built at run time: as a literal in this file it
    # would be collected as a test PAN.)
    unknown = "4929123" + "456781236"
    assert scan_secrets.luhn_ok(unknown)
    (tmp_path / "log.txt").write_text(
        "masked ************1111 and 411111******1111\n"
        "sealed P1AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        "time 1764547200.123456 nanos 1764547200123456789 count 16777216\n"
        f"luhn-valid but unknown {unknown}\n"
        "test result: ok. 12 passed; 0 failed\n")
    out = run(tmp_path)
    assert out.returncode == 0, out.stdout
    assert "0 found" in out.stdout


def test_scans_nested_directories_and_single_files(tmp_path):
    nested = tmp_path / "harness" / "pg"
    nested.mkdir(parents=True)
    (nested / "postgresql.log").write_text(
        "ERROR: duplicate key; DETAIL: (pan)=(4111111111111111)\n")
    assert run(tmp_path).returncode == 1
    assert run(nested / "postgresql.log").returncode == 1
