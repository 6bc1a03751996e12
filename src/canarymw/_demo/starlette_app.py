"""The demo's Starlette blue/green service, for uvicorn: ``canarymw._demo.starlette_app:create_app``.

The same service as :mod:`canarymw._demo.flask_app`, in ASGI: blue is wrapped with
:class:`~canarymw.asgi.ASGICanaryMiddleware` and green is routed in by cohort. Run with
``uvicorn --factory``; settings come from the environment.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .._rollout import Decision
from ..asgi import ASGICanaryMiddleware
from ..sinks import MemorySink
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
    return PlainTextResponse(
        body,
        status_code=status,
        headers={VARIANT_HEADER: variant, PID_HEADER: str(os.getpid()), **switches.headers()},
    )


def create_app(settings: DemoSettings | None = None) -> ASGIApp:
    """Build the blue app with green routed in by the canary middleware."""
    settings = DemoSettings.from_env() if settings is None else settings
    sink = MemorySink()
    rollout = settings.rollout()
    switches = SwitchLog(rollout)

    async def blue_hello(request: Request) -> Response:
        return _reply(BLUE_BODY, "old", switches)

    async def green_hello(request: Request) -> Response:
        decision: Decision = request.scope["canarymw.decision"]
        if settings.should_fail(decision.cohort, request.query_params.get(TAG_PARAM)):
            return _reply(FAILURE_BODY, "new", switches, 500)
        return _reply(GREEN_BODY, "new", switches)

    async def health(request: Request) -> Response:
        return _reply("ok\n", "none", switches)

    async def stats(request: Request) -> Response:
        # This worker's MemorySink only: each uvicorn worker counts its own requests.
        snapshot = sink.snapshot()
        return JSONResponse(
            {
                "pid": os.getpid(),
                "requests": {variant: st.requests for variant, st in snapshot.items()},
                "errors": {variant: st.errors for variant, st in snapshot.items()},
                **switches.snapshot(),
            }
        )

    blue = Starlette(routes=[Route("/", blue_hello), Route(HEALTH_PATH, health), Route(STATS_PATH, stats)])
    green = Starlette(routes=[Route("/", green_hello)])
    return ASGICanaryMiddleware(blue, new=green, rollout=rollout, sink=sink)
