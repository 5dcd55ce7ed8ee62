"""Failure verdicts as exception classes: the mapping users catch on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import trustwire
from trustwire import _native
from trustwire.testing import TestPKI
from conftest import ECHO, Env, eventually_in_metrics


def test_one_class_per_core_verdict_and_exported() -> None:
    assert len(_native.VERDICTS) == 22
    for name, code, class_name in _native.VERDICTS:
        cls = getattr(trustwire, class_name)
        assert class_name in trustwire.__all__
        # A method refusal answers a call: an RpcError; every other verdict fails a handshake.
        parent = trustwire.RpcError if name == "method_not_allowed" else trustwire.HandshakeError
        assert issubclass(cls, parent) and not issubclass(cls, {trustwire.RpcError: trustwire.HandshakeError}.get(parent, trustwire.RpcError))
        assert issubclass(cls, trustwire.TrustwireError)
        assert (cls.verdict, cls.code) == (name, code)
        assert cls.__module__ == "trustwire"
    assert [v[1] for v in _native.VERDICTS] == list(range(1, 23))


def test_hierarchy() -> None:
    assert issubclass(trustwire.Timeout, TimeoutError)
    assert issubclass(trustwire.Timeout, trustwire.TrustwireError)
    for cls in (trustwire.RpcError, trustwire.CredentialsError, trustwire.ConfigError, trustwire.TransportError,
                trustwire.HandshakeError):
        assert issubclass(cls, trustwire.TrustwireError)
    e = trustwire.RpcError(1004, "no")
    assert (e.code, e.text) == (1004, "no")


def connect(env: Env, server: trustwire.Server, tls: trustwire.TlsConfig) -> None:
    with trustwire.Client(f"127.0.0.1:{server.port}", tls) as client:
        client.call(*ECHO, b"x", timeout=5)


def test_unknown_issuer(env: Env, echo_server: trustwire.Server, tmp_path: Path) -> None:
    # A client of another PKI: its CA does not vouch for the server.
    other = TestPKI("example.org")
    cred = other.issue("client")
    tls = trustwire.TlsConfig(cert=cred.cert_pem.encode(), key=cred.key_pem.encode(), ca=other.ca_pem.encode(),
                              server_name="localhost")
    with pytest.raises(trustwire.UnknownIssuer) as e:
        connect(env, echo_server, tls)
    assert e.value.verdict == "unknown_issuer"
    assert e.value.side == "local"


def test_name_mismatch(env: Env, echo_server: trustwire.Server) -> None:
    with pytest.raises(trustwire.NameMismatch) as e:
        connect(env, echo_server, env.tls("client", server_name="elsewhere.example.org"))
    assert e.value.side == "local"


def test_peer_not_allowed_pinned_server_identity(env: Env, echo_server: trustwire.Server) -> None:
    tls = env.tls("client", server_spiffe_id="spiffe://example.org/ns/prod/someone-else")
    with pytest.raises(trustwire.PeerNotAllowed) as e:
        connect(env, echo_server, tls)
    assert e.value.side == "local"


def test_client_refused_by_allow_list_learns_it_as_peer_alert(env: Env) -> None:
    server = trustwire.Server(env.tls("server", allow=["spiffe://example.org/ns/prod/*"]))
    server.register(*ECHO, lambda p, c: p)
    with server:
        # TLS 1.3: the client finishes its half of the handshake before the server judges it.
        with pytest.raises(trustwire.PeerAlert) as e:
            connect(env, server, env.tls("client"))
        assert e.value.side == "remote"
    assert eventually_in_metrics('verdict="peer_not_allowed"')


def test_expired_server_certificate(env: Env, tmp_path: Path) -> None:
    now = time.time()
    cred = env.cred("old-server", not_before=now - 10 * 86400, not_after=now - 86400)
    # A store refuses to put an expired certificate in service…
    with pytest.raises(trustwire.CredentialsError) as ce:
        trustwire.TlsConfig(cert=cred.cert_pem.encode(), key=cred.key_pem.encode(), ca=env.ca_path)
    assert ce.value.verdict == "expired"
    # …so an expired peer is met from another implementation: the core's own CLI server can't
    # serve it either, hence a stdlib ssl server presenting it.
    import socket
    import ssl
    import threading

    cert, key = cred.write(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with trustwire.Client(f"127.0.0.1:{port}", env.tls("client")) as client:
        with pytest.raises(trustwire.Expired) as e:
            client.call(*ECHO, b"x", timeout=5)
    assert e.value.side == "local"
    t.join(5)
    listener.close()


def test_no_peer_certificate(env: Env, echo_server: trustwire.Server) -> None:
    tls = trustwire.TlsConfig(ca=env.ca_path, server_name="localhost")
    assert tls.roles == "client"
    with pytest.raises(trustwire.PeerAlert) as e:
        connect(env, echo_server, tls)
    assert e.value.alert == "certificate_required"
    assert eventually_in_metrics('verdict="no_peer_certificate"')


def test_method_not_allowed_by_rules(env: Env) -> None:
    server_tls = env.tls(
        "server",
        rules=[(["example.EchoService/Echo"], ["spiffe://example.org/ns/test/frontend"])],
    )
    server = trustwire.Server(server_tls)
    server.register(*ECHO, lambda p, c: p)
    with server:
        with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("frontend")) as ok:
            assert ok.call(*ECHO, b"x") == b"x"
        with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("batch")) as refused:
            with pytest.raises(trustwire.RpcError) as e:
                refused.call(*ECHO, b"x")
            assert isinstance(e.value, trustwire.MethodNotAllowed)
            assert (e.value.code, e.value.verdict) == (1004, "method_not_allowed")
            assert "may not call example.EchoService/Echo" in e.value.text


def test_revoked(env: Env, echo_server: trustwire.Server) -> None:
    bad = env.cred("server2")
    env.pki.revoke(bad)
    server = trustwire.Server(trustwire.TlsConfig(cert=bad.cert_pem.encode(), key=bad.key_pem.encode(), ca=env.ca_path))
    server.register(*ECHO, lambda p, c: p)
    with server:
        client_tls = env.tls("client", crl=env.pki.crl_pem().encode())
        with pytest.raises(trustwire.Revoked):
            connect(env, server, client_tls)


def test_bad_credentials_are_credentials_errors(env: Env) -> None:
    a, b = env.cred("a"), env.cred("b")
    with pytest.raises(trustwire.CredentialsError) as e:
        trustwire.TlsConfig(cert=a.cert_pem.encode(), key=b.key_pem.encode(), ca=env.ca_path)
    assert e.value.verdict == "key_mismatch"
    with pytest.raises(trustwire.CredentialsError) as e:
        trustwire.TlsConfig(cert=b"-----BEGIN CERT", key=b.key_pem.encode(), ca=env.ca_path)
    assert e.value.verdict == "bad_pem"
    with pytest.raises(trustwire.ConfigError):
        trustwire.TlsConfig(cert=a.cert_pem.encode(), key=a.key_pem.encode(), ca=env.ca_path, allow=["not a pattern"])


def test_connection_refused_is_transport_error(env: Env) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trustwire.Client(f"127.0.0.1:{port}", env.tls("client")) as client:
        with pytest.raises(trustwire.TrustwireError) as e:
            client.call(*ECHO, b"x", timeout=2)
    assert type(e.value) in (trustwire.TransportError, trustwire.Io)


def test_a_config_made_for_one_role_is_preflighted_for_that_role_only(env: Env, echo_server: trustwire.Server) -> None:
    # A certificate that may only authenticate clients: fine for role="client" ...
    cert, key = env.files("batch", usage="client")
    client_tls = trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path, server_name="localhost", role="client")
    assert client_tls.roles == "client"
    with trustwire.Client(f"127.0.0.1:{echo_server.port}", client_tls) as client:
        assert client.call(*ECHO, b"x") == b"x"
    # ... refused by name for role="server", before anything listens ...
    with pytest.raises(trustwire.TrustwireError) as e:
        trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path, role="server")
    assert getattr(e.value, "verdict", None) == "bad_key_usage", e.value
    # ... and a client config handed to a server says what it was made for.
    both_usage_client = env.tls("frontend", role="client")
    assert both_usage_client.roles == "client"
    with pytest.raises(trustwire.ConfigError, match="made for clients"):
        trustwire.Server(both_usage_client).start("127.0.0.1:0")
    with pytest.raises(trustwire.ConfigError, match="role must be"):
        env.tls("frontend", role="proxy")
