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
    towards old) logs the error, sets the rollout's percent to 0 and routes every
    request, forced ones included, to old for the life of the process;
    ``"fail"`` shuts the old app down again and reports ``lifespan.startup.failed`` to
    the server, which then refuses to start.

Any other scope type is passed to the old app untouched. Legacy ASGI 2 apps (called
with the scope alone) are accepted as either variant and run through a small shim.
See: https://asgi.readthedocs.io/en/latest/specs/www.html and .../specs/lifespan.html
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from mypy_extensions import mypyc_attr

from ._headers import joined_cookie, with_ours
from ._lifespan import LifespanApp, run_beside
from ._rollout import FORCE_HEADER, FORCE_PARAM, Decision, Rollout, split_force_query
from ._setup import check_adapter_args, resolve_upstreams
from ._types import ASGIApp, Message, Receive, Scope, Send
from .sinks._base import Sink
from .sinks._dispatch import as_sink, direct_queue, record
from .sinks.background import background_sinks

if TYPE_CHECKING:
    from .upstream import Upstream

StartupFailurePolicy = Literal["fail", "disable"]

__all__ = ["ASGIApp", "ASGICanaryMiddleware", "Message", "Receive", "Scope", "Send", "StartupFailurePolicy"]

log = logging.getLogger("canarymw")

_perf = time.perf_counter
_wall = time.time
_NAMES = (b"vary", b"cache-control", b"set-cookie")
_SECURE = ("https", "wss")
_FORCE = FORCE_HEADER.encode("ascii")


def _dec(value: bytes) -> str:
    return value.decode("latin-1")


def _enc(value: str) -> bytes:
    return value.encode("latin-1")


def _own_headers(scope: Scope) -> Scope:
    # Headers given as another iterable than a list or tuple (a generator, say) become a
    # list in our scope copy: the decision reads them once and the app again.
    headers = scope.get("headers")
    if headers is not None and type(headers) is not list and type(headers) is not tuple:
        scope["headers"] = list(headers)
    return scope


def _app_path(scope: Scope) -> str:
    # The path below the mount point, like WSGI's PATH_INFO.
    # See: https://asgi.readthedocs.io/en/latest/specs/www.html#http-connection-scope (root_path)
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _takes_scope_only(app: Any) -> bool:
    # ASGI 2 ("legacy") apps are called with the scope alone and return the coroutine
    # callable; an ASGI 3 app must accept three positional arguments. Decided by the
    # signature, so no valid ASGI 3 app is ever taken for a legacy one (servers guess
    # from coroutine-function-ness, which misreads sync callables returning awaitables).
    try:
        sig = inspect.signature(app)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(None, None, None)
    except TypeError:
        try:
            sig.bind(None)
        except TypeError:
            return False
        return True
    return False


def _asgi3(app: Any) -> ASGIApp:
    """``app`` as an ASGI 3 callable; a legacy ASGI 2 app gets a shim.

    See: https://asgi.readthedocs.io/en/latest/specs/main.html#legacy-applications
    """
    if not _takes_scope_only(app):
        return cast("ASGIApp", app)

    async def asgi3(scope: Scope, receive: Receive, send: Send) -> None:
        instance = app(scope)
        await instance(receive, send)

    asgi3.__wrapped__ = app  # type: ignore[attr-defined]
    return asgi3


