#!/usr/bin/env bash
# `trustwire bench` against `trustwire serve-echo` on loopback, as `make bench` runs it: pooled
# calls with 64 in flight, then a full handshake per call with 8 in flight, and the ratio of the
# two rates. A dev PKI is made in a temporary directory; the server and the directory go away
# however the script ends. BENCH_SECONDS=N lengthens both runs.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$root/target}/release/trustwire"
seconds="${BENCH_SECONDS:-}"
[ -x "$bin" ] || { echo "bench-cli: $bin is missing; run make build first" >&2; exit 1; }

tmp="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

"$bin" pki init --dir "$tmp/pki" --trust-domain example.org >/dev/null
"$bin" pki issue --dir "$tmp/pki" --name echo --ip 127.0.0.1 --usage server >/dev/null
"$bin" pki issue --dir "$tmp/pki" --name bench --usage client >/dev/null

"$bin" serve-echo --listen 127.0.0.1:0 --cert "$tmp/pki/echo.pem" --key "$tmp/pki/echo.key" \
    --ca "$tmp/pki/ca.pem" --allow 'spiffe://example.org/ns/default/bench' \
    >"$tmp/serve.out" 2>"$tmp/serve.err" &
server=$!
# The first line on stdout names the address in use.
addr=""
for _ in $(seq 100); do
    addr="$(sed -n 's/^serving .* on \(.*\)$/\1/p' "$tmp/serve.out")"
    [ -n "$addr" ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$addr" ]; then
    echo "bench-cli: serve-echo did not start:" >&2
    cat "$tmp/serve.err" >&2
    exit 1
fi

creds=(--cert "$tmp/pki/bench.pem" --key "$tmp/pki/bench.key" --ca "$tmp/pki/ca.pem")
target=example.EchoService/Echo

echo "== trustwire bench: pooled, 64 in flight"
"$bin" bench "$addr" "$target" "${creds[@]}" --duration "${seconds:-3}" --concurrency 64 \
    --payload-bytes 64 | tee "$tmp/pooled.txt"
echo
echo "== trustwire bench: a new connection (full handshake) per call, 8 in flight"
"$bin" bench "$addr" "$target" "${creds[@]}" --duration "${seconds:-2}" --concurrency 8 \
    --new-connection-per-call | tee "$tmp/handshakes.txt"

rate() { awk '$1 == "throughput" { print $2 }' "$1"; }
echo
awk -v p="$(rate "$tmp/pooled.txt")" -v h="$(rate "$tmp/handshakes.txt")" \
    'BEGIN { if (p > 0) printf "a new connection per call: %.3fx the pooled calls/s\n", h / p }'
