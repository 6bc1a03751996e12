"""WSGI adapter: route each request to the old or the new WSGI app by cohort.

::

    from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

    rollout = Rollout("hello-v2", percent=10, secret_key=os.environ["CANARY_KEY"])
    app.wsgi_app = WSGICanaryMiddleware(app.wsgi_app, new=green.wsgi_app, rollout=rollout,
                                        sink=MemorySink())

The middleware is PEP 3333 correct in both directions: ``start_response`` may be
called lazily (on the first iteration) and again with ``exc_info``; the ``write()``
callable is passed through; the response iterable is passed through chunk by chunk
(never buffered) and the inner ``close()`` is called exactly once. The outcome is
recorded in our iterable's ``close()``, after the inner one: that is when the server
has finished with the response. A server that calls ``close()`` before the body was
exhausted means the client went away: the outcome is marked ``disconnected``.

``environ["canarymw.decision"]`` holds the :class:`~canarymw.Decision`; a framework
may put a route template in ``environ["canarymw.route"]`` for the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from ._headers import with_ours
from ._rollout import FORCE_HEADER, FORCE_PARAM, Decision, Rollout, split_force_query
from ._setup import check_adapter_args, resolve_upstreams, with_guard_sink
from ._types import StartResponse, WSGIApplication, WSGIEnvironment
from .shadow._bind import shadow_tap
from .sinks._base import Sink
from .sinks._dispatch import Outlet, as_sink, record

if TYPE_CHECKING:
    from .shadow import Shadow
    from .upstream import Upstream

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

_NAMES = ("Vary", "Cache-Control", "Set-Cookie")
_perf = time.perf_counter
_wall = time.time
_FORCE = "HTTP_" + FORCE_HEADER.upper().replace("-", "_")
_codes: dict[str, int] = {}  # status line -> code: most apps send a handful of them


def _same(value: str) -> str:
    return value


@mypyc_attr(allow_interpreted_subclasses=True)  # integrations and users subclass it
class WSGICanaryMiddleware:
    """Route each request to ``old_app`` or ``new`` by its sticky cohort.

    Args:
        old_app: The WSGI app being wrapped: the current implementation, or an
            :class:`~canarymw.Upstream` to proxy the old variant to.
        new: The new implementation, another WSGI app or an :class:`~canarymw.Upstream`
            (which falls back to ``old_app`` when that is safe). ``None`` routes every
            request to ``old_app`` but still assigns cohorts and records outcomes, for
            apps that branch on ``environ["canarymw.decision"]`` themselves.
        rollout: The :class:`~canarymw.Rollout` that decides.
        sink: Where outcomes go: a :class:`~canarymw.Sink`, a list of them, or None.
            A sink that raises is counted in :attr:`sink_errors`, never seen by clients.
        cache_control: Directive added to ``Cache-Control`` of routed responses unless
            the app chose ``private``/``no-store``/``public`` itself; ``None`` adds none.
            ``Vary: Cookie`` is always merged, so shared caches never mix cohorts.
        shadow: Send a copy of requests to another app after the primary answered and
            compare the two responses: a :class:`~canarymw.Shadow`, or a WSGI app or
            :class:`~canarymw.Upstream` to shadow with its defaults (GET and HEAD
            requests served by old). Never affects the user's response. See
            docs/shadow.md.
    """

    def __init__(
        self,
        old_app: WSGIApplication | Upstream,
        *,
        new: WSGIApplication | Upstream | None,
        rollout: Rollout,
        sink: Sink | Sequence[Sink] | None = None,
        cache_control: str | None = "private",
        shadow: WSGIApplication | Upstream | Shadow | None = None,
    ) -> None:
        # Upstreams become plain WSGI apps here, once, so the request path never checks.
        old: WSGIApplication
        new_app: WSGIApplication | None
        old, new_app = resolve_upstreams(old_app, new, "wsgi")
        check_adapter_args("WSGICanaryMiddleware", "a WSGI", old, new_app, rollout, cache_control)
        self.old_app = old
        self.new_app = old if new_app is None else new_app
        self.rollout = rollout
        self.sink = sink
        """The sink(s) as given; outcomes reach them through an internal guard (with a
        StoreSink added when the rollout has a guard and no sink given feeds its store)."""
        self._guard = as_sink(with_guard_sink(sink, rollout))
        self._outlet = None if self._guard is None else Outlet(self._guard)
        self._cached, self._decide_full = rollout.deciders()
        self._forcing = rollout.force_token is not None
        self._excluded = rollout.is_excluded if rollout.is_excluded else None
        self.cache_control = cache_control
        self.extra_headers: list[tuple[str, str]] = [("Vary", "Cookie")]
        if cache_control:
            self.extra_headers.append(("Cache-Control", cache_control))
        self.split_only = False
        # Set by canarymw.flask: count only requests that reached a split view.
        self.shadow: Shadow | None
        """The :class:`~canarymw.Shadow` given (an app or Upstream becomes one), or None."""
        self._shadow: Callable[[WSGIApplication, Decision, WSGIEnvironment], WSGIApplication] | None
        self.shadow, self._shadow = shadow_tap(shadow, self, "wsgi")

    @property
    def sink_errors(self) -> int:
        """How many times the sink (or, for a list of sinks, any one of them) raised."""
        return self._guard.total_errors if self._guard is not None else 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._excluded is not None and self._excluded(environ.get("PATH_INFO", "")):
            return self.old_app(environ, start_response)
        cookie = environ.get("HTTP_COOKIE")
        decision = None
        wall = _wall()
        cached = self._cached
        if cookie and cached is not None:
            decision = cached(cookie)
        if decision is None:
            # With a cache to consult, it just was (or there is no cookie).
            decision = self._decide_full(
                cookie,
                environ.get("wsgi.url_scheme") == "https",
                environ.get(_FORCE),
                environ.get("QUERY_STRING", ""),
                environ,
            )
        if self._forcing:
            _drop_force(environ)
        environ["canarymw.decision"] = decision
        app = self.new_app if decision.variant == "new" else self.old_app
        if self._shadow is not None:
            app = self._shadow(app, decision, environ)
        return _respond(self, app, decision, environ, start_response, wall)


def _respond(
    mw: WSGICanaryMiddleware,
    app: WSGIApplication,
    decision: Decision,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    wall: float,
) -> Iterable[bytes]:
    """Call ``app`` and return our iterable around its response."""
    # Attributes set here rather than in an __init__: one Python frame less per request.
    response = _Response()
    response.mw = mw
    response.decision = decision
    response.environ = environ
    response.server_start_response = start_response
    response.wall = wall
    response.started = _perf()
    try:
        response.inner = app(environ, response.start_response)
    except BaseException as exc:
        response.error = type(exc).__name__
        response.finish()
        raise
    return response


class _Response:
    """Our response iterable for one request; also carries its start_response."""

    # No __slots__: class-level defaults spare the per-request stores of fields that
    # keep their default. The middleware fills in the rest.
    status: int | None = None
    error: str | None = None
    done = False
    inner: Iterable[bytes] | None = None
    mw: WSGICanaryMiddleware
    decision: Decision
    environ: WSGIEnvironment
    server_start_response: StartResponse
    wall: float
    started: float

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        code = _codes.get(status)
        self.status = _parse_status(status) if code is None else code
        cookie = self.decision.set_cookie
        mw = self.mw
        ours = mw.extra_headers if cookie is None else [*mw.extra_headers, ("Set-Cookie", cookie)]
        headers = with_ours(headers, ours, cookie, mw.cache_control, _NAMES, _same, _same, True)
        if exc_info is not None:
            return self.server_start_response(status, headers, exc_info)
        return self.server_start_response(status, headers)

    def __iter__(self) -> Iterator[bytes]:
        # A generator, not __next__: the end of the body costs no StopIteration object.
        # If the server stops early and calls close(), this generator is left suspended
        # and never closes the inner iterable itself; close() does that, exactly once.
        try:
            # "yield from" would also close the inner iterable when this generator is closed.
            for chunk in self.inner:  # type: ignore[union-attr]  # noqa: UP028
                yield chunk
        except Exception as exc:
            self.error = type(exc).__name__
            raise
        self.done = True

    def close(self) -> None:
        inner = self.inner
        if inner is None:
            return
        self.inner = None
        try:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            if self.error is None:
                self.error = type(exc).__name__
            self.finish()
            raise
        self.finish()

    def finish(self) -> None:
        mw = self.mw
        outlet = mw._outlet
        if outlet is None:
            return
        env = self.environ
        if mw.split_only and not env.get("canarymw.split"):
            return
        # An integration (a split view, an upstream) may name the failure it handled.
        error = self.error or env.get("canarymw.error")
        decision = self.decision
        method = env.get("REQUEST_METHOD", "GET")
        record(
            outlet,
            decision,
            self.status,
            _perf() - self.started,
            error,
            not self.done and error is None and method != "HEAD",
            method,
            env.get("canarymw.route"),
            self.wall,
        )


def _drop_force(environ: WSGIEnvironment) -> None:
    # The force token never reaches the app or an upstream (nor their logs).
    environ.pop(_FORCE, None)
    for key in ("QUERY_STRING", "RAW_URI", "REQUEST_URI"):
        value = environ.get(key)
        if value and FORCE_PARAM in value:
            head, mark, query = value.partition("?") if key != "QUERY_STRING" else ("", "", value)
            rest = split_force_query(query)[1]
            environ[key] = head + (mark if rest else "") + rest


def _parse_status(line: str) -> int | None:
    try:
        code = int(line[:3])
    except ValueError:
        return None
    if len(_codes) < 512:
        _codes[line] = code
    return code
