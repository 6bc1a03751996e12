"""Apps for the shadow tests, as WSGI or ASGI by the kit: each answers what it is told and
remembers what it saw."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ShadowBoom(RuntimeError):
    """What a failing shadow raises."""


@dataclass
class Seen:
    """What an app saw of each request it got."""

    cookies: list[str | None] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)
    decisions: list[bool] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)


def make_app(
    kind: str,
    *,
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (("Content-Type", "text/plain"),),
    body: bytes | str = b"hello",
    delay: float = 0.0,
    fail: bool = False,
    route: str | None = None,
    gate: threading.Event | None = None,
    seen: Seen | None = None,
) -> Any:
    """A WSGI (``kind == "wsgi"``) or ASGI app. ``body`` may be a str with ``{now}``, filled
    with the current time (a body that differs on every call); ``gate`` holds each
    response until it is set; ``route`` is named as the request's route template."""
    seen = seen if seen is not None else Seen()

    def content() -> bytes:
        return body.format(now=time.time_ns()).encode() if isinstance(body, str) else body

    if kind == "wsgi":

        def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            seen.cookies.append(environ.get("HTTP_COOKIE"))
            seen.bodies.append(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
            seen.flags.append(environ.get("canarymw.shadow", False))
            seen.decisions.append("canarymw.decision" in environ)
            seen.paths.append(environ["PATH_INFO"] + "?" + environ.get("QUERY_STRING", ""))
            seen.forced.append("HTTP_X_CANARYMW_FORCE" in environ)
            if route is not None:
                environ["canarymw.route"] = route
            if gate is not None:
                gate.wait(10)
            if delay:
                time.sleep(delay)
            if fail:
                raise ShadowBoom("the shadow broke")
            start_response(f"{status} X", list(headers))
            return [content()]

        wsgi.seen = seen  # type: ignore[attr-defined]
        return wsgi

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        cookie = [v.decode() for k, v in scope["headers"] if k == b"cookie"]
        seen.cookies.append("; ".join(cookie) if cookie else None)
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.bodies.append(data)
        seen.flags.append(scope.get("canarymw.shadow", False))
        seen.decisions.append("canarymw.decision" in scope)
        seen.paths.append(scope["path"] + "?" + scope["query_string"].decode())
        seen.forced.append(any(k == b"x-canarymw-force" for k, _ in scope["headers"]))
        if route is not None:
            scope["canarymw.route"] = route
        if gate is not None:
            while not gate.is_set():
                await asyncio.sleep(0.005)
        if delay:
            await asyncio.sleep(delay)
        if fail:
            raise ShadowBoom("the shadow broke")
        raw = [(k.lower().encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content()})

    asgi.seen = seen  # type: ignore[attr-defined]
    return asgi
