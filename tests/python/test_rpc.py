"""Python client and server against each other and against the Rust `trustwire serve-echo`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from typing import Tuple

import pytest

import trustwire
from baidu_frames import read_frame, request_frame
from conftest import ECHO, Env, target_binary


def test_python_client_python_server_echo(env: Env, echo_server: trustwire.Server) -> None:
    with trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client")) as client:
        assert client.call(*ECHO, b"hello") == b"hello"
        r = client.call_full(*ECHO, b"with attachment", attachment=b"att", timeout=5)
        assert r == trustwire.Response(b"with attachment", b"att")


def test_handler_sees_peer_identity_and_call_context(env: Env) -> None:
    seen = {}

    server = trustwire.Server(env.tls("server"))

    @server.method("example.EchoService", "Who")
    def who(request: bytes, ctx: trustwire.CallContext) -> bytes:
        seen["ctx"] = ctx
        seen["peer"] = ctx.peer
        return (ctx.peer.spiffe_id or "").encode()

    with server:
        client_tls = env.tls("frontend")
        with trustwire.Client(f"127.0.0.1:{server.port}", client_tls) as client:
            before = time.time()
            answer = client.call("example.EchoService", "Who", b"", timeout=3, attachment=b"a", log_id=42)
    assert answer == b"spiffe://example.org/ns/test/frontend"
    peer = seen["peer"]
    assert peer.serial == client_tls.serial
    assert "localhost" in peer.dns_sans
    assert len(peer.fingerprint) == 64
    assert abs(peer.not_after - (client_tls.not_after or 0)) < 1
    ctx = seen["ctx"]
    assert (ctx.attachment, ctx.log_id, ctx.service, ctx.method) == (b"a", 42, "example.EchoService", "Who")
    assert ctx.deadline is not None and before < ctx.deadline <= time.time() + 3.5


def test_async_handler_and_acall(env: Env) -> None:
    server = trustwire.Server(env.tls("server"))

    @server.method("example.EchoService", "Echo")
    async def slow_echo(request: bytes, ctx: trustwire.CallContext) -> Tuple[bytes, bytes]:
        await asyncio.sleep(0.01)
        return request.upper(), b"async"

    with server:
        client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))

        async def main() -> trustwire.Response:
            return await client.acall_full(*ECHO, b"abc")

        assert asyncio.run(main()) == trustwire.Response(b"ABC", b"async")
        client.close()


def test_rpc_error_and_handler_exception(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    server = trustwire.Server(env.tls("server"))

    @server.method("example.EchoService", "Refuse")
    def refuse(request: bytes, ctx: trustwire.CallContext) -> bytes:
        raise trustwire.RpcError(1003, "bad request: no name")

    @server.method("example.EchoService", "Crash")
    def crash(request: bytes, ctx: trustwire.CallContext) -> bytes:
        raise ValueError("boom")

    server.register(*ECHO, lambda p, c: p)
    with server, trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
        with pytest.raises(trustwire.RpcError) as e:
            client.call("example.EchoService", "Refuse", b"")
        # the server adds brpc's "[ip:port][E<code>]" prefix, as a brpc server does
        assert e.value.code == 1003
        assert e.value.text.endswith("][E1003]bad request: no name")
        with caplog.at_level(logging.ERROR, logger="trustwire"):
            for _ in range(3):
                with pytest.raises(trustwire.RpcError) as e:
                    client.call("example.EchoService", "Crash", b"")
                assert e.value.code == 2001
                assert "ValueError" in e.value.text
        assert any("boom" in (r.exc_text or "") for r in caplog.records)
        # the server keeps serving
        assert client.call(*ECHO, b"still here") == b"still here"
        with pytest.raises(trustwire.RpcError) as e:
            client.call("example.EchoService", "Nope", b"")
        assert e.value.code == 1002


def test_thousand_concurrent_acalls(env: Env, echo_server: trustwire.Server) -> None:
    client = trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client"))

    async def main() -> None:
        payloads = [f"call {i}".encode() for i in range(1000)]
        answers = await asyncio.gather(*(client.acall(*ECHO, p, timeout=30) for p in payloads))
        assert answers == payloads

    asyncio.run(main())
    client.close()


def test_timeout_is_timeout_error(env: Env) -> None:
    server = trustwire.Server(env.tls("server"))
    server.register("example.EchoService", "Sleep", lambda p, c: time.sleep(1.0) or b"late")
    with server, trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
        with pytest.raises(TimeoutError) as e:
            client.call("example.EchoService", "Sleep", b"", timeout=0.2)
        assert isinstance(e.value, trustwire.Timeout)


def test_closed_client_raises_transport_error(env: Env, echo_server: trustwire.Server) -> None:
    client = trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client"))
    assert client.call(*ECHO, b"x") == b"x"
    client.close()
    with pytest.raises(trustwire.TransportError):
        client.call(*ECHO, b"x")


def test_payload_with_serialize_to_string_and_response_type(env: Env, echo_server: trustwire.Server) -> None:
    class Msg:
        def __init__(self, data: bytes = b"") -> None:
            self.data = data

        def SerializeToString(self) -> bytes:  # noqa: N802
            return self.data

        def ParseFromString(self, data: bytes) -> None:  # noqa: N802
            self.data = data

    with trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client")) as client:
        answer = client.call(*ECHO, Msg(b"proto bytes"), response_type=Msg)
        assert isinstance(answer, Msg) and answer.data == b"proto bytes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not os.path.exists(target_binary()), reason="build the trustwire binary first (make build)")
def test_python_client_rust_server(env: Env) -> None:
    cert, key = env.files("echo")
    port = free_port()
    proc = subprocess.Popen(
        [target_binary(), "serve-echo", "--listen", f"127.0.0.1:{port}", "--cert", cert, "--key", key, "--ca", env.ca_path,
         "--allow", "spiffe://example.org/ns/test/*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "serving" in line, line
        with trustwire.Client(f"127.0.0.1:{port}", env.tls("client")) as client:
            r = client.call_full(*ECHO, b"to rust", attachment=b"att")
            assert r == trustwire.Response(b"to rust", b"att")
    finally:
        proc.terminate()
        proc.wait(10)


def test_handler_calls_another_server(env: Env, echo_server: trustwire.Server) -> None:
    # A blocking call made from inside a handler (a thread the runtime owns) must not deadlock.
    backend = trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("frontend-to-backend"))
    front = trustwire.Server(env.tls("frontend"))

    @front.method("example.Frontend", "Relay")
    def relay(request: bytes, ctx: trustwire.CallContext) -> bytes:
        return b"relayed " + backend.call(*ECHO, request, timeout=5)

    with front, trustwire.Client(f"127.0.0.1:{front.port}", env.tls("client")) as client:
        assert client.call("example.Frontend", "Relay", b"x") == b"relayed x"

        async def many() -> None:
            answers = await asyncio.gather(*(client.acall("example.Frontend", "Relay", b"%d" % i) for i in range(50)))
            assert answers == [b"relayed %d" % i for i in range(50)]

        asyncio.run(many())
    backend.close()


def test_cancelled_acall_does_not_disturb_the_client(env: Env) -> None:
    server = trustwire.Server(env.tls("server"))
    server.register("example.EchoService", "Slow", lambda p, c: time.sleep(0.5) or p)
    server.register(*ECHO, lambda p, c: p)
    with server:
        client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.acall("example.EchoService", "Slow", b"x", timeout=10), 0.1)
            assert await client.acall(*ECHO, b"after") == b"after"

        asyncio.run(main())
        client.close()


def test_serve_forever_and_wait_for_termination_return_once_the_server_stops(env: Env) -> None:
    import threading

    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, lambda p, c: p)
    assert server.wait_for_termination(timeout=0) is False, "a server never started is not running"
    server.start("127.0.0.1:0")
    assert server.wait_for_termination(timeout=0.05) is True, "still serving when the timeout passes"
    with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
        assert client.call(*ECHO, b"x") == b"x"
    threading.Timer(0.2, server.stop).start()
    assert server.wait_for_termination(timeout=10) is False

    again = trustwire.Server(env.tls("server"))
    again.register(*ECHO, lambda p, c: p)
    threading.Timer(0.3, again.stop).start()
    again.serve_forever("127.0.0.1:0")  # returns once stop() ran
    assert not again._native.running


def test_a_handler_and_the_call_hook_read_the_requests_authentication_data(env: Env) -> None:
    import ssl

    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, lambda p, c: (c.authentication_data or b"<none>", b""))
    hooked: list = []

    @server.authorize
    def authorize(peer: trustwire.PeerIdentity, service: str, method: str, metadata: trustwire.CallMetadata) -> bool:
        hooked.append(metadata.authentication_data)
        return True

    with server:
        cert, key = env.files("client")
        ctx = ssl.create_default_context(cafile=env.ca_path)
        ctx.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request_frame("example.EchoService", "Echo", b"", 3, authentication_data=b"tw2;kid=k1;opaque"))
                _, payload = read_frame(s)
    assert payload == b"tw2;kid=k1;opaque"
    assert hooked == [b"tw2;kid=k1;opaque"]


def _server_handshakes() -> int:
    total = 0
    for line in trustwire.metrics_text().splitlines():
        if line.startswith("trustwire_handshakes_total{") and 'role="server"' in line and 'result="accepted"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_blocking_calls_get_a_connection_per_thread_up_to_a_bound(env: Env, echo_server: trustwire.Server) -> None:
    import threading

    client = trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client"))
    before = _server_handshakes()
    threads_n, calls = 12, 20
    all_started = threading.Barrier(threads_n)
    all_done = threading.Barrier(threads_n)
    answers: dict = {}

    def run(i: int) -> None:
        got = [client.call(*ECHO, f"{i}-0".encode())]
        # Every thread is alive (and holds its connection) before any makes its next call.
        all_started.wait(30)
        got += [client.call(*ECHO, f"{i}-{k}".encode()) for k in range(1, calls)]
        answers[i] = got
        # A thread that exits frees its place for a thread still calling: none exits early.
        all_done.wait(30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(threads_n):
        assert answers.get(i) == [f"{i}-{k}".encode() for k in range(calls)]
    # Eight threads had connections of their own; the other four shared the client's one.
    assert _server_handshakes() - before == 9

    # Those threads have exited: the next thread gets a connection of its own, and keeps it.
    # (join() can return a moment before a thread's last destructors have run, and until then
    # its place is taken: a call in that moment goes over the shared connection.)
    deadline = time.monotonic() + 10
    while _server_handshakes() - before < 10 and time.monotonic() < deadline:
        assert client.call(*ECHO, b"main") == b"main"
        time.sleep(0.01)
    assert _server_handshakes() - before == 10
    for _ in range(5):
        assert client.call(*ECHO, b"again") == b"again"
    assert _server_handshakes() - before == 10
    client.close()
    with pytest.raises(trustwire.TransportError):
        client.call(*ECHO, b"closed")


def test_a_thread_connection_that_the_server_closed_is_replaced(env: Env) -> None:
    # The server goes away while the calling thread is between calls (its connection unread):
    # the next call finds the connection closed and goes over a new one, to the new server.
    first = trustwire.Server(env.tls("server"))
    first.register(*ECHO, lambda p, c: b"first server")
    first.start("127.0.0.1:0")
    port = first.port
    with trustwire.Client(f"127.0.0.1:{port}", env.tls("client")) as client:
        assert client.call(*ECHO, b"x") == b"first server"
        first.stop()
        second = trustwire.Server(env.tls("server"))
        second.register(*ECHO, lambda p, c: b"second server")
        second.start(f"127.0.0.1:{port}")
        with second:
            assert client.call(*ECHO, b"x", timeout=10) == b"second server"


@pytest.mark.skipif(not os.path.exists(target_binary()), reason="build the trustwire binary first (make build)")
def test_a_thread_connection_to_a_server_that_was_killed_is_replaced(env: Env) -> None:
    # No close_notify this time: the server process is killed while the thread is between calls.
    # The next call notices the dead connection before it sends, and goes over a new one.
    cert, key = env.files("echo")
    port = free_port()

    def start() -> "subprocess.Popen[bytes]":
        proc = subprocess.Popen(
            [target_binary(), "serve-echo", "--listen", f"127.0.0.1:{port}", "--cert", cert, "--key", key, "--ca",
             env.ca_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and "serving" in proc.stdout.readline().decode()
        return proc

    proc = start()
    try:
        with trustwire.Client(f"127.0.0.1:{port}", env.tls("client")) as client:
            assert client.call(*ECHO, b"one") == b"one"
            proc.kill()
            proc.wait(10)
            proc = start()
            assert client.call(*ECHO, b"two", timeout=10) == b"two"
    finally:
        proc.kill()
        proc.wait(10)


def test_blocking_handlers_run_side_by_side(env: Env) -> None:
    """A handler that waits holds only its own thread: sixteen can wait for each other."""
    import threading

    together = threading.Barrier(16, timeout=10)
    server = trustwire.Server(env.tls("server"))

    @server.method(*ECHO)
    def wait_for_the_others(payload: bytes, ctx: trustwire.CallContext) -> bytes:
        together.wait()
        return payload

    server.start("127.0.0.1:0")
    client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))

    async def main() -> None:
        payloads = [f"call {i}".encode() for i in range(16)]
        assert await asyncio.gather(*(client.acall(*ECHO, p, timeout=20) for p in payloads)) == payloads

    asyncio.run(main())
    client.close()
    server.stop()


def test_a_handler_threads_thread_local_state_lasts_between_calls(env: Env) -> None:
    """What a handler keeps in threading.local (a database connection, say) is there for the
    next call that runs on the same thread, as on any long-lived worker thread."""
    import threading

    local = threading.local()
    server = trustwire.Server(env.tls("server"))

    @server.method(*ECHO)
    def count(payload: bytes, ctx: trustwire.CallContext) -> bytes:
        local.calls = getattr(local, "calls", 0) + 1
        return str(local.calls).encode()

    server.start("127.0.0.1:0")
    with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
        counts = [int(client.call(*ECHO, b"")) for _ in range(50)]
    server.stop()
    assert max(counts) > 1, f"every call found the thread's state empty: {counts}"


def _holding_server(env: Env) -> "Tuple[trustwire.Server, threading.Event]":
    """A started server with the echo method and `Hold`, which answers once `release` is set."""
    release = threading.Event()
    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, lambda p, c: p)
    server.register("example.EchoService", "Hold", lambda p, c: release.wait(30) and p)
    server.start("127.0.0.1:0")
    return server, release


def test_close_fails_a_blocking_call_in_flight_on_another_thread(env: Env) -> None:

    server, release = _holding_server(env)
    try:
        client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))
        assert client.call(*ECHO, b"warm") == b"warm"
        outcome: list = []

        def hold() -> None:
            try:
                client.call("example.EchoService", "Hold", b"x", timeout=60)
                outcome.append("answered")
            except trustwire.TransportError as e:
                outcome.append(e)

        caller = threading.Thread(target=hold)
        caller.start()
        time.sleep(0.3)
        client.close()
        caller.join(10)
        # Ended by the close, long before the handler lets go.
        assert not caller.is_alive() and len(outcome) == 1 and isinstance(outcome[0], trustwire.TransportError)
        assert "closed" in str(outcome[0])
        with pytest.raises(trustwire.TransportError):
            client.call(*ECHO, b"later")
    finally:
        release.set()
        server.stop()


def test_a_signal_handler_can_call_while_its_thread_waits_on_a_call(env: Env) -> None:
    # The handler runs while the main thread's own connection is busy with the outer call: the
    # inner call goes over the shared connection instead of waiting for the outer one.
    import faulthandler
    import signal

    server, release = _holding_server(env)
    inner: list = []

    def on_alarm(signum: int, frame: object) -> None:
        inner.append(client.call(*ECHO, b"inner", timeout=10))
        release.set()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
            assert client.call(*ECHO, b"warm") == b"warm"
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            assert client.call("example.EchoService", "Hold", b"outer", timeout=60) == b"outer"
            assert inner == [b"inner"]
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        server.stop()


def test_a_threads_own_connection_ends_with_close_notify_when_the_thread_exits(env: Env) -> None:
    # The server is Python's ssl module, so what reaches it is seen as it is: a close_notify
    # reads as b"", a connection dropped without one raises SSLEOFError.
    import ssl

    from baidu_frames import length_delimited, read_frame, varint

    cert, key = env.files("server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(env.ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {}

    def correlation_id(meta: bytes) -> int:
        i = 0
        while i < len(meta):
            key, i = _read_varint(meta, i)
            if key & 7 == 0:
                value, i = _read_varint(meta, i)
                if key >> 3 == 4:
                    return value
            else:
                n, i = _read_varint(meta, i)
                i += n
        raise AssertionError("no correlation_id")

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            meta, body = read_frame(conn)
            answer = length_delimited(2, b"") + varint(4 << 3) + varint(correlation_id(meta))
            conn.sendall(b"PRPC" + struct.pack(">II", len(answer) + len(body), len(answer)) + answer + body)
            conn.settimeout(20)
            try:
                seen["after"] = conn.recv(1)
            except ssl.SSLError as e:
                seen["after"] = e

    server = threading.Thread(target=serve)
    server.start()
    client = trustwire.Client(f"127.0.0.1:{port}", env.tls("client"))
    caller = threading.Thread(target=lambda: seen.setdefault("answer", client.call(*ECHO, b"hello")))
    caller.start()
    caller.join(20)
    server.join(30)
    listener.close()
    assert seen.get("answer") == b"hello"
    assert seen.get("after") == b"", f"the thread's exit should end its connection with close_notify: {seen.get('after')!r}"
    client.close()


def _read_varint(data: bytes, i: int) -> "Tuple[int, int]":
    value, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
