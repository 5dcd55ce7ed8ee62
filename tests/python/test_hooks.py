"""Authorization hooks from Python: ``TlsConfig(authorize_peer=...)`` per connection and
``@server.authorize`` per call, with the same meaning as in Rust and C."""

from __future__ import annotations

import asyncio
import logging
from typing import List, Tuple

import pytest

import trustwire
from conftest import ECHO, Env


def test_a_connection_hook_refuses_a_peer_the_ca_vouches_for(env: Env) -> None:
    seen: List[str] = []

    def authorize_peer(peer: trustwire.PeerIdentity) -> object:
        seen.append(peer.spiffe_id or "")
        if (peer.spiffe_id or "").endswith("/suspended"):
            return "tenant suspended"
        return True

    cert, key = env.files("server")
    server = trustwire.Server(trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path, authorize_peer=authorize_peer))  # type: ignore[arg-type]
    server.register(*ECHO, lambda p, c: p)
    with server:
        address = f"127.0.0.1:{server.port}"
        with trustwire.Client(address, env.tls("web")) as ok:
            assert ok.call(*ECHO, b"x") == b"x"
        with trustwire.Client(address, env.tls("suspended")) as refused:
            with pytest.raises(trustwire.PeerAlert) as e:
                refused.call(*ECHO, b"x")
            assert e.value.alert == "access_denied" and "tenant suspended" not in str(e.value)
    assert seen == ["spiffe://example.org/ns/test/web", "spiffe://example.org/ns/test/suspended"]


def test_a_raising_connection_hook_fails_closed(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    def broken(peer: trustwire.PeerIdentity) -> bool:
        raise KeyError("tenant table")

    cert, key = env.files("server")
    server = trustwire.Server(trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path, authorize_peer=broken))
    server.register(*ECHO, lambda p, c: p)
    with caplog.at_level(logging.ERROR, logger="trustwire"):
        with server, trustwire.Client(f"127.0.0.1:{server.port}", env.tls("web")) as client:
            with pytest.raises(trustwire.PeerAlert):
                client.call(*ECHO, b"x")
    assert "KeyError: 'tenant table'" in caplog.text


def test_a_call_hook_allows_denies_and_chooses_the_code(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, lambda p, c: p)
    server.register("example.AdminService", "Reset", lambda p, c: b"reset")
    seen: List[Tuple[str, str, str, object]] = []

    @server.authorize
    def authorize(peer: trustwire.PeerIdentity, service: str, method: str, metadata: trustwire.CallMetadata) -> bool:
        seen.append((peer.spiffe_id or "", service, method, metadata.log_id))
        if metadata.log_id == 13:
            raise trustwire.RpcError(2001, "log id 13 is unlucky")
        if metadata.log_id == 99:
            raise ValueError("feature flag service down")
        return service != "example.AdminService" or (peer.spiffe_id or "").endswith("/admin")

    with server:
        address = f"127.0.0.1:{server.port}"
        with trustwire.Client(address, env.tls("web")) as web:
            assert web.call(*ECHO, b"x", log_id=7) == b"x"
            with pytest.raises(trustwire.RpcError) as denied:
                web.call("example.AdminService", "Reset", b"")
            assert isinstance(denied.value, trustwire.MethodNotAllowed)
            assert (denied.value.code, denied.value.verdict) == (1004, "method_not_allowed")
            with pytest.raises(trustwire.RpcError) as custom:
                web.call(*ECHO, b"x", log_id=13)
            assert custom.value.code == 2001 and custom.value.text.endswith("]log id 13 is unlucky")
            assert not isinstance(custom.value, trustwire.MethodNotAllowed)
            with caplog.at_level(logging.ERROR, logger="trustwire"):
                with pytest.raises(trustwire.MethodNotAllowed):
                    web.call(*ECHO, b"x", log_id=99)
            assert "feature flag service down" in caplog.text
        with trustwire.Client(address, env.tls("admin")) as admin:
            assert admin.call("example.AdminService", "Reset", b"") == b"reset"
    assert seen[0] == ("spiffe://example.org/ns/test/web", "example.EchoService", "Echo", 7)
    assert len(seen) == 5


def test_an_async_call_hook_runs(env: Env) -> None:
    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, lambda p, c: p)

    @server.authorize
    async def authorize(peer: trustwire.PeerIdentity, service: str, method: str, metadata: trustwire.CallMetadata) -> bool:
        await asyncio.sleep(0)
        return metadata.log_id != 5

    with server, trustwire.Client(f"127.0.0.1:{server.port}", env.tls("web")) as client:
        assert client.call(*ECHO, b"x", log_id=4) == b"x"
        with pytest.raises(trustwire.MethodNotAllowed):
            client.call(*ECHO, b"x", log_id=5)
