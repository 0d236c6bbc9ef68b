"""The key services outside the process from Python (issue 13, item 3):
`panseal.Client` on a PKCS#11 token (SoftHSM2, a token initialised here;
the PIN from a file and from an environment variable) and on AWS KMS (a
moto server started here; credentials from the environment), configured
with the README's JSON (ffi/tests/c/configs/key_services.jsonc, paths
replaced). 50 PANs sealed; 50 of 50 opened by a new client and by a new
process built from the same configuration; 0 of 50 with another row; the
PIN in no output and no error. Nothing is skipped: a missing SoftHSM2 or
moto fails with what to run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from panseal import Client, ConfigError, DecryptionFailed

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "ffi" / "tests" / "c" / "configs" / "key_services.jsonc"
PIN = "panseal-py-user-pin-2718"
SO_PIN = "panseal-py-so-pin-3141"
COUNT = 50
SOFTHSM_MODULES = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
]
# Dummy credentials: moto accepts any.
ACCESS_KEY_ID = "AKIAPANSEALPYTEST000"
SECRET_ACCESS_KEY = "panseal-py-test-secret-not-a-real-key"


def readme_config(name):
    """The README's configuration `name`: the lines between its markers."""
    text = CONFIGS.read_text()
    begin = f"// readme:begin {name}\n"
    start = text.index(begin) + len(begin)
    return text[start:text.index(f"// readme:end {name}", start)]


def substitute(text, pairs):
    for old, new in pairs:
        assert old in text, f"{old} not in the README configuration"
        text = text.replace(old, new)
    return text


def pan_for(i):
    """The i-th test PAN (as test_backends.c): 400000 + 9 digits + Luhn."""
    body = f"400000{i:09d}"
    total = 0
    for k, ch in enumerate(reversed(body)):
        d = int(ch)
        if k % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def row(i):
    return f"row-{i}"


def seal_all(client):
    return [client.seal(pan_for(i), "cards", "pan", row(i)) for i in range(COUNT)]


def count_opened(client, sealed, shift=0):
    opened = 0
    for i, s in enumerate(sealed):
        try:
            pan, _ = client.open(s, "cards", "pan", row(i + shift), "py-test", "backends")
        except DecryptionFailed:
            continue
        if pan == pan_for(i):
            opened += 1
    return opened


OPEN_IN_CHILD = r"""
import json, sys
from panseal import Client, DecryptionFailed
config, sealed = sys.argv[1], json.loads(sys.argv[2])
def pan_for(i):
    body = f"400000{i:09d}"
    total = 0
    for k, ch in enumerate(reversed(body)):
        d = int(ch)
        if k % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)
opened = moved = 0
with Client.from_file(config) as c:
    for i, s in enumerate(sealed):
        pan, _ = c.open(s, "cards", "pan", f"row-{i}", "py-child", "backends")
        opened += pan == pan_for(i)
        try:
            c.open(s, "cards", "pan", f"row-{i + 1}", "py-child", "backends")
            moved += 1
        except DecryptionFailed:
            pass
print(f"opened by a new process: {opened} of {len(sealed)}")
print(f"moved: {moved} of {len(sealed)}")
"""


def open_in_new_process(config_path, sealed, env):
    out = subprocess.run([sys.executable, "-c", OPEN_IN_CHILD, str(config_path), json.dumps(sealed)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def round_trip(config_path, secret, env):
    """Seal 50 with one client, open with a new client and a new process."""
    with Client.from_file(config_path) as first:
        sealed = seal_all(first)
        assert len(set(sealed)) == COUNT
        assert count_opened(first, sealed) == COUNT
        assert count_opened(first, sealed, shift=1) == 0
        index, version = first.blind_index(pan_for(0))
        assert version == 1 and len(index) == 64
        assert first.blind_index(pan_for(0))[0] == index != first.blind_index(pan_for(1))[0]
        first.rotate_dek()
        after = first.seal(pan_for(0), "cards", "pan", row(0))
        assert count_opened(first, [after]) == 1
    with Client(config_path.read_text()) as second:
        assert count_opened(second, sealed) == COUNT
        assert count_opened(second, sealed, shift=1) == 0
    child = open_in_new_process(config_path, sealed, env)
    assert f"opened by a new process: {COUNT} of {COUNT}" in child, child
    assert f"moved: 0 of {COUNT}" in child, child
    assert secret not in child
    assert not any(secret in s for s in sealed)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory):
    """A SoftHSM2 with the token `payments`, set up before the module loads."""
    util = shutil.which("softhsm2-util")
    module = next((m for m in SOFTHSM_MODULES if os.path.exists(m)), None)
    module = os.environ.get("PANSEAL_PKCS11_MODULE", module)
    if util is None or module is None:
        pytest.fail("SoftHSM2 is not installed (softhsm2-util, libsofthsm2.so): "
                    "run `bash scripts/setup.sh` (Debian package softhsm2)")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    out = subprocess.run([util, "--init-token", "--free", "--label", "payments",
                          "--pin", PIN, "--so-pin", SO_PIN], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return module


def pkcs11_config(tmp_path, module, pin_source):
    pin_file = tmp_path / "hsm-pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    text = substitute(readme_config("pkcs11-config"), [
        ("/usr/lib/softhsm/libsofthsm2.so", module),
        ("/var/lib/app/panseal-keys.pks", str(tmp_path / "keys.pks")),
        ("/var/log/app/panseal-audit.jsonl", str(tmp_path / "audit.jsonl")),
    ])
    if pin_source == "pin_file":
        text = substitute(text, [("/run/secrets/hsm-pin", str(pin_file))])
    else:
        text = substitute(text, [('"pin_file": "/run/secrets/hsm-pin"',
                                  '"pin_env": "PANSEAL_PKCS11_PIN"')])
    path = tmp_path / "panseal.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("pin_source", ["pin_file", "pin_env"])
