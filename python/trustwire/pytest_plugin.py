"""pytest fixtures, loaded automatically once trustwire is installed (entry point ``pytest11``).

- ``trustwire_pki``: a :class:`~trustwire.testing.TestPKI` whose CA is written to
  ``tmp_path/ca.pem`` (``trustwire_pki.ca_path``).
- ``trustwire_server``: a factory ``(handlers, allow=(), name="server") -> Server`` starting a
  server on 127.0.0.1 with a fresh certificate, stopped after the test. ``handlers`` maps
  ``(service, method)`` to a handler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import pytest

from ._native import TlsConfig
from ._rpc import Handler, Server
from .testing import TestPKI


class PluginPKI(TestPKI):
    """A TestPKI that knows the directory its CA was written to."""

    __test__ = False
    directory: Path
    ca_path: str

    def tls(self, name: str, allow: Sequence[str] = (), server_name: str = "localhost") -> TlsConfig:
        """A TlsConfig for a fresh credential named ``name`` (DNS localhost, IP 127.0.0.1)."""
        cert, key = self.issue(name, dns=["localhost"], ips=["127.0.0.1"]).write(self.directory)
        return TlsConfig(cert=cert, key=key, ca=self.ca_path, allow=list(allow), server_name=server_name)


@pytest.fixture
def trustwire_pki(tmp_path: Path) -> PluginPKI:
    pki = PluginPKI()
    pki.directory = tmp_path
    pki.ca_path = os.path.join(tmp_path, "ca.pem")
    with open(pki.ca_path, "w") as f:
        f.write(pki.ca_pem)
    return pki


ServerFactory = Callable[..., Server]


@pytest.fixture
def trustwire_server(trustwire_pki: PluginPKI) -> Iterator[ServerFactory]:
    started: List[Server] = []

    def make(handlers: Dict[Tuple[str, str], Handler], allow: Sequence[str] = (), name: str = "server") -> Server:
        server = Server(trustwire_pki.tls(name, allow))
        for (service, method), handler in handlers.items():
            server.register(service, method, handler)
        server.start("127.0.0.1:0")
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
