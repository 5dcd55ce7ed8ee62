# trustwire — `make demo` runs the main job, `make test` runs every test suite.
# Both install what a fresh machine lacks (Rust toolchain check, openssl, Go, Python).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
FUZZ_SECONDS ?= 20
# One target dir for cargo and maturin, so the Python build reuses the core's compiled crates.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
VENV ?= .venv
PY := $(VENV)/bin/python


PREFIX ?= /usr/local

.PHONY: examples install test-packaging header all build demo test test-rust test-fuzz test-python test-wheel wheel python bench bench-python fuzz deps lint clean

all: build

deps:
	@bash scripts/deps.sh

build:
	$(CARGO) build --release --bin trustwire

demo: build
	./target/release/trustwire demo

# Formatting and clippy first: the suite keeps them true, not only CI. `--workspace` runs every
# test target, tests/security (one module per security finding) among them.
test: deps
	$(MAKE) --no-print-directory lint
	$(CARGO) build --release --bin trustwire
	TRUSTWIRE_REQUIRE_PEERS=1 $(CARGO) test --workspace --release -- --test-threads=2
	$(CARGO) run --release -p trustwire-fuzz -- --seconds $(FUZZ_SECONDS)
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-wheel
	$(MAKE) --no-print-directory test-packaging

# The Python package in a virtualenv of its own (.venv): build it the way `pip install .` does,
# then its tests, the stub check and strict typing of the package and examples.
python: deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "maturin>=1.7,<2" pytest "mypy==2.4.1" "grpcio>=1.60"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation .

# The abi3 wheel users install (target/wheels), and the Python suite run against it in a fresh
# virtualenv, so what ships is what is tested.
WHEEL_VENV ?= target/wheel-venv
wheel: python
	rm -rf target/wheels
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m maturin build --release --quiet --out target/wheels
	ls target/wheels/trustwire-*-abi3-*.whl

test-wheel: wheel
	rm -rf $(WHEEL_VENV)
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q pytest "$$(ls target/wheels/trustwire-*-abi3-*.whl)[testing]"
	cd tests/python && ../../$(WHEEL_VENV)/bin/python -c 'import trustwire, sys; assert "site-packages" in trustwire.__file__, trustwire.__file__'
	$(WHEEL_VENV)/bin/python -m pytest tests/python -q -p no:cacheprovider

test-python: python
	$(PY) -m pytest tests/python -q
	$(PY) -m mypy.stubtest trustwire._native
	$(PY) -m mypy --strict python/trustwire $(wildcard examples/python/*.py)

# A real SPIRE server and agent (Go module github.com/spiffe/spire, built with cgo into
# target/spire-bin) serving this process an SVID through the Workload API client, and rotating it.
# Not part of `make test`: the first build downloads and compiles SPIRE.
.PHONY: test-spire
SPIRE_VERSION ?= v1.13.3
test-spire: deps
	bash tests/spire/build.sh $(SPIRE_VERSION)
	TRUSTWIRE_SPIRE_BIN=$(CARGO_TARGET_DIR)/spire-bin $(CARGO) test --release --test workload_api real_spire -- --ignored --test-threads=1

# Throughput, handshake and idle-memory benchmarks; prints a table and JSON with ratios against
# baselines measured in the same run, then `trustwire bench` against serve-echo
# (scripts/bench-cli.sh). Not a test: numbers depend on the machine.
bench: deps build
	$(CARGO) bench --bench rpc --features insecure-plaintext-bench
	$(CARGO) bench --bench rotation
	$(CARGO) bench --bench proxy
	$(CARGO) bench --bench pkcs11
	$(CARGO) bench --bench idle --features insecure-plaintext-bench
	$(CARGO) bench -p trustwire-c --bench c_client
	bash scripts/bench-cli.sh
	$(MAKE) --no-print-directory bench-python

# trustwire from Python against grpcio (installed into the bench's own virtualenv) and against
# stdlib ssl with a hand-written baidu_std client.
BENCH_VENV ?= .venv-bench
bench-python: build python
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "grpcio>=1.60"
	PYTHONPATH="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" $(BENCH_VENV)/bin/python benches/python_grpc.py
	$(PY) benches/python_client.py

# A longer decoder fuzzing session (stable Rust; see fuzz/src/main.rs).
fuzz:
	$(CARGO) run --release -p trustwire-fuzz -- --seconds 600

# The C and C++ examples built against the library in the build tree, into
# target/release/examples-c; they run from there without LD_LIBRARY_PATH (rpath), and
# target/release/pkgconfig/trustwire-uninstalled.pc builds your own programs the same way.
examples:
	bash scripts/examples.sh

# The C library, both headers, trustwire.pc and a CMake package under PREFIX.
install:
	bash scripts/install.sh "$(PREFIX)"

# Installs into a temporary prefix and builds a project out of tree with pkg-config and CMake.
test-packaging:
	bash tests/packaging/run.sh

# Regenerates include/trustwire.h and bindings/c/symbols.txt from the C ABI crate (the tests
# fail while the committed copies differ). Review the diff: removing or renaming a symbol
# breaks programs linked against the library.
header:
	TW_BLESS=1 $(CARGO) test --release -p trustwire-c --test header

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
