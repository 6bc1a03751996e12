"""Lifespan with two in-process apps: both start, both stop, failures handled by policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from canarymw import Rollout
from canarymw.asgi import ASGICanaryMiddleware

from ..harness import TestClient, run
from ..servers import free_port

MakeRollout = Callable[..., Rollout]
Message = dict[str, Any]
TOKEN = "force-token-0123456789"


async def serve_lifespan(
    app: Any,
    *,
    state: dict[str, Any] | None = None,
    between: Callable[[], Awaitable[None]] | None = None,
    sent: list[Message] | None = None,
) -> tuple[list[Message], BaseException | None]:
    """Play a server's lifespan: startup, then (if it completed) shutdown.

    Returns what the app sent (also appended to ``sent`` as it arrives) and the
    exception it raised, if any.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent = [] if sent is None else sent
    replied = asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message)
        replied.set()

    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
    if state is not None:
        scope["state"] = state
    task = asyncio.ensure_future(app(scope, receive, send))

    async def exchange(message: Message) -> None:
        replied.clear()
        await inbox.put(message)
        waiter = asyncio.ensure_future(replied.wait())
        await asyncio.wait([waiter, task], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    await exchange({"type": "lifespan.startup"})
    if sent and sent[-1]["type"] == "lifespan.startup.complete":
        if between is not None:
            await between()
        await exchange({"type": "lifespan.shutdown"})
    error: BaseException | None = None
    try:
        await asyncio.wait_for(task, 5)
    except Exception as exc:
        error = exc
    return sent, error


def lifespan_app(
    label: str,
    log: list[str],
    *,
    startup: str = "complete",
    shutdown: str = "complete",
    gate: Callable[[], asyncio.Event] | None = None,
) -> Any:
    """A raw app with lifespan. ``startup``: complete, failed, raise, raise-early, return-early, hang."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            body = f"{label} {scope.get('state', {}).get('db', '-')}".encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        if startup == "raise-early":
            raise TypeError(f"{label} only speaks http")
        if startup == "return-early":
            return
        message = await receive()
        log.append(f"{label} {message['type']}")
        if gate is not None:
            await gate().wait()
        if startup == "raise":
            raise ConnectionError(f"{label} cannot reach its database")
        if startup == "failed":
            await send({"type": "lifespan.startup.failed", "message": f"{label} is broken"})
            if shutdown == "hang":
                await receive()
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        log.append(f"{label} {message['type']}")
        if shutdown == "failed":
            await send({"type": "lifespan.shutdown.failed", "message": f"{label} could not flush"})
        else:
            await send({"type": "lifespan.shutdown.complete"})

    return app


def wrap(old: Any, new: Any, rollout: Rollout, **kw: Any) -> ASGICanaryMiddleware:
    return ASGICanaryMiddleware(old, new=new, rollout=rollout, **kw)


def types(sent: list[Message]) -> list[str]:
    return [m["type"] for m in sent]


@pytest.mark.parametrize("backend", ["anyio", "asyncio"])
def test_both_apps_start_and_stop_and_startup_waits_for_both(
    make_rollout: MakeRollout, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "asyncio":
        monkeypatch.setitem(sys.modules, "anyio", None)  # `import anyio` now fails
    log: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    def gate() -> asyncio.Event:
        return gates.setdefault("new", asyncio.Event())

    mw = wrap(lifespan_app("old", log), lifespan_app("new", log, gate=gate), make_rollout(10))

    async def main() -> tuple[list[Message], BaseException | None]:
        async def open_gate_late() -> None:
            # Both apps are starting; give the middleware time to (wrongly) reply early.
            while "new lifespan.startup" not in log:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            log.append(f"server has {len(sent_early)} replies")
            gate().set()

        sent_early: list[Message] = []
        opener = asyncio.ensure_future(open_gate_late())
        result = await serve_lifespan(mw, sent=sent_early)
        await opener
        return result

    sent, error = run(main())
    assert error is None
    assert types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log[:3] == ["old lifespan.startup", "new lifespan.startup", "server has 0 replies"]
    assert sorted(log[3:]) == ["new lifespan.shutdown", "old lifespan.shutdown"]


def starlette_with_state(label: str, state: dict[str, Any], *, fail: bool = False) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if fail:
            raise RuntimeError(f"{label}: migrations pending")
        yield state

    async def index(request: Request) -> Response:
        return PlainTextResponse(
            f"{label} db={request.state.db} shared={getattr(request.state, 'shared', '-')}"
        )

    return Starlette(routes=[Route("/", index)], lifespan=lifespan)


def test_each_app_sees_its_own_lifespan_state(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(0)
    old = starlette_with_state("blue", {"db": "blue-db", "shared": "pool"})
    new = starlette_with_state("green", {"db": "green-db"})
    with TestClient(wrap(old, new, rollout)) as client:
        assert client.get("/").text == "blue db=blue-db shared=pool"
        rollout.percent = 100
        # The new app's own state wins; what only the old one set is still visible.
        assert client.get("/").text == "green db=green-db shared=pool"


def test_failing_new_app_disables_the_canary_by_default(
    make_rollout: MakeRollout, caplog: pytest.LogCaptureFixture
) -> None:
    rollout = make_rollout(50, force_token=TOKEN)
    old = starlette_with_state("blue", {"db": "blue-db"})
    new = starlette_with_state("green", {"db": "green-db"}, fail=True)
    mw = wrap(old, new, rollout)
    with caplog.at_level(logging.ERROR, "canarymw"), TestClient(mw) as client:
        texts = {client.get("/", headers={"x-canarymw-force": f"new:{TOKEN}"}).text for _ in range(5)}
        client.cookies.clear()
        decisions = []
        for _ in range(20):
            client.cookies.clear()
            decisions.append(client.get("/").text)
    assert texts == {"blue db=blue-db shared=-"}  # even forced requests stay on old
    assert set(decisions) == {"blue db=blue-db shared=-"}
    assert rollout.percent == 0
    assert mw.new_startup_error is not None and "migrations pending" in mw.new_startup_error
    [record] = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert "hello-v2" in record.getMessage() and "migrations pending" in record.getMessage()


def test_failing_new_app_fails_startup_when_configured(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    rollout = make_rollout(50)
    mw = wrap(
        lifespan_app("old", log),
        lifespan_app("new", log, startup="failed"),
        rollout,
        on_new_startup_failure="fail",
    )
    sent, error = run(serve_lifespan(mw))
    assert error is None
    [failed] = sent
    assert failed["type"] == "lifespan.startup.failed"
    assert "'hello-v2'" in failed["message"] and "new is broken" in failed["message"]
    assert log == [
        "old lifespan.startup",
        "new lifespan.startup",
        "old lifespan.shutdown",
    ]  # old stopped again
    assert rollout.percent == 50 and mw.new_startup_error is None


def test_new_app_raising_after_startup_message_is_a_failure(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    rollout = make_rollout(50)
    mw = wrap(lifespan_app("old", log), lifespan_app("new", log, startup="raise"), rollout)
    sent, error = run(serve_lifespan(mw))
    assert error is None and types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert rollout.percent == 0
    assert mw.new_startup_error is not None and "ConnectionError: new cannot reach" in mw.new_startup_error
    assert log == ["old lifespan.startup", "new lifespan.startup", "old lifespan.shutdown"]


@pytest.mark.parametrize("how", ["raise-early", "return-early"])
def test_new_app_without_lifespan_support_is_skipped(make_rollout: MakeRollout, how: str) -> None:
    log: list[str] = []
    rollout = make_rollout(50)
    mw = wrap(lifespan_app("old", log), lifespan_app("new", log, startup=how), rollout)
    sent, error = run(serve_lifespan(mw))
    assert error is None and types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == ["old lifespan.startup", "old lifespan.shutdown"]
    assert rollout.percent == 50 and mw.new_startup_error is None


def test_old_app_without_lifespan_support_still_starts_new(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    mw = wrap(lifespan_app("old", log, startup="raise-early"), lifespan_app("new", log), make_rollout(50))
    sent, error = run(serve_lifespan(mw))
    assert error is None and types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == ["new lifespan.startup", "new lifespan.shutdown"]


def test_neither_app_supports_lifespan(make_rollout: MakeRollout) -> None:
    # The server sees what it would see from the old app alone: its exception means
    # "lifespan unsupported", and the server carries on without lifespan events.
    log: list[str] = []
    mw = wrap(
        lifespan_app("old", log, startup="raise-early"),
        lifespan_app("new", log, startup="raise-early"),
        make_rollout(50),
    )
    sent, error = run(serve_lifespan(mw))
    assert sent == [] and isinstance(error, TypeError) and str(error) == "old only speaks http"
    mw = wrap(
        lifespan_app("old", log, startup="return-early"),
        lifespan_app("new", log, startup="raise-early"),
        make_rollout(50),
    )
    sent, error = run(serve_lifespan(mw))
    assert sent == [] and error is None and log == []


@pytest.mark.parametrize("new_speaks_lifespan", [False, True], ids=["neither speaks it", "only new does"])
def test_uvicorn_carries_on_when_an_app_has_no_lifespan(
    make_rollout: MakeRollout, new_speaks_lifespan: bool
) -> None:
    log: list[str] = []

    def http_only(label: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                raise RuntimeError(f"{label} only speaks http")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": label.encode()})

        return app

    new = lifespan_app("new", log) if new_speaks_lifespan else http_only("new")
    mw = wrap(http_only("old"), new, make_rollout(100))

    async def main() -> str:
        config = uvicorn.Config(mw, host="127.0.0.1", port=free_port(), lifespan="auto", log_level="critical")
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve())
        try:
            for _ in range(500):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.01)
            assert server.started
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}") as client:
                return (await client.get("/")).text
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)

    body = run(main())
    assert body == ("new -" if new_speaks_lifespan else "new")
    assert log == (["new lifespan.startup", "new lifespan.shutdown"] if new_speaks_lifespan else [])


def test_failing_old_app_fails_startup_and_stops_new(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    mw = wrap(lifespan_app("old", log, startup="failed"), lifespan_app("new", log), make_rollout(50))
    sent, error = run(serve_lifespan(mw))
    assert error is None
    assert sent == [{"type": "lifespan.startup.failed", "message": "old is broken"}]
    assert log == ["old lifespan.startup", "new lifespan.startup", "new lifespan.shutdown"]


def test_shutdown_failure_is_reported_with_the_app_named(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    mw = wrap(lifespan_app("old", log), lifespan_app("new", log, shutdown="failed"), make_rollout(50))
    sent, error = run(serve_lifespan(mw))
    assert error is None
    assert sent[1] == {"type": "lifespan.shutdown.failed", "message": "new app: new could not flush"}


def test_new_app_that_fails_and_never_returns_does_not_hang_shutdown(make_rollout: MakeRollout) -> None:
    log: list[str] = []
    new = lifespan_app("new", log, startup="failed", shutdown="hang")
    mw = wrap(lifespan_app("old", log), new, make_rollout(50))
    sent, error = run(serve_lifespan(mw))
    assert error is None and types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert mw.new_startup_error == "new is broken"


def test_single_app_lifespan_passes_straight_through(make_rollout: MakeRollout) -> None:
    calls: list[tuple[Any, Any]] = []
    sent: list[Message] = []

    async def old(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope, receive))
        await send({"type": "lifespan.shutdown.complete"})

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "state": {}}
    run(wrap(old, None, make_rollout(50))(scope, receive, send))
    # Same scope and receive; send is only watched, to flush background sinks at shutdown.
    assert calls == [(scope, receive)]
    assert sent == [{"type": "lifespan.shutdown.complete"}]


def test_lifespan_reply_of_the_wrong_type_is_a_failure(make_rollout: MakeRollout) -> None:
    log: list[str] = []

    async def confused(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    mw = wrap(lifespan_app("old", log), confused, make_rollout(50), on_new_startup_failure="fail")
    sent, error = run(serve_lifespan(mw))
    assert error is None and types(sent) == ["lifespan.startup.failed"]
    assert "sent 'lifespan.shutdown.complete' in reply to lifespan.startup" in sent[0]["message"]


@pytest.mark.parametrize("new", ["app", "none"])
def test_shutdown_delivers_what_a_background_sink_still_holds(make_rollout: MakeRollout, new: str) -> None:
    import threading

    from canarymw import BackgroundSink

    from ..harness import RecordingSink

    inner = RecordingSink()
    release = threading.Event()

    class Slow:
        def record(self, outcome: Any) -> None:
            release.wait(1.0)  # the consumer lags behind the requests
            inner.record(outcome)

    background = BackgroundSink(Slow())
    new_app = lifespan_app("new", []) if new == "app" else None
    mw = ASGICanaryMiddleware(lifespan_app("old", []), new=new_app, rollout=make_rollout(0), sink=background)

    async def requests() -> None:
        for _ in range(3):
            scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}

            async def receive() -> Message:
                return {"type": "http.request", "body": b""}

            async def send(message: Message) -> None:
                pass

            await mw(scope, receive, send)
        release.set()

    try:
        sent, error = run(serve_lifespan(mw, between=requests))
        assert error is None and types(sent)[-1] == "lifespan.shutdown.complete"
        assert len(inner.outcomes) == 3  # delivered before the server was told shutdown completed
    finally:
        background.close(timeout=2)
