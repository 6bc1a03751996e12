"""ASGI adapter: route each request to the old or the new ASGI app by cohort.

::

    from canarymw import ASGICanaryMiddleware, MemorySink, Rollout   # or canarymw.asgi

    rollout = Rollout("hello-v2", percent=10, secret_key=os.environ["CANARY_KEY"])

    # as Starlette (or FastAPI) middleware: the app being built is the old one
    app = Starlette(routes=blue_routes,
                    middleware=[Middleware(ASGICanaryMiddleware, new=green_app, rollout=rollout,
                                           sink=MemorySink())])
    # or around any ASGI app
    app = ASGICanaryMiddleware(blue_app, new=green_app, rollout=rollout)

The middleware is pure ASGI (no ``BaseHTTPMiddleware``): the chosen app runs in the
caller's task, so contextvars, background tasks, streaming and disconnects behave
exactly as without it. Every cohort decision is made by :meth:`Rollout.decide
<canarymw.Rollout.decide>`, the same sans-IO core the WSGI adapter uses, so a visitor
gets the same variant from both.

HTTP (``scope["type"] == "http"``)
    Paths excluded by the rollout go straight to the old app, untouched. Otherwise the
    cookie is read from every ``cookie`` header (HTTP/2 and HTTP/3 send one per
    cookie; they are joined with ``"; "``), the scope is copied (the server's dict is
    never changed) and the copy carries ``scope["canarymw.decision"]``. On
    ``http.response.start`` a new header list is built with ``Set-Cookie`` (when the
    decision needs one), ``Vary: Cookie`` and ``Cache-Control: private`` merged in; the
    app's message and header list are never mutated. Body messages pass through one by
    one, unbuffered. Like Starlette, request header names are expected in lower case,
    as every ASGI server sends them; the ASGI spec requires lower-case response header
    names, so only those are checked for an existing ``vary``/``cache-control``.

Outcomes
    Exactly one :class:`~canarymw.Outcome` per routed request or websocket. Its
    duration ends when the last response message has been sent (``more_body`` false,
    or the last trailers when the app announced trailers), so work done afterwards,
    such as Starlette background tasks, is not part of the latency. It is recorded when
    the app's call returns or raises (like WSGI's ``close()``), so an exception after
    the last byte still counts: Starlette's ``ServerErrorMiddleware`` sends its 500 and
    raises afterwards. An app exception is recorded with its type name and re-raised
    unchanged; the middleware never sends a response of its own, so there is never a
    second ``http.response.start``. A client that goes away is recorded at once, as a
    disconnect without error: when the app receives ``http.disconnect`` before the
    response was complete, or when the server's ``send`` raises ``OSError``. A task
    cancelled from outside (a server cancelling on disconnect or shutdown) counts as a
    disconnect too. ``route`` is ``scope["canarymw.route"]`` if the app set it, else the
    path template of the Starlette/FastAPI route that handled the request (innermost,
    relative to its mount), else None; never the raw path.

WebSocket
    Routed like HTTP, by the cohort cookie of the handshake request. A handshake
    without a valid cookie is assigned a cohort like a first page visit (so ``0`` and
    ``100`` percent, the ``key`` callable and forcing work for websockets too) and the
    cookie is offered in the ``headers`` of ``websocket.accept`` (or of a
    ``websocket.http.response.start`` denial). The outcome has method ``"WEBSOCKET"``;
    status 101 once accepted, 403 when closed before accept (what the server answers),
    or the denial response's status; ``disconnected`` is true when the client closed
    first; ``close_code`` is the code the app sent or the client gave.

Lifespan
    Both apps get ``lifespan.startup`` and ``lifespan.shutdown``, concurrently; the
    server hears ``lifespan.startup.complete`` only after both apps completed. The old
    app sees the server's lifespan ``state``; the new app gets a ``state`` of its own,
    laid over the server's state in the scope of requests routed to it, so two apps
    that store the same key do not overwrite each other. An app that returns or raises
    before it received ``lifespan.startup`` does not support lifespan and is skipped
    (if neither app does, the old app's exception is re-raised, exactly as without the
    middleware). A failing old app fails startup, as it would alone. A failing new app
    (``lifespan.startup.failed``, or an exception after it received the startup
    message) follows ``on_new_startup_failure``: ``"disable"`` (default: fail open,
    towards old) logs the error, switches the rollout off in this process
    (``Rollout.switch_off()``: percent 0, whatever a shared store says) and routes
    every request, forced ones included, to old for the life of the process;
    ``"fail"`` shuts the old app down again and reports ``lifespan.startup.failed`` to
    the server, which then refuses to start.

Any other scope type is passed to the old app untouched. Legacy ASGI 2 apps (called
with the scope alone) are accepted as either variant and run through a small shim.
See: https://asgi.readthedocs.io/en/latest/specs/www.html and .../specs/lifespan.html
"""

