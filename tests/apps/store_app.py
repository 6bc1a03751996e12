"""A WSGI old/new pair following a shared store, for the real-server store tests.

Configured by the environment (every gunicorn worker imports it and follows the store
on its own): ``CANARYMW_TEST_STORE`` (a store URL), ``CANARYMW_TEST_NAME``,
``CANARYMW_TEST_KEY``, ``CANARYMW_TEST_PERCENT`` (the code's percent),
``CANARYMW_TEST_STORE_INTERVAL``, ``CANARYMW_TEST_SINK_INTERVAL`` (a ``StoreSink``
on the same store, flushing that often; empty: no sink), ``CANARYMW_TEST_POLICY``
(the ramp policy, ``monotone`` by default) and ``CANARYMW_TEST_USERS`` (set: the rollout's
``key=`` is the ``X-User`` request header, a logged-in user).

``/stats`` is excluded from the rollout (never routed, never counted) and answers JSON:
the worker's pid, ``rollout.store_status()``, the rollout's assignment ``epoch`` and
``store_errors``, and what the sink has flushed. Routed responses say their variant,
the worker's pid, the cohort id and its bucket (``X-Variant``, ``X-Pid``, ``X-Cohort``,
``X-Bucket``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.sinks.store import StoreSink

STATS = "/stats"

ROLLOUT = Rollout(
    os.environ.get("CANARYMW_TEST_NAME", "store-v2"),
    percent=float(os.environ.get("CANARYMW_TEST_PERCENT", "30")),
    secret_key=os.environ.get("CANARYMW_TEST_KEY", "store-secret-key-0123456789abcdef"),
    exclude=[STATS],
    store=os.environ["CANARYMW_TEST_STORE"],
    store_interval=float(os.environ.get("CANARYMW_TEST_STORE_INTERVAL", "0.2")),
    policy=os.environ.get("CANARYMW_TEST_POLICY", "monotone"),  # type: ignore[arg-type]
    key=(lambda environ: environ.get("HTTP_X_USER")) if os.environ.get("CANARYMW_TEST_USERS") else None,
)

_sink_interval = os.environ.get("CANARYMW_TEST_SINK_INTERVAL", "")
assert ROLLOUT.store is not None
SINK = StoreSink(ROLLOUT.store, interval=float(_sink_interval)) if _sink_interval else None


def make(label: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == STATS:  # excluded: the middleware hands it to old
            return _stats(environ, start_response)
        decision = environ["canarymw.decision"]
        body = f"{label}\n".encode()
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("X-Variant", label),
                ("X-Pid", str(os.getpid())),
                ("X-Cohort", str(decision.cohort)),
                ("X-Bucket", str(decision.bucket)),
            ],
        )
        return [body]

    return app


def _stats(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    stats = {
        "pid": os.getpid(),
        "decision": repr(environ.get("canarymw.decision")),
        **ROLLOUT.store_status(),
        "epoch": ROLLOUT.epoch,
        "store_errors": ROLLOUT.counters["store_errors"],
        "flushed": None if SINK is None else SINK.flushed,
        "sink_failures": None if SINK is None else SINK.failures,
    }
    body = json.dumps(stats).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Pid", str(os.getpid())),
        ],
    )
    return [body]


app = WSGICanaryMiddleware(make("old"), new=make("new"), rollout=ROLLOUT, sink=SINK)
