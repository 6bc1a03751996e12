"""The compiled ASGI request path (canarymw._speedups.router) against the Python one.

Generated requests (cookie headers in every shape, first and returning visits, forced
variants, a disabled new app) reach generated apps (message sequences, receive calls,
exceptions, route and error marks) through generated servers (coroutine sends and
receives, sends that suspend, Future-returning sends, sends that fail with OSError or
other errors, cancellation, disconnect messages, malformed messages). What the server
receives, what the apps see and raise, and the recorded outcomes must be the same
with either implementation.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canarymw.asgi
from canarymw import MemorySink, Outcome, Rollout
from canarymw.asgi import ASGICanaryMiddleware

KEY = "test-secret-key-0123456789abcdef"
COMPILED = canarymw.asgi._router
needs_speedups = pytest.mark.skipif(COMPILED is None, reason="canarymw._speedups was not built")

header_items = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"content-type", b"vary", b"cache-control", b"x-a", b"Vary"]), st.just(b"v")
        ),
        st.just([b"x-list", b"v"]),  # a list, not a tuple
        st.just(("x-str", "v")),  # str names
    ),
    max_size=3,
)
start = st.fixed_dictionaries(
    {"type": st.just("http.response.start"), "status": st.sampled_from([200, 404, 503])},
    optional={
        "headers": st.one_of(header_items, header_items.map(tuple), st.none()),
        "trailers": st.booleans(),
    },
)
body = st.fixed_dictionaries(
    {"type": st.just("http.response.body")},
    optional={"body": st.sampled_from([b"", b"x"]), "more_body": st.sampled_from([True, False, 0, 1])},
)
other = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("http.response.trailers")}, optional={"more_trailers": st.booleans()}
    ),
    st.just({"type": "http.response.pathsend", "path": "/nowhere"}),
    st.just({"no": "type"}),
)
# What the app does, step by step.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.one_of(start, body, body, other)),
        st.tuples(st.just("receive"), st.none()),
        st.tuples(st.just("mark"), st.sampled_from(["canarymw.route", "canarymw.error", "route"])),
        st.tuples(st.just("raise"), st.sampled_from(["ValueError", "CancelledError"])),
    ),
    max_size=6,
)
received = st.lists(
    st.sampled_from(
        [
            {"type": "http.request", "body": b"", "more_body": False},
            {"type": "http.request", "body": b"x", "more_body": True},
            {"type": "http.disconnect"},
            {"no": "type"},
            "not a dict",
        ]
    ),
    max_size=3,
)


@dataclass
class Server:
    kind: str  # how its send behaves
    fail_at: int | None  # which send fails
    failure: str  # "oserror", "runtime", "cancel"
    sink: str = "list"  # "list", "memory", "raising" or "none"
    received: list[Any] = field(default_factory=list)  # what receive() returns, in turn
    receive_fails: bool = False  # receive() raises once the list is used up


@dataclass
class Request:
    cookie: str  # "returning", "first", "tampered", "other"
    shape: str  # how the headers come: "list", "tuple", "split" (two cookie headers), "lists",
    # "str" (a str pair among them), "iterator" (a one-shot iterator)
    percent: float
    forcing: bool  # force_token configured (no cached fast path)
    disabled: bool  # the new app failed its startup
    repeat: int  # requests sent with the same headers


servers = st.builds(
    Server,
    kind=st.sampled_from(["coroutine", "suspending", "future", "awaitable-object"]),
    fail_at=st.one_of(st.none(), st.integers(0, 4)),
    failure=st.sampled_from(["oserror", "runtime", "cancel"]),
    sink=st.sampled_from(["list", "memory", "raising", "none"]),
    received=received,
    receive_fails=st.booleans(),
)
requests = st.builds(
    Request,
    cookie=st.sampled_from(["returning", "first", "tampered", "other"]),
    shape=st.sampled_from(["list", "list", "tuple", "split", "lists", "str", "iterator"]),
    percent=st.sampled_from([0, 50, 100]),
    forcing=st.booleans(),
    disabled=st.booleans(),
    repeat=st.integers(1, 3),
)


class ListSink:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


class RaisingSink:
    def record(self, outcome: Outcome) -> None:
        raise ValueError("sink down")


class Later:
    """An awaitable that is neither a coroutine nor a Future."""

    def __init__(self, fail: BaseException | None) -> None:
        self.fail = fail

    def __await__(self) -> Any:
        yield None
        if self.fail is not None:
            raise self.fail


# One cookie per (percent) that the rollout keeps on a known variant; made once.
_COOKIES: dict[str, str] = {}


def _cookie(kind: str) -> str:
    if "returning" not in _COOKIES:
        rollout = Rollout("p", percent=50, secret_key=KEY)
        _COOKIES["returning"] = (rollout.decide(None).set_cookie or "").split(";")[0]
    if kind == "returning":
        return _COOKIES["returning"]
    if kind == "tampered":
        return _COOKIES["returning"][:-2] + "xx"
    if kind == "other":
        return "theme=dark"
    return ""


def _headers(request: Request) -> Any:
    cookie = _cookie(request.cookie).encode("latin-1")
    pairs: list[Any] = [(b"host", b"example.test")]
    if request.shape == "split" and cookie:
        pairs += [(b"cookie", b"a=1"), (b"cookie", cookie)]
    elif cookie:
        pairs.append((b"cookie", cookie))
    if request.shape == "tuple":
        return tuple(pairs)
    if request.shape == "lists":
        return [list(p) for p in pairs]
    if request.shape == "str":
        return [*pairs, ("x-str", "v")]
    return pairs


def run(request: Request, actions: list[tuple[str, Any]], server: Server, router: Any) -> dict[str, Any]:
    seen: list[Any] = []

    def failure(i: int) -> BaseException | None:
        if server.fail_at != i:
            return None
        return {
            "oserror": OSError("gone"),
            "runtime": RuntimeError("bad"),
            "cancel": asyncio.CancelledError(),
        }[server.failure]

    count = 0

    def server_send(message: Any) -> Any:
        nonlocal count
        i, count = count, count + 1
        seen.append(("sent", _plain(message)))
        fail = failure(i)
        if server.kind == "future":
            fut = asyncio.get_running_loop().create_future()
            if fail is None:
                fut.set_result(None)
            else:
                fut.set_exception(fail)
            return fut
        if server.kind == "awaitable-object":
            return Later(fail)

        async def coro() -> None:
            if server.kind == "suspending":
                await asyncio.sleep(0)
            if fail is not None:
                raise fail

        return coro()

    inbox = list(server.received)

    async def server_receive() -> Any:
        if server.kind == "suspending":
            await asyncio.sleep(0)
        if inbox:
            return inbox.pop(0)
        if server.receive_fails:
            raise ConnectionResetError("receive failed")
        return {"type": "http.disconnect"}

    def make_app(label: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(("app", label, scope["canarymw.decision"].variant, scope.get("state")))
            seen.append(("headers", list(scope["headers"])))
            for action, arg in actions:
                try:
                    if action == "send":
                        await send(arg)
                    elif action == "receive":
                        seen.append(("received", _plain(await receive())))
                    elif action == "mark":
                        scope[arg] = type("R", (), {"path": "/r/{x}"})() if arg == "route" else "Marked"
                    elif arg == "ValueError":
                        raise ValueError("app failed")
                    else:
                        raise asyncio.CancelledError()
                except (OSError, RuntimeError, KeyError, TypeError) as exc:
                    seen.append(("app saw", type(exc).__name__))
                    return

        return app

    sink: Any = {"list": ListSink(), "memory": MemorySink(), "raising": RaisingSink(), "none": None}[
        server.sink
    ]
    saved = canarymw.asgi._router
    canarymw.asgi._router = router
    try:
        # A visitor without a valid cookie gets a random id: only 0 and 100 percent
        # make the variant predictable for both runs.
        percent = request.percent if request.cookie == "returning" else 100 * (request.percent > 50)
        rollout = Rollout(
            "p",
            percent=percent,
            secret_key=KEY,
            force_token="force-token-0123456789" if request.forcing else None,
        )
        mw = ASGICanaryMiddleware(make_app("old"), new=make_app("new"), rollout=rollout, sink=sink)
        if request.disabled:
            mw.new_startup_error = "startup failed"
            mw._new_state = {"new": 1}
        headers = _headers(request)
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""}
        scope["state"] = {"old": 1}

        async def main() -> None:
            for _ in range(request.repeat):
                given = dict(scope)
                if request.shape == "iterator":
                    given["headers"] = iter(headers)
                try:
                    await mw(given, server_receive, server_send)
                except BaseException as exc:
                    seen.append(("raised", type(exc).__name__))

        asyncio.run(main())
    finally:
        canarymw.asgi._router = saved
    outcomes: Any = None
    if isinstance(sink, ListSink):
        outcomes = [(*o[:3], o.duration > 0, *o[4:8], o.close_code) for o in sink.outcomes]
    elif isinstance(sink, MemorySink):
        stats = sink.snapshot().values()
        outcomes = [(v.requests, v.errors, v.exceptions, v.disconnects, v.statuses) for v in stats]
    assert scope["headers"] is headers and "canarymw.decision" not in scope  # the server's scope
    return {"seen": seen, "outcomes": outcomes, "sink_errors": mw.sink_errors}


def _plain(message: Any) -> Any:
    """The message as comparable data; a first visit's cookie holds a random id, so only
    its presence is compared."""
    if not isinstance(message, dict):
        return message
    out = dict(message)
    if out.get("headers") is not None:
        out["headers"] = [
            (h[0], b"<cookie>") if isinstance(h, tuple) and h[0] == b"set-cookie" else h
            for h in out["headers"]
        ]
    return out


@needs_speedups
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests, actions=steps, server=servers)
def test_compiled_and_python_paths_are_indistinguishable(
    request: Request, actions: list[tuple[str, Any]], server: Server
) -> None:
    assert run(request, actions, server, COMPILED) == run(request, actions, server, None)


@needs_speedups
def test_parity_check_can_fail() -> None:
    """The comparison above sees a difference when there is one."""
    request = Request("returning", "list", 50, False, False, 2)
    actions = [
        ("send", {"type": "http.response.start", "status": 200, "headers": []}),
        ("send", {"type": "http.response.body"}),
    ]
    server = Server("coroutine", None, "oserror")

    def broken(mw: Any, cached: Any, extra: list[Any]) -> Any:
        return COMPILED(mw, cached, [*extra, (b"x-extra", b"1")])

    assert run(request, actions, server, broken) != run(request, actions, server, None)
    assert run(request, actions, server, COMPILED) == run(request, actions, server, None)


def _outcome_when(router: Any, stop: str) -> tuple[Any, ...]:
    """The outcome of a request whose task is cancelled, or whose coroutine is closed,
    while the app waits mid-response."""
    sink = ListSink()
    saved = canarymw.asgi._router
    canarymw.asgi._router = router
    try:
        gate: asyncio.Future[None] | None = None
        log: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal gate
            await send({"type": "http.response.start", "status": 200, "headers": []})
            gate = asyncio.get_running_loop().create_future()
            try:
                await gate
            except BaseException as exc:
                log.append(type(exc).__name__)
                raise

        async def server_send(message: Any) -> None:
            return None

        async def server_receive() -> Any:
            return {"type": "http.request"}

        mw = ASGICanaryMiddleware(app, new=None, rollout=Rollout("p", percent=0, secret_key=KEY), sink=sink)
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}

        async def main() -> None:
            call = mw(scope, server_receive, server_send)
            if stop == "cancel":
                task = asyncio.ensure_future(call)
                await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                call.send(None)  # runs until the app waits on its gate
                call.close()

        asyncio.run(main())
    finally:
        canarymw.asgi._router = saved
    (o,) = sink.outcomes
    return (o.status, o.error, o.disconnected, o.method, log)


@needs_speedups
@pytest.mark.parametrize("stop", ["cancel", "close"])
def test_cancel_and_close_reach_the_app_and_count_as_disconnects(stop: str) -> None:
    expected = (200, None, True, "POST", ["CancelledError" if stop == "cancel" else "GeneratorExit"])
    assert _outcome_when(COMPILED, stop) == expected
    assert _outcome_when(None, stop) == expected


@needs_speedups
def test_awaitable_protocol_methods() -> None:
    """The request and each send/receive are awaitables with send(), throw() and
    close(), as coroutines are; a throw() reaches the server's own awaitable."""

    async def main() -> list[str]:
        log: list[str] = []
        gate = asyncio.get_running_loop().create_future()

        async def server_send(message: Any) -> None:
            try:
                await gate
            except asyncio.CancelledError:
                log.append("server send cancelled")
                raise

        async def app(scope: Any, receive: Any, send: Any) -> None:
            awaiter = send({"type": "http.response.body"})
            awaiter.close()  # a server coroutine that never ran closes quietly
            with pytest.raises(ValueError, match="thrown"):
                send({"type": "http.response.body"}).throw(ValueError("thrown"))
            await send({"type": "http.response.body", "body": b"x"})

        mw = ASGICanaryMiddleware(app, new=None, rollout=Rollout("p", percent=0, secret_key=KEY))
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        task = asyncio.ensure_future(mw(scope, server_send, server_send))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(main()) == ["server send cancelled"]


