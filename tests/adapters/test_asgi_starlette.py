"""canarymw.starlette: one route split between an old and a new endpoint."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from canarymw import Decision, Rollout
from canarymw.asgi import ASGICanaryMiddleware
from canarymw.starlette import CanaryRoute, SplitEndpoint, get_decision, get_variant, split

from ..harness import RecordingSink, TestClient, http_scope

# Every test here runs with both implementations of the HTTP request path.

MakeRollout = Callable[..., Rollout]


async def checkout(request: Request) -> Response:
    return PlainTextResponse(f"old checkout {request.path_params.get('cart', '-')} {get_variant(request)}")


async def checkout_v2(request: Request) -> Response:
    return PlainTextResponse(f"new checkout {request.path_params.get('cart', '-')} {get_variant(request)}")


async def about(request: Request) -> Response:
    return PlainTextResponse(f"about {get_variant(request)}")


def shop(rollout: Rollout, sink: RecordingSink | None = None) -> Starlette:
    return Starlette(
        routes=[
            CanaryRoute("/checkout/{cart}", checkout, checkout_v2, rollout=rollout, sink=sink),
            Route("/about", about),
        ]
    )


def test_split_route_is_sticky_and_only_it_gets_a_cookie(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    sink = RecordingSink()
    seen = set()
    for _ in range(30):
        with TestClient(shop(rollout, sink)) as client:
            about_page = client.get("/about")
            assert about_page.text == "about None"
            assert "set-cookie" not in about_page.headers and "vary" not in about_page.headers
            first = client.get("/checkout/7")
            assert "canarymw=" in first.headers["set-cookie"] and first.headers["vary"] == "Cookie"
            assert all(client.get("/checkout/8").text == first.text.replace(" 7 ", " 8 ") for _ in range(3))
            seen.add(first.text)
    assert seen == {"old checkout 7 old", "new checkout 7 new"}
    assert len(sink.outcomes) == 120 and {o.route for o in sink.outcomes} == {"/checkout/{cart}"}


def marks(response: Any) -> tuple[bool, bool, bool]:
    """(a cohort cookie was set, Vary has Cookie, Cache-Control has private)."""
    vary = {v.strip().lower() for v in response.headers.get("vary", "").split(",")}
    cache = {d.strip().lower() for d in response.headers.get("cache-control", "").split(",")}
    cookie = any(c.startswith("canarymw=") for c in response.headers.get_list("set-cookie"))
    return cookie, "cookie" in vary, "private" in cache


async def cart(request: Request) -> Response:
    return PlainTextResponse(f"cart {get_variant(request)}")


@pytest.mark.parametrize("percent", [0, 50, 100])
def test_only_split_routes_are_marked_and_assign_a_cohort(make_rollout: MakeRollout, percent: float) -> None:
    exposed: list[Decision] = []
    rollout = make_rollout(percent, on_exposure=exposed.append)
    app = Starlette(
        routes=[
            CanaryRoute("/checkout/{cart}", checkout, checkout_v2, rollout=rollout),
            Route("/cart", split(cart, cart, rollout=rollout), methods=["GET"]),
            Route("/about", about),  # reads get_variant: None outside a split route
        ]
    )
    with TestClient(app) as client:
        for _ in range(2):
            plain = client.get("/about")
            assert plain.text == "about None" and marks(plain) == (False, False, False)
        assert rollout.counters["assigned"] == 0 and exposed == []  # no cohort before a split route
        first = client.get("/checkout/1")
        assert marks(first) == (True, True, True)
        assert rollout.counters["assigned"] == 1 and len(exposed) == 1
        assert first.text.endswith(exposed[0].variant)
        assert marks(client.get("/about")) == (False, False, False)  # still unmarked, cookie or not
        other = client.get("/cart")
        assert other.text == f"cart {exposed[0].variant}" and marks(other) == (False, True, True)
        assert marks(client.get("/missing")) == (False, False, False)
    assert rollout.counters["assigned"] == 1


def test_canary_route_defaults_like_route(make_rollout: MakeRollout) -> None:
    route = CanaryRoute("/checkout/{cart}", checkout, checkout_v2, rollout=make_rollout(50))
    assert route.name == "checkout" and route.methods == {"GET", "HEAD"}
    assert route.old_endpoint is checkout and route.new_endpoint is checkout_v2
    assert isinstance(route.endpoint, SplitEndpoint)
    app = Starlette(routes=[route])
    assert app.url_path_for("checkout", cart="3") == "/checkout/3"
    with TestClient(app) as client:
        assert client.post("/checkout/3").status_code == 405
        assert client.head("/checkout/3").status_code == 200


def test_split_inside_route_with_methods_and_other_endpoint_kinds(make_rollout: MakeRollout) -> None:
    threads: list[str] = []

    class Old(HTTPEndpoint):
        async def post(self, request: Request) -> Response:
            return PlainTextResponse("old endpoint class")

    def new_sync(request: Request, greeting: str) -> Response:
        threads.append(threading.current_thread().name)
        return PlainTextResponse(f"{greeting} from a thread")

    rollout = make_rollout(0)
    endpoint = split(Old, functools.partial(new_sync, greeting="hi"), rollout=rollout)
    app = Starlette(routes=[Route("/cart", endpoint, methods=["POST"])])
    with TestClient(app) as client:
        assert client.post("/cart").text == "old endpoint class"
        rollout.percent = 100
        assert client.post("/cart").text == "hi from a thread"
        assert client.get("/cart").status_code == 405
    assert threads and threads[0] != threading.main_thread().name


def test_split_under_a_whole_app_middleware_of_the_same_rollout(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    outer_sink, inner_sink = RecordingSink(), RecordingSink()
    app = Starlette(
        routes=[CanaryRoute("/checkout/{cart}", checkout, checkout_v2, rollout=rollout, sink=inner_sink)],
        middleware=[Middleware(ASGICanaryMiddleware, new=None, rollout=rollout, sink=outer_sink)],
    )
    for _ in range(10):
        with TestClient(app) as client:
            first = client.get("/checkout/1")
            assert len(first.headers.get_list("set-cookie")) == 1
            assert client.get("/checkout/1").text == first.text
            words = first.text.split()
            assert words[0] == words[-1]  # the endpoint chosen matches the variant handlers read
    assert inner_sink.outcomes == [] and len(outer_sink.outcomes) == 20
    assert {o.route for o in outer_sink.outcomes} == {"/checkout/{cart}"}
    assert rollout.counters["assigned"] == 10


def test_split_under_a_mount_records_the_inner_template(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    inner = Starlette(
        routes=[CanaryRoute("/checkout/{cart}", checkout, checkout_v2, rollout=make_rollout(100), sink=sink)]
    )
    app = Starlette(routes=[Mount("/shop", app=inner)])
    with TestClient(app) as client:
        assert client.get("/shop/checkout/5").text == "new checkout 5 new"
    assert [o.route for o in sink.outcomes] == ["/checkout/{cart}"]


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        pytest.param(http_scope(), None, id="scope, not routed"),
        pytest.param(Request(http_scope()), None, id="request, not routed"),
    ],
)
def test_get_decision_when_not_routed(conn: Any, expected: Any) -> None:
    assert get_decision(conn) is expected and get_variant(conn) is expected


def test_get_decision_on_scope_and_request(make_rollout: MakeRollout) -> None:
    decision = make_rollout(100).decide(None)
    scope = http_scope()
    scope["canarymw.decision"] = decision
    assert get_decision(scope) is decision and get_decision(Request(scope)) is decision
    assert get_variant(Request(scope)) == "new"


def test_canary_route_with_a_partial_and_explicit_options(make_rollout: MakeRollout) -> None:
    async def page(request: Request, label: str) -> Response:
        return PlainTextResponse(label)

    route = CanaryRoute(
        "/p",
        functools.partial(page, label="old"),
        functools.partial(page, label="new"),
        rollout=make_rollout(100),
        methods=["POST"],
        name="page",
    )
    assert route.name == "page" and route.methods == {"POST"}
    with TestClient(Starlette(routes=[route])) as client:
        assert client.post("/p").text == "new" and client.get("/p").status_code == 405


@pytest.mark.parametrize("custom", [False, True], ids=["default rule", "custom classifier"])
def test_the_route_reaches_a_memory_sinks_classifier(make_rollout: MakeRollout, custom: bool) -> None:
    """A plain MemorySink folds without reading routes (the adapter skips looking them up);
    one with a classifier gets every outcome whole, route template included."""
    from canarymw.sinks import MemorySink, Outcome

    seen: list[Outcome] = []

    def rule(o: Outcome) -> bool:
        seen.append(o)
        return o.status is not None and o.status < 500

    app = Starlette(routes=[Route("/checkout/{cart}", checkout)])
    sink = MemorySink(classify=rule) if custom else MemorySink()
    mw = ASGICanaryMiddleware(app, new=app, rollout=make_rollout(50), sink=sink)
    with TestClient(mw) as client:
        for i in range(5):
            assert client.get(f"/checkout/{i}").status_code == 200
    stats = sink.snapshot()
    assert sum(v.requests for v in stats.values()) == 5 and sum(v.errors for v in stats.values()) == 0
    assert [o.route for o in seen] == (["/checkout/{cart}"] * 5 if custom else [])
