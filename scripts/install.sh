#!/usr/bin/env bash
# Installs the C library for C and C++ programs: `make install PREFIX=/opt/trustwire`.
#   PREFIX/lib/libtrustwire.{so,a}, PREFIX/include/trustwire.{h,hpp},
#   PREFIX/lib/pkgconfig/trustwire.pc, PREFIX/lib/cmake/trustwire/trustwireConfig*.cmake
set -euo pipefail

prefix="${1:?usage: install.sh PREFIX}"
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo="${CARGO:-cargo}"

(cd "$root" && "$cargo" build --release -p trustwire-c)

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
major="${version%%.*}"
rest="${version#*.}"
minor="${rest%%.*}"

mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/trustwire" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
# Release builds keep debug info for profiling; installed copies do not need it.
for lib in libtrustwire.so libtrustwire.a; do
  install -m 0644 "$target/release/$lib" "$prefix/lib/$lib"
  strip --strip-debug "$prefix/lib/$lib"
done
chmod 0755 "$prefix/lib/libtrustwire.so"
install -m 0644 "$root/include/trustwire.h" "$root/include/trustwire.hpp" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" \
  "$root/packaging/trustwire.pc.in" > "$prefix/lib/pkgconfig/trustwire.pc"
install -m 0644 "$root/packaging/trustwireConfig.cmake" "$prefix/lib/cmake/trustwire/"
sed -e "s|@VERSION@|$version|" -e "s|@VERSION_MAJOR@|$major|" -e "s|@VERSION_MINOR@|$minor|" \
  "$root/packaging/trustwireConfigVersion.cmake.in" > "$prefix/lib/cmake/trustwire/trustwireConfigVersion.cmake"
echo "installed trustwire $version into $prefix"
