"""The proxy itself under a real server: gunicorn (``wsgi_app``) or uvicorn (``asgi_app()``).

Every routed request goes to the new variant, an upstream: paths under ``/fault/`` to
``CANARYMW_TEST_FAULT``, everything else to ``CANARYMW_TEST_UPSTREAM``. The old variant
is an in-process app that answers ``old``. ``/_outcomes`` (excluded from the rollout)
lists what the middleware recorded, as JSON; run one worker so it sees everything.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from canarymw import ASGICanaryMiddleware, Outcome, Rollout, Upstream, WSGICanaryMiddleware

KEY = "proxy-secret-key-0123456789abcdef"

# Tests abort thousands of responses on purpose, and asyncio warns about every write to
# a socket that is gone. The test servers' stderr is a pipe read only when they stop:
# once full, the server would block on it.
logging.getLogger("asyncio").setLevel(logging.ERROR)
MAIN = os.environ.get("CANARYMW_TEST_UPSTREAM", "http://127.0.0.1:9")
FAULT = os.environ.get("CANARYMW_TEST_FAULT", "http://127.0.0.1:9")


class ListSink:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def dump(self) -> bytes:
        rows = [
            {"variant": o.variant, "status": o.status, "error": o.error, "disconnected": o.disconnected}
            for o in self.outcomes
        ]
        return json.dumps(rows).encode()


def _rollout(name: str) -> Rollout:
    return Rollout(name, percent=100, secret_key=KEY, exclude=["/_outcomes"])


def _old_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"old"]


def _make_wsgi() -> Any:
    sink = ListSink()
    main = WSGICanaryMiddleware(_old_wsgi, new=Upstream(MAIN), rollout=_rollout("e2e"), sink=sink)
    fault = WSGICanaryMiddleware(
        _old_wsgi, new=Upstream(FAULT, fallback=False), rollout=_rollout("e2e-fault"), sink=sink
    )

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/_outcomes":
            body = sink.dump()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return (fault if path.startswith("/fault/") else main)(environ, start_response)

    return app


wsgi_app = _make_wsgi()


async def _old_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"3")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"old"})


def asgi_app() -> Any:
    """The ASGI proxy (``uvicorn --factory``)."""
    sink = ListSink()
    main = ASGICanaryMiddleware(_old_asgi, new=Upstream(MAIN), rollout=_rollout("e2e"), sink=sink)
    fault = ASGICanaryMiddleware(
        _old_asgi, new=Upstream(FAULT, fallback=False), rollout=_rollout("e2e-fault"), sink=sink
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await main(scope, receive, send)  # runs both variants' lifespans; fault's pool is per loop too
            return
        if scope.get("path") == "/_outcomes":
            body = sink.dump()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await (fault if scope.get("path", "").startswith("/fault/") else main)(scope, receive, send)

    return app
