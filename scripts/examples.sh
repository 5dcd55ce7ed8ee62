#!/usr/bin/env bash
# Builds the C and C++ examples against the library in the build tree: `make examples`.
# Writes TARGET/release/pkgconfig/trustwire-uninstalled.pc, which pkg-config prefers to an
# installed trustwire.pc when that directory is on PKG_CONFIG_PATH; its Libs carry an rpath to
# the build tree, so programs built with it run without LD_LIBRARY_PATH:
#   PKG_CONFIG_PATH=target/release/pkgconfig cc app.c $(pkg-config --cflags --libs trustwire)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo="${CARGO:-cargo}"

(cd "$root" && "$cargo" build --release -p trustwire-c)

libdir="$(cd "$target/release" && pwd)"
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
mkdir -p "$libdir/pkgconfig"
cat > "$libdir/pkgconfig/trustwire-uninstalled.pc" <<PC
# trustwire from the build tree at $root (not installed).
libdir=$libdir
includedir=$root/include

Name: trustwire
Description: Mutual-TLS RPC speaking brpc's baidu_std (C ABI), uninstalled
Version: $version
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -ltrustwire
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC

export PKG_CONFIG_PATH="$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
out="$libdir/examples-c"
mkdir -p "$out"
flags="$(pkg-config --cflags --libs trustwire)"
for name in echo_server echo_client; do
  # shellcheck disable=SC2086 # pkg-config output is a list of flags
  cc -std=c11 -Wall -Wextra -Werror "$root/examples/c/$name.c" -o "$out/$name" $flags -lpthread
  # shellcheck disable=SC2086
  c++ -std=c++17 -Wall -Wextra -Werror -I "$root/examples/c" "$root/examples/cpp/$name.cpp" -o "$out/${name}_cpp" $flags -lpthread
done
echo "examples in $out (they find libtrustwire in $libdir by themselves)"
