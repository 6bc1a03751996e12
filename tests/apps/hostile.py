"""Apps for the hostile-input tests under real servers: gunicorn (``wsgi``) and uvicorn (``asgi``).

Paths under ``/f/`` go through a rollout with a force token (query form on); every
other path through one without, so returning visitors take the cached fast path.
Routed requests answer JSON describing what the app saw; ``/_state`` (excluded from
both rollouts) answers the plain rollout's counters and cache sizes. Run one worker.
"""

from __future__ import annotations

import json
from typing import Any

from canarymw import ASGICanaryMiddleware, Rollout, WSGICanaryMiddleware

KEY = "hostile-secret-key-0123456789abcdef"
TOKEN = "hostile-force-token-0123456789"

plain = Rollout("hostile", percent=50, secret_key=KEY, exclude=["/_state"])
forced = Rollout("hostile-forced", percent=0, secret_key=KEY, force_token=TOKEN, force_query=True)


def state() -> bytes:
    return json.dumps(
        {
            "counters": plain.counters,
            "header_entries": len(plain._by_header),
            "header_chars": sum(map(len, plain._by_header)),
            "values": len(plain._seen),
        }
    ).encode()


def _wsgi_seen(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    decision = environ["canarymw.decision"]
    body = json.dumps(
        {
            "variant": decision.variant,
            "reason": decision.reason,
            "force_header": environ.get("HTTP_X_CANARYMW_FORCE"),
            "query": environ.get("QUERY_STRING"),
            "raw_uri": environ.get("RAW_URI"),
            "request_uri": environ.get("REQUEST_URI"),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


_wsgi_plain = WSGICanaryMiddleware(_wsgi_seen, new=_wsgi_seen, rollout=plain)
_wsgi_forced = WSGICanaryMiddleware(_wsgi_seen, new=_wsgi_seen, rollout=forced)


def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ.get("PATH_INFO", "")
    if path == "/_state":
        body = state()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return (_wsgi_forced if path.startswith("/f/") else _wsgi_plain)(environ, start_response)


async def _asgi_seen(scope: dict[str, Any], receive: Any, send: Any) -> None:
    decision = scope["canarymw.decision"]
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    body = json.dumps(
        {
            "variant": decision.variant,
            "reason": decision.reason,
            "force_header": next((v for k, v in headers if k == "x-canarymw-force"), None),
            "query": scope["query_string"].decode("latin-1"),
            "cookie_headers": sum(k == "cookie" for k, _ in headers),
        }
    ).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


_asgi_plain = ASGICanaryMiddleware(_asgi_seen, new=_asgi_seen, rollout=plain)
_asgi_forced = ASGICanaryMiddleware(_asgi_seen, new=_asgi_seen, rollout=forced)


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope.get("path", "")
    if path == "/_state":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": state()})
        return
    await (_asgi_forced if path.startswith("/f/") else _asgi_plain)(scope, receive, send)
