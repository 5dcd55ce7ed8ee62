"""A Python trustwire server meets a client trustwire did not write: the stdlib ssl module
sending a baidu_std frame built by hand."""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Tuple

import trustwire
from conftest import Env


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, wire_type: int, value: bytes) -> bytes:
    return varint(number << 3 | wire_type) + value


def length_delimited(number: int, data: bytes) -> bytes:
    return field(number, 2, varint(len(data)) + data)


def request_frame(service: str, method: str, payload: bytes, correlation_id: int) -> bytes:
    # RpcMeta { request: RpcRequestMeta { service_name = 1, method_name = 2 }, correlation_id = 4 }
    request_meta = length_delimited(1, service.encode()) + length_delimited(2, method.encode())
    meta = length_delimited(1, request_meta) + field(4, 0, varint(correlation_id))
    return b"PRPC" + struct.pack(">II", len(meta) + len(payload), len(meta)) + meta + payload


def read_frame(sock: ssl.SSLSocket) -> Tuple[bytes, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed mid-frame"
            buf += chunk
        return buf

    header = exactly(12)
    assert header[:4] == b"PRPC"
    body_size, meta_size = struct.unpack(">II", header[4:])
    body = exactly(body_size)
    return body[:meta_size], body[meta_size:]


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
