"""Hello, Blue World! / Hello, Green World!: a canary release of a Flask app with canarymw.

Blue is the current version, green the new one. 10% of visitors get green; each visitor
keeps their colour on every request and in every gunicorn worker. Run (see README.md)::

    export CANARY_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    gunicorn -w 4 -b 127.0.0.1:8000 app:app
"""

from __future__ import annotations

import os

from flask import Flask, Response, request

from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

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

blue = Flask("blue")
green = Flask("green")


def hello(colour: str) -> Response:
    decision = request.environ["canarymw.decision"]
    return Response(
        f"Hello, {colour} World!\n",
        mimetype="text/plain",
        # The pid shows which worker answered: the colour must not depend on it.
        headers={"X-Canary-Variant": decision.variant, "X-Worker-Pid": str(os.getpid())},
    )


@blue.get("/")
def blue_hello() -> Response:
    return hello("Blue")


@green.get("/")
def green_hello() -> Response:
    return hello("Green")


@blue.get("/healthz")
def healthz() -> str:
    return "ok\n"


blue.wsgi_app = WSGICanaryMiddleware(  # type: ignore[method-assign]
    blue.wsgi_app, new=green.wsgi_app, rollout=rollout, sink=sink
)
app = blue
