"""Server and Client: the Python shape around the native ones."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Coroutine,
    Dict,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    Type,
    TypeVar,
    Union,
    overload,
)

from . import _native
from ._native import CallContext, CallMetadata, PeerIdentity, RpcError, TlsConfig

if TYPE_CHECKING:
    from . import IdentityToken

_log = logging.getLogger("trustwire")


class _Message(Protocol):
    """A protobuf message (anything with SerializeToString)."""

    def SerializeToString(self) -> bytes: ...  # noqa: N802 (protobuf's name)


class _Parseable(Protocol):
    def ParseFromString(self, data: bytes) -> Any: ...  # noqa: N802 (protobuf's name)


M = TypeVar("M", bound=_Parseable)
Payload = Union[bytes, bytearray, memoryview, _Message]
HandlerResult = Union[Payload, Tuple[Payload, Union[bytes, bytearray, memoryview]]]
Handler = Callable[[bytes, CallContext], Union[HandlerResult, Awaitable[HandlerResult]]]
H = TypeVar("H", bound=Handler)
AuthorizeResult = Union[bool, Awaitable[bool]]
Authorize = Callable[[PeerIdentity, str, str, CallMetadata], AuthorizeResult]
A = TypeVar("A", bound=Authorize)


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    serialize = getattr(value, "SerializeToString", None)
    if serialize is None:
        raise TypeError(f"expected bytes or a message with SerializeToString, got {type(value).__name__}")
    data = serialize()
    if not isinstance(data, bytes):
        raise TypeError("SerializeToString did not return bytes")
    return data


def _response_pair(result: Any) -> Tuple[bytes, bytes]:
    if isinstance(result, tuple):
        if len(result) != 2:
            raise TypeError("a handler returns payload or (payload, attachment)")
        return _to_bytes(result[0]), _to_bytes(result[1])
    return _to_bytes(result), b""


@dataclass(frozen=True)
class Response:
    """A successful answer: the payload and the attachment (b"" when none was sent)."""

    payload: bytes
    attachment: bytes


class Server:
    """An mTLS baidu_std server.

    Handlers are registered with :meth:`method` and get ``(request: bytes, ctx: CallContext)``;
    they return ``bytes`` (or a message with ``SerializeToString``) or ``(payload, attachment)``,
    and may be ``async def``. Raising :class:`RpcError` answers with that code and text; any
    other exception is logged with its traceback under the ``trustwire`` logger and answers
    EINTERNAL (2001), and the server keeps serving.

    Plain handlers run on trustwire's handler threads (up to 512 at once; a thread lives on
    between calls, so what a handler keeps in ``threading.local`` is there for the next call on
    that thread, and so is a ``contextvars`` value set without a reset); ``async def`` handlers
    run on one event loop thread the server starts for them.
    """

    def __init__(
        self,
        tls: TlsConfig,
        *,
        identity_token_keys: Optional[Mapping[str, bytes]] = None,
        identity_token_audience: Optional[str] = None,
        identity_token_max_age: float = 300.0,
    ) -> None:
        """``identity_token_keys`` (key id → secret) and ``identity_token_audience`` (the proxy
        route in front of this server): a call carrying ``authentication_data`` (a trustwire
        proxy's identity token) has it verified before its handler runs, and is refused with
        ERPCAUTH (1004) naming the reason when it fails; :meth:`identity_token` gives a handler
        the verified token."""
        if identity_token_keys is not None and not identity_token_audience:
            raise ValueError("identity_token_audience must name the proxy route in front of this server")
        if identity_token_audience and identity_token_keys is None:
            raise ValueError("identity_token_audience goes with identity_token_keys")
        self._token_keys = None if identity_token_keys is None else dict(identity_token_keys)
        self._token_audience = identity_token_audience or ""
        self._token_max_age = identity_token_max_age
        self._tokens: "Dict[int, IdentityToken]" = {}
        self._native = _native.Server(tls)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()
        # trustwire.aio.Server: coroutine handlers run in the application's loop instead.
        self._user_loop: Optional[asyncio.AbstractEventLoop] = None
        self._pending: "set[concurrent.futures.Future[Any]]" = set()

    def method(self, service: str, method: str) -> Callable[[H], H]:
        """Decorator registering a handler for ``service`` (full name) and ``method``."""

        def register(fn: H) -> H:
            self.register(service, method, fn)
            return fn

        return register

    def register(self, service: str, method: str, handler: Handler) -> None:
        if self._native.running:
            raise RuntimeError("register handlers before start()")

        def run(payload: bytes, ctx: CallContext) -> Tuple[bytes, bytes]:
            verified = self._token_keys is not None and ctx.authentication_data is not None
            if verified:
                token = self._verify_token(ctx.authentication_data or b"", service, method)
                with self._lock:
                    self._tokens[id(ctx)] = token
            try:
                result = handler(payload, ctx)
                if inspect.isawaitable(result):
                    result = self._await(_within_deadline(result, ctx.deadline), ctx)
                return _response_pair(result)
            except RpcError:
                raise
            except Exception:
                _log.exception("handler for %s/%s raised; answered EINTERNAL (2001)", service, method)
                raise
            finally:
                if verified:
                    with self._lock:
                        self._tokens.pop(id(ctx), None)

        self._native.register(service, method, run)

    def identity_token(self, ctx: CallContext) -> "Optional[IdentityToken]":
        """The verified identity token of the call ``ctx`` belongs to (the caller a trustwire
        proxy vouched for), or None when the call carried none or no keys are configured. Valid
        while the handler runs."""
        with self._lock:
            return self._tokens.get(id(ctx))

    def _verify_token(self, data: bytes, service: str, method: str) -> "IdentityToken":
        from . import IdentityTokenError, verify_identity_token

        try:
            return verify_identity_token(
                data, self._token_keys or {}, audience=self._token_audience, max_age=self._token_max_age
            )
        except IdentityTokenError as e:
            _log.warning("call to %s/%s refused: its identity token failed: %s", service, method, e)
            raise RpcError(1004, f"identity token refused: {e.reason}") from None

    def authorize(self, hook: A) -> A:
        """Decorator setting the call hook: ``hook(peer, service, method, metadata)`` runs
        before every handler the profile's method rules allow. True lets the call through;
        False refuses it with ERPCAUTH (1004, ``method_not_allowed``); raising
        :class:`RpcError` refuses it with that code and text; any other exception refuses it
        with 1004 and is logged (a failing hook fails closed). It may be ``async def`` (run on
        the server's event loop thread). It runs before each call is dispatched: keep it quick.
        Connections are judged by ``TlsConfig(authorize_peer=...)``."""
        if self._native.running:
            raise RuntimeError("set the hook before start()")

        def run(peer: PeerIdentity, service: str, method: str, metadata: CallMetadata) -> bool:
            try:
                result = hook(peer, service, method, metadata)
                if inspect.isawaitable(result):
                    result = self._await(_as_coroutine(result))
                if not isinstance(result, bool):
                    raise TypeError(f"an authorize hook returns True or False, not {type(result).__name__}")
                return result
            except RpcError:
                raise
            except Exception:
                _log.exception("authorize hook raised for %s/%s; the call is refused (1004)", service, method)
                return False

        self._native.set_authorize(run)
        return hook

    def _await(self, coro: Coroutine[Any, Any, Any], ctx: Optional[CallContext] = None) -> Any:
        """Runs ``coro`` on the handlers' loop from a worker thread and waits for its result.
        With ``ctx``, the coroutine is cancelled when the caller's connection closes."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._handler_loop())
        with self._lock:
            self._pending.add(fut)
        if ctx is not None:
            ctx.add_cancel_callback(fut.cancel)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if ctx is not None and ctx.cancelled():
                raise RpcError(2003, "the caller went away: the handler was cancelled") from None
            raise RpcError(2003, "the server is stopping: the handler was cancelled") from None
        finally:
            with self._lock:
                self._pending.discard(fut)

    def _cancel_pending(self) -> None:
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()

    def _handler_loop(self) -> asyncio.AbstractEventLoop:
        if self._user_loop is not None:
            return self._user_loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="trustwire-async-handlers", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def start(self, address: str = "127.0.0.1:0") -> int:
        """Binds ``address`` (port 0: any free port) and serves; returns the port."""
        port = self._native.start(address)
        self._stopped.clear()
        return port

    def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server is stopped (by :meth:`stop` from another thread or a signal
        handler) or ``timeout`` seconds pass; returns True when the timeout passed first (as
        ``grpc.Server.wait_for_termination`` does). Ctrl-C interrupts the wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.25 if deadline is None else min(0.25, max(0.0, deadline - time.monotonic()))
            if self._stopped.wait(step):
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return True

    def serve_forever(self, address: Optional[str] = None) -> None:
        """Starts the server (on ``address`` when given and not yet started) and serves until it
        is stopped; Ctrl-C (KeyboardInterrupt) stops it gracefully, finishing calls in flight."""
        if not self._native.running:
            self.start(address if address is not None else "127.0.0.1:0")
        try:
            self.wait_for_termination()
        except KeyboardInterrupt:
            self.stop()

    @property
    def port(self) -> int:
        port = self._native.port
        if port is None:
            raise RuntimeError("the server has not been started")
        return port

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self._native.host}:{self.port}"

    def stop(self) -> None:
        """Stops accepting, lets calls in flight finish, closes connections. Idempotent."""
        self._native.stop()
        self._stopped.set()
        with self._lock:
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> "Server":
        if not self._native.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def _within_deadline(awaitable: Awaitable[Any], deadline: Optional[float]) -> Any:
    """Awaits a handler, cancelling it once the caller's deadline has passed (the caller is
    answered ERPCTIMEDOUT, 1008, which it no longer waits for)."""
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(_as_coroutine(awaitable), max(0.0, deadline - time.time()))
    except asyncio.TimeoutError:
        raise RpcError(1008, "the caller's deadline passed: the handler was cancelled") from None


def _settle(fut: "asyncio.Future[Tuple[bytes, bytes]]", result: Optional[Tuple[bytes, bytes]], error: Optional[BaseException]) -> None:
    if fut.done():  # cancelled by the caller meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        assert result is not None
        fut.set_result(result)


class Client:
    """An mTLS baidu_std client for one endpoint. Connects on the first call; thread-safe.

    :meth:`call` and :meth:`acall` return the response payload as ``bytes``, or parsed into
    ``response_type()`` when one is given (anything with ``ParseFromString``, e.g. a protobuf
    message class). :meth:`call_full`/:meth:`acall_full` return a :class:`Response` with the
    attachment as well. Blocking calls release the GIL and honour Ctrl-C.
    """

    def __init__(self, address: str, tls: TlsConfig, *, connect_timeout: float = 5.0, pool_size: int = 1) -> None:
        self._native = _native.Client(address, tls, connect_timeout=connect_timeout, pool_size=pool_size)

    @property
    def address(self) -> str:
        return self._native.address

    def call_full(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        attachment: Optional[bytes] = None,
        log_id: Optional[int] = None,
    ) -> Response:
        data, att = self._native.call(
            service, method, _to_bytes(payload), timeout=timeout, attachment=attachment, log_id=log_id
        )
        return Response(data, att)

    @overload
    def call(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = ...,
        attachment: Optional[bytes] = ...,
        log_id: Optional[int] = ...,
        response_type: None = ...,
    ) -> bytes: ...

    @overload
    def call(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = ...,
        attachment: Optional[bytes] = ...,
        log_id: Optional[int] = ...,
        response_type: Type[M],
    ) -> M: ...

    def call(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        attachment: Optional[bytes] = None,
        log_id: Optional[int] = None,
        response_type: Optional[Type[M]] = None,
    ) -> Union[bytes, M]:
        """Calls ``service/method`` and waits for the answer (``timeout`` in seconds)."""
        data, _ = self._native.call(
            service, method, _to_bytes(payload), timeout=timeout, attachment=attachment, log_id=log_id
        )
        return _parse(data, response_type)

    async def acall_full(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        attachment: Optional[bytes] = None,
        log_id: Optional[int] = None,
    ) -> Response:
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[Tuple[bytes, bytes]]" = loop.create_future()

        def done(result: Optional[Tuple[bytes, bytes]], error: Optional[BaseException]) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop was closed before the answer came
                pass

        pending = self._native.call_async(
            service, method, _to_bytes(payload), done, timeout=timeout, attachment=attachment, log_id=log_id
        )
        try:
            data, att = await fut
        except asyncio.CancelledError:
            # e.g. asyncio.wait_for gave up: stop waiting on the wire too.
            pending.cancel()
            raise
        return Response(data, att)

    @overload
    async def acall(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = ...,
        attachment: Optional[bytes] = ...,
        log_id: Optional[int] = ...,
        response_type: None = ...,
    ) -> bytes: ...

    @overload
    async def acall(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = ...,
        attachment: Optional[bytes] = ...,
        log_id: Optional[int] = ...,
        response_type: Type[M],
    ) -> M: ...

    async def acall(
        self,
        service: str,
        method: str,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        attachment: Optional[bytes] = None,
        log_id: Optional[int] = None,
        response_type: Optional[Type[M]] = None,
    ) -> Union[bytes, M]:
        """:meth:`call` for asyncio: the event loop keeps running while the call is on the wire."""
        r = await self.acall_full(service, method, payload, timeout=timeout, attachment=attachment, log_id=log_id)
        return _parse(r.payload, response_type)

    def close(self) -> None:
        """Closes the connections, every thread's included; calls in flight on them and later
        calls raise :class:`TransportError`."""
        self._native.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _parse(data: bytes, response_type: Optional[Type[M]]) -> Union[bytes, M]:
    if response_type is None:
        return data
    message = response_type()
    message.ParseFromString(data)
    return message
