"""Hello, Blue World! / Hello, Green World!: a canary release of a Starlette app with canarymw.

Blue is the current version, green the new one. 10% of visitors get green; each visitor
keeps their colour on every request and in every uvicorn worker. Run (see README.md)::

    export CANARY_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    uvicorn app:app --workers 2 --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from canarymw import MemorySink, Rollout
from canarymw.asgi import ASGICanaryMiddleware

CANARY_KEY = os.environ.get("CANARY_KEY", "")
if not CANARY_KEY:
    # Not a random default: each worker would get its own key, reject the cookies the
    # others signed, and reshuffle visitors whenever a different worker answered.
    raise RuntimeError("Set CANARY_KEY to one secret shared by every worker (see README.md).")

rollout = Rollout(
    "hello-v2",
    percent=float(os.environ.get("CANARY_PERCENT", "10")),
    secret_key=CANARY_KEY,
    exclude=["/healthz"],  # never routed, never counted
)
sink = MemorySink()  # counts this worker's requests only


def hello(request: Request, colour: str) -> PlainTextResponse:
    decision = request.scope["canarymw.decision"]
    return PlainTextResponse(
        f"Hello, {colour} World!\n",
        # The pid shows which worker answered: the colour must not depend on it.
        headers={"X-Canary-Variant": decision.variant, "X-Worker-Pid": str(os.getpid())},
    )


async def blue_hello(request: Request) -> PlainTextResponse:
    return hello(request, "Blue")


async def green_hello(request: Request) -> PlainTextResponse:
    return hello(request, "Green")


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok\n")


green = Starlette(routes=[Route("/", green_hello)])
app = Starlette(
    routes=[Route("/", blue_hello), Route("/healthz", healthz)],
    middleware=[Middleware(ASGICanaryMiddleware, new=green, rollout=rollout, sink=sink)],
)
