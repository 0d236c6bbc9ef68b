#!/usr/bin/env bash
# The whole test suite, as CI runs it (after scripts/setup.sh):
#   bash scripts/test.sh
# FUZZ_SECONDS (default 30) sets how long each fuzz target runs.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
LOG="$(mktemp -d)/panseal-test"
mkdir -p "$LOG"
export CARGO_TERM_COLOR=never
# Every output of the run is kept under $LOG and scanned for the suite's
# test PANs, passwords/PINs and key bytes at the end (scripts/scan_secrets.py).
# Test harnesses copy their child processes' logs (PostgreSQL, ...) here.
export PANSEAL_TEST_LOG_DIR="$LOG/harness"
mkdir -p "$PANSEAL_TEST_LOG_DIR"
echo "logs: $LOG"

step() { printf '\n== %s\n' "$*"; }
# cargo test with every passing test's captured output kept (for the scan):
# the log gets all of it, the console the usual report without the
# "successes:" sections.
quiet_successes() {
    awk '/^successes:$/ {skip = 1} /^(failures:|test result:)/ {skip = 0} !skip {print; fflush()}'
}

step "format"
cargo fmt --all -- --check

step "cargo deny: advisories (committed RustSec snapshot, offline), licenses, duplicate versions, sources"
# cargo-deny looks for the database of deny.toml's URL in
# <db-path>/advisory-db-<hash of the URL>.
python3 scripts/advisories.py materialize target/deny/db/advisory-db-3157b0e258782691
cargo deny --workspace --all-features --offline check 2>&1 | tee "$LOG/deny.txt" | grep -vE '^\s+[│├└]'

step "clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

step "cargo test --all-features (builds the examples the tool tests run)"
cargo build --quiet --workspace --all-features --bins --examples
cargo test --workspace --all-features -- --show-output 2>&1 | tee "$LOG/cargo-all.txt" | quiet_successes

step "cargo test (default features: compile-fail tests that need the feature off)"
cargo test -p panseal --test it -- compile_fail:: api:: --show-output 2>&1 | tee "$LOG/cargo-default.txt" |
    quiet_successes

step "C header: regenerate with cbindgen and compare with ffi/include/panseal.h"
(cd ffi && cbindgen --config cbindgen.toml --crate panseal-ffi --quiet --output "$LOG/panseal.h")
diff -u ffi/include/panseal.h "$LOG/panseal.h"

step "Python: the panseal package (PyO3, built by maturin), test vectors (independent implementation), the C ABI through ctypes"
cargo build --quiet -p panseal-ffi --lib
# The panseal package: a debug wheel built by maturin into target/wheels
# (same target directory and the same library features as the C ABI build
# above, so only PyO3 and python/src are compiled here), then installed
# over any earlier one. The tests import the installed package.
rm -f target/wheels/panseal-*.whl
python3 -m maturin build --quiet -m python/Cargo.toml --out target/wheels
python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
    target/wheels/panseal-*.whl
# The same library built with AddressSanitizer: tests/python/test_close_race.py
# repeats its close-while-calling race under it (runtime preloaded into python).
# Without the PKCS#11, AWS KMS and PostgreSQL backends (the race uses the
# local service and the memory store), so the AWS SDK is not built a second
# time with the sanitizer.
HOST="$(rustc -vV | sed -n 's/^host: //p')"
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address" \
    cargo build --quiet -p panseal-ffi --lib --no-default-features --target "$HOST" --target-dir target/asan
PANSEAL_LIB="$PWD/target/debug/libpanseal_ffi.so" \
PANSEAL_ASAN_LIB="$PWD/target/asan/$HOST/debug/libpanseal_ffi.so" \
PANSEAL_ASAN_RUNTIME="$(gcc -print-file-name=libasan.so)" \
    python3 -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$LOG/pytest.txt"

step "examples"
cargo run --quiet --example quickstart

step "C library: scripts/cinstall.sh, then the README's C example built with pkg-config (shared and static)"
# Outside $LOG: the example programs carry the README's test PAN as a
# string constant, which the secrets scan below would rightly report.
cdir="$(mktemp -d)"
bash scripts/cinstall.sh --prefix "$cdir/prefix" --debug
export PKG_CONFIG_PATH="$cdir/prefix/lib/pkgconfig"
gcc -Wall -Wextra -Werror ffi/tests/c/example.c $(pkg-config --cflags --libs panseal) \
    -o "$cdir/c-example-shared"
