# trustwire — `make demo` runs the main job, `make test` runs every test suite.
# Both install what a fresh machine lacks (Rust toolchain check, openssl, Go, Python).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
FUZZ_SECONDS ?= 20

.PHONY: all build demo test test-rust test-fuzz bench fuzz deps lint clean

all: build

deps:
	@bash scripts/deps.sh

build:
	$(CARGO) build --release --bin trustwire

demo: build
	./target/release/trustwire demo

test: deps
	$(CARGO) build --release --bin trustwire
	TRUSTWIRE_REQUIRE_PEERS=1 $(CARGO) test --workspace --release -- --test-threads=2
	$(CARGO) run --release -p trustwire-fuzz -- --seconds $(FUZZ_SECONDS)

# Throughput and handshake benchmarks; prints a table and JSON with ratios against baselines
# measured in the same run. Not a test: numbers depend on the machine.
bench: deps
	$(CARGO) bench --bench rpc --features insecure-plaintext-bench
	$(CARGO) bench --bench rotation
	$(CARGO) bench --bench proxy

# A longer decoder fuzzing session (stable Rust; see fuzz/src/main.rs).
fuzz:
	$(CARGO) run --release -p trustwire-fuzz -- --seconds 600

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
