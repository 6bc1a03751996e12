"""The hostile-input tests' shared pieces: one raw request driver for both protocols,
forged and valid cohort cookies, and a codec that counts signature checks.

The tests themselves are split by concern: ``core/test_hostile.py`` (the cohort caches and
the cookie parser), ``adapters/test_hostile.py`` (both adapters, both request paths),
``upstream/test_hostile.py`` (the proxy) and ``real_servers/test_hostile.py`` (the same
attacks through gunicorn and uvicorn).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from canarymw import Rollout, Upstream

from .harness import ASGIKit, WSGIKit, http_scope

Kit = WSGIKit | ASGIKit

KEY = "hostile-secret-key-0123456789abcdef"

TOKEN = "hostile-force-token-0123456789"


# -- one raw request driver for both protocols ------------------------------------------
@dataclass
class Served:
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    raised: BaseException | None


@dataclass
class Request:
    path: str = "/"
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()


def serve_all(
    kit: Kit, app: Any, requests: Iterable[Request], *, upstream: Upstream | None = None
) -> list[Served]:
    """Serve ``requests`` one after another, as a server would (one event loop for ASGI).

    WSGI gets repeated headers joined as servers join them (``"; "`` for Cookie, RFC 9110
    §5.3 otherwise); ASGI gets every header as its own pair, as HTTP/2 servers send them.
    """
    if kit.kind == "wsgi":
        try:
            return [_serve_wsgi(app, r) for r in requests]
        finally:
            if upstream is not None:
                upstream.close()
    return asyncio.run(_serve_asgi_all(app, requests, upstream))


def _serve_wsgi(app: Any, request: Request) -> Served:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        sep = "; " if key == "HTTP_COOKIE" else ", "
        environ[key] = f"{environ[key]}{sep}{value}" if key in environ else value
    served = Served(None, [], b"", None)

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        served.status, served.headers = int(status[:3]), list(headers)
        return lambda data: None

    try:
        result = app(environ, start_response)
        try:
            served.body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
    except BaseException as exc:  # the server's view: whatever escapes the app
        served.raised = exc
    return served


async def _serve_asgi_all(app: Any, requests: Iterable[Request], upstream: Upstream | None) -> list[Served]:
    out = []
    for request in requests:
        scope = http_scope(
            request.path,
            query_string=request.query.encode("latin-1"),
            headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        )
        served = Served(None, [], b"", None)
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any], served: Served = served) -> None:
            if message["type"] == "http.response.start":
                served.status = message["status"]
                served.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                served.body += message.get("body", b"")

        try:
            await app(scope, receive, send)
        except BaseException as exc:  # the server's view: whatever escapes the app
            served.raised = exc
        out.append(served)
    if upstream is not None:
        await upstream.aclose()  # its pool belongs to this event loop
    return out


def seeing_app(kit: Kit, seen: list[dict[str, Any]]) -> Any:
    """An app that answers 200 and appends what it was given (environ or scope) to ``seen``."""
    if kit.kind == "wsgi":

        def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            seen.append(dict(environ))
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ["canarymw.decision"].variant.encode()]

        return wsgi_app

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope))
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": scope["canarymw.decision"].variant.encode()})

    return asgi_app


def set_cookie_of(served: Served) -> str | None:
    return next((v for k, v in served.headers if k.lower() == "set-cookie"), None)


def cohort_cookie(rollout: Rollout) -> str:
    """A valid ``canarymw=...`` pair for a fresh visitor of ``rollout``."""
    set_cookie = rollout.decide(None).set_cookie
    assert set_cookie is not None
    return set_cookie.split(";", 1)[0]


class CountingCodec:
    """Stands in for a rollout's cookie codec and counts signature checks."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.checks = 0

    def verify(self, value: str) -> Any:
        self.checks += 1
        return self.inner.verify(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def forged_values(count: int) -> str:
    return "; ".join(f"canarymw=1.{'A' * 22}.{i:x}.forged-signature-value" for i in range(count))
