"""A primary with a shadow, for real-server tests (gunicorn, uvicorn).

``CANARYMW_SHADOW_MODE`` picks the shadow: ``none`` (no shadow at all), ``match`` (answers
like the primary), ``mismatch`` (another body on half the pages), ``slow`` (answers like
the primary after 0.2 s, with a 0.1 s timeout), ``fail`` (raises), or ``upstream`` (an
:class:`~canarymw.Upstream` at ``CANARYMW_SHADOW_URL``). ``GET /_shadow`` (excluded from
the rollout) answers this process's ``shadow.report()`` as JSON; ``/green`` is a plain
app answering what the shadow would, to serve as an upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from canarymw import Rollout, Shadow, Upstream, WSGICanaryMiddleware
from canarymw.asgi import ASGICanaryMiddleware

MODE = os.environ.get("CANARYMW_SHADOW_MODE", "none")
SLOW = 0.2


def rollout() -> Rollout:
    return Rollout(
        "shadow-servers", percent=0, secret_key="servers-secret-key-0123456789abcdef", exclude=["/_shadow"]
    )


def page(path: str, shadow: bool) -> bytes:
    """The body of ``path``: the shadow in mode ``mismatch`` differs on /odd/ pages."""
    if shadow and MODE == "mismatch" and path.startswith("/odd"):
        return b"green " + path.encode()
    return b"page " + path.encode()


def _report(holder: dict[str, Any]) -> bytes:
    mw = holder.get("mw")
    report = None if mw is None or mw.shadow is None else mw.shadow.report().as_dict()
    return json.dumps({"pid": os.getpid(), "report": report}).encode()


# -- WSGI -------------------------------------------------------------------------------
_wsgi: dict[str, Any] = {}


def _wsgi_page(shadow: bool) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/_shadow":
            body = _report(_wsgi)
        else:
            if shadow and MODE == "slow":
                time.sleep(SLOW)
            if shadow and MODE == "fail":
                raise RuntimeError("the shadow broke")
            body = page(path, shadow)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def _shadow(target: Any) -> Any:
    if MODE == "none":
        return None
    if MODE == "upstream":
        return Shadow(Upstream(os.environ["CANARYMW_SHADOW_URL"], read_timeout=2.0), timeout=2.0)
    return Shadow(target, timeout=0.1 if MODE == "slow" else 5.0, queue_size=8)


green_wsgi = _wsgi_page(True)
wsgi_app = _wsgi["mw"] = WSGICanaryMiddleware(
    _wsgi_page(False), new=green_wsgi, rollout=rollout(), shadow=_shadow(green_wsgi)
)


# -- ASGI -------------------------------------------------------------------------------
_asgi: dict[str, Any] = {}


def _asgi_page(shadow: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/_shadow":
            body = _report(_asgi)
        else:
            if shadow and MODE == "slow":
                await asyncio.sleep(SLOW)
            if shadow and MODE == "fail":
                raise RuntimeError("the shadow broke")
            body = page(path, shadow)
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


green_asgi = _asgi_page(True)
asgi_app = _asgi["mw"] = ASGICanaryMiddleware(
    _asgi_page(False), new=green_asgi, rollout=rollout(), shadow=_shadow(green_asgi)
)