from __future__ import annotations

import time
from typing import Any

from ._asgi_core import StartupFailurePolicy, _app_path, _Core
from ._lifespan import LifespanApp, run_beside
from ._types import ASGIApp, Message, Receive, Scope, Send
from .shadow._bind import shadow_tap

__all__ = ["ASGIApp", "ASGICanaryMiddleware", "Message", "Receive", "Scope", "Send", "StartupFailurePolicy"]

_perf = time.perf_counter
_wall = time.time


class ASGICanaryMiddleware(_Core):
    """Route each request to ``old_app`` or ``new`` by its sticky cohort (pure ASGI).

    Args:
        old_app: The ASGI app being wrapped: the current implementation, or an
            :class:`~canarymw.Upstream` to proxy the old variant to. Positional, so
            ``Middleware(ASGICanaryMiddleware, new=..., rollout=...)`` works. A legacy
            ASGI 2 app (called with the scope alone, as a class or a function whose
            signature takes one argument) is accepted as well, for both variants.
        new: The new implementation, another ASGI app (a Starlette or FastAPI app, a
            router, a bare callable) or an :class:`~canarymw.Upstream` (which falls
            back to ``old_app`` when that is safe). ``None`` routes every request to
            ``old_app`` but still assigns cohorts, sets ``scope["canarymw.decision"]``
            and records outcomes, for apps that branch on the decision themselves.
        rollout: The :class:`~canarymw.Rollout` that decides.
        sink: Where outcomes go: a :class:`~canarymw.Sink`, a list of them, or None.
            A sink that raises is counted in :attr:`sink_errors`, never seen by clients.
        cache_control: Directive added to ``Cache-Control`` of routed responses unless
            the app chose ``private``/``no-store``/``public`` itself; ``None`` adds none.
            ``Vary: Cookie`` is always merged, so shared caches never mix cohorts.
        on_new_startup_failure: What a failing lifespan startup of ``new`` does.
            ``"disable"`` (default) keeps the service up on the old app: the error is
            logged, the rollout is switched off in this process (percent 0, whatever a
            shared store says) and every request goes to old,
            because a canary must never take the service down. ``"fail"`` fails the
            server's startup instead, for deployments that would rather not start.
        shutdown_flush_timeout: On lifespan shutdown, after both apps stopped, each
            :class:`~canarymw.BackgroundSink` fed by this middleware gets this many
            seconds to deliver the outcomes it still holds.
        shadow: Send a copy of requests to another app after the primary answered and
            compare the two responses: a :class:`~canarymw.Shadow`, or an ASGI app or
            :class:`~canarymw.Upstream` to shadow with its defaults (GET and HEAD
            requests served by old). Never affects the user's response. See
            docs/shadow.md.
    """

    def _bind_shadow(self, shadow: object) -> None:
        self.shadow, self._shadow = shadow_tap(shadow, self, "asgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            elif scope["type"] == "lifespan":
                if self.new_app is not self.old_app:
                    await self._lifespan(scope, receive, send)
                else:
                    await self.old_app(scope, receive, self._flushing(send))
            else:
                await self.old_app(scope, receive, send)
            return
        excluded = self._excluded
        if excluded is not None and excluded(_app_path(scope)):
            await self.old_app(scope, receive, send)
            return
        app, scope, x = self._begin(scope, receive, send)
        if self._shadow is not None:
            app = self._shadow(app, scope)
        # The outcome waits for the app to return (like WSGI's close()), so an exception
        # raised after the last byte still counts: Starlette's ServerErrorMiddleware sends
        # its 500 first and raises afterwards; a background task may fail.
        try:
            await app(scope, x.receive, x.send)
        except BaseException as exc:
            x.raised(exc)
            raise
        x.finish()  # the app returned: record the outcome unless it already was

    # -- WebSocket -----------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        excluded = self._excluded
        if excluded is not None and excluded(_app_path(scope)):
            await self.old_app(scope, receive, send)
            return
        app, scope, x = self._begin(scope, receive, send)
        x.method = "WEBSOCKET"
        cookie = x.cookie

        async def send_(message: Message) -> None:
            kind = message["type"]
            last = False
            if kind == "websocket.send":
                pass
            elif kind == "websocket.accept":
                x.status = 101
                if cookie is not None:
                    # See: https://asgi.readthedocs.io/en/latest/specs/www.html#accept-send-event
                    message = dict(message)
                    message["headers"] = [*(message.get("headers") or ()), (b"set-cookie", cookie)]
            elif kind == "websocket.close":
                if x.status is None:
                    x.status = 403  # closing before accept rejects the handshake with 403
                if not (x.ended or x.done):
                    x.close_code = message.get("code", 1000)
                    last = True
            elif kind == "websocket.http.response.start":
                await x.send(message)  # a denial response: our headers as on any response
                return
            elif kind == "websocket.http.response.body":
                last = not (x.ended or message.get("more_body", False))
            try:
                await send(message)
            except OSError:
                x.finish(None, True)
                raise
            if last:
                x.ended = _perf()

        async def receive_() -> Message:
            message = await receive()
            if not (x.done or x.ended) and message["type"] == "websocket.disconnect":
                x.close_code = message.get("code", 1005)  # 1005: no code given, RFC 6455 §7.4.1
                x.finish(None, True)
            return message

        try:
            await app(scope, receive_, send_)
        except BaseException as exc:
            x.raised(exc)
            raise
        x.finish()

    # -- Lifespan ------------------------------------------------------------------
    def _flushing(self, send: Send) -> Send:
        async def send_(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self._flush_sinks()
            await send(message)

        return send_

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        new_scope = dict(scope)
        new_state: dict[str, Any] | None = None
        if "state" in scope:
            new_state = new_scope["state"] = {}
        old = LifespanApp("old", self.old_app, scope)
        new = LifespanApp("new", self.new_app, new_scope)
        error = await run_beside(lambda: self._orchestrate(old, new, new_state, receive, send), old, new)
        if error is not None:
            raise error

    async def _orchestrate(
        self,
        old: LifespanApp,
        new: LifespanApp,
        new_state: dict[str, Any] | None,
        receive: Receive,
        send: Send,
    ) -> Exception | None:
        """Speak lifespan to the server for both apps; return an exception to re-raise, if any."""
        running: list[LifespanApp] = []
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                old_failure = await old.exchange(message, "startup")
                new_failure = await new.exchange(message, "startup")
                if old_failure is not None:
                    if new.started:
                        await new.exchange({"type": "lifespan.shutdown"}, "shutdown")
                    await send({"type": "lifespan.startup.failed", "message": old_failure})
                    return None
                if new_failure is not None:
                    if self.on_new_startup_failure == "fail":
                        if old.started:
                            await old.exchange({"type": "lifespan.shutdown"}, "shutdown")
                        text = f"canarymw: the new app of rollout {self.rollout.name!r} failed to start: "
                        await send({"type": "lifespan.startup.failed", "message": text + new_failure})
                        return None
                    self._disable(new_failure)
                running = [app for app in (old, new) if app.started]
                if not running:
                    # Neither app speaks lifespan: leave the server as the old app alone
                    # would have. See: lifespan spec, an exception means "unsupported".
                    return old.error
                if new.started:
                    self._new_state = new_state
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                failures = []
                for app in running:
                    failure = await app.exchange(message, "shutdown")
                    if failure is not None:
                        failures.append(f"{app.label} app: {failure}")
                self._flush_sinks()
                if failures:
                    await send({"type": "lifespan.shutdown.failed", "message": "\n".join(failures)})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return None
