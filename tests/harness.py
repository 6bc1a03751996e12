"""One vocabulary of tiny apps and clients for both adapters.

Behavioural tests take the ``kit`` fixture (parametrised ``wsgi`` / ``asgi``) and
describe apps through it, so one test body checks both middlewares.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from wsgiref.validate import validator

import httpx

from canarymw import Rollout, WSGICanaryMiddleware

App = Any
Headers = Sequence[tuple[str, str]]


class Boom(RuntimeError):
    """The exception test apps raise."""


class WSGITransport(httpx.BaseTransport):
    """A PEP 3333 client transport: latin-1 header decoding (as real servers do),
    repeated headers joined with a comma, and the app iterable always closed."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": request.url.scheme,
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": request.url.path,
            "QUERY_STRING": request.url.query.decode("latin-1"),
            "SERVER_NAME": request.url.host,
            "SERVER_PORT": str(request.url.port or 80),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
        }
        for raw_name, raw_value in request.headers.raw:
            key = raw_name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            value = raw_value.decode("latin-1")
            environ[key] = f"{environ[key]}, {value}" if key in environ else value
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return lambda data: None

        result = self.app(environ, start_response)
        try:
            content = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        return httpx.Response(
            int(status[:3]),
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            content=content,
            request=request,
        )

    def __init__(self, app: App) -> None:
        self.app = app


class WSGIKit:
    kind = "wsgi"

    def echo(self, label: str, *, status: int = 200, headers: Headers = ()) -> App:
        """Body and ``X-App`` header are ``label``; ``X-Decision`` echoes the decision."""

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            d = environ.get("canarymw.decision")
            extra = [("X-App", label), ("X-Decision", d.variant if d else "-")]
            start_response(f"{status} X", [("Content-Type", "text/plain"), *headers, *extra])
            return [label.encode()]

        return app

    def boom(self, *, after_start: bool) -> App:
        def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            if not after_start:
                raise Boom("before start")
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"partial"
            raise Boom("after start")

        if after_start:
            return app

        def eager(environ: dict[str, Any], start_response: Any) -> Any:
            raise Boom("before start")

        return eager

    def stream(self, chunks: Sequence[bytes], log: list[str] | None = None) -> App:
        """Yields ``chunks`` one by one; appends ``"chunk N"`` and ``"closed"`` to ``log``."""

        def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            try:
                for i, c in enumerate(chunks):
                    if log is not None:
                        log.append(f"chunk {i}")
                    yield c
            finally:
                if log is not None:
                    log.append("closed")

        return app

    def wrap(self, old: App, new: App | None, rollout: Rollout, **kw: Any) -> App:
        inner_new = validator(new) if new is not None else None
        return validator(WSGICanaryMiddleware(validator(old), new=inner_new, rollout=rollout, **kw))

    def raw_wrap(self, old: App, new: App | None, rollout: Rollout, **kw: Any) -> App:
        return WSGICanaryMiddleware(old, new=new, rollout=rollout, **kw)

    @contextlib.contextmanager
    def client(self, app: App) -> Iterator[httpx.Client]:
        with httpx.Client(transport=WSGITransport(app), base_url="http://testserver") as c:
            yield c


class ASGIKit:
    kind = "asgi"

    def echo(self, label: str, *, status: int = 200, headers: Headers = ()) -> App:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _lifespan_ok(receive, send)
                return
            d = scope.get("canarymw.decision")
            hs = [("content-type", "text/plain"), *headers, ("x-app", label)]
            hs.append(("x-decision", d.variant if d else "-"))
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in hs],
                }
            )
            await send({"type": "http.response.body", "body": label.encode()})

        return app

    def boom(self, *, after_start: bool) -> App:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _lifespan_ok(receive, send)
                return
            if not after_start:
                raise Boom("before start")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise Boom("after start")

        return app

    def stream(self, chunks: Sequence[bytes], log: list[str] | None = None) -> App:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _lifespan_ok(receive, send)
                return
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            try:
                for i, c in enumerate(chunks):
                    if log is not None:
                        log.append(f"chunk {i}")
                    await send({"type": "http.response.body", "body": c, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                if log is not None:
                    log.append("closed")

        return app

    def wrap(self, old: App, new: App | None, rollout: Rollout, **kw: Any) -> App:
        from canarymw import ASGICanaryMiddleware  # type: ignore[attr-defined]

        return ASGICanaryMiddleware(old, new=new, rollout=rollout, **kw)

    raw_wrap = wrap

    @contextlib.contextmanager
    def client(self, app: App) -> Iterator[httpx.Client]:
        from starlette.testclient import TestClient

        with TestClient(app, base_url="http://testserver") as c:
            yield c


async def _lifespan_ok(receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def run(coro: Any) -> Any:
    """Run a coroutine to completion (for raw ASGI calls in tests)."""
    return asyncio.run(coro)


KITS: dict[str, Callable[[], WSGIKit | ASGIKit]] = {"wsgi": WSGIKit, "asgi": ASGIKit}
