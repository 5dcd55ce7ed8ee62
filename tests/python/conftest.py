"""Shared helpers for the Python suite. Tests that exercise the pytest plugin use its fixtures
(trustwire_pki, trustwire_server) and nothing from here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import pytest

import trustwire
from trustwire.testing import Credential, TestPKI

ECHO = ("example.EchoService", "Echo")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = TestPKI("example.org")
        self.ca_path = str(tmp / "ca.pem")
        Path(self.ca_path).write_text(self.pki.ca_pem)

    def cred(self, name: str, **kw: object) -> Credential:
        kw.setdefault("dns", ["localhost"])
        kw.setdefault("ips", ["127.0.0.1"])
        return self.pki.issue(name, **kw)  # type: ignore[arg-type]

    def files(self, name: str, **kw: object) -> Tuple[str, str]:
        return self.cred(name, **kw).write(self.tmp)

    def tls(self, name: str, allow: Sequence[str] = (), server_name: Optional[str] = "localhost", **kw: object) -> trustwire.TlsConfig:
        cert, key = self.files(name)
        return trustwire.TlsConfig(cert=cert, key=key, ca=self.ca_path, allow=list(allow), server_name=server_name, **kw)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def echo(payload: bytes, ctx: trustwire.CallContext) -> Tuple[bytes, bytes]:
    return payload, ctx.attachment


@pytest.fixture
def echo_server(env: Env):  # type: ignore[no-untyped-def]
    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, echo)
    server.start("127.0.0.1:0")
    yield server
    server.stop()


def target_binary() -> str:
    root = Path(__file__).resolve().parents[2]
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    return str(target / "release" / "trustwire")
