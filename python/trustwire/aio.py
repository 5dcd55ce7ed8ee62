"""An asyncio-native server: ``async def`` handlers run in the application's own event loop.

The model is ``grpc.aio.server()``::

    server = trustwire.aio.Server(tls)

    @server.method("example.EchoService", "Echo")
    async def echo(payload: bytes, ctx: trustwire.CallContext) -> bytes:
        await app_ready.wait()          # the application's own asyncio objects work here
        return payload

    async with server:                  # or: await server.start(addr) ... await server.stop(grace)
        await server.start("0.0.0.0:8443")
        await server.wait_closed()

Coroutine handlers run in the loop that called :meth:`Server.start`; one past the caller's
deadline is cancelled and the caller answered ERPCTIMEDOUT (1008), and one whose caller's
connection closes is cancelled too (``ctx.cancelled()`` is then True). Plain (sync) handlers
still work and run on trustwire's worker threads, never blocking the loop; they can poll
``ctx.cancelled()`` or register ``ctx.add_cancel_callback(fn)``. TLS, verification, policy
and hooks are the core's, as for :class:`trustwire.Server`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Type

from . import _rpc
from ._native import CallContext, TlsConfig

if TYPE_CHECKING:
    from . import IdentityToken

__all__ = ["Server"]


class Server:
    """An mTLS baidu_std server whose coroutine handlers run in the caller's event loop."""

    def __init__(
        self,
        tls: TlsConfig,
        *,
        identity_token_keys: Optional[Mapping[str, bytes]] = None,
        identity_token_audience: Optional[str] = None,
        identity_token_max_age: float = 300.0,
    ) -> None:
        """The identity-token options are :class:`trustwire.Server`'s."""
        self._server = _rpc.Server(
            tls,
            identity_token_keys=identity_token_keys,
            identity_token_audience=identity_token_audience,
            identity_token_max_age=identity_token_max_age,
        )
        self._closed: Optional[asyncio.Event] = None

    def method(self, service: str, method: str) -> Callable[[_rpc.H], _rpc.H]:
        """Decorator registering a handler (``async def`` or plain) for ``service``/``method``."""
        return self._server.method(service, method)

    def register(self, service: str, method: str, handler: _rpc.Handler) -> None:
        self._server.register(service, method, handler)

    def identity_token(self, ctx: CallContext) -> "Optional[IdentityToken]":
        """As :meth:`trustwire.Server.identity_token`."""
        return self._server.identity_token(ctx)

    def authorize(self, hook: _rpc.A) -> _rpc.A:
        """The call hook, as :meth:`trustwire.Server.authorize`; an ``async def`` hook runs in
        this server's loop."""
        return self._server.authorize(hook)

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Binds ``address`` and serves; coroutine handlers run in the running loop. Returns
        the port."""
        loop = asyncio.get_running_loop()
        self._server._user_loop = loop
        self._closed = asyncio.Event()
        return await loop.run_in_executor(None, self._server.start, address)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def address(self) -> str:
        return self._server.address

    async def stop(self, grace: Optional[float] = None) -> None:
        """Stops accepting and lets calls in flight finish; after ``grace`` seconds (when given)
        the handlers still running are cancelled (their callers get ELOGOFF, 2003)."""
        loop = asyncio.get_running_loop()
        stopping = loop.run_in_executor(None, self._server.stop)
        if grace is not None:
            done, _ = await asyncio.wait({stopping}, timeout=grace)
            if not done:
                self._server._cancel_pending()
        await stopping
        if self._closed is not None:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Returns once :meth:`stop` has finished."""
        if self._closed is None:
            raise RuntimeError("the server has not been started")
        await self._closed.wait()

    async def serve_forever(self, address: Optional[str] = None) -> None:
        """Starts (unless started) and serves until stopped; cancelling it stops the server."""
        if not self._server._native.running:
            await self.start(address if address is not None else "127.0.0.1:0")
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._server._native.running:
            await self.stop()
