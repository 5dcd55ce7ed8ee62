#!/usr/bin/env bash
# Installs what the test suites need and a fresh machine may lack. Safe to run repeatedly.
set -euo pipefail

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || need_apt+=(golang-go)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The Python suite builds the package in a virtualenv (make test-python).
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# The C API's tests run one program under Valgrind (bindings/c/tests/c_programs.rs).
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
# make test-packaging builds a project against the installed library with pkg-config.
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# tests/pkcs11.rs: a software PKCS#11 token, and OpenSC's pkcs11-tool to generate keys on it.
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
