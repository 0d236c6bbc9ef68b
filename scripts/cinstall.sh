#!/usr/bin/env bash
# Builds and installs panseal's C library (crate panseal-ffi): the shared and
# static libraries, the header and a pkg-config file — what `cargo cinstall`
# (cargo-c) does, without a tool that takes minutes to build from source.
#
#   bash scripts/cinstall.sh [--prefix /usr/local] [--destdir DIR] [--debug]
#                            [--no-default-features] [--features LIST]
#
# The stock build has every key service (local, keyd, PKCS#11, AWS KMS);
# `--no-default-features` leaves out PKCS#11 and AWS KMS (a smaller library
# that builds in a fraction of the time), `--features pkcs11` puts one back.
#
# Installs
#   $prefix/lib/libpanseal.so.0.1.0  (soname libpanseal.so.0), libpanseal.so.0
#   and libpanseal.so symlinks, $prefix/lib/libpanseal.a,
#   $prefix/include/panseal/panseal.h, $prefix/lib/pkgconfig/panseal.pc
# so that a C program builds with
#   cc app.c $(pkg-config --cflags --libs panseal)            # shared
#   cc app.c $(pkg-config --cflags --libs --static panseal)   # static
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local destdir="" profile=release
features=()
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --destdir) destdir="$2"; shift 2 ;;
    --debug) profile=debug; shift ;;
    --no-default-features) features+=(--no-default-features); shift ;;
    --features) features+=(--features "$2"); shift 2 ;;
    *) echo "usage: $0 [--prefix DIR] [--destdir DIR] [--debug] [--no-default-features] [--features LIST]" >&2; exit 2 ;;
    esac
done
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' ffi/Cargo.toml | head -n 1)"
major="${version%%.*}"
flag=""
[ "$profile" = release ] && flag="--release"
PANSEAL_FFI_SONAME="libpanseal.so.$major" cargo build --quiet -p panseal-ffi --lib $flag ${features[@]+"${features[@]}"}
out="target/$profile"
# The system libraries the static library needs (rustc's native-static-libs
# for this target, Linux/glibc).
static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

lib="$destdir$prefix/lib" inc="$destdir$prefix/include/panseal"
install -d "$lib/pkgconfig" "$inc"
install -m 0755 "$out/libpanseal_ffi.so" "$lib/libpanseal.so.$version"
ln -sf "libpanseal.so.$version" "$lib/libpanseal.so.$major"
ln -sf "libpanseal.so.$major" "$lib/libpanseal.so"
install -m 0644 "$out/libpanseal_ffi.a" "$lib/libpanseal.a"
install -m 0644 ffi/include/panseal.h "$inc/panseal.h"
cat >"$lib/pkgconfig/panseal.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: panseal
Description: Field-level envelope encryption of payment card numbers (C ABI)
Version: $version
Cflags: -I\${includedir}/panseal
Libs: -L\${libdir} -lpanseal
Libs.private: $static_libs
PC
echo "installed panseal $version ($profile) under $destdir$prefix"
