"""The pytest plugin, used as a downstream project would: fixtures only, no trustwire test
helpers imported."""

from __future__ import annotations

import trustwire


def test_fixtures_give_a_pki_and_running_servers(trustwire_pki, trustwire_server) -> None:  # type: ignore[no-untyped-def]
    server = trustwire_server(
        {("example.EchoService", "Echo"): lambda payload, ctx: payload[::-1]},
        allow=["spiffe://example.org/ns/test/*"],
    )
    with trustwire.Client(f"127.0.0.1:{server.port}", trustwire_pki.tls("caller")) as client:
        assert client.call("example.EchoService", "Echo", b"abc") == b"cba"
    with open(trustwire_pki.ca_path) as f:
        assert f.read() == trustwire_pki.ca_pem
