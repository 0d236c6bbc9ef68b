#!/usr/bin/env python3
"""The RustSec advisory snapshot `cargo deny check advisories` reads offline.

CI reaches crates.io, PyPI, Debian and npm but not GitHub, where the RustSec
advisory database lives. So the advisories of every crate in the lockfiles
(`Cargo.lock`, `fuzz/Cargo.lock`) are committed under `deny/advisory-db/`
with the upstream commit and date they were taken from, and the test command
turns that snapshot into the local git repository where `cargo deny --offline`
looks for the database `deny.toml` names.

  python3 scripts/advisories.py refresh /path/to/advisory-db-checkout
      Rewrites the snapshot from a checkout (or bare clone) of
      https://github.com/rustsec/advisory-db for the crates in the lockfiles.
  python3 scripts/advisories.py materialize DIR
      Builds DIR, a git repository of the snapshot whose commit carries the
      upstream date, where cargo-deny looks for its database (`db-path` in
      deny.toml, then `advisory-db-<hash of the URL>`; scripts/test.sh
      names it), and `cargo deny --offline` reads it. Fails if a crate in a lockfile is not covered by the
      snapshot (a new dependency: refresh) or if the snapshot is older than
      MAX_AGE_DAYS (refresh it).
"""

import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "deny" / "advisory-db"
LOCKFILES = [ROOT / "Cargo.lock", ROOT / "fuzz" / "Cargo.lock"]
MAX_AGE_DAYS = 180


def locked_crates():
    names = set()
    for lock in LOCKFILES:
        for m in re.finditer(r'^name = "([^"]+)"$', lock.read_text(), re.M):
            names.add(m.group(1))
    return names


def git(repo, *args):
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def refresh(source):
    source = pathlib.Path(source)
    commit = git(source, "rev-parse", "HEAD").strip()
    date = git(source, "show", "-s", "--format=%cI", "HEAD").strip()
    listing = git(source, "ls-tree", "-r", "--name-only", "HEAD", "crates").split()
    wanted = locked_crates()
    if SNAPSHOT.exists():
        shutil.rmtree(SNAPSHOT)
    count = 0
    for path in listing:
        parts = path.split("/")
        if len(parts) == 3 and parts[1] in wanted and parts[2].endswith(".md"):
            out = SNAPSHOT / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(git(source, "show", f"HEAD:{path}"))
            count += 1
    meta = {
        "upstream": "https://github.com/rustsec/advisory-db",
        "commit": commit,
        "date": date,
        "covered_crates": sorted(wanted),
    }
    (SNAPSHOT / "snapshot.json").write_text(json.dumps(meta, indent=1) + "\n")
    (SNAPSHOT / "README.md").write_text(
        "# RustSec advisories for panseal's dependencies\n\n"
        "Taken from https://github.com/rustsec/advisory-db (CC0-1.0) at commit\n"
        f"`{commit}` ({date}), only the `crates/<name>/` entries of the crates in\n"
        "`Cargo.lock` and `fuzz/Cargo.lock`. Written by\n"
        "`python3 scripts/advisories.py refresh CHECKOUT`; read by `cargo deny`\n"
        "through `scripts/advisories.py materialize` (see `deny.toml`).\n"
    )
    print(f"{count} advisories for {len(wanted)} crates from {commit[:12]} ({date})")


def materialize(out):
    meta = json.loads((SNAPSHOT / "snapshot.json").read_text())
    missing = sorted(locked_crates() - set(meta["covered_crates"]))
    if missing:
        sys.exit(
            "advisory snapshot does not cover "
            + ", ".join(missing)
            + ": run `python3 scripts/advisories.py refresh CHECKOUT`"
        )
    taken = datetime.datetime.fromisoformat(meta["date"])
    age = datetime.datetime.now(datetime.timezone.utc) - taken
    if age.days > MAX_AGE_DAYS:
        sys.exit(
            f"advisory snapshot is {age.days} days old (limit {MAX_AGE_DAYS}): "
            "refresh it from https://github.com/rustsec/advisory-db"
        )
    repo = pathlib.Path(out)
    if repo.exists():
        shutil.rmtree(repo)
    repo.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SNAPSHOT, repo)
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="panseal",
        GIT_AUTHOR_EMAIL="panseal@localhost",
        GIT_COMMITTER_NAME="panseal",
        GIT_COMMITTER_EMAIL="panseal@localhost",
        GIT_AUTHOR_DATE=meta["date"],
        GIT_COMMITTER_DATE=meta["date"],
    )
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["commit", "-q", "-m", f"advisory-db {meta['commit']}"],
    ):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env)
    n = sum(1 for _ in (repo / "crates").rglob("*.md")) if (repo / "crates").exists() else 0
    print(f"advisory snapshot {meta['commit'][:12]} ({meta['date']}, {age.days} days old): "
          f"{n} advisories, {len(meta['covered_crates'])} crates covered -> {repo}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("refresh", "materialize"):
        sys.exit(__doc__)
    (refresh if sys.argv[1] == "refresh" else materialize)(sys.argv[2])
