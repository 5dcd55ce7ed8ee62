"""Python clients against the same `trustwire serve-echo`: trustwire's Client against what a
Python user writes today (stdlib ssl and a hand-written baidu_std client), in alternating
rounds so a busy machine affects both. Prints a table and a BENCH_JSON line of ratios.

    make bench-python            (BENCH_SECONDS=N lengthens each measurement)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import trustwire
from trustwire.testing import TestPKI

SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = 3
SERVICE, METHOD = "example.EchoService", "Echo"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def ld(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


class StdlibClient:
    """The baseline: one TLS connection, sequential request/response framing by hand."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.cid = 0

    def call(self, payload: bytes) -> bytes:
        self.cid += 1
        meta = ld(1, ld(1, SERVICE.encode()) + ld(2, METHOD.encode())) + varint(4 << 3) + varint(self.cid)
        self.sock.sendall(b"PRPC" + struct.pack(">II", len(meta) + len(payload), len(meta)) + meta + payload)
        header = self._exactly(12)
        body_size, meta_size = struct.unpack(">II", header[4:])
        body = self._exactly(body_size)
        return body[meta_size:]

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


def rate(op: Callable[[], None]) -> float:
    n, start = 0, time.perf_counter()
    end = start + SECONDS
    while time.perf_counter() < end:
        for _ in range(10):
            op()
        n += 10
    return n / (time.perf_counter() - start)


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "release", "trustwire")
    tmp = tempfile.mkdtemp()
    pki = TestPKI()
    ca = os.path.join(tmp, "ca.pem")
    with open(ca, "w") as f:
        f.write(pki.ca_pem)
    scert, skey = pki.issue("echo", dns=["localhost"], ips=["127.0.0.1"]).write(tmp)
    ccert, ckey = pki.issue("client", dns=["localhost"]).write(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "serve-echo", "--listen", f"127.0.0.1:{port}", "--cert", scert, "--key", skey,
                             "--ca", ca], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and b"serving" in proc.stdout.readline()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(ccert, ckey)
        tls = trustwire.TlsConfig(cert=ccert, key=ckey, ca=ca, server_name="localhost")
        payload = b"x" * 100
        big = b"z" * (1 << 20)

        results: Dict[str, Tuple[List[float], List[float]]] = {
            "sequential calls/s": ([], []),
            "sequential 1 MiB echo calls/s": ([], []),
            "new connections/s": ([], []),
            "64 concurrent calls/s (asyncio vs 64 threads)": ([], []),
        }
        std = StdlibClient(port, ctx)
        tw = trustwire.Client(f"127.0.0.1:{port}", tls)

        def std_connect() -> None:
            c = StdlibClient(port, ctx)
            c.call(payload)
            c.close()

        def tw_connect() -> None:
            with trustwire.Client(f"127.0.0.1:{port}", tls) as c:
                c.call(SERVICE, METHOD, payload)

        def std_concurrent() -> float:
            import threading

            clients = [StdlibClient(port, ctx) for _ in range(64)]
            counts = [0] * 64
            stop = time.perf_counter() + SECONDS

            def run(i: int) -> None:
                while time.perf_counter() < stop:
                    clients[i].call(payload)
                    counts[i] += 1

            threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for c in clients:
                c.close()
            return sum(counts) / (time.perf_counter() - start)

        def tw_concurrent() -> float:
            async def worker(stop: float) -> int:
                n = 0
                while time.perf_counter() < stop:
                    await tw.acall(SERVICE, METHOD, payload)
                    n += 1
                return n

            async def run() -> float:
                start = time.perf_counter()
                counts = await asyncio.gather(*(worker(start + SECONDS) for _ in range(64)))
                return sum(counts) / (time.perf_counter() - start)

            return asyncio.run(run())

        for _ in range(ROUNDS):
            results["sequential calls/s"][0].append(rate(lambda: std.call(payload) and None))
            results["sequential calls/s"][1].append(rate(lambda: tw.call(SERVICE, METHOD, payload) and None))
            results["sequential 1 MiB echo calls/s"][0].append(rate(lambda: std.call(big) and None))
            results["sequential 1 MiB echo calls/s"][1].append(rate(lambda: tw.call(SERVICE, METHOD, big) and None))
            results["new connections/s"][0].append(rate(std_connect))
            results["new connections/s"][1].append(rate(tw_connect))
            results["64 concurrent calls/s (asyncio vs 64 threads)"][0].append(std_concurrent())
            results["64 concurrent calls/s (asyncio vs 64 threads)"][1].append(tw_concurrent())
        std.close()
        tw.close()
    finally:
        proc.terminate()
        proc.wait(10)

    print(f"{'benchmark':48} {'stdlib ssl':>12} {'trustwire':>12} {'ratio':>7}")
    out = {}
    for name, (base, ours) in results.items():
        b, o = sorted(base)[len(base) // 2], sorted(ours)[len(ours) // 2]
        out[name] = {"stdlib_ssl": round(b, 1), "trustwire": round(o, 1), "ratio": round(o / b, 2)}
        print(f"{name:48} {b:12.0f} {o:12.0f} {o / b:6.2f}x")
    print("BENCH_JSON " + json.dumps({"bench": "python_client", "seconds": SECONDS, "python": sys.version.split()[0], "results": out}))


if __name__ == "__main__":
    main()