def test_pkcs11_softhsm(softhsm, tmp_path, monkeypatch, capfd, pin_source):
    if pin_source == "pin_env":
        monkeypatch.setenv("PANSEAL_PKCS11_PIN", PIN)
    config = pkcs11_config(tmp_path, softhsm, pin_source)
    assert PIN not in config.read_text()
    round_trip(config, PIN, dict(os.environ))
    out, err = capfd.readouterr()
    assert PIN not in out and PIN not in err


def test_pkcs11_pin_mistakes_are_named_never_shown(softhsm, tmp_path, monkeypatch):
    config = json.loads(pkcs11_config(tmp_path, softhsm, "pin_file").read_text())
    pin_file = Path(config["key_service"]["pin_file"])

    def refused(service, *wanted):
        c = dict(config, key_service=service)
        with pytest.raises(ConfigError) as e:
            Client(c)
        text = f"{e.value} {e.value!r}"
        for w in wanted:
            assert w in text, text
        assert PIN not in text and "8642" not in text, text
        return text

    base = dict(config["key_service"])
    del base["pin_file"]
    refused(dict(base, pin=PIN), "never given inline", "pin_file", "pin_env")
    refused(dict(base, pin=86421357, pin_env="X"), "never given inline")
    refused(dict(base, pin={"value": PIN}), "never given inline")
    refused(dict(base), "exactly one of `pin_file`")
    refused(dict(base, type="hsm"), "unknown key_service type `hsm`", "`pkcs11`", "`aws-kms`")
    refused(dict(base, module=base["module"] + ".missing", pin_env="X"),
            ".missing does not exist")
    refused(dict(base, pin_env="PANSEAL_PY_TEST_UNSET"),
            "environment variable PANSEAL_PY_TEST_UNSET (pin_env) is not set")
    pin_file.chmod(0o640)
    refused(dict(base, pin_file=str(pin_file)), "group or others (mode 640)", "chmod 600")
    pin_file.chmod(0o600)
    refused(dict(base, pin_file=str(tmp_path / "no-pin")), "no-pin does not exist")
    refused({"type": "aws-kms", "kek": "cards", "secret_access_key": PIN},
            "never given inline", "AWS_PROFILE")
    # A wrong PIN is the token's refusal, not a configuration error, and
    # still does not show the PIN.
    monkeypatch.setenv("PANSEAL_PKCS11_PIN", "wrong-" + PIN)
    with pytest.raises(Exception) as e:
        Client(dict(config, key_service=dict(base, pin_env="PANSEAL_PKCS11_PIN")))
    assert PIN not in str(e.value) and "wrong-" not in str(e.value)


@pytest.fixture(scope="module")
def moto_endpoint():
    try:
        from moto.server import ThreadedMotoServer
    except Exception as e:  # noqa: BLE001 - any import failure means: not installed
        pytest.fail(f"moto is not installed ({e}): run `bash scripts/setup.sh` "
                    "(tests/python/requirements.txt: moto[server])")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_aws_kms_moto(moto_endpoint, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    text = substitute(readme_config("aws-kms-config"), [
        ("http://127.0.0.1:5000", moto_endpoint),
        ("/var/lib/app/panseal-keys.pks", str(tmp_path / "keys.pks")),
        ("/var/log/app/panseal-audit.jsonl", str(tmp_path / "audit.jsonl")),
    ])
    config = tmp_path / "panseal.json"
    config.write_text(text)
    round_trip(config, SECRET_ACCESS_KEY, dict(os.environ))
    out, err = capfd.readouterr()
    assert SECRET_ACCESS_KEY not in out and SECRET_ACCESS_KEY not in err
