"""ASGI-specific HTTP behaviour of ASGICanaryMiddleware, driven through a fake server."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import time
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from canarymw import MemorySink, Outcome, Rollout
from canarymw.asgi import ASGICanaryMiddleware

from ..harness import FakeServer, RecordingSink, TestClient, http_scope, run, validate_asgi

# Every test here runs with both implementations of the HTTP request path.

MakeRollout = Callable[..., Rollout]
Message = dict[str, Any]


def cookie_for(rollout: Rollout, variant: str) -> bytes:
    """A valid cohort cookie (``name=value``) that ``rollout`` puts on ``variant``."""
    for _ in range(1000):
        value = (rollout.decide(None).set_cookie or "").split(";")[0]
        if rollout.decide(value).variant == variant:
            return value.encode()
    raise AssertionError(f"no cohort on {variant}")


def labelled(label: str, *, headers: Any = None, start_extra: Message | None = None) -> Any:
    """A raw app answering ``label``; ``headers`` is passed as is (any shape)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        hs = [(b"content-type", b"text/plain")] if headers is None else headers
        await send({"type": "http.response.start", "status": 200, "headers": hs, **(start_extra or {})})
        await send({"type": "http.response.body", "body": label.encode()})

    return app


def middleware(old: Any, new: Any, rollout: Rollout, **kw: Any) -> ASGICanaryMiddleware:
    return ASGICanaryMiddleware(old, new=new, rollout=rollout, **kw)


# -- scope and message hygiene ------------------------------------------------------------


def test_scope_is_copied_and_the_servers_scope_is_untouched(make_rollout: MakeRollout) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        scope["mutated by app"] = True
        await labelled("old")(scope, receive, send)

    scope = http_scope(headers=[(b"cookie", b"a=1")])
    before = copy.deepcopy(scope)
    server = FakeServer()
    run(middleware(app, app, make_rollout(50))(scope, server.receive, server.send))
    assert scope == before
    [inner] = seen
    assert inner is not scope and inner["canarymw.decision"].rollout == "hello-v2"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"content-type", b"text/plain")], id="list of tuples"),
        pytest.param([[b"content-type", b"text/plain"]], id="list of lists"),
        pytest.param(((b"content-type", b"text/plain"),), id="tuple of tuples"),
        pytest.param([(b"vary", b"Accept"), (b"cache-control", b"max-age=5")], id="merge path"),
        pytest.param([[b"vary", b"Accept"], [b"vary", b"Origin"]], id="merge path, lists"),
    ],
)
def test_app_message_and_header_list_are_never_mutated(make_rollout: MakeRollout, headers: Any) -> None:
    sent: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = {"type": "http.response.start", "status": 200, "headers": headers}
        sent.append(message)
        await send(message)
        await send({"type": "http.response.body", "body": b"x"})

    pristine = copy.deepcopy(headers)
    server = FakeServer()
    run(validate_asgi(middleware(app, app, make_rollout(50)))(http_scope(), server.receive, server.send))
    assert (
        sent[0]["headers"] is headers
        and headers == pristine
        and set(sent[0]) == {"type", "status", "headers"}
    )
    out = server.header_list()
    assert server.sent[0] is not sent[0]
    assert b"canarymw=" in server.header(b"set-cookie")[0]
    assert b"cookie" in b",".join(server.header(b"vary")).lower()
    assert len(out) >= len(pristine) + 1


def test_headers_given_as_a_one_shot_iterator(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        hs = iter([(b"content-type", b"text/plain"), (b"vary", b"Accept")])
        await send({"type": "http.response.start", "status": 200, "headers": hs})
        await send({"type": "http.response.body", "body": b"x"})

    server = FakeServer()
    run(middleware(app, app, make_rollout(50))(http_scope(), server.receive, server.send))
    assert server.header(b"content-type") == [b"text/plain"]
    assert server.header(b"vary") == [b"Accept, Cookie"]


def test_messages_without_optional_keys(make_rollout: MakeRollout) -> None:
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await receive())
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    sink = RecordingSink()
    server = FakeServer(incoming=[{"type": "http.request"}])
    run(
        validate_asgi(middleware(app, app, make_rollout(50), sink=sink))(
            http_scope(), server.receive, server.send
        )
    )
    assert got == [{"type": "http.request"}]
    assert server.types == ["http.response.start", "http.response.body"]
    assert server.sent[1] == {"type": "http.response.body"}  # body messages pass through as they are
    assert server.header(b"vary") == [b"Cookie"] and server.header(b"cache-control") == [b"private"]
    [outcome] = sink.outcomes
    assert outcome.status == 204 and not outcome.disconnected and outcome.error is None


