"""One vocabulary of tiny apps and clients for both adapters.

Behavioural tests take the ``kit`` fixture (parametrised ``wsgi`` / ``asgi``) and
describe apps through it, so one test body checks both middlewares.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from decimal import Decimal
from typing import Any
from wsgiref.validate import validator

import httpx

from canarymw import Outcome, Rollout, WSGICanaryMiddleware
from canarymw.asgi import ASGICanaryMiddleware

with warnings.catch_warnings():
    # Starlette asks for the httpx2 fork; the test client works the same with httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient as TestClient
    from starlette.testclient import WebSocketDenialResponse as WebSocketDenialResponse

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
        """The middleware between two spec checkers: as an app (outer) and as a server (inner)."""
        inner_new = validate_asgi(new) if new is not None else None
        return validate_asgi(ASGICanaryMiddleware(validate_asgi(old), new=inner_new, rollout=rollout, **kw))

    def raw_wrap(self, old: App, new: App | None, rollout: Rollout, **kw: Any) -> App:
        return ASGICanaryMiddleware(old, new=new, rollout=rollout, **kw)

    @contextlib.contextmanager
    def client(self, app: App) -> Iterator[httpx.Client]:
        with TestClient(app, base_url="http://testserver") as c:
            yield c


class ASGIViolation(AssertionError):
    """A message or scope that breaks the ASGI spec (raised by :func:`validate_asgi`)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ASGIViolation(what)


def _check_headers(headers: Any, where: str, *, lower: bool) -> None:
    _check(isinstance(headers, (list, tuple)), f"{where}: headers must be a list or tuple, got {headers!r}")
    for item in headers:
        _check(len(item) == 2, f"{where}: header {item!r} is not a pair")
        name, value = item
        _check(type(name) is bytes and type(value) is bytes, f"{where}: header {item!r} is not bytes")
        _check(not lower or name == name.lower(), f"{where}: header name {name!r} is not lower case")


