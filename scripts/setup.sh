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
    build-essential pkg-config ca-certificates python3 python3-pip \
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

echo "== Python test helpers"
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

echo "== fetch crates"
cargo fetch --quiet
(cd fuzz && cargo fetch --quiet)
echo "setup done"
