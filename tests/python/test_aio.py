"""trustwire.aio.Server: coroutine handlers in the application's own event loop."""

from __future__ import annotations

import asyncio
import typing
import time

import pytest

import trustwire
import trustwire.aio
from conftest import ECHO, Env


def test_handlers_await_the_applications_own_event_and_queue(env: Env) -> None:
    async def main() -> None:
        ready = asyncio.Event()  # bound to this loop: awaiting it elsewhere would raise
        jobs: "asyncio.Queue[bytes]" = asyncio.Queue()
        server = trustwire.aio.Server(env.tls("server"))

        @server.method(*ECHO)
        async def echo(payload: bytes, ctx: trustwire.CallContext) -> bytes:
            await ready.wait()
            await jobs.put(payload)
            return payload + b"|" + ctx.peer.spiffe_id.encode()  # type: ignore[union-attr]

        server.register("example.EchoService", "Sync", lambda p, c: b"sync " + p)
        async with server:
            await server.start("127.0.0.1:0")
            with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
                call = asyncio.ensure_future(client.acall(*ECHO, b"hi", timeout=5))
                await asyncio.sleep(0.1)
                assert not call.done(), "the handler waits for the application's event"
                ready.set()
                assert await call == b"hi|spiffe://example.org/ns/test/client"
                assert await jobs.get() == b"hi"
                assert await client.acall("example.EchoService", "Sync", b"x", timeout=5) == b"sync x"
        assert not server._server._native.running

    asyncio.run(main())


def test_a_thousand_concurrent_calls(env: Env) -> None:
    async def main() -> None:
        server = trustwire.aio.Server(env.tls("server"))
        in_flight = [0, 0]

        @server.method(*ECHO)
        async def echo(payload: bytes, ctx: trustwire.CallContext) -> bytes:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            await asyncio.sleep(0.05)
            in_flight[0] -= 1
            return payload

        await server.start("127.0.0.1:0")
        try:
            with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
                answers = await asyncio.gather(*(client.acall(*ECHO, b"%d" % i, timeout=30) for i in range(1000)))
            assert answers == [b"%d" % i for i in range(1000)]
            assert in_flight[1] > 50, f"handlers ran concurrently in the loop (peak {in_flight[1]})"
        finally:
            await server.stop()
        await server.wait_closed()

    asyncio.run(main())


def test_a_handler_past_the_callers_deadline_is_cancelled(env: Env) -> None:
    async def main() -> None:
        server = trustwire.aio.Server(env.tls("server"))
        cancelled = asyncio.Event()

        @server.method(*ECHO)
        async def slow(payload: bytes, ctx: trustwire.CallContext) -> bytes:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        await server.start("127.0.0.1:0")
        try:
            with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
                started = time.monotonic()
                with pytest.raises(trustwire.TrustwireError):
                    await client.acall(*ECHO, b"x", timeout=0.3)
                await asyncio.wait_for(cancelled.wait(), 5)
                assert time.monotonic() - started < 5
        finally:
            await server.stop()

    asyncio.run(main())


def test_stop_with_grace_cancels_handlers_still_running(env: Env) -> None:
    async def main() -> None:
        server = trustwire.aio.Server(env.tls("server"))
        entered, cancelled = asyncio.Event(), asyncio.Event()

        @server.method(*ECHO)
        async def forever(payload: bytes, ctx: trustwire.CallContext) -> bytes:
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        await server.start("127.0.0.1:0")
        with trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
            call = asyncio.ensure_future(client.acall(*ECHO, b"x"))
            await asyncio.wait_for(entered.wait(), 5)
            await asyncio.wait_for(server.stop(grace=0.2), 10)
            assert cancelled.is_set()
            with pytest.raises(trustwire.TrustwireError):
                await call

    asyncio.run(main())


def test_a_handler_whose_caller_goes_away_is_cancelled(env: Env) -> None:
    async def main() -> None:
        server = trustwire.aio.Server(env.tls("server"))
        entered, cancelled = asyncio.Event(), asyncio.Event()
        seen_by_ctx = []

        @server.method(*ECHO)
        async def forever(payload: bytes, ctx: trustwire.CallContext) -> bytes:
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen_by_ctx.append(ctx.cancelled())
                cancelled.set()
                raise
            return payload

        await server.start("127.0.0.1:0")
        try:
            client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))
            call = asyncio.ensure_future(client.acall(*ECHO, b"x"))
            await asyncio.wait_for(entered.wait(), 5)
            client.close()  # no deadline: only the closed connection can end the handler
            await asyncio.wait_for(cancelled.wait(), 10)
            assert seen_by_ctx == [True]
            with pytest.raises(trustwire.TrustwireError):
                await call
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_sync_handler_can_see_its_caller_go_away(env: Env) -> None:
    import threading

    server = trustwire.Server(env.tls("server"))
    entered, gone = threading.Event(), threading.Event()
    polled = []

    @server.method(*ECHO)
    def wait_for_caller(payload: bytes, ctx: trustwire.CallContext) -> bytes:
        polled.append(ctx.cancelled())
        ctx.add_cancel_callback(gone.set)
        entered.set()
        gone.wait(30)
        polled.append(ctx.cancelled())
        return payload

    server.start("127.0.0.1:0")
    try:
        client = trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client"))
        pending = threading.Thread(target=lambda: _swallow(lambda: client.call(*ECHO, b"x")))
        pending.start()
        assert entered.wait(10)
        client.close()
        assert gone.wait(10), "the cancel callback ran once the caller's connection closed"
        pending.join(10)
        assert polled[0] is False
    finally:
        server.stop()
    assert polled == [False, True]


def _swallow(fn: "typing.Callable[[], object]") -> None:
    try:
        fn()
    except trustwire.TrustwireError:
        pass
