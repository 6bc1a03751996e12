"""Hostile input: what an attacker can send, against both adapters and both request paths.

Each attack here was once a defect: memory and CPU amplification through the cohort
cookie caches, a force token that travelled on to the app, a quadratic join of many
cookie headers, a sink's BaseException handled differently by the two request paths.
The core's own share of these attacks is in ``core/test_hostile.py``, the proxy's in
``upstream/test_hostile.py``; where the behaviour depends on a real server (what gunicorn
puts in ``RAW_URI``, how uvicorn splits headers), ``real_servers/test_hostile.py`` sends
the attack through one. The shared request driver is ``tests/attacks.py``.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

import pytest

import canarymw._rollout
from canarymw import Outcome, Rollout

from ..attacks import (
    KEY,
    TOKEN,
    CountingCodec,
    Kit,
    Request,
    Served,
    _serve_wsgi,
    cohort_cookie,
    forged_values,
    seeing_app,
    serve_all,
    set_cookie_of,
)
from ..harness import ASGIKit, WSGIKit


def cache_chars(rollout: Rollout) -> int:
    return sum(map(len, rollout._by_header)) + sum(map(len, rollout._seen))


# -- 1. memory amplification through the returning-visitor cache ------------------------
@pytest.mark.parametrize(
    "junk_size", [pytest.param(3_500, id="3.5 KB junk"), pytest.param(8_000, id="8 KB junk")]
)
def test_a_junk_neighbour_cookie_per_request_does_not_grow_memory(kit: Kit, junk_size: int) -> None:
    """One valid cohort cookie sent with a different junk neighbour on every request:
    memory held stays within the caches' character budget, whatever the header size."""
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    seen: list[dict[str, Any]] = []
    app = kit.raw_wrap(seeing_app(kit, seen), None, rollout)
    valid = cohort_cookie(rollout)
    count = 3_000
    # Made while memory is traced, as a server makes each request's header strings.
    requests = (Request(headers=[("cookie", f"j{i}={'x' * junk_size}; {valid}")]) for i in range(count))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        served = serve_all(kit, app, requests)
        seen.clear()
        del served, requests
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    budget = canarymw._rollout._CACHE_CHARS
    # Without a bound this holds count * junk_size characters (10.5 MB and 24 MB here).
    assert count * junk_size > 1.7 * budget
    assert grown < 1.25 * budget, f"{grown} bytes held after {count} requests"
    assert cache_chars(rollout) <= 2 * budget
    assert rollout.counters["assigned"] == 1  # the same visitor throughout


# -- 2. CPU amplification through many cohort values in one header ----------------------
@pytest.mark.parametrize("keys", [1, 3])
def test_hundreds_of_cohort_values_cost_two_checks_and_one_rejection(kit: Kit, keys: int) -> None:
    secret = [f"{KEY}-{i}" for i in range(keys)]
    rollout = Rollout("hostile", percent=50, secret_key=secret)
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout)
    valid = cohort_cookie(rollout)
    codec = rollout._codec = CountingCodec(rollout._codec)  # type: ignore[assignment]
    stuffed = f"{forged_values(570)}; {valid}"
    assert len(stuffed) > 8_000
    served = serve_all(kit, app, [Request(headers=[("cookie", stuffed)])] * 5)
    assert all(s.status == 200 and s.raised is None for s in served)
    assert codec.checks <= 2 * 5
    assert rollout.counters["cookie_rejected"] == 5  # one per request
    assert all(set_cookie_of(s) for s in served)  # the valid value came too late: reassigned


def test_a_valid_cookie_among_the_first_two_values_is_honoured(kit: Kit) -> None:
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout)
    valid = cohort_cookie(rollout)
    [served] = serve_all(kit, app, [Request(headers=[("cookie", f"{forged_values(1)}; {valid}")])])
    assert set_cookie_of(served) is None
    assert rollout.counters["cookie_rejected"] == 1 and rollout.counters["assigned"] == 1


# -- 4. the force token never travels ---------------------------------------------------
@pytest.mark.parametrize("force_query", [True, False])
def test_the_force_token_never_reaches_the_app(kit: Kit, force_query: bool) -> None:
    rollout = Rollout("hostile", percent=0, secret_key=KEY, force_token=TOKEN, force_query=force_query)
    seen: list[dict[str, Any]] = []
    app = kit.raw_wrap(seeing_app(kit, seen), None, rollout)
    requests = [
        Request(headers=[("x-canarymw-force", f"new:{TOKEN}")], query="a=1&b=%20"),
        Request(query=f"a=1&canarymw_force=new:{TOKEN}&b=2"),
        Request(query=f"canarymw_force=new%3A{TOKEN}"),
        Request(headers=[("x-canarymw-force", "new:a-wrong-guess-0123456789")]),
    ]
    served = serve_all(kit, app, requests)
    assert [s.body for s in served] == [
        b"new",
        b"new" if force_query else b"old",
        b"new" if force_query else b"old",
        b"old",
    ]
    queries = []
    for given in seen:
        if kit.kind == "wsgi":
            assert not any("CANARYMW_FORCE" in key for key in given)
            queries.append(given["QUERY_STRING"])
        else:
            assert all(name != b"x-canarymw-force" for name, _ in given["headers"])
            queries.append(given["query_string"].decode())
        assert TOKEN not in repr(given).replace(repr(rollout), "")
    assert queries == ["a=1&b=%20", "a=1&b=2", "", ""]