@mypyc_attr(allow_interpreted_subclasses=True)  # integrations and users subclass it
class ASGICanaryMiddleware:
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
            logged, ``rollout.percent`` is set to 0 and every request goes to old,
            because a canary must never take the service down. ``"fail"`` fails the
            server's startup instead, for deployments that would rather not start.
        shutdown_flush_timeout: On lifespan shutdown, after both apps stopped, each
            :class:`~canarymw.BackgroundSink` fed by this middleware gets this many
            seconds to deliver the outcomes it still holds.
    """

    def __init__(
        self,
        old_app: ASGIApp | Upstream,
        *,
        new: ASGIApp | Upstream | None,
        rollout: Rollout,
        sink: Sink | Sequence[Sink] | None = None,
        cache_control: str | None = "private",
        on_new_startup_failure: StartupFailurePolicy = "disable",
        shutdown_flush_timeout: float = 2.0,
    ) -> None:
        # Upstreams become plain ASGI apps here, once, so the request path never checks.
        old_app, new = resolve_upstreams(old_app, new, "asgi")
        check_adapter_args("ASGICanaryMiddleware", "an ASGI", old_app, new, rollout, cache_control)
        old_app = _asgi3(old_app)
        new = None if new is None else _asgi3(new)
        if on_new_startup_failure not in ("fail", "disable"):
            raise ValueError(
                f"ASGICanaryMiddleware got on_new_startup_failure={on_new_startup_failure!r}; "
                "use 'disable' (route everyone to old) or 'fail' (refuse to start)."
            )
        self.app = self.old_app = old_app
        self.new_app = old_app if new is None else new
        self.rollout = rollout
        self.sink = sink
        """The sink(s) as given; outcomes reach them through an internal guard."""
        self._guard = as_sink(sink)
        self.cache_control = cache_control or None
        self.on_new_startup_failure: StartupFailurePolicy = on_new_startup_failure
        self.shutdown_flush_timeout = shutdown_flush_timeout
        """Seconds lifespan shutdown waits for BackgroundSinks to deliver what they hold."""
        self.new_startup_error: str | None = None
        """Why the new app was disabled at startup (its failure message), or None."""
        self._extra: list[tuple[bytes, bytes]] = [(b"vary", b"Cookie")]
        if self.cache_control:
            self._extra.append((b"cache-control", self.cache_control.encode("ascii")))
        # Rollout.is_excluded is fixed at construction; skip the call when it is empty.
        self._excluded: Callable[[str], bool] | None = rollout.is_excluded if rollout.is_excluded else None
        self._record = self._guard.sink.record if self._guard is not None else None
        self._memory = direct_queue(self._guard)
        self._new_state: dict[str, Any] | None = None

    @property
    def sink_errors(self) -> int:
        """How many times the sink (or, for a list of sinks, any one of them) raised."""
        return self._guard.total_errors if self._guard is not None else 0

    # -- routing -------------------------------------------------------------------
    def _decide(self, scope: Scope) -> Decision:
        """Decide from the request or handshake headers, in one pass over ``scope["headers"]``."""
        rollout = self.rollout
        headers = scope.get("headers", ())
        cookie = joined_cookie(headers)
        force: str | None = None
        query = ""
        if rollout.force_token is not None:
            # Read, then removed from our scope copy: the token never reaches the app,
            # an upstream or their logs.
            forced = [value for name, value in headers if name == _FORCE]
            if forced:
                force = forced[0].decode("latin-1")
                scope["headers"] = [h for h in headers if h[0] != _FORCE]
            query = scope.get("query_string", b"").decode("latin-1")
            if FORCE_PARAM in query:
                scope["query_string"] = split_force_query(query)[1].encode("latin-1")
        # On the fast path __call__ just consulted the cache (or there is no cookie).
        return (rollout._decide_uncached if rollout.cookie_only else rollout.decide)(
            None if cookie is None else cookie.decode("latin-1"),
            scope.get("scheme") in _SECURE,
            force,
            query,
            scope,
        )

    def _pick(self, scope: Scope, decision: Decision) -> tuple[ASGIApp, Decision]:
        if decision.variant == "new":
            if self.new_startup_error is not None:
                return self.old_app, decision._replace(variant="old")
            new_state = self._new_state
            if new_state:
                # The server copied the (old) lifespan state into the scope; lay the
                # new app's own state over it. See: ASGI lifespan spec, "Lifespan State".
                state = dict(scope.get("state") or ())
                state.update(new_state)
                scope["state"] = state
            return self.new_app, decision
        return self.old_app, decision

    def _start(self, message: Message, cookie: bytes | None, extra: list[tuple[bytes, bytes]]) -> Message:
        """A copy of a response start message with our headers merged into a new list."""
        headers: Iterable[Any] | None = message.get("headers")
        if headers is None:
            headers = ()
        elif not isinstance(headers, (list, tuple)):
            headers = list(headers)  # a one-shot iterable is read twice below
        out = dict(message)
        out["headers"] = with_ours(
            cast("Iterable[tuple[bytes, bytes]]", headers),
            extra,
            cookie,
            self.cache_control,
            _NAMES,
            _dec,
            _enc,
            False,
        )
        return out

    # -- HTTP ----------------------------------------------------------------------
    def _outcome(
        self,
        decision: Decision,
        scope: Scope,
        status: int | None,
        duration: float,
        error: str | None,
        disconnected: bool,
        method: str,
        wall: float,
        close_code: int | None = None,
    ) -> None:
        """Build and record one outcome; a failing sink is counted, never raised."""
        if self._record is None:
            return
        route = scope.get("canarymw.route")
        if route is None:
            # Starlette's Router (and FastAPI's) store the matched route object here.
            route = getattr(scope.get("route"), "path", None)
            if not isinstance(route, str):
                route = None
        error = error or scope.get("canarymw.error")
        record(self, decision, status, duration, error, disconnected, method, route, wall, close_code)

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
        scope = dict(scope)
        headers = scope.get("headers", ())
        if type(headers) is not list and type(headers) is not tuple:
            headers = _own_headers(scope)["headers"]
        decision = None
        if self.rollout.cookie_only:
            # A returning visitor: one pass for the cookie, one dict lookup, no parsing.
            cookie_header = joined_cookie(headers)
            if cookie_header is not None:
                decision = self.rollout.cached(cookie_header.decode("latin-1"))
        if decision is None:
            decision = self._decide(scope)
        if decision.variant == "new":
            app, decision = self._pick(scope, decision)
        else:
            app = self.old_app
        scope["canarymw.decision"] = decision
        # One object per request carries its state; its bound methods wrap send/receive
        # (cheaper than closures over a dozen cells).
        x = _Exchange()
        x.mw = self
        x.decision = decision
        x.scope = scope
        x.server_send = send
        x.server_receive = receive
        set_cookie = decision.set_cookie
        if set_cookie is not None:
            x.cookie = cookie = set_cookie.encode("latin-1")
            x.extra = [*self._extra, (b"set-cookie", cookie)]
        else:
            x.extra = self._extra
        x.wall = _wall()
        x.started = _perf()
        # The outcome waits for the app to return (like WSGI's close()), so an exception
        # raised after the last byte still counts: Starlette's ServerErrorMiddleware sends
        # its 500 first and raises afterwards; a background task may fail.
        try:
            await app(scope, x.receive, x.send)
        except Exception as exc:
            if not x.done:
                x.finish(type(exc).__name__, False, x.ended or _perf())
            raise
        except BaseException:
            # Cancelled or interrupted from outside: the server tore the request down.
            if not x.done:
                x.finish(None, not x.ended, x.ended or _perf())
            raise
        if not x.done and self._record is not None:
            x.finish(None, False, x.ended or _perf())

    # -- WebSocket -----------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        excluded = self._excluded
        if excluded is not None and excluded(_app_path(scope)):
            await self.old_app(scope, receive, send)
            return
        scope = _own_headers(dict(scope))
        decision = self._decide(scope)
        app, decision = self._pick(scope, decision)
        scope["canarymw.decision"] = decision
        set_cookie = decision.set_cookie
        cookie = None if set_cookie is None else set_cookie.encode("latin-1")
        extra = self._extra if cookie is None else [*self._extra, (b"set-cookie", cookie)]
        status: int | None = None
        close_code: int | None = None
        ended = 0.0
        done = False
        wall = _wall()
        started = _perf()

        def finish(error: str | None, disconnected: bool) -> None:
            nonlocal done
            done = True
            duration = (ended or _perf()) - started
            self._outcome(
                decision, scope, status, duration, error, disconnected, "WEBSOCKET", wall, close_code
            )

        async def send_(message: Message) -> None:
            nonlocal status, close_code, ended
            kind = message["type"]
            last = False
            if kind == "websocket.send":
                pass
            elif kind == "websocket.accept":
                status = 101
                if cookie is not None:
                    # See: https://asgi.readthedocs.io/en/latest/specs/www.html#accept-send-event
                    message = dict(message)
                    message["headers"] = [*(message.get("headers") or ()), (b"set-cookie", cookie)]
            elif kind == "websocket.close":
                if status is None:
                    status = 403  # closing before accept rejects the handshake with 403
                if not (ended or done):
                    close_code = message.get("code", 1000)
                    last = True
            elif kind == "websocket.http.response.start":
                # See: https://asgi.readthedocs.io/en/latest/extensions.html#websocket-denial-response
                status = message.get("status")
                message = self._start(message, cookie, extra)
            elif kind == "websocket.http.response.body":
                last = not (ended or message.get("more_body", False))
            try:
                await send(message)
            except OSError:
                if not done:
                    finish(None, True)
                raise
            if last:
                ended = _perf()

        async def receive_() -> Message:
            nonlocal close_code
            message = await receive()
            if not (done or ended) and message["type"] == "websocket.disconnect":
                close_code = message.get("code", 1005)  # 1005: no code given, RFC 6455 §7.4.1
                finish(None, True)
            return message

        try:
            await app(scope, receive_, send_)
        except Exception as exc:
            if not done:
                finish(type(exc).__name__, False)
            raise
        except BaseException:
            if not done:
                finish(None, not ended)
            raise
        if not done:
            finish(None, False)

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

    def _flush_sinks(self) -> None:
        # Outcomes still queued in a BackgroundSink are delivered before the server exits;
        # bounded, as a stuck sink must not hold the shutdown hostage.
        for sink in background_sinks(self):
            sink.flush(timeout=self.shutdown_flush_timeout)

    def _disable(self, reason: str) -> None:
        self.new_startup_error = reason
        self.rollout.percent = 0
        log.error(
            "canarymw: the new app of rollout %r failed its lifespan startup; the canary is "
            "disabled (percent set to 0, every request goes to old): %s",
            self.rollout.name,
            reason,
        )


class _Exchange:
    """One HTTP request's state; ``send``/``receive`` wrap the server's callables."""

    # No __slots__: class-level defaults spare the per-request stores of fields that
    # keep their default. The middleware fills in the rest.
    cookie: bytes | None = None
    status: int | None = None
    trailers = False
    ended = 0.0  # perf_counter() when the last response message went out
    done = False  # the outcome has been recorded
    mw: ASGICanaryMiddleware
    decision: Decision
    scope: Scope
    server_send: Send
    server_receive: Receive
    extra: list[tuple[bytes, bytes]]
    wall: float
    started: float

    async def send(self, message: Message) -> None:
        kind = message["type"]
        last = False
        if kind == "http.response.body":
            last = not (self.ended or self.trailers or message.get("more_body", False))
        elif kind == "http.response.start":
            self.status = message.get("status")
            self.trailers = bool(message.get("trailers", False))
            message = self.mw._start(message, self.cookie, self.extra)
        elif kind == "http.response.trailers":
            # See: https://asgi.readthedocs.io/en/latest/extensions.html#http-trailers
            last = not (self.ended or message.get("more_trailers", False))
        elif kind == "http.response.pathsend":
            last = not self.ended
        try:
            await self.server_send(message)
        except OSError:
            # The server could not write: the client is gone (uvicorn raises
            # ClientDisconnected, an OSError, for ASGI spec >= 2.4).
            if not self.done:
                self.finish(None, True, _perf())
            raise
        if last:
            self.ended = _perf()

    async def receive(self) -> Message:
        message = await self.server_receive()
        if not (self.done or self.ended) and message["type"] == "http.disconnect":
            self.finish(None, True, _perf())
        return message

    def finish(self, error: str | None, disconnected: bool, at: float) -> None:
        """Record the outcome once (see ASGICanaryMiddleware._outcome)."""
        self.done = True
        scope = self.scope
        self.mw._outcome(
            self.decision,
            scope,
            self.status,
            at - self.started,
            error,
            disconnected,
            scope.get("method", "GET"),
            self.wall,
        )
