"""A Python trustwire server meets a client trustwire did not write: the stdlib ssl module
sending a baidu_std frame built by hand."""

from __future__ import annotations

import socket
import ssl

import trustwire
from baidu_frames import field, read_frame, request_frame, varint
from conftest import Env


def test_stdlib_ssl_client_calls_python_server(env: Env) -> None:
    server = trustwire.Server(env.tls("server"))

    @server.method("example.EchoService", "Echo")
    def echo(request: bytes, ctx: trustwire.CallContext) -> bytes:
        return b"hello " + (ctx.peer.spiffe_id or "?").encode() + b": " + request

    cert, key = env.files("stdlib")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(env.ca_path)
    ctx.load_cert_chain(cert, key)
    with server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == "TLSv1.3"
                tls.sendall(request_frame("example.EchoService", "Echo", b"frame", 7))
                meta, payload = read_frame(tls)
    assert payload == b"hello spiffe://example.org/ns/test/stdlib: frame"
    # correlation_id 7 comes back (field 4, varint)
    assert field(4, 0, varint(7)) in meta


def test_stdlib_ssl_client_without_certificate_is_refused(env: Env, echo_server: trustwire.Server) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(env.ca_path)
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            try:
                tls.sendall(request_frame("example.EchoService", "Echo", b"x", 1))
                data = tls.recv(12)
            except ssl.SSLError as e:
                assert "CERTIFICATE_REQUIRED" in str(e).upper()
            else:
                assert data == b""
