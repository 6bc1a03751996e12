"""The compiled half of the ASGI adapter: setup, decisions, header merging and the
per-request exchange. The coroutines are in :mod:`canarymw.asgi`."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from mypy_extensions import mypyc_attr

from ._headers import joined_cookie, with_ours
from ._rollout import FORCE_HEADER, FORCE_PARAM, Decision, Rollout, split_force_query
from ._setup import check_adapter_args, resolve_upstreams, with_guard_sink
from ._types import ASGIApp, Message, Receive, Scope, Send
from .sinks._base import Sink, default_classifier
from .sinks._dispatch import Outlet, as_sink, record
from .sinks.background import background_sinks

if TYPE_CHECKING:
    from .shadow import Shadow
    from .upstream import Upstream

StartupFailurePolicy = Literal["fail", "disable"]


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
class _Core:
    """The compiled part of :class:`~canarymw.asgi.ASGICanaryMiddleware`: everything but
    its coroutines, which stay interpreted so that exceptions thrown into them (from a
    worker thread, a failed future) keep their whole traceback."""

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
        shadow: ASGIApp | Upstream | Shadow | None = None,
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
        """The sink(s) as given; outcomes reach them through an internal guard (with a
        StoreSink added when the rollout has a guard and no sink given feeds its store)."""
        self._guard = as_sink(with_guard_sink(sink, rollout))
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
        self._outlet = None if self._guard is None else Outlet(self._guard)
        memory = None if self._outlet is None else self._outlet.memory
        # A MemorySink that folds with the default rule reads no route: skip looking it up.
        self._routes = memory is None or memory._classify is not default_classifier
        self._cached, self._decide_full = rollout.deciders()
        self._new_state: dict[str, Any] | None = None
        self.shadow: Shadow | None = None
        """The :class:`~canarymw.Shadow` given (an app or Upstream becomes one), or None."""
        self._shadow: Callable[[ASGIApp, Scope], ASGIApp] | None = None
        if shadow is not None:
            self._bind_shadow(shadow)

    @property
    def sink_errors(self) -> int:
        """How many times the sink (or, for a list of sinks, any one of them) raised."""
        return self._guard.total_errors if self._guard is not None else 0

    # -- routing -------------------------------------------------------------------
    def _decide(self, scope: Scope, cookie: bytes | None) -> Decision:
        """Decide from the request or handshake headers (``cookie``: their cookies, joined)."""
        rollout = self.rollout
        headers = scope.get("headers", ())
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
        # With a cache to consult, _begin just did (or there is no cookie).
        return self._decide_full(
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

    def _begin(self, scope: Scope, receive: Receive, send: Send) -> tuple[ASGIApp, Scope, _Exchange]:
        """The request's (or WebSocket handshake's) app, our copy of its scope, and its
        exchange (the prelude of ``__call__``, compiled)."""
        scope = dict(scope)
        headers = scope.get("headers", ())
        if type(headers) is not list and type(headers) is not tuple:
            headers = _own_headers(scope)["headers"]
        decision = None
        cookie = joined_cookie(headers)
        cached = self._cached
        if cookie is not None and cached is not None:
            # A returning visitor: one dict lookup, no parsing.
            decision = cached(cookie.decode("latin-1"))
        if decision is None:
            decision = self._decide(scope, cookie)
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
            x.cookie = ours = set_cookie.encode("latin-1")
            x.extra = [*self._extra, (b"set-cookie", ours)]
        else:
            x.extra = self._extra
        x.wall = _wall()
        x.started = _perf()
        return app, scope, x

    def _bind_shadow(self, shadow: object) -> None:
        """Set :attr:`shadow` and the per-request wrapper from ``shadow=``; done by
        :class:`~canarymw.asgi.ASGICanaryMiddleware`, whose module may import the
        shadow's ASGI side (which imports this one)."""
        raise NotImplementedError

    def _flush_sinks(self) -> None:
        # Outcomes still queued in a BackgroundSink are delivered before the server exits;
        # bounded, as a stuck sink must not hold the shutdown hostage.
        for sink in background_sinks(self):
            sink.flush(timeout=self.shutdown_flush_timeout)

    def _disable(self, reason: str) -> None:
        self.new_startup_error = reason
        self.rollout.switch_off()
        log.error(
            "canarymw: the new app of rollout %r failed its lifespan startup; the canary is "
            "disabled in this process (percent 0, every request goes to old): %s",
            self.rollout.name,
            reason,
        )


def route_of(scope: Scope) -> str | None:
    """The route template of a request the app has handled, if known (never the raw path)."""
    route = scope.get("canarymw.route")
    if route is None:
        # Starlette's Router (and FastAPI's) store the matched route object here.
        route = getattr(scope.get("route"), "path", None)
        if not isinstance(route, str):
            route = None
    return route


class _Exchange:
    """One HTTP request's (or WebSocket's) state; ``send``/``receive`` wrap the server's
    callables for HTTP, and the WebSocket wrappers use its fields."""

    # No __slots__: class-level defaults spare the per-request stores of fields that
    # keep their default. The middleware fills in the rest.
    cookie: bytes | None = None
    status: int | None = None
    trailers = False
    method: str | None = None  # None: the scope's ("WEBSOCKET" for a WebSocket)
    close_code: int | None = None
    ended = 0.0  # perf_counter() when the last response message went out
    done = False  # the outcome has been recorded
    mw: _Core
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
        elif kind == "http.response.start" or kind == "websocket.http.response.start":
            # See: https://asgi.readthedocs.io/en/latest/extensions.html#websocket-denial-response
            self.status = message.get("status")
            self.trailers = bool(message.get("trailers", False))
            headers: Iterable[Any] | None = message.get("headers")
            if headers is None:
                headers = ()
            elif not isinstance(headers, (list, tuple)):
                headers = list(headers)  # a one-shot iterable is read twice below
            message = dict(message)
            message["headers"] = with_ours(
                headers, self.extra, self.cookie, self.mw.cache_control, _NAMES, _dec, _enc, False
            )
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

    def finish(self, error: str | None = None, disconnected: bool = False, at: float = 0.0) -> None:
        """Record the outcome unless it already was; a failing sink is counted, never
        raised. ``at``: when the exchange ended; 0 for when the last response message
        went out, else now."""
        if self.done:
            return
        self.done = True
        mw = self.mw
        outlet = mw._outlet
        if outlet is None:
            return
        scope = self.scope
        record(
            outlet,
            self.decision,
            self.status,
            (at or self.ended or _perf()) - self.started,
            error or scope.get("canarymw.error"),
            disconnected,
            self.method or scope.get("method", "GET"),
            route_of(scope) if mw._routes else None,
            self.wall,
            self.close_code,
        )

    def raised(self, exc: BaseException) -> None:
        """The app raised: an exception is its failure; anything else (cancellation,
        an interrupt) means the server tore the request down."""
        if self.done:
            return
        if isinstance(exc, Exception):
            self.finish(type(exc).__name__, False)
        else:
            self.finish(None, not self.ended)
