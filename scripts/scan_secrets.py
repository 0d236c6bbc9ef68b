#!/usr/bin/env python3
"""Fails if any known test secret appears in what the test suite left behind.

    python3 scripts/scan_secrets.py [--root REPO] PATH...

PATHs (files or directories, scanned recursively) are the captured outputs
of a test run: cargo test output, the logs the harnesses copy out
(PostgreSQL, keyd), pytest output. The secrets are collected from the
repository itself, so a new test PAN or PIN is covered without a list to
maintain:

* test PANs: every Luhn-valid 12-19 digit literal not starting with 0 in
  src/, tests/, examples/, benches/, python/ and fuzz/ (plain or in 4-digit
  groups separated by a space or dash), the PANs the test helpers generate (`luhn_pan(prefix, len, seed)`
  in tests/common, `luhn(prefix, n)` in tests/python) for the prefixes the
  tests use, seeds 0..SEEDS, and the PANs (fields named *pan*) of the committed test vectors;
* test passwords and PINs: string constants named *PIN*, *PASSWORD*,
  *SECRET*, and the password of any URL `scheme://user:password@`;
* test key bytes: the hex values of key fields in tests/vectors/*.json;
* whatever tests/known_secrets.txt adds (`pan 4…`, `secret …`, `hex …`,
  or `ignore DIGITS` for a Luhn-valid literal that is not a card number).

A PAN counts wherever its digits appear, also inside a longer digit run or
split into groups by spaces or dashes. Findings are reported by file, line
and kind with the PAN masked (last four) and secrets not shown at all, so
the report itself leaks nothing. Exit status 1 if anything was found, 2 on
usage errors.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

SEEDS = 5000
SOURCE_DIRS = ["src", "tests", "examples", "benches", "python", "fuzz/fuzz_targets"]
SOURCE_EXT = {".rs", ".py", ".c", ".h", ".json", ".toml", ".txt", ".sh"}
MASK64 = (1 << 64) - 1

DIGIT_RUN = re.compile(rb"[0-9](?:[ -]?[0-9])+")
GROUPED_LITERAL = re.compile(r"(?<![0-9])[0-9]{4}(?:[ -][0-9]{4}){2}[ -][0-9]{1,7}(?![0-9])")
PLAIN_LITERAL = re.compile(r"(?<![0-9])[0-9]{12,19}(?![0-9])")
SECRET_CONST = re.compile(
    r"""(?ix)\b[A-Z_]*(?:PIN|PASSWORD|PASSWD|SECRET)[A-Z_]*\b
        \s*(?::\s*&(?:'static\s+)?str)?\s*=\s*["']([^"'\s]{6,})["']""")
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s:/@\"']+:([^\s@\"'/]{4,})@")
RUST_LUHN_CALL = re.compile(r"luhn_pan\(\s*\"([0-9]+)\"\s*,\s*([0-9]+)?")
PY_LUHN_CALL = re.compile(r"\bluhn\(\s*[\"']([0-9]+)[\"']")
KEY_FIELD = re.compile(r"(?i)(kek|dek|key|secret|master|share)")
HEX_VALUE = re.compile(r"^(?:[0-9a-fA-F]{2}){16,}$")


def luhn_ok(digits):
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def rust_luhn_pan(prefix, length, seed):
    """tests/common/mod.rs `luhn_pan`, bit for bit."""
    digits = [int(c) for c in prefix]
    x = seed
    while len(digits) < length - 1:
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK64
        digits.append((x >> 33) % 10)
    total = 0
    for i, d in enumerate(reversed(digits)):
        v = d
        if i % 2 == 0:
            v *= 2
            if v > 9:
                v -= 9
        total += v
    digits.append((10 - total % 10) % 10)
    return "".join(map(str, digits))


def python_luhn(prefix, n):
    """tests/python/test_ffi.py `luhn`."""
    digits = [int(d) for d in prefix.ljust(n - 1, "7")]
    s = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
            for i, d in enumerate(reversed(digits)))
    return "".join(map(str, digits)) + str((10 - s % 10) % 10)


class Secrets:
    def __init__(self):
        self.pans = set()
        self.texts = set()  # passwords, PINs: exact substrings
        self.hex = set()    # key bytes in hex: case-insensitive
        self.ignored = set()

    def add_pan(self, digits):
        # No card number starts with 0 (ISO/IEC 7812 MII 0 is not issued).
        if 12 <= len(digits) <= 19 and digits[0] != "0" and luhn_ok(digits):
            self.pans.add(digits)

    def finish(self):
        self.pans -= self.ignored


def source_files(root):
    for d in SOURCE_DIRS:
        base = root / d
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [x for x in dirnames if x not in ("target", "corpus", "artifacts",
                                                             "__pycache__")]
            for f in filenames:
                p = Path(dirpath) / f
                if p.suffix in SOURCE_EXT:
                    yield p


def collect(root):
    s = Secrets()
    rust_prefixes, py_prefixes = set(), set()
    for path in source_files(root):
        try:
            text = path.read_text("utf-8", "replace")
        except OSError:
            continue
        if path.suffix != ".json":
            for m in PLAIN_LITERAL.finditer(text):
                s.add_pan(m.group(0))
            for m in GROUPED_LITERAL.finditer(text):
                s.add_pan(re.sub(r"[ -]", "", m.group(0)))
        if path.suffix in (".rs", ".py", ".c", ".sh", ".toml"):
            for m in SECRET_CONST.finditer(text):
                # `pin_env = "HSM_PIN"` names where a PIN is, not a PIN.
                if not ENV_NAME.match(m.group(1)):
                    s.texts.add(m.group(1))
            for m in URL_PASSWORD.finditer(text):
                if "{" not in m.group(1):
                    s.texts.add(m.group(1))
        for m in RUST_LUHN_CALL.finditer(text):
            rust_prefixes.add((m.group(1), int(m.group(2)) if m.group(2) else None))
        for m in PY_LUHN_CALL.finditer(text):
            py_prefixes.add(m.group(1))
        if path.suffix == ".json" and "vectors" in path.parts:
            try:
                collect_vector(json.loads(text), s)
            except ValueError:
                pass
    for prefix, length in rust_prefixes:
        lengths = [length] if length and 12 <= length <= 19 else range(12, 20)
        for n in lengths:
            for seed in range(SEEDS):
                s.add_pan(rust_luhn_pan(prefix, n, seed))
    for prefix in py_prefixes:
        for n in range(12, 20):
            s.add_pan(python_luhn(prefix, n))
    extra = root / "tests" / "known_secrets.txt"
    if extra.exists():
        for line in extra.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, value = line.partition(" ")
            value = value.strip()
            if kind == "pan":
                s.add_pan(re.sub(r"[ -]", "", value))
            elif kind == "secret":
                s.texts.add(value)
            elif kind == "hex":
                s.hex.add(value.lower())
            elif kind == "ignore":
                s.ignored.add(value)
    s.texts = {t for t in s.texts if len(t) >= 6}
    s.finish()
    return s


def collect_vector(node, s, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            collect_vector(v, s, k)
    elif isinstance(node, list):
        for v in node:
            collect_vector(v, s, key)
    elif isinstance(node, str):
        digits = re.sub(r"[ -]", "", node)
        if digits.isdigit() and "pan" in key.lower():
            s.add_pan(digits)
        elif KEY_FIELD.search(key) and HEX_VALUE.match(node):
            s.hex.add(node.lower())


def mask(pan):
    return "*" * (len(pan) - 4) + pan[-4:]


def scan_bytes(data, secrets):
    """Yields (offset, kind, shown) for every finding in `data`."""
    if secrets.pans:
        for m in DIGIT_RUN.finditer(data):
            run = re.sub(rb"[ -]", b"", m.group(0))
            if len(run) < 12:
                continue
            digits = run.decode()
            seen = set()
            for n in range(12, 20):
                for i in range(0, len(digits) - n + 1):
                    cand = digits[i:i + n]
                    if cand in secrets.pans and cand not in seen:
                        seen.add(cand)
                        yield m.start(), "test PAN", mask(cand)
    for t in secrets.texts:
        needle = t.encode()
        start = data.find(needle)
        while start != -1:
            yield start, "test password/PIN", f"({len(t)} characters)"
            start = data.find(needle, start + 1)
    if secrets.hex:
        lower = data.lower()
        for h in secrets.hex:
            needle = h.encode()
            start = lower.find(needle)
            while start != -1:
                yield start, "test key bytes (hex)", f"({len(h) // 2} bytes)"
                start = lower.find(needle, start + 1)


def files_under(paths):
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for dirpath, _, filenames in os.walk(p):
                for f in sorted(filenames):
                    yield Path(dirpath) / f
        elif p.exists():
            yield p


def scan(paths, secrets, out=sys.stdout):
    findings = 0
    files = 0
    size = 0
    for path in files_under(paths):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        files += 1
        size += len(data)
        for offset, kind, shown in scan_bytes(data, secrets):
            line = data.count(b"\n", 0, offset) + 1
            print(f"{path}:{line}: {kind} {shown}", file=out)
            findings += 1
    print(f"scan_secrets: {files} files, {size} bytes; looked for {len(secrets.pans)} test PANs, "
          f"{len(secrets.texts)} passwords/PINs, {len(secrets.hex)} key values: "
          f"{findings} found", file=out)
    return findings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                    help="repository to collect the test secrets from")
    ap.add_argument("paths", nargs="+", help="files or directories to scan")
    args = ap.parse_args(argv)
    secrets = collect(Path(args.root))
    if not secrets.pans:
        print("scan_secrets: no test PANs collected (wrong --root?)", file=sys.stderr)
        return 2
    return 1 if scan(args.paths, secrets) else 0


if __name__ == "__main__":
    sys.exit(main())
