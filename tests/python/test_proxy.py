"""Proxy mode from Python: routes started in-process, and identity tokens verified."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

import trustwire
from baidu_frames import read_frame, request_frame, varint
from trustwire.testing import TestPKI

KEY = b"0123456789abcdef0123456789abcdef"


def _upstream(seen: list[bytes]) -> int:
    """A plaintext baidu_std upstream that records each request's bytes and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while len(data) < 12 or len(data) < 12 + int.from_bytes(data[4:8], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            seen.append(data)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_in_process_proxy_injects_a_token_python_can_verify(tmp_path: Path) -> None:
    pki = TestPKI()
    server = pki.issue("proxy", spiffe_id="spiffe://example.org/ns/test/proxy", dns=["localhost"])
    client = pki.issue("caller", spiffe_id="spiffe://example.org/ns/test/caller")
    server.write(tmp_path)
    client.write(tmp_path)
    (tmp_path / "ca.pem").write_text(pki.ca_pem)
    (tmp_path / "token.key").write_bytes(KEY)
    (tmp_path / "server.toml").write_text(
        '[identity]\ncert = "proxy.pem"\nkey = "proxy.key"\n[trust]\nca = ["ca.pem"]\n'
    )
    seen: list[bytes] = []
    port = _upstream(seen)
    (tmp_path / "proxy.toml").write_text(
        "[[route]]\n"
        'name = "in"\nmode = "server"\nlisten = "127.0.0.1:0"\n'
        f'upstream = "127.0.0.1:{port}"\nprofile = "server.toml"\n'
        'protocol = "baidu_std"\nidentity_key_id = "k1"\nidentity_key_file = "token.key"\n'
    )
    proxy = trustwire.Proxy.start(tmp_path / "proxy.toml")
    try:
        host, _, listen_port = proxy.addresses()["in"].rpartition(":")
        import ssl

        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(str(tmp_path / "caller.pem"), str(tmp_path / "caller.key"))
        with socket.create_connection((host, int(listen_port))) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request_frame("example.EchoService", "Echo", b"\x0a\x02hi", 5))
                for _ in range(100):
                    if seen:
                        break
                    threading.Event().wait(0.05)
    finally:
        proxy.stop()
    assert seen, "the upstream got the request"
    frame = seen[0]
    start = frame.find(b"tw2;kid=k1;aud=in;")
    assert start > 0
    end = frame.find(b"\x0a\x02hi")
    token = frame[start : start + frame[start:].find(b";mac=") + 5 + 64]
    ident = trustwire.verify_identity_token(token, {"k1": KEY}, audience="in")
    assert ident.spiffe_id == "spiffe://example.org/ns/test/caller"
    assert ident.audience == "in"
    assert end > start

    with pytest.raises(trustwire.TokenBadMac) as bad:
        trustwire.verify_identity_token(token, {"k1": b"another secret of 32 bytes......"}, audience="in")
    assert bad.value.reason == "bad_mac"
    with pytest.raises(trustwire.TokenUnknownKey) as unknown:
        trustwire.verify_identity_token(token, {"k2": KEY}, audience="in")
    assert unknown.value.reason == "unknown_key"
    with pytest.raises(trustwire.TokenBadFormat) as garbled:
        trustwire.verify_identity_token(b"tw2;garbage", {"k1": KEY}, audience="in")
    assert garbled.value.reason == "bad_format"
    with pytest.raises(trustwire.TokenWrongAudience) as elsewhere:
        trustwire.verify_identity_token(token, {"k1": KEY}, audience="billing-in")
    assert "'in'" in str(elsewhere.value) and "'billing-in'" in str(elsewhere.value)
    with pytest.raises(trustwire.TokenUnsupportedVersion) as old:
        trustwire.verify_identity_token(b"tw1;kid=k1;spiffe=;fp=;na=1;iat=1;mac=00", {"k1": KEY}, audience="in")
    assert isinstance(old.value, trustwire.IdentityTokenError)
    with pytest.raises(TypeError):
        trustwire.verify_identity_token(token, {"k1": KEY})  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        trustwire.verify_identity_token(token, {"k1": KEY}, audience="in", max_age=0)


def test_a_token_older_than_max_age_is_refused() -> None:
    # A valid tw2 token issued ten minutes ago, MAC'd here the way the proxy does.
    import hashlib
    import hmac
    import time

    now = int(time.time())
    body = f"tw2;kid=k1;aud=in;spiffe=spiffe://example.org/web;fp={'ab' * 32};na={now + 3600};iat={now - 600}"
    token = f"{body};mac={hmac.new(KEY, body.encode(), hashlib.sha256).hexdigest()}".encode()
    with pytest.raises(trustwire.TokenTooOld) as old:
        trustwire.verify_identity_token(token, {"k1": KEY}, audience="in")
    assert old.value.reason == "too_old"
    assert trustwire.verify_identity_token(token, {"k1": KEY}, audience="in", max_age=3600).spiffe_id == (
        "spiffe://example.org/web"
    )


def test_a_server_with_token_keys_verifies_a_proxys_token_before_the_handler(tmp_path: Path) -> None:
    import hashlib
    import hmac
    import ssl
    import time

    pki = TestPKI()
    server_cred = pki.issue("svc", dns=["localhost"])
    proxy_cred = pki.issue("proxy", spiffe_id="spiffe://example.org/ns/test/proxy")
    server_cred.write(tmp_path)
    proxy_cred.write(tmp_path)
    (tmp_path / "ca.pem").write_text(pki.ca_pem)
    tls = trustwire.TlsConfig(cert=tmp_path / "svc.pem", key=tmp_path / "svc.key", ca=tmp_path / "ca.pem")
    server = trustwire.Server(tls, identity_token_keys={"k1": KEY}, identity_token_audience="in")
    ran: list[str] = []

    @server.method("example.EchoService", "Echo")
    def echo(payload: bytes, ctx: trustwire.CallContext) -> bytes:
        token = server.identity_token(ctx)
        who = "direct" if token is None else f"via proxy for {token.spiffe_id}"
        ran.append(who)
        return who.encode()

    now = int(time.time())
    body = f"tw2;kid=k1;aud=in;spiffe=spiffe://example.org/web;fp={'ab' * 32};na={now + 3600};iat={now}"
    good = f"{body};mac={hmac.new(KEY, body.encode(), hashlib.sha256).hexdigest()}".encode()
    forged = f"{body};mac={'0' * 64}".encode()
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(str(tmp_path / "proxy.pem"), str(tmp_path / "proxy.key"))
    with server:
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request_frame("example.EchoService", "Echo", b"", 1, authentication_data=good))
                assert read_frame(s)[1] == b"via proxy for spiffe://example.org/web"
                s.sendall(request_frame("example.EchoService", "Echo", b"", 2, authentication_data=forged))
                refused, _ = read_frame(s)
                assert b"identity token refused: bad_mac" in refused and varint(1004) in refused
                s.sendall(request_frame("example.EchoService", "Echo", b"", 3))
                assert read_frame(s)[1] == b"direct"
    assert ran == ["via proxy for spiffe://example.org/web", "direct"], "the forged call never reached the handler"
    with pytest.raises(ValueError, match="audience"):
        trustwire.Server(tls, identity_token_keys={"k1": KEY})
