"""WebSocket routing by the handshake's cohort cookie, and the websocket outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from canarymw import Rollout
from canarymw.asgi import ASGICanaryMiddleware

from ..harness import (
    FakeServer,
    RecordingSink,
    TestClient,
    WebSocketDenialResponse,
    http_scope,
    run,
    validate_asgi,
)

MakeRollout = Callable[..., Rollout]


def colour_app(label: str, *, close_code: int | None = None) -> Starlette:
    """HTTP ``/`` answers ``label``; websocket ``/ws`` greets with ``label`` then echoes."""

    async def index(request: Request) -> Response:
        return PlainTextResponse(label)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(f"{label} {websocket.scope['canarymw.decision'].variant}")
        if close_code is not None:
            await websocket.close(code=close_code)
            return
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[Route("/", index), WebSocketRoute("/ws", ws)])


def pair(rollout: Rollout, **kw: Any) -> Any:
    return validate_asgi(
        ASGICanaryMiddleware(
            validate_asgi(colour_app("blue")), new=validate_asgi(colour_app("green")), rollout=rollout, **kw
        )
    )


def test_websocket_follows_the_cohort_of_the_page(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    seen = set()
    for _ in range(30):
        with TestClient(pair(rollout)) as client:
            page = client.get("/").text
            with client.websocket_connect("/ws") as ws:
                greeting = ws.receive_text()
                assert not any(k == b"set-cookie" for k, _ in ws.extra_headers or [])
            assert greeting == {"blue": "blue old", "green": "green new"}[page]
            seen.add(page)
    assert seen == {"blue", "green"}


def test_websocket_without_cookie_is_assigned_on_accept(make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    with TestClient(pair(rollout)) as client:
        with client.websocket_connect("/ws") as ws:
            greeting = ws.receive_text()
            [cookie] = [v.decode() for k, v in ws.extra_headers or [] if k == b"set-cookie"]
        assert cookie.startswith("canarymw=") and "HttpOnly" in cookie
        # The cookie offered on accept puts later page views in the same cohort.
        page = client.get("/", headers={"cookie": cookie.split(";")[0]})
        assert greeting.split()[0] == page.text and "set-cookie" not in page.headers
    assert rollout.counters["assigned"] == 1


@pytest.mark.parametrize("percent", [0, 100])
def test_kill_switch_and_full_switch_apply_to_websockets(make_rollout: MakeRollout, percent: int) -> None:
    with TestClient(pair(make_rollout(percent))) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == ("green new" if percent else "blue old")


def test_client_close_outcome(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    with TestClient(pair(make_rollout(50), sink=sink)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        ws.send_text("ping")
        assert ws.receive_text() == "ping"
        ws.close(code=1001)
    [outcome] = sink.outcomes
    assert outcome.method == "WEBSOCKET" and outcome.status == 101 and outcome.route == "/ws"
    assert outcome.disconnected and outcome.error is None and outcome.ok and outcome.duration > 0


def test_app_close_outcome(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    app = ASGICanaryMiddleware(
        colour_app("blue", close_code=4001), new=None, rollout=make_rollout(50), sink=sink
    )
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 4001
    [outcome] = sink.outcomes
    assert outcome.status == 101 and not outcome.disconnected and outcome.error is None


@pytest.mark.parametrize(("who", "code"), [("client", 1001), ("app", 4001), ("client default", 1005)])
def test_close_code_is_recorded(make_rollout: MakeRollout, who: str, code: int) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        if who == "app":
            await send({"type": "websocket.close", "code": code})
        else:
            await receive()  # websocket.disconnect

    sink = RecordingSink()
    mw = ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink)
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    if who == "client":
        incoming.append({"type": "websocket.disconnect", "code": code})
    elif who == "client default":
        incoming.append({"type": "websocket.disconnect"})  # no code given: 1005, RFC 6455 §7.4.1
    server = FakeServer(incoming, kind="websocket")
    run(mw(http_scope("/ws", type="websocket", scheme="ws"), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.close_code == code
    assert outcome.disconnected == (who != "app")


def test_handshake_rejected_before_accept(make_rollout: MakeRollout) -> None:
    async def reject(websocket: WebSocket) -> None:
        await websocket.close(code=1008)

    sink = RecordingSink()
    app = Starlette(routes=[WebSocketRoute("/ws", reject)])
    client = TestClient(ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink))
    with client, pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws"):
        pass
    [outcome] = sink.outcomes
    assert outcome.status == 403 and not outcome.disconnected


def test_denial_response_gets_status_and_cookie(make_rollout: MakeRollout) -> None:
    async def deny(websocket: WebSocket) -> None:
        await websocket.send_denial_response(PlainTextResponse("log in first", status_code=401))

    sink = RecordingSink()
    app = Starlette(routes=[WebSocketRoute("/ws", deny)])
    client = TestClient(ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink))
    with client, pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/ws"):
        pass
    assert denied.value.status_code == 401 and denied.value.text == "log in first"
    assert "canarymw=" in denied.value.headers["set-cookie"] and denied.value.headers["vary"] == "Cookie"
    [outcome] = sink.outcomes
    assert outcome.status == 401 and outcome.ok


def test_websocket_app_exception_is_recorded_and_reraised(make_rollout: MakeRollout) -> None:
    async def crash(websocket: WebSocket) -> None:
        await websocket.accept()
        raise ZeroDivisionError("bug")

    sink = RecordingSink()
    app = Starlette(routes=[WebSocketRoute("/ws", crash)])
    mw = ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink)
    with TestClient(mw) as client, pytest.raises(ZeroDivisionError), client.websocket_connect("/ws") as ws:
        ws.receive_text()
    [outcome] = sink.outcomes
    assert outcome.error == "ZeroDivisionError" and outcome.status == 101 and not outcome.ok


def test_websocket_send_raising_oserror_is_a_disconnect(make_rollout: MakeRollout) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            raise ConnectionResetError("peer gone")

    sink = RecordingSink()
    server = FakeServer([{"type": "websocket.connect"}], on_send=on_send, kind="websocket")
    mw = ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink)
    with pytest.raises(ConnectionResetError):
        run(mw(http_scope("/ws", type="websocket", scheme="wss"), server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.disconnected and outcome.error is None and outcome.status == 101
    [accept] = [m for m in server.sent if m["type"] == "websocket.accept"]
    assert b"; Secure" in dict(accept["headers"])[b"set-cookie"]  # wss is a secure scheme


def test_excluded_websocket_path_is_passed_through(make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    rollout = make_rollout(100, exclude=["/ws"])
    mw = ASGICanaryMiddleware(colour_app("blue"), new=colour_app("green"), rollout=rollout, sink=sink)

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        scope["canarymw.decision"] = type("D", (), {"variant": "-"})()  # what the endpoint reads
        await mw(scope, receive, send)

    with TestClient(plain) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "blue -" and not ws.extra_headers
    assert sink.outcomes == []


@pytest.mark.parametrize("ending", ["returns", "cancelled"])
def test_websocket_app_that_ends_without_a_close(make_rollout: MakeRollout, ending: str) -> None:
    import asyncio

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        if ending == "cancelled":
            await asyncio.sleep(60)

    sink = RecordingSink()
    mw = ASGICanaryMiddleware(app, new=None, rollout=make_rollout(50), sink=sink)
    server = FakeServer([{"type": "websocket.connect"}], kind="websocket")

    async def main() -> None:
        task = asyncio.ensure_future(
            mw(http_scope("/ws", type="websocket", scheme="ws"), server.receive, server.send)
        )
        if ending == "cancelled":
            while not server.sent:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task

    run(main())
    [outcome] = sink.outcomes
    assert outcome.status == 101 and outcome.error is None
    assert outcome.disconnected == (ending == "cancelled")
