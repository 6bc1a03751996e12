"""``shadow=`` through the Flask extension and the Starlette split helpers."""

from __future__ import annotations

from typing import Any

from canarymw import Rollout, Shadow

from ..conftest import KEY
from ..harness import TestClient
from .apps import Seen, make_app


def test_flask_canary_passes_shadow_to_its_middleware() -> None:
    from flask import Flask

    from canarymw.flask import Canary

    app = Flask("blue")
    seen = Seen()
    headers = [("Content-Type", "text/html; charset=utf-8")]
    shadow = Shadow(make_app("wsgi", body=b"Hello, Blue!", headers=headers, seen=seen))
    canary = Canary(app, rollout=Rollout("flask-v2", percent=0, secret_key=KEY), shadow=shadow)

    @app.route("/")
    @canary.split(new=lambda: "Hello, Green!")
    def hello() -> str:
        return "Hello, Blue!"

    with app.test_client() as client:
        # Closed at once (buffered): the copy goes once the response has finished.
        assert client.get("/", buffered=True).text == "Hello, Blue!"
    assert shadow.drain(5)
    assert app.extensions["canarymw"].middleware.shadow is shadow
    assert seen.flags == [True]
    assert {k: v for k, v in shadow.report().total.counts.items() if v} == {"match": 1}


def test_starlette_split_passes_shadow_and_takes_an_endpoint() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    from canarymw.starlette import CanaryRoute

    async def old(request: Request) -> Any:
        return PlainTextResponse("old")

    async def new(request: Request) -> Any:
        return PlainTextResponse("new")

    async def candidate(request: Request) -> Any:
        return PlainTextResponse("candidate")

    rollout = Rollout("starlette-v2", percent=0, secret_key=KEY)
    route = CanaryRoute("/items/{id}", old, new, rollout=rollout, shadow=candidate)
    app = Starlette(routes=[route])
    with TestClient(app) as client:
        assert client.get("/items/3").text == "old"
        shadow = route.endpoint.shadow  # type: ignore[attr-defined]
        assert isinstance(shadow, Shadow)
        assert shadow.drain(5)
    [sample] = shadow.report().routes["/items/{id}"].samples
    assert sample.differences == ("body",) and sample.path == "/items/3"
