"""The ASGI side: capture the primary's response as it streams, then send the copy as a
task on the same event loop (a semaphore per loop; the bound on waiting copies is the
Shadow's)."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from .._asgi_core import _app_path, _asgi3, route_of
from .._types import ASGIApp, Message, Receive, Scope, Send
from ._capture import Capture, Copy, skipped, strip_cookie, verdict
from ._compare import Comparison
from ._config import Shadow, ShadowRequest, _is_upstream
from ._record import comparison_sinks

_perf = time.perf_counter
_wall = time.time
_DISCONNECT = {"type": "http.disconnect"}


class _Loop:
    """What the copies on one event loop share: the concurrency limit and the tasks
    (asyncio keeps only weak references to tasks)."""

    def __init__(self, concurrency: int) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: set[asyncio.Task[None]] = set()


class ASGITap:
    """Decides which requests are copied and wraps their primary (see :meth:`wrap`)."""

    def __init__(self, shadow: Shadow, mw: Any) -> None:
        target = shadow.target
        self.shadow = shadow
        self.mw = mw
        self.app: ASGIApp = target.asgi_app() if _is_upstream(target) else _asgi3(target)
        self.cookie = mw.rollout.cookie_name.encode("latin-1")
        self.sinks = comparison_sinks(mw._guard)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()

    def wrap(self, app: ASGIApp, scope: Scope) -> ASGIApp:
        """``app``, or ``app`` wrapped to capture its response when this request is copied."""
        s = self.shadow
        decision = scope["canarymw.decision"]
        method: str = scope.get("method", "GET")
        if method not in s.methods or decision.variant not in s.variants:
            return app
        if s.when is not None and not self._asked(scope, method):
            return app
        wall = _wall()
        headers = []
        length = 0
        sized = True
        for name, value in scope.get("headers", ()):
            if name == b"cookie" and not s.send_cohort_cookie:
                value = strip_cookie(value.decode("latin-1"), self.cookie.decode("latin-1")).encode("latin-1")
                if not value:
                    continue
            elif name == b"content-length":
                sized = value.isdigit()
                length = int(value) if sized else 0
            elif name == b"transfer-encoding":
                sized = False
            headers.append((name, value))
        if not sized or length > s.max_request_body:
            reason = "the request body is over max_request_body or has no length"
            self.record(skipped(self._meta(decision, scope, wall), "not-compared", reason))
            return app
        copy = dict(scope)
        del copy["canarymw.decision"]
        copy["headers"] = headers
        copy["canarymw.shadow"] = True
        new_state = self.mw._new_state
        if new_state and self.app is self.mw.new_app:
            # The shadow is the new app: it gets its own lifespan state, as on a real request.
            copy["state"] = {**(scope.get("state") or {}), **new_state}
        primary = _Primary(self, app, copy, decision, wall, length > 0)
        return primary.__call__

    def _asked(self, scope: Scope, method: str) -> bool:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1")
            sep = "; " if key == "cookie" else ", "
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}{sep}{text}" if key in headers else text
        query = scope.get("query_string", b"").decode("latin-1")
        request = ShadowRequest(method, _app_path(scope), query, headers)
        try:
            return bool(self.shadow.when(request))  # type: ignore[misc]
        except Exception:
            return False

    def _meta(self, decision: Any, scope: Scope, wall: float) -> Copy:
        path = scope.get("root_path", "") + _app_path(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        return Copy(
            decision.rollout,
            decision.variant,
            route_of(scope),
            scope.get("method", "GET"),
            f"{path}?{query}" if query else path,
            wall,
        )

    def finished(self, primary: _Primary, scope: Scope) -> None:
        """The primary's response has finished: start the copy, or say why not."""
        meta = self._meta(primary.decision, scope, primary.wall)
        capture = primary.capture
        if not capture.complete or capture.status is None:
            self.record(skipped(meta, "not-compared", "the primary failed or its client left"))
            return
        if primary.wants_body and not primary.body_complete:
            self.record(skipped(meta, "not-compared", "the primary did not read the whole request body"))
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.record(skipped(meta, "not-compared", "shadowing needs an asyncio event loop"))
            return
        if not self.shadow._admit():
            self.record(skipped(meta, "dropped", "the queue was full"))
            return
        held = self._loops.get(loop)
        if held is None:
            held = self._loops[loop] = _Loop(self.shadow.concurrency)
        body = b"".join(primary.body)
        task = loop.create_task(self.run(held, meta, primary.copy, body, capture))
        held.tasks.add(task)
        task.add_done_callback(held.tasks.discard)

    async def run(self, held: _Loop, meta: Copy, scope: Scope, body: bytes, primary: Capture) -> None:
        """Send one copy and compare (a task of its own)."""
        s = self.shadow
        ran = False
        try:
            async with held.slots:
                s._begin()
                ran = True
                got = Capture(s.max_body)
                error: str | None = None
                started = _perf()
                try:
                    await asyncio.wait_for(self._call(scope, body, got), s.timeout)
                except asyncio.TimeoutError:
                    error = "timeout"
                except Exception as exc:
                    error = type(exc).__name__
                # The upstream proxy names a failure it answered with a 502 or 504.
                error = error or scope.get("canarymw.error")
                self.record(verdict(s, meta, primary, got, error, started))
        finally:
            s._end(ran)

    async def _call(self, scope: Scope, body: bytes, got: Capture) -> None:
        done = asyncio.Event()
        messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            if messages:
                return messages.pop()
            # Like a client that stays until the response is complete (a streaming
            # response listens for the disconnect).
            await done.wait()
            return dict(_DISCONNECT)

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                got.status = message.get("status")
                got.headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())
                ]
            elif kind == "http.response.body":
                got.take(message.get("body", b""))
                if not message.get("more_body", False):
                    got.complete = True
                    done.set()
            elif kind == "http.response.pathsend":
                got.over = got.complete = True
                done.set()

        await self.app(scope, receive, send)

    def record(self, comparison: Comparison) -> None:
        self.shadow._recorder.record(comparison, self.sinks)


class _Primary:
    """The primary app of a copied request: its response passes through, captured."""

    def __init__(
        self, tap: ASGITap, app: ASGIApp, copy: Scope, decision: Any, wall: float, wants_body: bool
    ) -> None:
        self.tap = tap
        self.app = app
        self.copy = copy
        self.decision = decision
        self.wall = wall
        self.capture = Capture(tap.shadow.max_body)
        self.wants_body = wants_body
        self.body: list[bytes] = []
        self.body_complete = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        capture = self.capture

        async def send_(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = message.get("headers", ())
                if not isinstance(headers, list | tuple):
                    message = {**message, "headers": list(headers)}  # a one-shot iterable
                    headers = message["headers"]
                capture.status = message.get("status")
                capture.headers = [
                    (bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in headers
                ]
            elif kind == "http.response.body":
                capture.take(message.get("body", b""))
                if not message.get("more_body", False):
                    capture.complete = True
            elif kind == "http.response.pathsend":
                capture.over = capture.complete = True
            await send(message)

        async def receive_() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not self.body_complete:
                self.body.append(bytes(message.get("body", b"")))
                self.body_complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, receive_ if self.wants_body else receive, send_)
        finally:
            self.tap.finished(self, scope)
