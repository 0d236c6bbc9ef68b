#!/usr/bin/env python3
"""Runs, or checks against the code, every fenced code block of README.md.

    python3 scripts/readme.py [--log DIR] [--only SESSION] [--list] [README.md]

Every fenced block must be preceded, on the line directly before its
opening fence, by a marker saying how it is tested:

    <!-- readme: KIND key=value ... -->

KIND is one of

* ``sh session=NAME [cleanup=DIR,DIR] [timeout=SECONDS]``: the blocks of
  one session are joined, in README order, into one bash script
  (``set -euo pipefail``) run from the repository root with ``HOME`` set to
  a fresh empty directory, in its own process group: whatever it started
  and left running (a server started with ``&``) is stopped when it ends.
  ``cleanup`` directories (relative to the repository root) must not exist
  before the session (the runner never deletes what it did not create) and
  are removed after it.
* ``file session=NAME path=P``: the block is written to P (relative to the
  session's current directory at that point of its script).
* ``python [session=NAME]``: run by python3 (the installed ``panseal``
  package); alone in a fresh directory, or as a step of a session.
* ``mirror FILE#NAME``: the block must equal the lines between the
  ``readme:begin NAME`` and ``readme:end NAME`` comment lines of FILE, line
  by line, with runs of whitespace counted as one space and leading and
  trailing whitespace ignored (so rustfmt may align comments); FILE is
  under tests/, examples/, ffi/tests/ or keyd/tests/, where the test suite
  compiles or runs it (a Rust test or example, a C test).
* ``json-config``: a client configuration: opened with ``panseal.Client`` in
  a fresh directory, then closed.
* ``usage program=PATH``: a command synopsis with placeholders: every
  ``--flag`` after the command's `` -- `` (or all of them, when there is
  none) must appear in ``PATH --help``.
* ``ci``: the README's two commands: they must be the commands ``.ci/run``
  runs.
* ``not-a-command``: a diagram or sample output.

Exit status 0 when every block passed, 1 otherwise (each failure named by
its README line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(\s*)(`{3,})([^`\s]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*readme:\s*(.*?)\s*-->\s*$")
# A mirrored region must sit in code the test command compiles or runs.
MIRROR_ROOTS = ("tests/", "examples/", "ffi/tests/", "keyd/tests/")
KINDS = {"sh", "file", "python", "mirror", "json-config", "usage", "ci", "not-a-command"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str = ""
    args: dict = field(default_factory=dict)
    positional: list = field(default_factory=list)

    def where(self) -> str:
        return f"README.md:{self.line}"


class Failure(Exception):
    pass


def parse(readme: Path) -> tuple[list[Block], list[str]]:
    lines = readme.read_text().split("\n")
    blocks: list[Block] = []
    errors: list[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        start = i
        body = []
        i += 1
        while i < len(lines):
            c = FENCE.match(lines[i])
            if c and c.group(2) == fence and c.group(3) == "" and c.group(1) == indent:
                break
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        else:
            errors.append(f"README.md:{start + 1}: a code block that is never closed")
            break
        i += 1
        block = Block(line=start + 1, lang=lang, text="\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        if not marker:
            errors.append(
                f"{block.where()}: a ```{lang} block without a `<!-- readme: KIND -->` marker "
                "on the line before it (see scripts/readme.py)"
            )
            continue
        words = shlex.split(marker.group(1))
        block.kind = words[0] if words else ""
        for w in words[1:]:
            if "=" in w:
                k, v = w.split("=", 1)
                block.args[k] = v
            else:
                block.positional.append(w)
        if block.kind not in KINDS:
            errors.append(f"{block.where()}: unknown kind {block.kind!r}")
            continue
        blocks.append(block)
    return blocks, errors


def normalized(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.strip("\n").split("\n")]


def check_mirror(block: Block) -> str:
    if len(block.positional) != 1 or "#" not in block.positional[0]:
        raise Failure("mirror needs FILE#NAME")
    file, name = block.positional[0].split("#", 1)
    if not file.startswith(MIRROR_ROOTS):
        raise Failure(
            f"mirror: {file} is not under {', '.join(MIRROR_ROOTS)} (where the suite compiles "
            "and runs what it mirrors)"
        )
    path = ROOT / file
    if not path.is_file():
        raise Failure(f"mirror: {file} does not exist")
    lines = path.read_text().split("\n")
    begin = [i for i, l in enumerate(lines) if re.search(rf"readme:begin\s+{re.escape(name)}(\s|$)", l)]
    end = [i for i, l in enumerate(lines) if re.search(rf"readme:end\s+{re.escape(name)}(\s|$)", l)]
    if len(begin) != 1 or len(end) != 1 or end[0] <= begin[0]:
        raise Failure(f"mirror: {file} needs exactly one `readme:begin {name}` ... `readme:end {name}`")
    region = "\n".join(lines[begin[0] + 1 : end[0]])
    want, have = normalized(block.text), normalized(region)
    if want != have:
        for n, (a, b) in enumerate(zip(want, have)):
            if a != b:
                raise Failure(
                    f"differs from {file}#{name} at its line {n + 1}:\n  README: {a}\n  {file}: {b}"
                )
        raise Failure(
            f"differs from {file}#{name}: {len(want)} lines in README, {len(have)} in the file"
        )
    return f"equals {file}#{name}"


def check_ci(block: Block) -> str:
    def commands(text: str) -> list[str]:
        out = []
        for line in text.split("\n"):
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith(("set ", "cd ")):
                out.append(line)
        return out

    ci = commands((ROOT / ".ci/run").read_text().replace("#!/usr/bin/env bash", ""))
    readme = commands(block.text)
    if ci != readme:
        raise Failure(f".ci/run runs {ci}, the README shows {readme}")
    return ".ci/run runs exactly these"


def check_usage(block: Block, log: Path) -> str:
    program = block.args.get("program")
    if not program:
        raise Failure("usage needs program=PATH")
    path = ROOT / program
    if not path.exists():
        raise Failure(f"usage: {program} is not built")
    text = " ".join(block.text.replace("\\\n", " ").split())
    if " -- " in text:
        text = text.split(" -- ", 1)[1]
    flags = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)))
    try:
        helptext = subprocess.run(
            [str(path), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failure(f"usage: cannot run {program} --help: {e}")
    (log / f"usage-{block.line}.txt").write_text(helptext.stdout + helptext.stderr)
    known = set(re.findall(r"--[a-z][a-z0-9-]*", helptext.stdout + helptext.stderr))
    missing = [f for f in flags if f not in known]
    if missing:
        raise Failure(f"{program} --help does not list {', '.join(missing)}")
    return f"{len(flags)} flags, all in {program} --help"


def run_python(code: str, log: Path, name: str, env: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="readme-py-") as d:
        script = Path(d) / "snippet.py"
        script.write_text(code)
        r = subprocess.run(
            [sys.executable, str(script)], cwd=d, capture_output=True, text=True,
            timeout=300, env=env,
        )
        (log / f"{name}.txt").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().split("\n")[-15:])
            raise Failure(f"python exited {r.returncode}:\n{tail}")


def check_json_config(block: Block, log: Path, env: dict) -> str:
    try:
        json.loads(block.text)
    except json.JSONDecodeError as e:
        raise Failure(f"not JSON: {e}")
    code = (
        "import panseal\n"
        f"client = panseal.Client({block.text.strip()!r})\n"
        "client.close()\n"
    )
    run_python(code, log, f"json-{block.line}", env)
    return "opened by panseal.Client"


def heredoc(text: str, tag: str) -> str:
    if any(line.strip() == tag for line in text.split("\n")):
        raise Failure(f"the block contains the line {tag}")
    return f"<<'{tag}'\n{text}{'' if text.endswith(chr(10)) else chr(10)}{tag}\n"


def session_script(blocks: list[Block]) -> str:
    parts = ["set -euo pipefail\n"]
    for b in blocks:
        parts.append(f"\necho '== README.md:{b.line} ({b.kind})'\n")
        if b.kind == "sh":
            parts.append(b.text)
        elif b.kind == "file":
            p = b.args.get("path")
            if not p:
                raise Failure(f"{b.where()}: file needs path=P")
            q = shlex.quote(p)
            parts.append(f'mkdir -p "$(dirname {q})"\ncat >{q} {heredoc(b.text, "README_FILE_EOF")}')
        elif b.kind == "python":
            parts.append(f"python3 - {heredoc(b.text, 'README_PY_EOF')}")
    return "".join(parts)


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_session(name: str, blocks: list[Block], log: Path, env: dict) -> str:
    cleanup = []
    timeout = 900
    for b in blocks:
        cleanup += [c for c in b.args.get("cleanup", "").split(",") if c]
        timeout = max(timeout, int(b.args.get("timeout", 0)))
    for c in cleanup:
        if ".." in Path(c).parts or Path(c).is_absolute():
            raise Failure(f"cleanup={c}: must be a directory inside the repository")
    script = session_script(blocks)
    # The script holds the README's text (its test PAN among it): kept out
    # of the log directory, which the test command scans for PANs.
    script_dir = tempfile.mkdtemp(prefix=f"readme-script-{name}-")
    script_path = Path(script_dir) / f"session-{name}.sh"
    script_path.write_text(script)

    def clean() -> None:
        for c in cleanup:
            subprocess.run(["rm", "-rf", str(ROOT / c)], check=True)

    # A directory the session would create may be a developer's own (a dev
    # keyd's folder holds its shares): never delete one the runner did not
    # make.
    existing = [c for c in cleanup if (ROOT / c).exists()]
    if existing:
        raise Failure(
            f"session {name} works in {', '.join(existing)}, which already exists: "
            "move it away (the runner deletes only what its sessions created)"
        )
    home = tempfile.mkdtemp(prefix=f"readme-home-{name}-")
    senv = dict(env, HOME=home)
    out = open(log / f"session-{name}.txt", "w")
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(script_path)], cwd=ROOT, env=senv, stdout=out,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop_group(proc)
        out.close()
        clean()
        subprocess.run(["rm", "-rf", home, script_dir], check=False)
    took = time.monotonic() - started
    if rc != 0:
        text = (log / f"session-{name}.txt").read_text().strip().split("\n")
        why = f"timed out after {timeout} s" if rc is None else f"exited {rc}"
        raise Failure(f"session {name} {why}; last lines:\n  " + "\n  ".join(text[-25:]))
    return f"{len(blocks)} blocks ran in {took:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("readme", nargs="?", default=str(ROOT / "README.md"))
    ap.add_argument("--log", default=None, help="directory for each block's output")
    ap.add_argument("--only", default=None, help="run only this session (checks still run)")
    ap.add_argument("--list", action="store_true", help="list the blocks and their markers")
    a = ap.parse_args()
    blocks, errors = parse(Path(a.readme))
    if a.list:
        for b in blocks:
            print(f"{b.where()}: ```{b.lang} {b.kind} {b.positional} {b.args}")
        for e in errors:
            print(f"FAIL {e}")
        return 1 if errors else 0
    log = Path(a.log or tempfile.mkdtemp(prefix="readme-"))
    log.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("CARGO_TERM_COLOR", "never")
    # Sessions get a fresh HOME; the toolchain and cargo's registry stay
    # where they are (rustup and cargo find them from HOME otherwise).
    home = Path.home()
    env.setdefault("RUSTUP_HOME", str(home / ".rustup"))
    env.setdefault("CARGO_HOME", str(home / ".cargo"))
    sessions: dict[str, list[Block]] = {}
    results: list[tuple[str, str, bool]] = []
    for b in blocks:
        try:
            if b.kind in ("sh", "file") or (b.kind == "python" and "session" in b.args):
                name = b.args.get("session")
                if not name:
                    raise Failure(f"{b.kind} needs session=NAME")
                sessions.setdefault(name, []).append(b)
                continue
            if a.only and b.kind == "python":
                continue
            if b.kind == "mirror":
                msg = check_mirror(b)
            elif b.kind == "ci":
                msg = check_ci(b)
            elif b.kind == "usage":
                msg = check_usage(b, log)
            elif b.kind == "json-config":
                msg = check_json_config(b, log, env)
            elif b.kind == "python":
                run_python(b.text, log, f"python-{b.line}", env)
                msg = "ran"
            else:
                msg = "not a command"
            results.append((b.where(), f"{b.kind}: {msg}", True))
        except Failure as e:
            results.append((b.where(), f"{b.kind}: {e}", False))
    for name, group in sessions.items():
        if a.only and name != a.only:
            continue
        try:
            msg = run_session(name, group, log, env)
            results.append((group[0].where(), f"session {name}: {msg}", True))
        except Failure as e:
            results.append((group[0].where(), f"session {name}: {e}", False))
    for where, msg, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {where} {msg}")
    for e in errors:
        print(f"FAIL {e}")
    failed = len(errors) + sum(1 for _, _, ok in results if not ok)
    total = len(errors) + len(results)
    print(f"readme: {total - failed} of {total} checks passed ({len(blocks)} marked blocks, "
          f"{len(sessions)} sessions); outputs in {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
