"""Shadow traffic through both adapters: what is copied, what is compared, what is
counted, and that nothing the shadow does reaches the user."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Any

import pytest

from canarymw import Rollout, Shadow, WSGICanaryMiddleware
from canarymw.asgi import ASGICanaryMiddleware
from canarymw.shadow import RESULTS, Comparison, ShadowRequest, ShadowResponse

from ..conftest import KEY
from ..harness import ASGIKit, WSGIKit
from .apps import Seen, make_app

Kit = WSGIKit | ASGIKit


def rollout(percent: float = 0, **kw: Any) -> Rollout:
    return Rollout(kw.pop("name", "shadow-v2"), percent=percent, secret_key=KEY, **kw)


def serve(kit: Kit, primary: Any, shadow: Any, *, percent: float = 0, new: Any = None, **kw: Any) -> Any:
    """The middleware (between spec checkers) over ``primary`` with ``shadow=``."""
    return kit.wrap(primary, new, rollout(percent, **kw.pop("rollout_kw", {})), shadow=shadow, **kw)


def run(kit: Kit, app: Any, shadow: Shadow, requests: int = 1, **request: Any) -> list[Any]:
    """Send ``requests`` GETs (or ``method=``), wait until the shadow compared them all."""
    method = request.pop("method", "GET")
    path = request.pop("path", "/items/7?q=1")
    with kit.client(app) as client:
        responses = [client.request(method, path, **request) for _ in range(requests)]
        assert shadow.drain(10)
    return responses


def counts(shadow: Shadow) -> dict[str, int]:
    return {k: v for k, v in shadow.report().total.counts.items() if v}


def test_a_copy_that_answers_the_same_is_a_match(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind))
    app = serve(kit, make_app(kit.kind), shadow)
    [response] = run(kit, app, shadow)
    assert response.text == "hello"
    report = shadow.report()
    assert counts(shadow) == {"match": 1}
    assert report.total.compared == 1 and report.total.mismatch_rate == 0.0
    assert list(report.routes) == ["-"]  # no route template known: never the raw path
    assert report.routes["-"].samples == ()
    assert report.queued == report.running == 0


@pytest.mark.parametrize(
    ("shadow_kw", "parts"),
    [
        pytest.param({"status": 500}, ("status",), id="status"),
        pytest.param({"headers": [("Content-Type", "text/html")]}, ("headers",), id="content-type"),
        pytest.param(
            {"headers": [("Content-Type", "text/plain"), ("Location", "/elsewhere")]},
            ("headers",),
            id="location",
        ),
        pytest.param({"body": b"hullo"}, ("body",), id="body"),
        pytest.param({"status": 404, "body": b"gone"}, ("status", "body"), id="status and body"),
    ],
)
def test_a_copy_that_answers_otherwise_is_a_mismatch_naming_what_differs(
    kit: Kit, shadow_kw: dict[str, Any], parts: tuple[str, ...]
) -> None:
    shadow = Shadow(make_app(kit.kind, **shadow_kw))
    app = serve(kit, make_app(kit.kind), shadow)
    [response] = run(kit, app, shadow)
    assert (response.status_code, response.text) == (200, "hello")  # the user sees the primary only
    assert counts(shadow) == {"mismatch": 1}
    [sample] = shadow.report().routes["-"].samples
    assert sample.result == "mismatch" and sample.differences == parts
    assert (sample.method, sample.path, sample.rollout, sample.variant) == (
        "GET",
        "/items/7?q=1",
        "shadow-v2",
        "old",
    )
    assert sample.primary_status == 200 and sample.shadow_status == shadow_kw.get("status", 200)
    assert dict(shadow.report().total.parts) == {p: int(p in parts) for p in ("status", "headers", "body")}
    if "headers" in parts:
        assert sample.headers and all(a != b for _, a, b in sample.headers)
    if "body" in parts:
        assert sample.body is not None and "first difference at byte" in sample.body


def test_only_the_headers_that_matter_are_compared_and_the_list_is_configurable(kit: Kit) -> None:
    primary = make_app(kit.kind, headers=[("Content-Type", "text/plain"), ("X-Served-By", "blue")])
    other = make_app(kit.kind, headers=[("Content-Type", "text/plain"), ("X-Served-By", "green")])
    default = Shadow(other)
    run(kit, serve(kit, primary, default), default)
    assert counts(default) == {"match": 1}
    chosen = Shadow(other, headers=["X-Served-By"])
    run(kit, serve(kit, primary, chosen), chosen)
    [sample] = chosen.report().routes["-"].samples
    assert sample.headers == (("x-served-by", "blue", "green"),)


def test_a_normaliser_masks_what_legitimately_differs(kit: Kit) -> None:
    stamped = "generated at {now}"

    def mask(r: ShadowResponse) -> ShadowResponse:
        return dataclasses.replace(r, body=re.sub(rb"\d+", b"N", r.body))

    raw = Shadow(make_app(kit.kind, body=stamped))
    run(kit, serve(kit, make_app(kit.kind, body=stamped), raw), raw)
    assert counts(raw) == {"mismatch": 1}
    masked = Shadow(make_app(kit.kind, body=stamped), normalize=mask)
    run(kit, serve(kit, make_app(kit.kind, body=stamped), masked), masked, requests=3)
    assert counts(masked) == {"match": 3}


def test_a_normaliser_that_raises_makes_the_copy_an_error(kit: Kit) -> None:
    def broken(r: ShadowResponse) -> ShadowResponse:
        raise KeyError("oops")

    shadow = Shadow(make_app(kit.kind), normalize=broken)
    [response] = run(kit, serve(kit, make_app(kit.kind), shadow), shadow)
    assert response.text == "hello"
    [sample] = shadow.report().routes["-"].samples
    assert (sample.result, sample.error) == ("error", "normalize raised KeyError")


def test_the_cohort_cookie_is_stripped_unless_configured(kit: Kit) -> None:
    cookies = {"canarymw": "signed-cohort-id", "theme": "dark", "sid": "abc"}
    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    run(
        kit,
        serve(kit, make_app(kit.kind), shadow),
        shadow,
        headers={"Cookie": "canarymw=signed-cohort-id; theme=dark"},
    )
    assert seen.cookies == ["theme=dark"]
    alone = Seen()
    shadow = Shadow(make_app(kit.kind, seen=alone))
    run(kit, serve(kit, make_app(kit.kind), shadow), shadow, headers={"Cookie": "canarymw=signed-cohort-id"})
    assert alone.cookies == [None]  # no empty Cookie header either
    sent = Seen()
    shadow = Shadow(make_app(kit.kind, seen=sent), send_cohort_cookie=True)
    header = "; ".join(f"{k}={v}" for k, v in cookies.items())
    run(kit, serve(kit, make_app(kit.kind), shadow), shadow, headers={"Cookie": header})
    assert sent.cookies == [header]


def test_the_cohort_cookie_is_stripped_from_repeated_cookie_headers(kit: Kit) -> None:
    # Two Cookie headers: WSGI servers join them with ", " into one (PEP 3333), ASGI keeps two.
    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    two = [("Cookie", "theme=dark"), ("Cookie", "canarymw=signed-cohort-id; sid=abc")]
    run(kit, serve(kit, make_app(kit.kind), shadow), shadow, headers=two)
    [got] = seen.cookies
    assert got is not None and "canarymw" not in got
    assert got.replace(",", ";").replace(" ", "").split(";") == ["theme=dark", "sid=abc"]


def test_a_custom_cohort_cookie_name_is_the_one_stripped(kit: Kit) -> None:
    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    app = serve(kit, make_app(kit.kind), shadow, rollout_kw={"cookie_name": "cohort"})
    run(kit, app, shadow, headers={"Cookie": "canarymw=keep; cohort=drop"})
    assert seen.cookies == ["canarymw=keep"]


def test_the_copy_is_marked_and_carries_no_decision_nor_force_token(kit: Kit) -> None:
    seen, primary_seen = Seen(), Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    app = serve(
        kit, make_app(kit.kind, seen=primary_seen), shadow, rollout_kw={"force_token": "tok-0123456789abcdef"}
    )
    run(kit, app, shadow, headers={"X-Canarymw-Force": "old:tok-0123456789abcdef"})
    assert primary_seen.flags == [False] and primary_seen.decisions == [True]
    assert seen.flags == [True] and seen.decisions == [False]
    assert seen.paths == primary_seen.paths == ["/items/7?q=1"]
    assert seen.forced == primary_seen.forced == [False]


def test_requests_with_side_effects_are_not_copied_by_default(kit: Kit) -> None:
    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    app = serve(kit, make_app(kit.kind), shadow)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        run(kit, app, shadow, method=method, content=b"x=1")
    run(kit, app, shadow, method="HEAD")
    assert len(seen.cookies) == 1  # the HEAD
    assert counts(shadow) == {"match": 1}


def test_allowed_methods_replay_the_request_body(kit: Kit) -> None:
    seen, primary_seen = Seen(), Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen), methods=["GET", "POST"], max_request_body=10)
    app = serve(kit, make_app(kit.kind, seen=primary_seen), shadow)
    run(kit, app, shadow, method="POST", content=b"x=1")
    assert primary_seen.bodies == seen.bodies == [b"x=1"]
    assert counts(shadow) == {"match": 1}
    run(kit, app, shadow, method="POST", content=b"x" * 11)
    assert primary_seen.bodies[-1] == b"x" * 11 and len(seen.bodies) == 1
    [sample] = [s for s in shadow.report().routes["-"].samples if s.result == "not-compared"] or [None]
    assert counts(shadow) == {"match": 1, "not-compared": 1}
    assert sample is None  # samples keep mismatches and failures only


def test_a_predicate_chooses_among_the_allowed_methods(kit: Kit) -> None:
    asked: list[ShadowRequest] = []

    def only_items(request: ShadowRequest) -> bool:
        asked.append(request)
        return request.path.startswith("/items") and request.headers.get("x-tenant") != "vip"

    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen), when=only_items)
    app = serve(kit, make_app(kit.kind), shadow)
    run(kit, app, shadow, path="/items/1")
    run(kit, app, shadow, path="/items/2", headers={"X-Tenant": "vip"})
    run(kit, app, shadow, path="/other")
    run(kit, app, shadow, method="POST", path="/items/3")  # the method rules first
    assert seen.paths == ["/items/1?"]
    assert [(r.method, r.path) for r in asked] == [
        ("GET", "/items/1"),
        ("GET", "/items/2"),
        ("GET", "/other"),
    ]
    assert asked[1].query == "" and asked[1].headers["x-tenant"] == "vip"


def test_a_predicate_that_raises_copies_nothing(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind), when=lambda r: 1 / 0)
    [response] = run(kit, serve(kit, make_app(kit.kind), shadow), shadow)
    assert response.text == "hello" and counts(shadow) == {}


@pytest.mark.parametrize(
    ("primary", "percent", "copied"),
    [
        pytest.param("old", 0, True, id="old at 0%"),
        pytest.param("old", 100, False, id="old at 100%"),
        pytest.param("new", 100, True, id="new at 100%"),
        pytest.param("new", 0, False, id="new at 0%"),
        pytest.param("both", 0, True, id="both at 0%"),
        pytest.param("both", 100, True, id="both at 100%"),
    ],
)
def test_primary_chooses_whose_requests_are_copied(
    kit: Kit, primary: str, percent: float, copied: bool
) -> None:
    shadow = Shadow(make_app(kit.kind), primary=primary)  # type: ignore[arg-type]
    app = serve(
        kit, make_app(kit.kind, body=b"old"), shadow, percent=percent, new=make_app(kit.kind, body=b"new")
    )
    run(kit, app, shadow)
    total = shadow.report().total
    assert sum(total.counts.values()) == int(copied)


def test_a_full_queue_drops_copies_and_counts_them(kit: Kit) -> None:
    gate = threading.Event()
    shadow = Shadow(make_app(kit.kind, gate=gate), queue_size=1, concurrency=1)
    app = serve(kit, make_app(kit.kind), shadow)
    with kit.client(app) as client:
        started = time.perf_counter()
        responses = [client.get("/") for _ in range(5)]
        elapsed = time.perf_counter() - started
        assert [r.text for r in responses] == ["hello"] * 5
        assert elapsed < 5  # the gate holds the shadow for 10 s: the user never waits for it
        report = shadow.report()
        assert (report.running, report.queued) == (1, 1)
        assert report.total.counts["dropped"] == 3
        gate.set()
        assert shadow.drain(10)
    assert counts(shadow) == {"match": 2, "dropped": 3}


def test_a_failing_shadow_never_reaches_the_user(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind, fail=True))
    responses = run(kit, serve(kit, make_app(kit.kind), shadow), shadow, requests=3)
    assert [(r.status_code, r.text) for r in responses] == [(200, "hello")] * 3
    assert counts(shadow) == {"error": 3}
    samples = shadow.report().routes["-"].samples
    assert [(s.result, s.error, s.shadow_status) for s in samples] == [("error", "ShadowBoom", None)] * 3


def test_a_slow_shadow_times_out_without_slowing_the_user(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind, delay=0.3), timeout=0.1)
    app = serve(kit, make_app(kit.kind), shadow)
    with kit.client(app) as client:
        started = time.perf_counter()
        response = client.get("/")
        assert time.perf_counter() - started < 0.25
        assert response.text == "hello"
        assert shadow.drain(10)
    [sample] = shadow.report().routes["-"].samples
    assert sample.result == "timeout" and sample.duration is not None and sample.duration >= 0.1


def test_samples_are_bounded_per_route_and_keep_the_newest(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind, body="shadow {now}", route="/items/{id}"), samples=2)
    app = serve(kit, make_app(kit.kind, route="/items/{id}"), shadow)
    for i in range(5):
        run(kit, app, shadow, path=f"/items/{i}")
    route = shadow.report().routes["/items/{id}"]
    assert route.counts["mismatch"] == 5 and route.mismatch_rate == 1.0
    assert [s.path for s in route.samples] == ["/items/3", "/items/4"]
    assert all(s.route == "/items/{id}" for s in route.samples)
    assert Shadow(make_app(kit.kind), samples=0).samples == 0


def test_bodies_over_max_body_are_not_compared_but_status_still_is(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind, body=b"x" * 100), max_body=10)
    run(kit, serve(kit, make_app(kit.kind, body=b"y" * 100), shadow), shadow)
    assert counts(shadow) == {"not-compared": 1}
    status = Shadow(make_app(kit.kind, status=503, body=b"x" * 100), max_body=10)
    run(kit, serve(kit, make_app(kit.kind, body=b"y" * 100), status), status)
    [sample] = status.report().routes["-"].samples
    assert sample.differences == ("status",)


def test_a_primary_that_fails_is_not_compared(kit: Kit) -> None:
    seen = Seen()
    shadow = Shadow(make_app(kit.kind, seen=seen))
    app = kit.raw_wrap(make_app(kit.kind, fail=True), None, rollout(), shadow=shadow)
    with kit.client(app) as client, pytest.raises(Exception, match="the shadow broke"):
        client.get("/")
    assert shadow.drain(5)
    assert counts(shadow) == {"not-compared": 1} and seen.cookies == []


def test_an_app_as_shadow_gets_the_defaults(kit: Kit) -> None:
    target = make_app(kit.kind)
    middleware = kit.raw_wrap(make_app(kit.kind), None, rollout(), shadow=target)
    assert isinstance(middleware.shadow, Shadow) and middleware.shadow.target is target
    assert middleware.shadow.methods == {"GET", "HEAD"} and middleware.shadow.primary == "old"
    assert kit.raw_wrap(make_app(kit.kind), None, rollout()).shadow is None


def test_one_shadow_serves_one_protocol(kit: Kit) -> None:
    shadow = Shadow(make_app(kit.kind))
    kit.raw_wrap(make_app(kit.kind), None, rollout(), shadow=shadow)
    kit.raw_wrap(make_app(kit.kind), None, rollout(name="another"), shadow=shadow)  # same protocol: fine
    other = "asgi" if kit.kind == "wsgi" else "wsgi"
    cls = ASGICanaryMiddleware if other == "asgi" else WSGICanaryMiddleware
    with pytest.raises(ValueError, match=f"already serves a {kit.kind.upper()} middleware"):
        cls(make_app(other), new=None, rollout=rollout(), shadow=shadow)


def test_comparisons_reach_the_sinks_that_take_them(kit: Kit) -> None:
    class Comparisons:
        def __init__(self) -> None:
            self.got: list[Comparison] = []
            self.outcomes: list[Any] = []

        def record(self, outcome: Any) -> None:
            self.outcomes.append(outcome)

        def record_comparison(self, comparison: Comparison) -> None:
            self.got.append(comparison)

    class Broken:
        def record(self, outcome: Any) -> None:
            pass

        def record_comparison(self, comparison: Comparison) -> None:
            raise OSError("full disk")

    sink = Comparisons()
    shadow = Shadow(make_app(kit.kind, body=b"other"))
    app = serve(kit, make_app(kit.kind), shadow, sink=[sink, Broken()])
    run(kit, app, shadow, requests=2)
    assert [c.result for c in sink.got] == ["mismatch", "mismatch"]
    assert [o.variant for o in sink.outcomes] == ["old", "old"]  # comparisons are no outcomes
    assert shadow.report().sink_errors == 2


def test_the_report_is_json_ready(kit: Kit) -> None:
    import json

    shadow = Shadow(make_app(kit.kind, status=500, route="/r"))
    run(kit, serve(kit, make_app(kit.kind, route="/r"), shadow), shadow)
    data = json.loads(json.dumps(shadow.report().as_dict()))
    assert data["total"]["counts"] == {r: int(r == "mismatch") for r in RESULTS}
    [sample] = data["routes"]["/r"]["samples"]
    assert sample["request"] == "GET /items/7?q=1" and sample["differences"] == ["status"]
