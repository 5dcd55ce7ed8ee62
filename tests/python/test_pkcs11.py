"""A Python server whose private key stays on a PKCS#11 token (SoftHSM2): TlsConfig with
key="pkcs11:…", and the refusals a user meets. Skips when SoftHSM2 or pkcs11-tool is missing
(fails instead with TRUSTWIRE_REQUIRE_PEERS=1).

The token store is made once for this module: a PKCS#11 module reads its configuration
(SOFTHSM2_CONF) once per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

import trustwire
from conftest import ECHO, echo

PIN = "135790"
MODULES = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
]


def _cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "trustwire")


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    module = next((m for m in [os.environ.get("TRUSTWIRE_SOFTHSM_MODULE", "")] + MODULES if m and os.path.exists(m)), None)
    if not (shutil.which("softhsm2-util") and shutil.which("pkcs11-tool") and module):
        message = "SoftHSM2 and pkcs11-tool were not found; run scripts/deps.sh"
        if os.environ.get("TRUSTWIRE_REQUIRE_PEERS"):
            pytest.fail(message)
        pytest.skip(message)
    d = tmp_path_factory.mktemp("hsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)

    def run(*args: str) -> None:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    run("softhsm2-util", "--init-token", "--free", "--label", "py", "--so-pin", "2468", "--pin", PIN)
    run("pkcs11-tool", "--module", module, "--token-label", "py", "--login", "--pin", PIN,
        "--keypairgen", "--key-type", "EC:prime256v1", "--label", "server-key", "--id", "0a")
    (d / "pin").write_text(PIN + "\n")
    ca = d / "ca"
    run(_cli(), "pki", "init", "--dir", str(ca))
    run(_cli(), "pki", "issue", "--dir", str(ca), "--name", "server", "--dns", "localhost",
        "--key", "pkcs11:token=py;object=server-key", "--pkcs11-module", module, "--pkcs11-pin-file", str(d / "pin"))
    run(_cli(), "pki", "issue", "--dir", str(ca), "--name", "client", "--usage", "client")
    assert not (ca / "server.key").exists()
    yield {"module": module, "dir": str(d), "ca": str(ca / "ca.pem"), "cert": str(ca / "server.pem"),
           "client_cert": str(ca / "client.pem"), "client_key": str(ca / "client.key")}


# First in the module: login state belongs to the process, and once a key of this token is in
# use a wrong PIN can no longer be told apart (the token answers "already logged in").
def test_token_refusals_are_key_unavailable(token: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_PY_PIN", "000000")
    with pytest.raises(trustwire.CredentialsError, match="wrong PIN") as e:
        trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;object=server-key", ca=token["ca"],
                            pkcs11_module=token["module"], pkcs11_pin_env="TW_PY_PIN")
    assert e.value.verdict == "key_unavailable"
    monkeypatch.setenv("TW_PY_PIN", PIN)
    with pytest.raises(trustwire.CredentialsError, match="no private key object 'missing' on token 'py'") as e:
        trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;object=missing", ca=token["ca"],
                            pkcs11_module=token["module"], pkcs11_pin_env="TW_PY_PIN")
    assert e.value.verdict == "key_unavailable"
    with pytest.raises(trustwire.CredentialsError, match="nowhere.so") as e:
        trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;object=server-key", ca=token["ca"],
                            pkcs11_module="/nowhere.so", pkcs11_pin_env="TW_PY_PIN")
    assert e.value.verdict == "key_unavailable"
    with pytest.raises(trustwire.ConfigError, match="pkcs11_module"):
        trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;object=server-key", ca=token["ca"])


def test_server_with_a_token_key_answers_calls(token: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_PY_PIN", PIN)
    tls = trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;object=server-key", ca=token["ca"],
                              pkcs11_module=token["module"], pkcs11_pin_env="TW_PY_PIN")
    assert tls.generation == 1
    server = trustwire.Server(tls)
    server.register(*ECHO, echo)
    server.start("127.0.0.1:0")
    try:
        client_tls = trustwire.TlsConfig(cert=token["client_cert"], key=token["client_key"], ca=token["ca"],
                                         server_name="localhost")
        with trustwire.Client(f"127.0.0.1:{server.port}", client_tls) as client:
            assert client.call(*ECHO, b"signed on a token") == b"signed on a token"
    finally:
        server.stop()
    # The PIN may come from a file as well.
    by_file = trustwire.TlsConfig(cert=token["cert"], key="pkcs11:token=py;id=%0a", ca=token["ca"],
                                  pkcs11_module=token["module"], pkcs11_pin_file=str(Path(token["dir"]) / "pin"))
    assert by_file.serial == tls.serial