def test_the_wsgi_request_uri_loses_the_token_too() -> None:
    rollout = Rollout("hostile", percent=0, secret_key=KEY, force_token=TOKEN, force_query=True)
    seen: list[dict[str, Any]] = []
    app = WSGIKit().raw_wrap(seeing_app(WSGIKit(), seen), None, rollout)
    environ_extra = {
        "RAW_URI": f"/p?a=1&canarymw_force=new:{TOKEN}",
        "REQUEST_URI": f"/p?canarymw_force=new:{TOKEN}",
    }
    original = _serve_wsgi

    def with_uris(app: Any, request: Request) -> Served:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            environ.update(environ_extra)
            return app(environ, start_response)

        return original(wrapped, request)

    served = with_uris(app, Request(path="/p", query=f"a=1&canarymw_force=new:{TOKEN}"))
    assert served.body == b"new"
    assert (seen[0]["RAW_URI"], seen[0]["REQUEST_URI"], seen[0]["QUERY_STRING"]) == ("/p?a=1", "/p", "a=1")


# -- 7. many separate cookie headers (ASGI) ---------------------------------------------
# WSGI servers hand the app one joined Cookie header; ASGI ones may send thousands.
def test_thousands_of_cookie_headers_are_joined_in_order() -> None:
    kit = ASGIKit()
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout)
    valid = cohort_cookie(rollout)
    headers = [("cookie", f"c{i}=v") for i in range(2_000)]
    headers.insert(1_000, ("cookie", valid))
    served = serve_all(kit, app, [Request(headers=headers)] * 2)
    assert all(set_cookie_of(s) is None for s in served)  # found in the middle: no reassignment
    assert rollout.counters["assigned"] == 1


def test_joining_cookie_headers_is_linear() -> None:
    """A complexity check, not a speed floor: 16x more cookie headers may cost about
    16x more (linear), never about 256x (a join by repeated concatenation)."""
    kit = ASGIKit()
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout)

    def cost(count: int) -> float:
        request = Request(headers=[("cookie", f"cookie{i}=value-{i:08d}") for i in range(count)])
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            [served] = serve_all(kit, app, [request])
            best = min(best, time.process_time() - started)
            assert served.status == 200
        return best

    small, large = cost(1_000), cost(16_000)
    assert large < 64 * small, f"1,000 headers: {small * 1e3:.2f} ms; 16,000: {large * 1e3:.2f} ms"


# -- 8. a sink that raises something other than an Exception ----------------------------
class RaisingSink:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def record(self, outcome: Outcome) -> None:
        self.calls += 1
        raise self.exc


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(KeyboardInterrupt, id="KeyboardInterrupt"),
        pytest.param(SystemExit, id="SystemExit"),
        pytest.param(asyncio.CancelledError, id="CancelledError"),
    ],
)
def test_a_sink_that_raises_a_base_exception_stops_the_request(kit: Kit, kind: type[BaseException]) -> None:
    """The rule on both paths: an Exception from a sink is counted and swallowed; any other
    BaseException (interrupt, exit, cancellation) propagates once the response is out."""
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    exc = kind()  # made here: a raised exception keeps the request's frames in its traceback
    sink = RaisingSink(exc)
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout, sink=sink)
    [served] = serve_all(kit, app, [Request()])
    assert served.status == 200 and served.body in (b"old", b"new")
    assert served.raised is exc
    assert sink.calls == 1 and app.sink_errors == 0


def test_a_sink_that_raises_an_exception_never_fails_the_request(kit: Kit) -> None:
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    sink = RaisingSink(RuntimeError("sink down"))
    app = kit.raw_wrap(seeing_app(kit, []), None, rollout, sink=sink)
    served = serve_all(kit, app, [Request()] * 3)
    assert all(s.status == 200 and s.raised is None for s in served)
    assert sink.calls == 3 and app.sink_errors == 3


def test_a_base_exception_from_the_sink_takes_the_app_error_as_its_context(kit: Kit) -> None:
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    sink = RaisingSink(KeyboardInterrupt())
    app = kit.raw_wrap(kit.boom(after_start=False), None, rollout, sink=sink)
    [served] = serve_all(kit, app, [Request()])
    assert isinstance(served.raised, KeyboardInterrupt)
    assert type(served.raised.__context__).__name__ == "Boom"
