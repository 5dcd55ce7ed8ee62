"""baidu_std frames built and read by hand, for tests that speak to trustwire through the stdlib
ssl module (a client trustwire did not write)."""

from __future__ import annotations

import ssl
import struct
from typing import Optional, Tuple


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


def request_frame(
    service: str, method: str, payload: bytes, correlation_id: int, authentication_data: Optional[bytes] = None
) -> bytes:
    # RpcMeta { request: RpcRequestMeta { service_name = 1, method_name = 2 }, correlation_id = 4,
    #           authentication_data = 7 }
    request_meta = length_delimited(1, service.encode()) + length_delimited(2, method.encode())
    meta = length_delimited(1, request_meta) + field(4, 0, varint(correlation_id))
    if authentication_data is not None:
        meta += length_delimited(7, authentication_data)
    return b"PRPC" + struct.pack(">II", len(meta) + len(payload), len(meta)) + meta + payload


def read_frame(sock: ssl.SSLSocket) -> Tuple[bytes, bytes]:
    """One whole frame: (meta, payload + attachment)."""

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
