"""trustwire from Python against grpcio, the usual choice for mTLS RPC in Python: an mTLS unary
echo with a Python server and a Python client on each side, 16-byte payloads, in alternating
rounds (grpcio, trustwire, grpcio, ...) so a busy machine affects both.

  1. sequential calls/s from one thread;
  2. asyncio, 64 concurrent calls in flight (grpc.aio vs Client.acall).

Targets: trustwire >= 3.5x grpcio sequential, >= 6x with asyncio. Prints a table and a BENCH_JSON line.

    make bench-python            (BENCH_SECONDS=N lengthens each measurement)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent import futures
from typing import Awaitable, Callable, Dict, List

import grpc  # type: ignore[import-untyped]

import trustwire
from trustwire.testing import TestPKI

SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = 3
PAYLOAD = b"0123456789abcdef"
IN_FLIGHT = 64


def grpc_server(pki: TestPKI, server: trustwire.testing.Credential) -> tuple[grpc.Server, int]:
    def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "example.EchoService", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    srv.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(server.key_pem.encode(), server.cert_pem.encode())],
        root_certificates=pki.ca_pem.encode(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    return srv, port


def grpc_creds(pki: TestPKI, client: trustwire.testing.Credential) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem.encode(),
        private_key=client.key_pem.encode(),
        certificate_chain=client.cert_pem.encode(),
    )


GRPC_OPTIONS = [("grpc.ssl_target_name_override", "localhost")]


def sequential(call: Callable[[], bytes]) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + SECONDS
    while time.perf_counter() < deadline:
        for _ in range(50):
            assert call() == PAYLOAD
        n += 50
    return n / (time.perf_counter() - start)


async def concurrent(call: Callable[[], Awaitable[bytes]]) -> float:
    count = 0
    stop = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            assert await call() == PAYLOAD
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return count / (time.perf_counter() - start)


def main() -> int:
    pki = TestPKI()
    server_cred = pki.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    client_cred = pki.issue("client", usage="client")
    tmp = tempfile.mkdtemp(prefix="tw-bench-")
    server_cred.write(tmp)
    client_cred.write(tmp)
    ca = os.path.join(tmp, "ca.pem")
    with open(ca, "w") as f:
        f.write(pki.ca_pem)

    gsrv, gport = grpc_server(pki, server_cred)
    gchannel = grpc.secure_channel(f"127.0.0.1:{gport}", grpc_creds(pki, client_cred), GRPC_OPTIONS)
    gecho = gchannel.unary_unary("/example.EchoService/Echo")

    tsrv = trustwire.Server(
        trustwire.TlsConfig(cert=os.path.join(tmp, "server.pem"), key=os.path.join(tmp, "server.key"), ca=ca)
    )

    @tsrv.method("example.EchoService", "Echo")
    def echo(request: bytes, ctx: trustwire.CallContext) -> bytes:
        return request

    tport = tsrv.start("127.0.0.1:0")
    tcfg = trustwire.TlsConfig(
        cert=os.path.join(tmp, "client.pem"), key=os.path.join(tmp, "client.key"), ca=ca, server_name="localhost"
    )
    tclient = trustwire.Client(f"127.0.0.1:{tport}", tcfg)

    def g_seq() -> bytes:
        return bytes(gecho(PAYLOAD))

    def t_seq() -> bytes:
        return tclient.call("example.EchoService", "Echo", PAYLOAD)

    async def run_async() -> Dict[str, List[float]]:
        out: Dict[str, List[float]] = {"grpc": [], "trustwire": []}
        achannel = grpc.aio.secure_channel(f"127.0.0.1:{gport}", grpc_creds(pki, client_cred), GRPC_OPTIONS)
        aecho = achannel.unary_unary("/example.EchoService/Echo")

        async def g_call() -> bytes:
            return bytes(await aecho(PAYLOAD))

        async def t_call() -> bytes:
            return await tclient.acall("example.EchoService", "Echo", PAYLOAD)

        await g_call()
        await t_call()
        for _ in range(ROUNDS):
            out["grpc"].append(await concurrent(g_call))
            out["trustwire"].append(await concurrent(t_call))
        await achannel.close()
        return out

    g_seq()
    t_seq()
    seq: Dict[str, List[float]] = {"grpc": [], "trustwire": []}
    for _ in range(ROUNDS):
        seq["grpc"].append(sequential(g_seq))
        seq["trustwire"].append(sequential(t_seq))
    conc = asyncio.run(run_async())

    tclient.close()
    tsrv.stop()
    gchannel.close()
    gsrv.stop(None)

    def median(xs: List[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    rows = [
        ("1. sequential calls/s, one thread", median(seq["grpc"]), median(seq["trustwire"]), 3.5),
        (f"2. asyncio, {IN_FLIGHT} concurrent calls", median(conc["grpc"]), median(conc["trustwire"]), 6.0),
    ]
    print(f"trustwire vs grpcio {grpc.__version__}, Python server and client each, mTLS, 16-byte echo; median of {ROUNDS} alternating rounds")
    print()
    print(f"{'scenario':<40} {'grpcio':>10} {'trustwire':>10} {'ratio':>7} {'target':>7} {'met?':>5}")
    print("-" * 84)
    figures = {}
    for i, (name, g, t, target) in enumerate(rows, 1):
        ratio = t / g
        print(f"{name:<40} {g:>10.0f} {t:>10.0f} {ratio:>7.2f} {'>=' + format(target, 'g'):>7} {'yes' if ratio >= target else 'MISS':>5}")
        figures[f"s{i}_grpc"] = round(g, 1)
        figures[f"s{i}_trustwire"] = round(t, 1)
        figures[f"s{i}_ratio"] = round(ratio, 3)
    print("-" * 84)
    print("BENCH_JSON " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
