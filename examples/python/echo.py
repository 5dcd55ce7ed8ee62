"""A Python echo server and a client calling it over mTLS, with a throwaway PKI.

    python examples/python/echo.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import trustwire
from trustwire.testing import TestPKI


def main() -> None:
    pki = TestPKI("example.org")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "ca.pem").write_text(pki.ca_pem)
    server_cert, server_key = pki.issue("echo", dns=["localhost"], ips=["127.0.0.1"]).write(tmp)
    client_cert, client_key = pki.issue("web").write(tmp)

    server_tls = trustwire.TlsConfig(cert=server_cert, key=server_key, ca=str(tmp / "ca.pem"),
                                     allow=["spiffe://example.org/ns/test/*"])
    server = trustwire.Server(server_tls)

    @server.method("example.EchoService", "Echo")
    def echo(request: bytes, ctx: trustwire.CallContext) -> tuple[bytes, bytes]:
        if not request:
            raise trustwire.RpcError(1003, "empty request")
        return request, ctx.attachment

    client_tls = trustwire.TlsConfig(cert=client_cert, key=client_key, ca=str(tmp / "ca.pem"), server_name="localhost")
    with server, trustwire.Client(f"127.0.0.1:{server.port}", client_tls) as client:
        print(client.call("example.EchoService", "Echo", b"hello", timeout=5))
        r = client.call_full("example.EchoService", "Echo", b"with", attachment=b"attachment")
        print(r.payload, r.attachment)
        try:
            client.call("example.EchoService", "Echo", b"")
        except trustwire.RpcError as e:
            print("refused:", e.code, e.text)

        async def many() -> list[bytes]:
            return await asyncio.gather(*(client.acall("example.EchoService", "Echo", b"%d" % i) for i in range(5)))

        print(asyncio.run(many()))


if __name__ == "__main__":
    main()
