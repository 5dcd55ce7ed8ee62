#!/usr/bin/env bash
# Installs trustwire into a temporary prefix and builds a small project out of tree against it,
# with pkg-config (shared and static) and with CMake's find_package; runs every program.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
app="$root/tests/packaging/app"

make -C "$root" --no-print-directory install PREFIX="$prefix" >/dev/null
test -f "$prefix/include/trustwire.h" && test -f "$prefix/include/trustwire.hpp"

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
echo "pkg-config: $(pkg-config --modversion trustwire)"
cc -std=c11 -Wall -Wextra -Werror "$app/main.c" -o "$tmp/app_pc" $(pkg-config --cflags --libs trustwire)
LD_LIBRARY_PATH="$prefix/lib" "$tmp/app_pc"
c++ -std=c++17 -Wall -Wextra -Werror "$app/main.cpp" -o "$tmp/app_pc_cpp" $(pkg-config --cflags --libs trustwire)
LD_LIBRARY_PATH="$prefix/lib" "$tmp/app_pc_cpp"
cc -std=c11 -Wall -Wextra -Werror "$app/main.c" -o "$tmp/app_pc_static" \
  $(pkg-config --cflags trustwire) "$prefix/lib/libtrustwire.a" $(pkg-config --static --libs-only-l trustwire | sed 's/-ltrustwire//')
"$tmp/app_pc_static"

cmake -S "$app" -B "$tmp/build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_RPATH="$prefix/lib" >/dev/null
cmake --build "$tmp/build" >/dev/null
"$tmp/build/app"
"$tmp/build/app_cpp"
"$tmp/build/app_static"
echo "packaging: pkg-config and CMake builds against the installed copy work"