readelf -d "$cdir/c-example-shared" | grep -q 'NEEDED.*\[libpanseal\.so\.0\]'
gcc -Wall -Wextra -Werror ffi/tests/c/example.c $(pkg-config --cflags panseal) \
    "$cdir/prefix/lib/libpanseal.a" $(pkg-config --static --libs-only-l panseal | sed 's/-lpanseal\b//') \
    -o "$cdir/c-example-static"
! readelf -d "$cdir/c-example-static" | grep -q 'NEEDED.*libpanseal'
for v in shared static; do
    (cd "$cdir" && LD_LIBRARY_PATH="$cdir/prefix/lib" "./c-example-$v") >"$LOG/c-example-$v.txt"
    grep -q '^store in VARCHAR(64): P1' "$LOG/c-example-$v.txt"
    echo "c example ($v): sealed and opened"
done
unset PKG_CONFIG_PATH
rm -rf "$cdir"

step "README: every code block runs, or equals the compiled code it mirrors (scripts/readme.py)"
# After the builds above (binaries, examples, the installed Python package).
# The walkthroughs' servers listen on 127.0.0.1 and are stopped when their
# session ends; their outputs stay under $LOG/readme for the secrets scan.
python3 scripts/readme.py --log "$LOG/readme"

step "a payment backend's dependency tree (default features): no server, TLS or FFI crate, no cdylib"
user="$LOG/user-crate"
mkdir -p "$user/src"
cat >"$user/Cargo.toml" <<TOML
[package]
name = "payments-backend"
version = "0.1.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
panseal = { path = "$PWD" }
TOML
echo 'fn main() {}' >"$user/src/main.rs"
cargo tree --quiet --offline --manifest-path "$user/Cargo.toml" -e normal --prefix none |
    sed 's/ (.*//' | sort -u >"$LOG/user-tree.txt"
if grep -E '^(hyper|hyper-util|rustls|tokio-rustls|ring|rcgen|toml|blahaj|cryptoki|aws-[a-z-]+|tokio-postgres|deadpool-postgres|clap|pyo3|panseal-keyd|panseal-ffi|panseal-python) ' \
    "$LOG/user-tree.txt"; then
    echo "a default-features user of panseal links the crates above" >&2
    exit 1
fi
cargo metadata --quiet --offline --no-deps --format-version 1 | python3 -c '
import json, sys
kinds = [t["kind"] for p in json.load(sys.stdin)["packages"] if p["name"] == "panseal"
         for t in p["targets"] if "lib" in t["kind"] or "cdylib" in t["kind"] or "staticlib" in t["kind"]]
assert kinds == [["lib"]], kinds
'
echo "$(wc -l <"$LOG/user-tree.txt") crates in a payment backend's tree; none is a server, TLS or FFI crate; panseal is rlib only"


step "benches compile"
cargo bench --workspace --no-run --quiet --all-features

step "keyd benchmark (1 s phases; figures in README)"
KEYD_BENCH_SECONDS=1 cargo bench --quiet -p panseal-keyd --bench keyd

step "fuzz: every target for ${FUZZ_SECONDS}s"
(
    cd fuzz
    export RUSTC_BOOTSTRAP=1
    cargo fuzz build -O
    for target in $(cargo fuzz list); do
        echo "-- fuzz $target"
        if ! cargo fuzz run -O "$target" -- -max_total_time="$FUZZ_SECONDS" \
            >"$LOG/fuzz-$target.txt" 2>&1; then
            tail -n 60 "$LOG/fuzz-$target.txt"
            echo "fuzz target $target failed"
            exit 1
        fi
        grep -E '^Done' "$LOG/fuzz-$target.txt" | tail -n 1
    done
)

step "secrets scan: no test PAN, password/PIN or key bytes in any output of this run"
python3 scripts/scan_secrets.py "$LOG"

step "summary"
counts() { sed -n 's/^test result: .*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$LOG"/cargo-*.txt; }
passed=$(counts | awk '{p += $1} END {print p + 0}')
failed=$(counts | awk '{f += $2} END {print f + 0}')
py_passed=$(sed -n 's/^\([0-9]*\) passed.*/\1/p' "$LOG/pytest.txt" | tail -n 1)
echo "suite: $((passed + ${py_passed:-0})) passed, ${failed} failed"
