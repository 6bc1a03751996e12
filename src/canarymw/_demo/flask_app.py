"""The demo's Flask blue/green service, for gunicorn: ``canarymw._demo.flask_app:create_app()``.

Blue is the current app; green is the new one. Blue's ``wsgi_app`` is wrapped with
:class:`~canarymw.WSGICanaryMiddleware`, so each visitor is routed in-process to one of
them by their signed cohort cookie. Settings come from the environment (see
:mod:`canarymw._demo.settings`).
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request

from .._rollout import Decision
from ..sinks import MemorySink
from ..wsgi import WSGICanaryMiddleware
from .settings import (
    BLUE_BODY,
    FAILURE_BODY,
    GREEN_BODY,
    HEALTH_PATH,
    PID_HEADER,
    STATS_PATH,
    TAG_PARAM,
    VARIANT_HEADER,
    DemoSettings,
)
from .watch import SwitchLog


def _reply(body: str, variant: str, switches: SwitchLog, status: int = 200) -> Response:
    return Response(
        body,
        status=status,
        mimetype="text/plain",
        headers={VARIANT_HEADER: variant, PID_HEADER: str(os.getpid()), **switches.headers()},
    )


def create_app(settings: DemoSettings | None = None) -> Flask:
    """Build the blue app with green routed in by the canary middleware."""
    settings = DemoSettings.from_env() if settings is None else settings
    blue = Flask("canarymw_demo_blue")
    green = Flask("canarymw_demo_green")
    sink = MemorySink()
    rollout = settings.rollout()
    switches = SwitchLog(rollout)

    @blue.get("/")
    def blue_hello() -> Response:
        return _reply(BLUE_BODY, "old", switches)

    @green.get("/")
    def green_hello() -> Response:
        decision: Decision = request.environ["canarymw.decision"]
        if settings.should_fail(decision.cohort, request.args.get(TAG_PARAM)):
            return _reply(FAILURE_BODY, "new", switches, 500)
        return _reply(GREEN_BODY, "new", switches)

    @blue.get(HEALTH_PATH)
    def health() -> Response:
        return _reply("ok\n", "none", switches)

    @blue.get(STATS_PATH)
    def stats() -> Response:
        # This worker's MemorySink only: each gunicorn worker counts its own requests.
        snapshot = sink.snapshot()
        return jsonify(
            pid=os.getpid(),
            requests={variant: st.requests for variant, st in snapshot.items()},
            errors={variant: st.errors for variant, st in snapshot.items()},
            **switches.snapshot(),
        )

    blue.wsgi_app = WSGICanaryMiddleware(  # type: ignore[method-assign]
        blue.wsgi_app, new=green.wsgi_app, rollout=rollout, sink=sink
    )
    return blue
