"""The ASGI proxy: ``Upstream.asgi_app()``, on httpcore (the ``upstream`` extra)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .._types import ASGIApp, Message, Receive, Scope, Send
from ._errors import UpstreamAborted, UpstreamError, _HeadTimedOut, _IncompleteBody
from ._forward import (
    _NO_BODY_STATUS,
    _WATCH_ABOVE,
    _classify,
    _connection_tokens,
    _error_body,
    _forwarding,
    _may_fall_back,
    _Proxy,
    _response_headers,
    _target,
)

if TYPE_CHECKING:
    import anyio
    import httpcore

    from ._config import Upstream

# -- ASGI ------------------------------------------------------------------------


class _AsyncInput:
    """The request body streamed from ``receive()`` after the ``head`` chunks already read."""

    started = False

    def __init__(self, head: list[bytes], receive: Receive) -> None:
        self.head = head
        self.receive = receive

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        for chunk in self.head:
            if chunk:
                yield chunk
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise _IncompleteBody
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def _replaying(chunks: list[bytes], more: bool, receive: Receive) -> Receive:
    """A receive() that first hands out ``chunks`` again, then continues with ``receive``."""
    pending = list(chunks) or [b""]

    async def replay() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or more}
        return await receive()

    return replay


class _Gone:
    """Set by the disconnect listener of a watched copy."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


async def _copy(response: httpcore.Response, remaining: int | None, send: Send, watch: _Gone | None) -> None:
    """Send the upstream body as it arrives; with a known length the last chunk ends the response.

    The stream is read to its end even after the last byte went out (or when no body is
    expected, as for HEAD): only a response read to its end leaves the connection
    reusable, and that costs no further network read.
    """
    finished = False
    async for chunk in response.aiter_stream():
        # Once the client left, the closed connection ends this loop with a read error;
        # until then chunks are read and dropped (leaving the loop early would strand
        # httpcore's async generators until garbage collection).
        if chunk and not finished and (watch is None or not watch.gone):
            if remaining is not None:
                remaining -= len(chunk)
                finished = remaining <= 0
            await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
    if not finished and (watch is None or not watch.gone):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # trio: long bodies are copied in the request's task, unwatched


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _copy_then_close(
    response: httpcore.Response, remaining: int | None, send: Send, watch: _Gone
) -> None:
    try:
        await _copy(response, remaining, send, watch)
    finally:
        await response.aclose()


_stopping: set[asyncio.Task[None]] = set()  # strong references to fire-and-forget closes


def _stop(relay: asyncio.Task[None], response: httpcore.Response, watch: _Gone) -> None:
    """End a copy task without cancelling it: close its connection so its read fails."""
    watch.gone = True
    relay.add_done_callback(_consume)
    network = response.extensions.get("network_stream")
    if network is not None and not relay.done():
        closing = relay.get_loop().create_task(network.aclose())
        _stopping.add(closing)
        closing.add_done_callback(_consume)


def _consume(task: asyncio.Task[None]) -> None:
    _stopping.discard(task)
    if not task.cancelled():
        task.exception()  # the copy of a client that left may fail; nobody is waiting for it


