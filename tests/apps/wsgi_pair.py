"""A WSGI old/new pair behind the middleware, for real-server tests (gunicorn)."""

from __future__ import annotations

import os
from typing import Any

from canarymw import Rollout, WSGICanaryMiddleware

ROLLOUT = Rollout(
    os.environ.get("CANARYMW_TEST_NAME", "hello-v2"),
    percent=float(os.environ.get("CANARYMW_TEST_PERCENT", "30")),
    secret_key=os.environ.get("CANARYMW_TEST_KEY", "test-secret-key-0123456789abcdef"),
    exclude=["/healthz"],
)


def make(label: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = f"Hello, {label} World!".encode()
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("X-Pid", str(os.getpid())),
            ],
        )
        return [body]

    return app


app = WSGICanaryMiddleware(make("Blue"), new=make("Green"), rollout=ROLLOUT)
