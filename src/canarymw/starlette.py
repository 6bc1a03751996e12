"""Starlette integration: split one route between an old and a new endpoint.

::

    from starlette.applications import Starlette
    from starlette.routing import Route
    from canarymw import MemorySink, Rollout
    from canarymw.starlette import CanaryRoute, get_variant, split

    rollout = Rollout("checkout-v2", percent=10, secret_key=os.environ["CANARY_KEY"])
    sink = MemorySink()

    async def checkout_v2(request):
        log.info("checkout", extra={"variant": get_variant(request)})   # "new"
        ...

    app = Starlette(routes=[
        CanaryRoute("/checkout", checkout, checkout_v2, rollout=rollout, sink=sink),
        # or, with any Route option:
        Route("/cart", split(cart, cart_v2, rollout=rollout, sink=sink), methods=["GET", "POST"]),
    ])

:func:`split` returns an :class:`~canarymw.asgi.ASGICanaryMiddleware` whose old and
new apps are the two endpoints, so a split route behaves exactly like the whole-app
middleware: same sticky cohort cookie, ``Vary``/``Cache-Control``, one outcome per
request (with the route's path template), and the decision in
``request.scope["canarymw.decision"]``. Only requests to split routes get a cohort
cookie, ``Vary: Cookie`` and ``Cache-Control: private``, and count: every other route
keeps its shared caching, :func:`get_variant` is None there, and a visitor is assigned
(``counters["assigned"]``, ``on_exposure``) on their first split route, not on their
first page. Endpoints may be anything ``Route`` accepts: ``async def`` or plain
functions taking a ``Request`` (run like Starlette runs them, plain ones in a thread),
``HTTPEndpoint`` classes, or ASGI apps.

Inside an app that already runs ``ASGICanaryMiddleware`` with the same rollout, a split
route follows the decision already made for the request (no second cookie, no second
outcome). Several split routes may share one rollout: a visitor then gets the new
endpoint on all of them or on none.

This module imports Starlette; the rest of canarymw does not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from starlette.routing import Route, request_response

from ._rollout import Decision, Rollout, Variant
from .asgi import ASGIApp, ASGICanaryMiddleware, Receive, Scope, Send
from .shadow import Shadow
from .shadow._config import _is_upstream
from .sinks import Sink

__all__ = ["CanaryRoute", "SplitEndpoint", "get_decision", "get_variant", "split"]

Endpoint = Callable[..., Any]


def _is_function(endpoint: Endpoint) -> bool:
    # The same rule as starlette.routing.Route: functions and methods (possibly in a
    # functools.partial) take a Request and return a Response; anything else (an
    # HTTPEndpoint class, an app) is ASGI.
    handler = endpoint
    while isinstance(handler, functools.partial):
        handler = handler.func
    return inspect.isfunction(handler) or inspect.ismethod(handler)


def _as_app(endpoint: Endpoint) -> ASGIApp:
    return request_response(endpoint) if _is_function(endpoint) else endpoint


class SplitEndpoint(ASGICanaryMiddleware):
    """The ASGI app :func:`split` returns: a canary middleware over two endpoints."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        decision = scope.get("canarymw.decision")
        if decision is not None and decision.rollout == self.rollout.name:
            # An outer ASGICanaryMiddleware of the same rollout already decided,
            # set the cookie and records the outcome.
            app = self.new_app if decision.variant == "new" else self.old_app
            await app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def split(
    old: Endpoint,
    new: Endpoint,
    *,
    rollout: Rollout,
    sink: Sink | Sequence[Sink] | None = None,
    cache_control: str | None = "private",
    shadow: Any = None,
) -> SplitEndpoint:
    """Return an endpoint that sends each request to ``old`` or ``new`` by cohort.

    Use it as the endpoint of a ``Route`` (pass ``methods=`` there: an ASGI endpoint
    accepts every method by default) or use :class:`CanaryRoute`. ``rollout``,
    ``sink``, ``cache_control`` and ``shadow`` mean what they mean for
    :class:`~canarymw.asgi.ASGICanaryMiddleware` (a shadow endpoint may be a function
    taking a ``Request``, like ``old`` and ``new``).
    """
    if shadow is not None and not isinstance(shadow, Shadow) and not _is_upstream(shadow):
        shadow = _as_app(shadow)
    return SplitEndpoint(
        _as_app(old),
        new=_as_app(new),
        rollout=rollout,
        sink=sink,
        cache_control=cache_control,
        shadow=shadow,
    )


class CanaryRoute(Route):
    """A ``Route`` whose requests go to ``old`` or ``new`` by cohort.

    Takes ``Route``'s arguments, with the endpoint replaced by the two endpoints and
    the options of :func:`split`. As with ``Route``, ``methods`` defaults to GET (and
    HEAD) when ``old`` is a function, and ``name`` defaults to the old endpoint's name.
    """

    def __init__(
        self,
        path: str,
        old: Endpoint,
        new: Endpoint,
        *,
        rollout: Rollout,
        sink: Sink | Sequence[Sink] | None = None,
        cache_control: str | None = "private",
        shadow: Any = None,
        methods: Collection[str] | None = None,
        name: str | None = None,
        include_in_schema: bool = True,
    ) -> None:
        if methods is None and _is_function(old):
            methods = ["GET"]
        if name is None:
            name = getattr(old, "__name__", None) or type(old).__name__
        super().__init__(
            path,
            split(old, new, rollout=rollout, sink=sink, cache_control=cache_control, shadow=shadow),
            methods=methods,
            name=name,
            include_in_schema=include_in_schema,
        )
        self.old_endpoint = old
        self.new_endpoint = new


def get_decision(conn: Any) -> Decision | None:
    """The :class:`~canarymw.Decision` for a request, websocket or ASGI scope, or None.

    None means no canary middleware or split route handled this connection (an
    excluded path, say).
    """
    scope: Mapping[str, Any] = getattr(conn, "scope", conn)
    decision: Decision | None = scope.get("canarymw.decision")
    return decision


def get_variant(conn: Any) -> Variant | None:
    """``"old"`` or ``"new"`` for a request, websocket or ASGI scope, or None (not routed)."""
    decision = get_decision(conn)
    return None if decision is None else decision.variant