async def _copy_watching(
    loop: asyncio.AbstractEventLoop,
    response: httpcore.Response,
    remaining: int | None,
    receive: Receive,
    send: Send,
) -> None:
    """:func:`_copy` for long or endless bodies (event streams, downloads), watching the client.

    Servers before ASGI 2.4 drop send() after a disconnect instead of raising, so the
    request's task waits for ``http.disconnect`` while a task of our own copies the
    body and then closes the response. That task is never cancelled: a client that
    left, or a cancellation of the request's task, ends it by closing the upstream
    connection, so its read fails as any broken connection does and httpcore cleans
    up on its ordinary error path. (A cancellation landing inside httpcore's own
    cleanup, which anyio's shields cannot stop on asyncio, would leave the pooled
    connection marked busy for good.)
    """
    watch = _Gone()
    relay = loop.create_task(_copy_then_close(response, remaining, send, watch))
    listener = loop.create_task(_until_disconnect(receive))
    listener.add_done_callback(_consume)
    try:
        await asyncio.wait((relay, listener), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        listener.cancel()
        _stop(relay, response, watch)
        raise
    listener.cancel()
    if relay.done():
        relay.result()  # re-raises a failure of the copy
        return
    _stop(relay, response, watch)  # the client went away
    await asyncio.wait((relay,))


async def _aclose(response: httpcore.Response) -> None:
    """Close an upstream response even when the request's task is being cancelled.

    A native ``Task.cancel()`` (a server tearing a request down) is not stopped by an
    anyio shield: it would interrupt the close half-way and leave the pooled
    connection marked busy forever. On asyncio the close runs in a task of its own,
    which the cancellation of ours cannot reach.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import anyio

        with anyio.CancelScope(shield=True):
            await response.aclose()
        return
    await asyncio.shield(loop.create_task(response.aclose()))


class _ASGIProxy(_Proxy):
    """``Upstream.asgi_app()``: one instance per middleware variant."""

    def __init__(self, upstream: Upstream, fallback: ASGIApp | None) -> None:
        super().__init__(upstream)
        self.fallback = fallback
        # Request headers treated specially (rewritten or dropped), by lower-case name.
        self._special = {name.encode(): name for name in (*self._drop, "cookie")}
        self._head_timeout = upstream.head_timeout
        import anyio
        import httpcore

        self._Request = httpcore.Request
        self._URL = httpcore.URL
        self._CancelScope = anyio.CancelScope
        self._now = anyio.current_time

    def __repr__(self) -> str:
        return f"<ASGI proxy to {self.upstream.url}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.upstream.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            scope.setdefault("canarymw.error", "UpstreamWebSocketUnsupported")
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1011})
        else:
            raise RuntimeError(f"canarymw.Upstream cannot serve ASGI scope type {kind!r}.")

    def _headers(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """The headers to forward, and the client's Content-Length (None if it sent none)."""
        special = self._special
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        host = length = None
        # Repeated fields are collected and joined once: linear however many a client sends.
        cookies: list[bytes] = []
        forwarded: list[bytes] = []
        vias: list[bytes] = []
        connection: list[bytes] = []
        for name, value in scope.get("headers", ()):
            which = special.get(name)
            if which is None:
                if name[:6] != b"proxy-":
                    append((name, value))
            elif which == "host":
                host = value
            elif which == "cookie":
                cookies.append(value)
            elif which == "x-forwarded-for":
                forwarded.append(value)
            elif which == "via":
                vias.append(value)
            elif which == "connection":
                connection.append(value)
            elif which == "content-length":
                length = value
        if connection:
            named = _connection_tokens(b", ".join(connection).decode("latin-1"))
            if named:
                out = [h for h in out if h[0] not in named]
                if b"cookie" in named:
                    cookies = []
        if cookies:
            # See: RFC 9113 §8.2.3 (an HTTP/1.1 upstream wants one Cookie header)
            out.append((b"cookie", b"; ".join(cookies)))
        https = scope.get("scheme") == "https"
        if host is None:
            server = scope.get("server")
            if server:
                server_host, port = server[0], server[1]
                text = server_host if port in (None, 443 if https else 80) else f"{server_host}:{port}"
                host = str(text).encode("latin-1")
        client = scope.get("client")
        address = str(client[0]).encode("latin-1") if client else None
        out += _forwarding(self, host, forwarded, address, https, scope.get("http_version", "1.1"), vias)
        return out, length

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        headers, length = self._headers(scope)
        target = _target(
            self._prefix,
            scope.get("path", "/"),
            scope.get("query_string", b"").decode("latin-1"),
            "utf-8",
        )
        # The body: read into memory up to the cap (replayable), else streamed.
        chunks: list[bytes] = []
        size = 0
        complete = False
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished its request
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                complete = True
                break
            if size > self._cap:
                break
        body: bytes | _AsyncInput
        if complete:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if body or length is not None:
                headers.append((b"content-length", str(len(body)).encode("ascii")))
        else:
            body = _AsyncInput(chunks, receive)
            if length is not None:
                headers.append((b"content-length", length))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        extensions = self._extensions
        head_timeout = self._head_timeout
        head: anyio.CancelScope | None = None  # cut at the head deadline
        if head_timeout is not None:
            # httpcore's read timeout is per read and it skips any number of 1xx answers:
            # a scope whose deadline starts once the request is out (a slow upload is the
            # client's doing) bounds the whole head. Cancelling an anyio scope is safe
            # here, unlike Task.cancel(): httpcore's cleanup shields hold against it.
            head = self._CancelScope()
            now = self._now

            async def trace(event: str, info: object) -> None:
                if event == "http11.receive_response_headers.started":
                    head.deadline = now() + head_timeout

            extensions = {**extensions, "trace": trace}
        request = self._Request(
            method,
            self._URL(scheme=self._scheme, host=self._host, port=self._port, target=target),
            headers=headers,
            content=body,
            extensions=extensions,
        )
        try:
            if head is None:
                response = await self.upstream._async_pool().handle_async_request(request)
            else:
                with head:
                    response = await self.upstream._async_pool().handle_async_request(request)
                if head.cancelled_caught:
                    raise _HeadTimedOut("the upstream did not send its response head within the head timeout")
        except Exception as exc:
            if isinstance(exc, _IncompleteBody):
                return  # the client went away while uploading; nobody is left to answer
            cls = _classify(exc)
            if cls is None:
                raise
            await self._failed(cls, exc, scope, receive, send, method, body)
            return
        await self._relay(response, method, receive, send)

    async def _relay(self, response: httpcore.Response, method: str, receive: Receive, send: Send) -> None:
        status = response.status
        headers: list[tuple[bytes, bytes]] = []
        remaining: int | None = None
        for name, value in _response_headers(response.headers):
            lower = name.lower()
            if lower == b"content-length":
                try:
                    remaining = int(value)
                except ValueError:
                    remaining = None
            headers.append((lower, value))
        if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            remaining = 0
        open_ = self.upstream._open
        open_.add(response)
        owned = False  # a copy task of our own closes the response
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            loop = _asyncio_loop() if remaining is None or remaining > _WATCH_ABOVE else None
            if loop is not None:
                owned = True
                await _copy_watching(loop, response, remaining, receive, send)
            else:
                await _copy(response, remaining, send, None)
        except Exception as exc:
            if _classify(exc) is None:
                raise
            # The start message is out: raising makes the server abort the connection,
            # so the client never takes a short body for a complete one.
            raise UpstreamAborted(f"the upstream response broke off: {exc!r}") from exc
        finally:
            open_.discard(response)
            if not owned:
                await _aclose(response)

    async def _failed(
        self,
        cls: type[UpstreamError],
        exc: Exception,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        body: bytes | _AsyncInput,
    ) -> None:
        fallback = self.fallback
        if fallback is not None:
            replay = body if isinstance(body, bytes) else None
            if _may_fall_back(cls, method, replay, not isinstance(body, bytes) and body.started, self._cap):
                scope.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                if isinstance(body, bytes):
                    await fallback(scope, _replaying([body], False, receive), send)
                else:
                    await fallback(scope, _replaying(body.head, True, receive), send)
                return
        scope.setdefault("canarymw.error", self.upstream._fail(cls, exc, False))
        text = _error_body(cls)
        await send(
            {
                "type": "http.response.start",
                "status": cls.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(text)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else text})