def test_repeated_cookie_headers_are_joined(make_rollout: MakeRollout) -> None:
    # HTTP/2 and HTTP/3 send each cookie as its own header field (RFC 9113 §8.2.3).
    rollout = make_rollout(50)
    ours = cookie_for(rollout, "new")
    assigned = rollout.counters["assigned"]
    headers = [
        (b"cookie", b"session=abc"),
        (b"accept", b"*/*"),
        (b"cookie", ours),
        (b"cookie", b"theme=dark"),
    ]
    server = FakeServer()
    mw = middleware(labelled("old"), labelled("new"), rollout)
    run(mw(http_scope(headers=headers), server.receive, server.send))
    assert server.body == b"new"
    assert server.header(b"set-cookie") == []
    assert rollout.counters["assigned"] == assigned


def test_request_headers_given_as_a_one_shot_iterable(make_rollout: MakeRollout) -> None:
    """The decision and the app both read headers a server gave as a generator."""
    rollout = make_rollout(50)
    ours = cookie_for(rollout, "new")
    assigned = rollout.counters["assigned"]
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend(scope["headers"])
        await labelled("new")(scope, receive, send)

    pairs = [(b"accept", b"*/*"), (b"cookie", ours)]
    for _ in range(2):  # the second request takes the cached decision
        server = FakeServer()
        scope = {**http_scope(), "headers": (pair for pair in pairs)}
        run(middleware(labelled("old"), app, rollout)(scope, server.receive, server.send))
        assert server.body == b"new" and server.header(b"set-cookie") == []
    assert seen == pairs * 2 and rollout.counters["assigned"] == assigned


def test_https_scheme_marks_the_cookie_secure(make_rollout: MakeRollout) -> None:
    server = FakeServer()
    run(
        middleware(labelled("old"), None, make_rollout(50))(
            http_scope(scheme="https"), server.receive, server.send
        )
    )
    assert b"; Secure" in server.header(b"set-cookie")[0]