def validate_asgi(app: App) -> App:
    """Wrap ``app`` so every scope, received and sent message is checked against the ASGI spec.

    The ASGI counterpart of ``wsgiref.validate.validator``; an ``ASGIViolation`` is
    raised where the rule is broken. See: https://asgi.readthedocs.io/en/latest/specs/www.html
    """

    async def checked(scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        _check(isinstance(scope, dict), "scope must be a dict")
        if kind in ("http", "websocket"):
            _check(isinstance(scope["path"], str), "scope path must be str")
            _check(isinstance(scope.get("query_string", b""), bytes), "query_string must be bytes")
            _check_headers(scope["headers"], "scope", lower=True)
        state = {"started": False, "done": False, "trailers": False, "accepted": False, "closed": False}

        async def receive_() -> Any:
            message = await receive()
            _check(
                isinstance(message, dict) and isinstance(message.get("type"), str), f"received {message!r}"
            )
            return message

        async def send_(message: Any) -> None:
            _check(isinstance(message, dict), f"sent {message!r}, not a dict")
            t = message["type"]
            if kind == "http":
                _check(not state["done"], f"{t} sent after the response was complete")
                if t == "http.response.start":
                    _check(not state["started"], "a second http.response.start")
                    _check(type(message["status"]) is int, "status must be an int")
                    _check_headers(message.get("headers", []), t, lower=True)
                    state["started"] = True
                    state["trailers"] = bool(message.get("trailers", False))
                elif t == "http.response.body":
                    _check(state["started"], "http.response.body before http.response.start")
                    _check(isinstance(message.get("body", b""), bytes), "body must be bytes")
                    if not message.get("more_body", False) and not state["trailers"]:
                        state["done"] = True
                elif t == "http.response.trailers" and not message.get("more_trailers", False):
                    state["done"] = True
            elif kind == "websocket":
                _check(not state["closed"], f"{t} sent after websocket.close")
                if t == "websocket.accept":
                    _check(not state["accepted"], "a second websocket.accept")
                    _check_headers(message.get("headers", []), t, lower=True)
                    state["accepted"] = True
                elif t == "websocket.send":
                    _check(state["accepted"], "websocket.send before websocket.accept")
                elif t == "websocket.close":
                    state["closed"] = True
            elif kind == "lifespan":
                _check(t.startswith("lifespan."), f"{t} sent for a lifespan scope")
            await send(message)

        await app(scope, receive_, send_)

    return checked


class RecordingSink:
    """A sink that keeps every outcome, in order (optionally also appending to ``log``)."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.outcomes: list[Any] = []
        self.log = log

    def record(self, outcome: Any) -> None:
        self.outcomes.append(outcome)
        if self.log is not None:
            self.log.append("outcome")


def http_scope(
    path: str = "/", *, method: str = "GET", headers: Sequence[tuple[bytes, bytes]] = (), **extra: Any
) -> dict[str, Any]:
    """A complete HTTP connection scope, as a server builds it."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    scope.update(extra)
    return scope


class FakeServer:
    """Plays the server side of one ASGI connection and records what the app sends.

    ``receive`` hands out ``incoming`` in order, then waits until :meth:`disconnect`
    and returns ``http.disconnect`` (``websocket.disconnect`` for ``kind="websocket"``).
    ``on_send`` runs after each message is recorded; it may raise to play a failing
    transport.
    """

    def __init__(
        self,
        incoming: Sequence[dict[str, Any]] = ({"type": "http.request", "body": b"", "more_body": False},),
        *,
        on_send: Callable[[Any], Any] | None = None,
        kind: str = "http",
    ) -> None:
        self.incoming = list(incoming)
        self.sent: list[dict[str, Any]] = []
        self.on_send = on_send
        self.kind = kind
        self._gone: asyncio.Event | None = None

    @property
    def gone(self) -> asyncio.Event:
        if self._gone is None:
            self._gone = asyncio.Event()
        return self._gone

    def disconnect(self) -> None:
        self.gone.set()

    async def receive(self) -> dict[str, Any]:
        if self.incoming:
            return self.incoming.pop(0)
        await self.gone.wait()
        return {"type": f"{self.kind}.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(dict(message) if not isinstance(message, dict) else message)
        if self.on_send is not None:
            result = self.on_send(message)
            if asyncio.iscoroutine(result):
                await result

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    def header_list(self) -> list[tuple[bytes, bytes]]:
        """The headers of the (single) response start message, as sent."""
        [start] = [m for m in self.sent if m["type"].endswith("http.response.start")]
        return [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.header_list() if k == name]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def _lifespan_ok(receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def by_bucket(bucket: int, percent: float) -> str:
    """The frozen rule of docs/cohorts.md: ``new`` iff ``bucket < percent x 100``, the
    percent taken as the decimal it is written as (1.1% is buckets 0-109: in binary floating
    point ``1.1 * 100`` is 110.00000000000001, which would let bucket 110 in)."""
    return "new" if bucket < Decimal(repr(percent)) * 100 else "old"


def make_outcome(
    variant: str = "new", status: int | None = 200, duration: float = 0.02, **kw: Any
) -> Outcome:
    """An outcome of rollout ``r`` for sink tests; any field can be given by name."""
    fields: dict[str, Any] = {
        "rollout": "r",
        "variant": variant,
        "status": status,
        "duration": duration,
        "error": None,
        "disconnected": False,
        "method": "GET",
        "route": None,
        "timestamp": 1.0,
    }
    fields.update(kw)
    return Outcome(**fields)


def build() -> str:
    """Which build of canarymw this process runs: ``compiled`` or ``python``. Servers a
    test starts inherit its environment, hence its build."""
    import canarymw._compat

    return "compiled" if canarymw._compat.IS_COMPILED else "python"


def run(coro: Any) -> Any:
    """Run a coroutine to completion (for raw ASGI calls in tests)."""
    return asyncio.run(coro)


KITS: dict[str, Callable[[], WSGIKit | ASGIKit]] = {
    "wsgi": WSGIKit,
    "asgi": ASGIKit,
}
