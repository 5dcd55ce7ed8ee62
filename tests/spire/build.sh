#!/usr/bin/env bash
# Builds spire-server and spire-agent (Go module github.com/spiffe/spire, version $1) into
# $CARGO_TARGET_DIR/spire-bin, with Go's caches under the target dir as the Go test peers have
# them. cgo is on: SPIRE's SQLite datastore needs it. Skipped when that version is built.
set -euo pipefail
version="${1:?usage: build.sh VERSION}"
target="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}"
bin="$target/spire-bin"
if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ] && [ "$(cat "$bin/version" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
export PATH="$PATH:/usr/local/go/bin"
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=1
export GOCACHE="$target/go-cache" GOPATH="$target/go-path" GOMODCACHE="$target/go-path/pkg/mod"
export XDG_CONFIG_HOME="$target/go-config"
# Download the module itself and build inside a writable copy of it, so its own go.mod and
# go.sum pin every dependency (`go install pkg@version` also asks the proxy for the module's
# version list, which it may refuse).
dir="$(go mod download -json "github.com/spiffe/spire@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
src="$target/spire-src"
rm -rf "$src"
cp -r "$dir" "$src"
chmod -R u+w "$src"
mkdir -p "$bin"
start=$(date +%s)
(cd "$src" && go build -o "$bin/" ./cmd/spire-server ./cmd/spire-agent)
echo "$version" > "$bin/version"
echo "built SPIRE $version in $(( $(date +%s) - start ))s: $bin"
