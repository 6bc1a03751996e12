"""A guarded WSGI old/new pair for the real-server guard tests.

Configured by the environment (every gunicorn worker imports it, follows the store and
runs a controller of its own; one at a time leads): ``CANARYMW_TEST_STORE`` (a store
URL), ``CANARYMW_TEST_NAME``, ``CANARYMW_TEST_STEPS`` (comma-separated percents),
``CANARYMW_TEST_BAKE``, ``CANARYMW_TEST_MIN_REQUESTS``, ``CANARYMW_TEST_DEADLINE`` and
``CANARYMW_TEST_ERROR_RATE`` (the share of ``new``'s answers that are 500s, drawn per
request).

No sink is given: the middleware adds a StoreSink on the rollout's store by itself,
because the rollout has a guard. ``/stats`` is excluded (never routed, never counted)
and answers JSON: the worker's pid, ``rollout.store_status()`` and its controller.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.guard import Analysis, Guard

STATS = "/stats"
ERROR_RATE = float(os.environ.get("CANARYMW_TEST_ERROR_RATE", "0"))

ROLLOUT = Rollout(
    os.environ.get("CANARYMW_TEST_NAME", "guard-v2"),
    percent=0,
    secret_key="guard-app-secret-key-0123456789abcdef",
    exclude=[STATS],
    store=os.environ["CANARYMW_TEST_STORE"],
    store_interval=0.2,
    guard=Guard(
        steps=[float(s) for s in os.environ.get("CANARYMW_TEST_STEPS", "50,100").split(",")],
        bake=float(os.environ.get("CANARYMW_TEST_BAKE", "1")),
        min_requests=int(os.environ.get("CANARYMW_TEST_MIN_REQUESTS", "100")),
        deadline=float(os.environ.get("CANARYMW_TEST_DEADLINE", "3600")),
        analysis=Analysis(min_requests=50),
        interval=0.25,
        lease=float(os.environ.get("CANARYMW_TEST_LEASE", "1.0")),
    ),
)


def make(label: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == STATS:
            return _stats(start_response)
        failing = label == "new" and random.random() < ERROR_RATE
        body = f"{label}\n".encode()
        start_response(
            "500 Internal Server Error" if failing else "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("X-Variant", label),
                ("X-Pid", str(os.getpid())),
            ],
        )
        return [body]

    return app


def _stats(start_response: Any) -> list[bytes]:
    controller = ROLLOUT.controller
    stats = {
        "pid": os.getpid(),
        **ROLLOUT.store_status(),
        "holder": None if controller is None else controller.holder,
        "leading": controller is not None and controller.token is not None,
    }
    body = json.dumps(stats).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


app = WSGICanaryMiddleware(make("old"), new=make("new"), rollout=ROLLOUT)