@needs_speedups
def test_compiled_path_keeps_no_references() -> None:
    """Nothing the compiled path touched stays alive after its requests, whatever the
    ending: completed, suspended, failed, cancelled, disconnected, app exceptions."""
    ok: list[tuple[str, Any]] = [
        ("send", {"type": "http.response.start", "status": 200, "headers": []}),
        ("receive", None),
        ("send", {"type": "http.response.body"}),
    ]
    cases = [
        (Request(cookie, "list", 50, False, False, 2), actions, Server(kind, fail, how, received=rec))
        for cookie in ("returning", "first")
        for actions in (ok, [*ok[:1], ("raise", "ValueError")], [("raise", "CancelledError")])
        for kind in ("coroutine", "suspending", "future", "awaitable-object")
        for fail, how in ((None, "oserror"), (1, "oserror"), (0, "cancel"), (1, "runtime"))
        for rec in ([], [{"type": "http.disconnect"}])
    ]
    for case in cases:  # warm up
        run(*case, COMPILED)
    gc.collect()
    before = [sys.getrefcount(o) for o in (COMPILED, run, Server, Request)]
    for _ in range(5):
        for case in cases:
            run(*case, COMPILED)
    gc.collect()
    assert [sys.getrefcount(o) for o in (COMPILED, run, Server, Request)] == before
    names = {"Router", "Exchange", "Sender", "Receiver", "Awaiter"}
    assert not [
        o
        for o in gc.get_objects()
        if type(o).__name__ in names and type(o).__module__ == "canarymw._speedups"
    ]
