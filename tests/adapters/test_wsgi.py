"""PEP 3333 details of the WSGI adapter, and a real gunicorn with several workers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.validate import validator

import httpx
import pytest

from canarymw import MemorySink, Outcome, Rollout, WSGICanaryMiddleware

from ..harness import RecordingSink, WSGITransport
from ..servers import free_port, gunicorn, serve

# Every test here runs against both implementations of the adapter's response path.

KEY = "test-secret-key-0123456789abcdef"


def sandwich(old: Any, new: Any, percent: float = 50, **kw: Any) -> tuple[Any, RecordingSink]:
    sink = RecordingSink()
    rollout = Rollout("w", percent=percent, secret_key=KEY)
    mw = WSGICanaryMiddleware(validator(old), new=validator(new), rollout=rollout, sink=sink, **kw)
    return validator(mw), sink


def get(app: Any, path: str = "/", **kw: Any) -> httpx.Response:
    with httpx.Client(transport=WSGITransport(app), base_url="http://t") as c:
        return c.get(path, **kw)


def lazy_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    # start_response is called on the first iteration, which PEP 3333 allows.
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"lazy"


def write_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    return [b"returned"]


def test_lazy_start_response_and_write_callable() -> None:
    app, _ = sandwich(lazy_app, lazy_app)
    response = get(app)
    assert response.text == "lazy" and response.headers["vary"] == "Cookie"
    body: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return body.append

    mw = WSGICanaryMiddleware(write_app, new=write_app, rollout=Rollout("w", percent=5, secret_key=KEY))
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}
    result = mw(env, start_response)
    body.extend(result)
    result.close()  # type: ignore[attr-defined]
    assert b"".join(body) == b"written returned"


def test_exc_info_is_passed_through_and_error_response_gets_our_headers() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"error page"]

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append((status, dict(headers), exc_info))
        return lambda data: None

    sink = RecordingSink()
    mw = WSGICanaryMiddleware(app, new=app, rollout=Rollout("w", percent=5, secret_key=KEY), sink=sink)
    result = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start_response)
    assert list(result) == [b"error page"]
    result.close()  # type: ignore[attr-defined]
    assert seen[1][0].startswith("500") and seen[1][2][0] is ValueError
    assert seen[1][1]["Vary"] == "Cookie" and "Set-Cookie" in seen[1][1]
    assert sink.outcomes[0].status == 500


def test_inner_close_called_exactly_once_and_outcome_once() -> None:
    closes: list[int] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            closes.append(1)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body()

    sink = RecordingSink()
    mw = WSGICanaryMiddleware(app, new=app, rollout=Rollout("w", percent=5, secret_key=KEY), sink=sink)
    result = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: None)
    assert list(result) == [b"x"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert closes == [1] and len(sink.outcomes) == 1


def test_client_abandons_generator_after_one_chunk() -> None:
    log: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            for i in range(100):
                log.append(f"chunk {i}")
                yield b"chunk"
        finally:
            log.append("closed")

    app_v, sink = sandwich(app, app)
    result = app_v({"REQUEST_METHOD": "GET", "PATH_INFO": "/", **_base_env()}, lambda s, h, e=None: None)
    iterator = iter(result)
    assert next(iterator) == b"chunk"
    result.close()  # the server gives up: the client went away
    assert log == ["chunk 0", "closed"]
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.status == 200 and outcome.error is None


def test_inner_close_raising_is_recorded_and_reraised() -> None:
    class Body(list[bytes]):
        def close(self) -> None:
            raise OSError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body([b"x"])

    sink = RecordingSink()
    mw = WSGICanaryMiddleware(app, new=app, rollout=Rollout("w", percent=5, secret_key=KEY), sink=sink)
    result = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: None)
    list(result)
    with pytest.raises(OSError, match="close failed"):
        result.close()  # type: ignore[attr-defined]
    assert sink.outcomes[0].error == "OSError"


def test_app_headers_list_is_not_mutated() -> None:
    headers = [("Content-Type", "text/plain"), ("Vary", "Accept")]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", headers)
        return [b""]

    get(WSGICanaryMiddleware(app, new=app, rollout=Rollout("w", percent=5, secret_key=KEY)))
    assert headers == [("Content-Type", "text/plain"), ("Vary", "Accept")]


def test_decision_in_environ_and_new_none_routes_to_old() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["canarymw.decision"].variant.encode()]

    mw = WSGICanaryMiddleware(validator(app), new=None, rollout=Rollout("w", percent=100, secret_key=KEY))
    assert get(validator(mw)).text == "new"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"new": 3}, "new= to be a WSGI app", id="new not callable"),
        pytest.param({"rollout": "r"}, "canarymw.Rollout", id="rollout wrong type"),
        pytest.param({"sink": object()}, "record", id="sink without record"),
    ],
)
def test_construction_errors(kwargs: dict[str, Any], error: str) -> None:
    base: dict[str, Any] = {"new": lazy_app, "rollout": Rollout("w", percent=5, secret_key=KEY)}
    with pytest.raises(TypeError, match=error):
        WSGICanaryMiddleware(lazy_app, **{**base, **kwargs})


def _base_env() -> dict[str, Any]:
    import io

    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
    }


@pytest.mark.server
def test_gunicorn_workers_agree_on_every_users_variant() -> None:
    port = free_port()
    rollout = Rollout("hello-v2", percent=30, secret_key=KEY)
    with serve(gunicorn("tests.apps.wsgi_pair:app", port, workers=2), port, ready_path="/healthz") as base:

        def user(_: int) -> tuple[set[str], set[str], str]:
            with httpx.Client(base_url=base, timeout=10) as c:
                bodies, pids = set(), set()
                for _ in range(4):
                    r = c.get("/")
                    assert r.status_code == 200
                    bodies.add(r.text)
                    pids.add(r.headers["x-pid"])
                cookie = c.cookies["canarymw"]
            return bodies, pids, cookie

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(user, range(150)))
    all_pids: set[str] = set()
    greens = 0
    for bodies, pids, cookie in results:
        assert len(bodies) == 1, bodies  # sticky across requests and workers
        expected = rollout.decide(f"canarymw={cookie}").variant
        assert bodies == {"Hello, Green World!" if expected == "new" else "Hello, Blue World!"}
        greens += expected == "new"
        all_pids |= pids
    assert len(all_pids) == 2  # both workers served
    assert 15 <= greens <= 80  # about 30% of 150


def test_memory_sink_with_a_custom_classifier_sees_outcomes() -> None:
    """Outcomes reach a MemorySink's queue without a record() call; a custom classifier
    still gets Outcome objects."""
    seen: list[object] = []

    def classify(outcome: Any) -> bool:
        seen.append(type(outcome))
        return bool(outcome.status != 404)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK", [])
        return [b""]

    sink = MemorySink(classify=classify)
    rollout = Rollout("w", percent=0, secret_key=KEY)
    mw = WSGICanaryMiddleware(app, new=app, rollout=rollout, sink=sink)
    for path in ["/missing"] * 3 + ["/"] * 300:
        result = mw({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda s, h, e=None: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
    stats = sink.snapshot()["old"]
    assert (stats.requests, stats.errors, stats.statuses) == (303, 3, {2: 300, 4: 3})
    assert set(seen) == {Outcome}
