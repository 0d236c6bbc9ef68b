#!/usr/bin/env bash
# The whole test suite, as CI runs it (after scripts/setup.sh):
#   bash scripts/test.sh
# FUZZ_SECONDS (default 60) sets how long each fuzz target runs.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
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

step "Python: test vectors (independent implementation) and the C ABI through ctypes"
cargo build --quiet -p panseal-ffi --lib
# The same library built with AddressSanitizer: tests/python/test_close_race.py
# repeats its close-while-calling race under it (runtime preloaded into python).
HOST="$(rustc -vV | sed -n 's/^host: //p')"
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address" \
    cargo build --quiet -p panseal-ffi --lib --target "$HOST" --target-dir target/asan
PANSEAL_LIB="$PWD/target/debug/libpanseal_ffi.so" \
PANSEAL_ASAN_LIB="$PWD/target/asan/$HOST/debug/libpanseal_ffi.so" \
PANSEAL_ASAN_RUNTIME="$(gcc -print-file-name=libasan.so)" \
    python3 -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$LOG/pytest.txt"

step "examples"
cargo run --quiet --example quickstart

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
