"""scripts/readme.py, the README runner, on small READMEs: it passes what
matches and runs, and fails — naming the README line — a block without a
marker, a mirror that drifted, a session that fails, a flag the program does
not have; and it stops what a session left running."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
RUNNER = ROOT / "scripts" / "readme.py"
FENCE = "```"


@pytest.fixture
def scratch():
    # Under tests/: the runner accepts mirrors only where the suite compiles.
    d = ROOT / "tests" / "python" / f".readme-runner-test-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=True)


def run(scratch, readme_text):
    readme = scratch / "README.md"
    readme.write_text(textwrap.dedent(readme_text).replace("FENCE", FENCE))
    r = subprocess.run(
        [sys.executable, str(RUNNER), str(readme), "--log", str(scratch / "log")],
        capture_output=True, text=True, timeout=120,
    )
    return r.returncode, r.stdout + r.stderr


def rel(p):
    return str(p.relative_to(ROOT))


def test_matching_mirror_and_passing_session(scratch):
    code = scratch / "code.rs"
    code.write_text("fn main() {\n    // readme:begin x\n    let a =   1; // one\n    // readme:end x\n}\n")
    rc, out = run(scratch, f"""
        <!-- readme: mirror {rel(code)}#x -->
        FENCErust
        let a = 1;   // one
        FENCE

        <!-- readme: sh session=s -->
        FENCEsh
        X=41
        FENCE

        <!-- readme: file session=s path={rel(scratch)}/out.txt -->
        FENCEtext
        hello
        FENCE

        <!-- readme: sh session=s -->
        FENCEsh
        test "$((X + 1))" = 42 && grep -q hello {rel(scratch)}/out.txt
        FENCE
    """)
    assert rc == 0, out
    assert "readme: 2 of 2 checks passed" in out


def test_unmarked_block_fails(scratch):
    rc, out = run(scratch, """
        Some text.

        FENCEsh
        echo hi
        FENCE
    """)
    assert rc == 1
    assert "README.md:4: a ```sh block without" in out


def test_drifted_mirror_fails(scratch):
    code = scratch / "code.c"
    code.write_text("/* readme:begin y */\nint a = 1;\n/* readme:end y */\n")
    rc, out = run(scratch, f"""
        <!-- readme: mirror {rel(code)}#y -->
        FENCEc
        int a = 2;
        FENCE
    """)
    assert rc == 1
    assert "differs from" in out and "int a = 2;" in out


def test_failing_session_fails_and_names_the_line(scratch):
    rc, out = run(scratch, """
        <!-- readme: sh session=bad -->
        FENCEsh
        echo before
        false
        echo after
        FENCE
    """)
    assert rc == 1
    assert "session bad exited 1" in out and "before" in out and "after" not in out


def test_unknown_flag_fails(scratch):
    rc, out = run(scratch, f"""
        <!-- readme: usage program=scripts/readme.py -->
        FENCEsh
        python3 scripts/readme.py --log DIR --no-such-flag
        FENCE
    """)
    assert rc == 1
    assert "does not list --no-such-flag" in out


def test_what_a_session_leaves_running_is_stopped(scratch):
    pidfile = scratch / "pid"
    rc, out = run(scratch, f"""
        <!-- readme: sh session=bg -->
        FENCEsh
        sleep 300 &
        echo $! > {rel(pidfile)}
        FENCE
    """)
    assert rc == 0, out
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the session's background process {pid} still runs")


def test_list_only_lists(scratch):
    marker = scratch / "ran"
    rc, out = run(scratch, f"""
        <!-- readme: sh session=s -->
        FENCEsh
        touch {rel(marker)}
        FENCE
    """.replace("README_LIST", ""))
    assert rc == 0 and marker.exists()
    marker.unlink()
    readme = scratch / "README.md"
    r = subprocess.run([sys.executable, str(RUNNER), str(readme), "--list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sh ['" not in r.stdout and "sh [] {'session': 's'}" in r.stdout
    assert not marker.exists(), "--list ran the session"


def test_an_existing_cleanup_directory_is_refused_and_kept(scratch):
    mine = scratch / "devdir"
    mine.mkdir()
    (mine / "shares").write_text("a developer's own")
    rc, out = run(scratch, f"""
        <!-- readme: sh session=s cleanup={rel(mine)} -->
        FENCEsh
        echo hi
        FENCE
    """)
    assert rc == 1 and "already exists" in out
    assert (mine / "shares").read_text() == "a developer's own"


def test_a_mirror_outside_the_compiled_trees_fails(scratch):
    rc, out = run(scratch, """
        <!-- readme: mirror README.md#x -->
        FENCEtext
        a
        FENCE
    """)
    assert rc == 1 and "is not under tests/" in out
