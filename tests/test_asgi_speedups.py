"""The compiled ASGI send wrapper (canarymw._speedups.sender) against _Exchange.send.

Generated apps send generated message sequences to generated servers (coroutine
sends, sends that suspend, Future-returning sends, sends that fail with OSError or
other errors, tasks cancelled mid-send); what the server receives, what the app sees
and the recorded outcome must be the same with either implementation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canarymw.asgi
from canarymw import MemorySink, Outcome, Rollout
from canarymw.asgi import ASGICanaryMiddleware

KEY = "test-secret-key-0123456789abcdef"
COMPILED = canarymw.asgi._sender
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
messages = st.lists(st.one_of(start, body, body, other), min_size=0, max_size=5)


@dataclass
class Server:
    kind: str  # how its send behaves
    fail_at: int | None  # which message fails
    failure: str  # "oserror", "runtime", "cancel"
    sink: str = "list"  # "list", "memory" or "raising"


servers = st.builds(
    Server,
    kind=st.sampled_from(["coroutine", "suspending", "future", "awaitable-object"]),
    fail_at=st.one_of(st.none(), st.integers(0, 4)),
    failure=st.sampled_from(["oserror", "runtime", "cancel"]),
    sink=st.sampled_from(["list", "memory", "raising"]),
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


def run(msgs: list[dict[str, Any]], server: Server, sender: Any) -> dict[str, Any]:
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
        seen.append(("sent", message.get("type") if isinstance(message, dict) else message, _plain(message)))
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

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for m in msgs:
            try:
                await send(m)
            except (OSError, RuntimeError, KeyError) as exc:
                seen.append(("app saw", type(exc).__name__))
                return

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    sink: Any = {"list": ListSink(), "memory": MemorySink(), "raising": RaisingSink()}[server.sink]
    mw = ASGICanaryMiddleware(app, new=app, rollout=Rollout("p", percent=0, secret_key=KEY), sink=sink)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}

    async def main() -> None:
        try:
            await mw(scope, receive, server_send)
        except BaseException as exc:
            seen.append(("raised", type(exc).__name__))

    saved = canarymw.asgi._sender
    canarymw.asgi._sender = sender
    try:
        asyncio.run(main())
    finally:
        canarymw.asgi._sender = saved
    outcomes: Any = None
    if isinstance(sink, ListSink):
        outcomes = [(o.status, o.error, o.disconnected, o.duration > 0) for o in sink.outcomes]
    elif isinstance(sink, MemorySink):
        stats = sink.snapshot().values()
        outcomes = [(v.requests, v.errors, v.exceptions, v.disconnects, v.statuses) for v in stats]
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
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages, server=servers)
def test_compiled_and_python_send_are_indistinguishable(msgs: list[dict[str, Any]], server: Server) -> None:
    assert run(msgs, server, COMPILED) == run(msgs, server, None)


@needs_speedups
def test_parity_check_can_fail() -> None:
    """The comparison above sees a difference when there is one."""
    msgs = [{"type": "http.response.start", "status": 200, "headers": []}, {"type": "http.response.body"}]
    server = Server("coroutine", None, "oserror")

    def broken(x: Any, send: Any, extra: list[Any]) -> Any:
        return COMPILED(x, send, [*extra, (b"x-extra", b"1")])

    assert run(msgs, server, broken) != run(msgs, server, None)


@needs_speedups
def test_awaiter_protocol_methods() -> None:
    """send(), throw() and close() reach the server's awaitable, as a coroutine's would."""

    async def main() -> list[str]:
        log: list[str] = []
        gate = asyncio.get_running_loop().create_future()

        async def server_send(message: Any) -> None:
            try:
                await gate
            except asyncio.CancelledError:
                log.append("server send cancelled")
                raise

        class X:
            ended = 0.0
            trailers = False
            done = False
            status = None

            def finish(self, *args: Any) -> None:
                log.append("finish")

        send = COMPILED(X(), server_send, [(b"vary", b"Cookie")])
        task = asyncio.ensure_future(send({"type": "http.response.body", "body": b"x"}))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        awaiter = send({"type": "http.response.body"})
        awaiter.close()  # a coroutine that never ran closes quietly
        return log

    assert asyncio.run(main()) == ["server send cancelled"]


@needs_speedups
def test_compiled_send_keeps_no_references() -> None:
    """Nothing the compiled wrapper touched stays alive after its requests, whether the
    server's send completed, suspended, failed or was cancelled."""
    import gc
    import sys

    msgs = [{"type": "http.response.start", "status": 200, "headers": []}, {"type": "http.response.body"}]
    kinds = [Server(kind, fail, how) for kind in ("coroutine", "suspending", "future", "awaitable-object")
             for fail, how in ((None, "oserror"), (1, "oserror"), (0, "cancel"), (1, "runtime"))]  # fmt: skip
    for server in kinds:  # warm up
        run(msgs, server, COMPILED)
    gc.collect()
    before = [sys.getrefcount(o) for o in (COMPILED, run, Server)]
    for _ in range(100):
        for server in kinds:
            run(msgs, server, COMPILED)
    gc.collect()
    assert [sys.getrefcount(o) for o in (COMPILED, run, Server)] == before
    names = {"Sender", "SendAwaiter"}
    assert not [
        o
        for o in gc.get_objects()
        if type(o).__name__ in names and type(o).__module__ == "canarymw._speedups"
    ]