def test_unknown_scope_types_pass_through_untouched(make_rollout: MakeRollout) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    async def old(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope, receive, send))

    async def new(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("new must not see it")

    sink = RecordingSink()
    scope = {"type": "webtransport", "path": "/"}
    server = FakeServer()
    run(middleware(old, new, make_rollout(100), sink=sink)(scope, server.receive, server.send))
    assert calls == [(scope, server.receive, server.send)] and calls[0][0] is scope
    assert scope == {"type": "webtransport", "path": "/"} and sink.outcomes == []


def test_excluded_path_below_root_path_is_passed_through(make_rollout: MakeRollout) -> None:
    seen: list[Any] = []

    async def old(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        await labelled("old")(scope, receive, send)

    sink = RecordingSink()
    mw = middleware(old, labelled("new"), make_rollout(100, exclude=["/healthz"]), sink=sink)
    scope = http_scope("/api/healthz", root_path="/api")
    server = FakeServer()
    run(mw(scope, server.receive, server.send))
    assert seen == [scope] and seen[0] is scope
    assert server.header_list() == [(b"content-type", b"text/plain")] and sink.outcomes == []


def test_new_none_assigns_and_records_but_always_serves_old(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    mw = middleware(labelled("old"), None, make_rollout(100), sink=sink)
    server = FakeServer()
    run(mw(http_scope(), server.receive, server.send))
    assert server.body == b"old" and server.header(b"set-cookie")
    [outcome] = sink.outcomes
    assert outcome.variant == "new" and outcome.status == 200


class LegacyApp:
    """An ASGI 2 app: instantiated with the scope, then called with receive and send."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        variant = self.scope["canarymw.decision"].variant.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"legacy class " + variant})


def legacy_function(scope: Any) -> Any:
    async def instance(receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"legacy function"})

    return instance


@pytest.mark.parametrize("percent", [0, 100])
def test_legacy_asgi2_apps_are_served_as_either_variant(make_rollout: MakeRollout, percent: int) -> None:
    """ASGI 2 apps (uvicorn and Starlette's TestClient accept them) work as old and new."""
    sink = RecordingSink()
    mw = middleware(LegacyApp, legacy_function, make_rollout(percent), sink=sink)
    response = TestClient(mw).get("/")
    if percent == 0:
        assert (response.status_code, response.text) == (200, "legacy class old")
    else:
        assert (response.status_code, response.text) == (201, "legacy function")
    assert response.headers["vary"] == "Cookie" and "canarymw" in response.headers["set-cookie"]
    assert [o.status for o in sink.outcomes] == [200 if percent == 0 else 201]


def test_asgi3_callables_are_never_taken_for_legacy_apps(make_rollout: MakeRollout) -> None:
    """A sync function returning an awaitable, a partial and *args callables are ASGI 3."""
    served = labelled("plain")

    def returns_awaitable(scope: Any, receive: Any, send: Any) -> Any:
        return served(scope, receive, send)

    def star_args(*args: Any) -> Any:
        return served(*args)

    async def with_extra(scope: Any, receive: Any, send: Any, extra: int = 0) -> None:
        await served(scope, receive, send)

    for app in (returns_awaitable, star_args, functools.partial(with_extra, extra=1)):
        server = FakeServer()
        run(middleware(app, None, make_rollout(0))(http_scope(), server.receive, server.send))
        assert server.body == b"plain"


# -- outcomes: exceptions, disconnects, cancellation ---------------------------------------


@pytest.mark.parametrize("after_start", [False, True], ids=["before start", "after start"])
def test_exception_is_recorded_then_reraised_unchanged(make_rollout: MakeRollout, after_start: bool) -> None:
    error = KeyError("boom")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise error

    sink = RecordingSink()
    server = FakeServer()
    with pytest.raises(KeyError) as caught:
        run(
            validate_asgi(middleware(app, app, make_rollout(50), sink=sink))(
                http_scope(), server.receive, server.send
            )
        )
    assert caught.value is error
    assert server.types.count("http.response.start") == (1 if after_start else 0)
    [outcome] = sink.outcomes
    assert outcome.error == "KeyError" and outcome.status == (200 if after_start else None)
    assert not outcome.disconnected and not outcome.ok


@pytest.mark.parametrize("after_start", [False, True], ids=["before start", "after start"])
def test_exception_inside_starlette_gives_one_response_start(
    make_rollout: MakeRollout, after_start: bool
) -> None:
    async def fail(request: Request) -> Response:
        if after_start:

            async def body() -> Any:
                yield b"part"
                raise ValueError("mid-stream")

            return StreamingResponse(body())
        raise ValueError("early")

    sink = RecordingSink()
    inner = Starlette(routes=[Route("/", fail)])
    app = Starlette(
        routes=[Route("/", fail)],
        middleware=[Middleware(ASGICanaryMiddleware, new=inner, rollout=make_rollout(50), sink=sink)],
    )
    server = FakeServer()
    with pytest.raises(ValueError, match=r"early|mid-stream"):
        run(app(http_scope(), server.receive, server.send))
    assert server.types.count("http.response.start") == 1
    if not after_start:
        assert server.sent[0]["status"] == 500  # Starlette's ServerErrorMiddleware, outside us
    [outcome] = sink.outcomes
    assert outcome.error == "ValueError" and outcome.route == "/"


def test_sink_sees_an_error_the_app_reports_in_scope(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["canarymw.error"] = "HandledError"  # a framework that turned an exception into a 500
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"oops"})

    sink = RecordingSink()
    server = FakeServer()
    run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    assert sink.outcomes[0].error == "HandledError"


def test_disconnect_mid_stream_reaches_the_app_and_is_recorded(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    app_saw: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        message = await receive()  # waits until the client goes away
        app_saw.append(message["type"])
        app_saw.append(f"outcomes={len(sink.outcomes)}")  # recorded by the time the app hears it

    async def on_send(message: Message) -> None:
        if message.get("body") == b"first":
            server.disconnect()

    server = FakeServer(on_send=on_send)
    run(
        validate_asgi(middleware(app, app, make_rollout(50), sink=sink))(
            http_scope(), server.receive, server.send
        )
    )
    assert app_saw == ["http.disconnect", "outcomes=1"]
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.status == 200 and outcome.error is None


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_disconnect_during_a_starlette_stream(make_rollout: MakeRollout, spec: str) -> None:
    # spec 2.3: Starlette listens for http.disconnect; 2.4: it relies on send raising OSError.
    produced: list[int] = []

    async def numbers() -> Any:
        for i in range(1000):
            produced.append(i)
            yield f"data: {i}\n\n"
            await asyncio.sleep(0)

    async def sse(request: Request) -> Response:
        return StreamingResponse(numbers(), media_type="text/event-stream")

    async def on_send(message: Message) -> None:
        if message.get("body") == b"data: 2\n\n":
            if spec == "2.3":
                server.disconnect()
            else:
                raise ConnectionResetError("client went away")
        elif message.get("body", b"").startswith(b"data: "):
            pass

    sink = RecordingSink()
    app = Starlette(routes=[Route("/events", sse)])
    mw = middleware(app, app, make_rollout(50), sink=sink)
    server = FakeServer(on_send=on_send)
    scope = http_scope("/events", asgi={"version": "3.0", "spec_version": spec})
    if spec == "2.3":
        run(mw(scope, server.receive, server.send))
    else:
        from starlette.requests import ClientDisconnect

        with pytest.raises(ClientDisconnect):
            run(mw(scope, server.receive, server.send))
    assert len(produced) < 1000
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None and outcome.status == 200
    assert outcome.route == "/events"


def test_send_raising_oserror_after_disconnect(make_rollout: MakeRollout) -> None:
    failure = BrokenPipeError("gone")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})

    def on_send(message: Message) -> None:
        if message.get("body") == b"b":
            raise failure

    sink = RecordingSink()
    server = FakeServer(on_send=on_send)
    with pytest.raises(BrokenPipeError) as caught:
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    assert caught.value is failure
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None and outcome.status == 200


def test_send_raising_oserror_after_the_app_saw_the_disconnect(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"too late", "more_body": True})

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            server.disconnect()
        elif message["type"] == "http.response.body":
            raise ConnectionResetError("client went away")

    sink = RecordingSink()
    server = FakeServer(on_send=on_send)
    with pytest.raises(ConnectionResetError):
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    [outcome] = sink.outcomes  # recorded once, when the disconnect reached the app
    assert outcome.disconnected and outcome.error is None and outcome.status == 200


def test_server_rejecting_a_message_is_an_app_error(make_rollout: MakeRollout) -> None:
    def on_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise RuntimeError("Unexpected ASGI message")

    sink = RecordingSink()
    server = FakeServer(on_send=on_send)
    with pytest.raises(RuntimeError):
        run(
            middleware(labelled("x"), None, make_rollout(50), sink=sink)(
                http_scope(), server.receive, server.send
            )
        )
    [outcome] = sink.outcomes
    assert outcome.error == "RuntimeError" and not outcome.disconnected


def test_cancelled_request_counts_as_a_disconnect(make_rollout: MakeRollout) -> None:
    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(60)

    sink = RecordingSink()
    server = FakeServer()

    async def main() -> None:
        task = asyncio.ensure_future(
            middleware(slow, None, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send)
        )
        while not server.sent:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None and outcome.status == 200


def test_cancelled_after_the_last_byte_is_not_a_disconnect(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await asyncio.sleep(60)  # e.g. a background task, cut short by shutdown

    sink = RecordingSink()
    server = FakeServer()

    async def main() -> None:
        task = asyncio.ensure_future(
            middleware(app, None, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send)
        )
        while len(server.sent) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    [outcome] = sink.outcomes
    assert not outcome.disconnected and outcome.error is None and outcome.ok


def test_app_returning_without_a_response_is_recorded_once(make_rollout: MakeRollout) -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None

    sink = RecordingSink()
    server = FakeServer()
    run(middleware(silent, None, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.status is None and not outcome.ok and server.sent == []


def test_duration_ends_with_the_trailers(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    sink = RecordingSink(log)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"x"})
        await asyncio.sleep(0.02)  # the response is not finished yet: this counts
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")]})
        await asyncio.sleep(0.1)  # the response is finished: this does not
        log.append("returned")

    server = FakeServer()
    run(
        validate_asgi(middleware(app, None, make_rollout(50), sink=sink))(
            http_scope(), server.receive, server.send
        )
    )
    assert log == ["returned", "outcome"]
    assert 0.02 <= sink.outcomes[0].duration < 0.1


def test_pathsend_finishes_the_response(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})
        await asyncio.sleep(0.1)

    server = FakeServer()
    run(middleware(app, None, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.status == 200 and outcome.duration < 0.1


def test_outcome_fields_and_route_template(make_rollout: MakeRollout) -> None:
    async def item(request: Request) -> Response:
        return PlainTextResponse(request.path_params["item_id"])

    async def custom(scope: Any, receive: Any, send: Any) -> None:
        scope["canarymw.route"] = "/custom/{name}"
        await labelled("c")(scope, receive, send)

    sink = RecordingSink()
    app = Starlette(routes=[Route("/items/{item_id}", item), Mount("/custom", app=custom)])
    mw = middleware(app, None, make_rollout(50, name="fields"), sink=sink)
    for path, method in (
        ("/items/42", "GET"),
        ("/items/7", "HEAD"),
        ("/custom/x", "GET"),
        ("/nowhere", "GET"),
    ):
        server = FakeServer()
        run(mw(http_scope(path, method=method), server.receive, server.send))
    routes = [(o.route, o.method, o.status) for o in sink.outcomes]
    assert routes == [
        ("/items/{item_id}", "GET", 200),
        ("/items/{item_id}", "HEAD", 200),
        ("/custom/{name}", "GET", 200),
        (None, "GET", 404),  # never the raw path
    ]
    for o in sink.outcomes:
        assert isinstance(o, Outcome) and o.rollout == "fields" and 0 < o.duration < 5 and o.timestamp > 1e9


# -- streaming, contextvars, background tasks ----------------------------------------------


def test_first_chunk_reaches_the_server_before_the_last_is_produced(make_rollout: MakeRollout) -> None:
    first_arrived: asyncio.Event | None = None

    async def events() -> Any:
        yield "data: first\n\n"
        assert first_arrived is not None
        await asyncio.wait_for(first_arrived.wait(), 2)  # deadlocks if anyone buffers
        yield "data: last\n\n"

    async def sse(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    async def on_send(message: Message) -> None:
        if message.get("body") == b"data: first\n\n":
            assert first_arrived is not None
            first_arrived.set()

    async def main() -> None:
        nonlocal first_arrived
        first_arrived = asyncio.Event()
        app = Starlette(routes=[Route("/", sse)])
        mw = middleware(app, app, make_rollout(50))
        await mw(http_scope(), server.receive, server.send)

    server = FakeServer(on_send=on_send)
    run(main())
    assert server.body == b"data: first\n\ndata: last\n\n"
    assert server.header(b"content-type") == [b"text/event-stream; charset=utf-8"]


def test_contextvars_flow_both_ways(make_rollout: MakeRollout) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    user: contextvars.ContextVar[str] = contextvars.ContextVar("user")
    seen: list[str] = []

    async def endpoint(request: Request) -> Response:
        seen.append(request_id.get())
        user.set("alice")  # set by the app, read by an outer layer afterwards
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    mw = middleware(app, app, make_rollout(50))

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        request_id.set("r-1")
        await mw(scope, receive, send)
        seen.append(user.get("lost"))

    server = FakeServer()
    run(outer(http_scope(), server.receive, server.send))
    assert seen == ["r-1", "alice"]


def test_background_task_runs_after_the_last_byte_and_outside_the_duration(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    finished: list[float] = []

    async def later() -> None:
        await asyncio.sleep(0.05)
        finished.append(time.time())
        log.append("background")

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("hello", background=BackgroundTask(later))

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            log.append("last byte")

    sink = RecordingSink(log)
    app = Starlette(routes=[Route("/", endpoint)])
    server = FakeServer(on_send=on_send)
    run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    assert log == ["last byte", "background", "outcome"]
    [outcome] = sink.outcomes
    # The duration ended with the last byte, before the task's 50 ms sleep began (whatever
    # the machine's load; 5 ms for reading two clocks).
    assert outcome.timestamp + outcome.duration <= finished[0] - 0.045 and outcome.ok


def test_failing_background_task_is_recorded_against_the_variant(make_rollout: MakeRollout) -> None:
    def later() -> None:
        raise LookupError("mail server down")

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("hello", background=BackgroundTask(later))

    sink = RecordingSink()
    app = Starlette(routes=[Route("/", endpoint)])
    server = FakeServer()
    with pytest.raises(LookupError):
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    assert server.body == b"hello"  # the client got its answer
    [outcome] = sink.outcomes
    assert outcome.status == 200 and outcome.error == "LookupError" and not outcome.disconnected


# -- real frameworks and clients -----------------------------------------------------------


def fastapi_app(label: str) -> FastAPI:
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        return {"app": label, "item": item_id, "variant": request.scope["canarymw.decision"].variant}

    return api


@pytest.mark.parametrize("percent", [0, 100], ids=["fastapi as old", "fastapi as new"])
def test_fastapi_apps_as_old_and_new(make_rollout: MakeRollout, percent: int) -> None:
    sink = RecordingSink()
    mw = middleware(fastapi_app("blue"), fastapi_app("green"), make_rollout(percent), sink=sink)
    with TestClient(mw) as client:
        body = client.get("/items/3").json()
        assert client.get("/items/nope").status_code == 422
    assert body == {"app": "green" if percent else "blue", "item": 3, "variant": "new" if percent else "old"}
    assert [(o.route, o.status) for o in sink.outcomes] == [
        ("/items/{item_id}", 200),
        ("/items/{item_id}", 422),
    ]


def test_starlette_middleware_form_from_the_issue(make_rollout: MakeRollout) -> None:
    async def blue(request: Request) -> Response:
        return PlainTextResponse("Hello, Blue World!")

    async def green(request: Request) -> Response:
        return PlainTextResponse("Hello, Green World!")

    rollout = make_rollout(10)
    sink = MemorySink()
    green_app = Starlette(routes=[Route("/", green)])
    app = Starlette(
        routes=[Route("/", blue)],
        middleware=[Middleware(ASGICanaryMiddleware, new=green_app, rollout=rollout, sink=sink)],
    )
    texts = []
    for _ in range(60):
        with TestClient(app) as client:
            first = client.get("/").text
            assert all(client.get("/").text == first for _ in range(2))
            texts.append(first)
    assert set(texts) == {"Hello, Blue World!", "Hello, Green World!"}
    stats = sink.snapshot()
    assert stats["old"].requests + stats["new"].requests == 180


def test_httpx_asgi_transport_keeps_a_visitor_sticky(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    sink = RecordingSink()
    mw = middleware(labelled("old"), labelled("new"), rollout, sink=sink)

    async def main() -> list[str]:
        texts = []
        for _ in range(20):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=mw), base_url="http://t"
            ) as client:
                first = await client.get("/")
                again = [await client.get("/") for _ in range(3)]
                assert {r.text for r in again} == {first.text}
                assert "set-cookie" in first.headers and all("set-cookie" not in r.headers for r in again)
                texts.append(first.text)
        return texts

    texts = run(main())
    assert set(texts) == {"old", "new"} and len(sink.outcomes) == 80
    assert rollout.counters["assigned"] == 20


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kw", "error", "match"),
    [
        pytest.param(("not an app",), {}, TypeError, "ASGI app to wrap", id="old not callable"),
        pytest.param(
            (labelled("x"),), {"new": 3}, TypeError, "new= to be an ASGI app", id="new not callable"
        ),
        pytest.param((labelled("x"),), {"rollout": "r"}, TypeError, "canarymw.Rollout", id="rollout"),
        pytest.param(
            (labelled("x"),), {"on_new_startup_failure": "ignore"}, ValueError, "disable", id="bad policy"
        ),
        pytest.param((labelled("x"),), {"cache_control": "privé"}, ValueError, "ASCII", id="cache_control"),
    ],
)
def test_configuration_errors(
    make_rollout: MakeRollout, args: tuple[Any, ...], kw: dict[str, Any], error: type[Exception], match: str
) -> None:
    kw = {"new": None, "rollout": make_rollout(10), **kw}
    with pytest.raises(error, match=match):
        ASGICanaryMiddleware(*args, **kw)


def test_sink_errors_counted_and_no_sink_works(make_rollout: MakeRollout) -> None:
    class Broken:
        def record(self, outcome: Outcome) -> None:
            raise RuntimeError("down")

    for sink, errors in ((Broken(), 2), (None, 0)):
        mw = middleware(labelled("old"), labelled("new"), make_rollout(50), sink=sink)
        for _ in range(2):
            server = FakeServer()
            run(mw(http_scope(), server.receive, server.send))
            assert server.sent[0]["status"] == 200
        assert mw.sink_errors == errors


class _CallableSend:
    """A server's send that is an object, not a function: no code to find in a traceback."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server

    async def __call__(self, message: Message) -> None:
        await self.server.send(message)


@pytest.mark.parametrize("kind", ["method", "function", "object", "partial"])
def test_send_raising_oserror_is_a_disconnect_whatever_kind_of_callable_send_is(
    make_rollout: MakeRollout, kind: str
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})

    def on_send(message: Message) -> None:
        if message.get("body") == b"b":
            raise BrokenPipeError("gone")

    server = FakeServer(on_send=on_send)

    async def function_send(message: Message) -> None:
        await server.send(message)

    send = {
        "method": server.send,
        "function": function_send,
        "object": _CallableSend(server),
        "partial": functools.partial(server.send),
    }[kind]
    sink = RecordingSink()
    with pytest.raises(BrokenPipeError):
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, send))
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None and outcome.status == 200


def test_an_app_that_turns_the_send_failure_into_its_own_error_still_counts_a_disconnect(
    make_rollout: MakeRollout,
) -> None:
    class ClientGone(Exception):
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.body", "body": b"b", "more_body": True})
        except OSError:
            raise ClientGone from None  # like Starlette's ClientDisconnect; context kept

    def on_send(message: Message) -> None:
        if message.get("body") == b"b":
            raise ConnectionResetError("gone")

    sink = RecordingSink()
    server = FakeServer(on_send=on_send)
    with pytest.raises(ClientGone):
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None


def test_an_oserror_of_the_app_itself_is_an_error_not_a_disconnect(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise FileNotFoundError("/data/report.csv")

    sink = RecordingSink()
    server = FakeServer()
    with pytest.raises(FileNotFoundError):
        run(middleware(app, app, make_rollout(50), sink=sink)(http_scope(), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.error == "FileNotFoundError" and not outcome.disconnected


def _fails_in_a_thread() -> None:
    raise LookupError("raised in a worker thread")


@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_an_exception_thrown_in_keeps_its_whole_traceback(make_rollout: MakeRollout, kind: str) -> None:
    # A sync endpoint's error comes back from a worker thread: asyncio throws it into
    # the awaiting coroutines. Logs must still show where it was raised.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, _fails_in_a_thread)

    scope = http_scope()
    if kind == "websocket":
        scope = {**scope, "type": "websocket", "scheme": "ws"}
    server = FakeServer()
    with pytest.raises(LookupError) as caught:
        run(middleware(app, app, make_rollout(50))(scope, server.receive, server.send))
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-2:] == ["run", "_fails_in_a_thread"], frames  # the executor's frame, then ours
    assert "app" in frames
