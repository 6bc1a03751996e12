"""Flask integration: split one route between an old and a new view function.

::

    from flask import Flask
    from canarymw.flask import Canary

    app = Flask(__name__)
    app.config.update(CANARYMW_NAME="hello-v2", CANARYMW_PERCENT=10, CANARYMW_SECRET_KEY="...")
    canary = Canary(app)            # or canary = Canary(); canary.init_app(app)

    def hello_green():
        return "Hello, Green World!"

    @app.route("/")
    @canary.split(new=hello_green)
    def hello():
        return "Hello, Blue World!"

Only responses that depend on the cohort are marked with it (the cohort cookie,
``Vary: Cookie`` and ``Cache-Control: private``): those of split views, and those of any
other view that read the variant (:func:`current_variant`, :func:`current_decision`,
``{{ canary_variant }}`` in a template) before its response started. Every other page
keeps its shared caching, and a visitor is assigned a cohort (``counters["assigned"]``,
``on_exposure``) on the first of those responses, not on the first page of the site.

``Canary`` wraps ``app.wsgi_app``: a request whose URL matches a split view goes
through :class:`~canarymw.WSGICanaryMiddleware` (with ``new=None``: the view branches
itself), so its cookie, caching headers and outcome are exactly those of two whole
apps; any other request goes to the app untouched, and is decided only if it asks for
its variant. By default only requests that reached a split view are recorded as
outcomes (``CANARYMW_RECORD = "split"``). ``"all"`` records every request, and so
routes every request through the middleware: every response then carries the cohort
and its caching headers, as with the whole-app middleware.

Decorators stacked above ``@canary.split`` should use ``functools.wraps`` (as
``@login_required`` and most others do), so the split is seen before routing. A split
view that is not seen (or that another view calls) still serves and marks the right
variant, but its request is not recorded.

Configuration (used when no :class:`~canarymw.Rollout` is passed in)::

    CANARYMW_NAME           rollout name (default "canary")
    CANARYMW_PERCENT        0..100 (default 0: nothing changes until you raise it)
    CANARYMW_SECRET_KEY     key or list of keys, oldest first (default: app.secret_key)
    CANARYMW_EXCLUDE        paths never routed (default: [app.static_url_path])
    CANARYMW_COOKIE_NAME    cohort cookie name (default "canarymw")
    CANARYMW_FORCE_TOKEN    secret enabling per-request forcing (default None)
    CANARYMW_FORCE_QUERY    also accept the token in the query (default False)
    CANARYMW_CACHE_CONTROL  directive for routed responses (default "private")
    CANARYMW_RECORD         "split" or "all" (default "split")

The live percent is ``canary.rollout.percent`` (inside an app context) or the
``Rollout`` you passed in. Handlers read the variant with :func:`current_variant`,
templates with ``{{ canary_variant }}``, and log records get ``canary_variant`` and
``canary_rollout`` attributes through :class:`CanaryLogFilter`. Read it through these,
not from ``environ["canarymw.decision"]``: outside a split view that key exists only
once the request has been decided.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import Flask, current_app, has_request_context, request
from werkzeug.local import LocalProxy

from ._headers import finish_headers
from ._rollout import Decision, Rollout
from ._runtime import BoundedCache
from .sinks import Sink
from .wsgi import _FORCE, WSGICanaryMiddleware, _drop_force

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

F = TypeVar("F", bound=Callable[..., Any])

_SPLIT = "_canarymw_split"  # set on split views; functools.wraps carries it up a decorator stack
_PENDING = "canarymw.flask.pending"
_NAMES = ("Vary", "Cache-Control", "Set-Cookie")
_ROUTES = (4096, 1 << 20, 2048)  # remembered URLs: entries, key characters, longest key

__all__ = ["Canary", "CanaryLogFilter", "current_decision", "current_variant"]


class _State:
    __slots__ = ("middleware", "rollout")

    def __init__(self, rollout: Rollout, middleware: WSGICanaryMiddleware) -> None:
        self.rollout = rollout
        self.middleware = middleware


def current_decision() -> Decision | None:
    """The :class:`~canarymw.Decision` of the current request, or None (excluded path,
    no request context, or no canary installed).

    Reading it makes the response depend on the cohort: outside a split view the
    request is decided now (a first visitor is assigned here) and its response gets the
    cohort cookie, ``Vary: Cookie`` and ``Cache-Control: private``, provided it has not
    started yet (read it before a streamed body, not inside it).
    """
    if not has_request_context():
        return None
    environ = request.environ
    decision: Decision | None = environ.get("canarymw.decision")
    if decision is None:
        pending: _Pending | None = environ.get(_PENDING)
        if pending is not None:
            decision = pending.decide(environ)
    return decision


def current_variant() -> str | None:
    """``"old"`` or ``"new"`` for the current request, or None when not routed.

    Like :func:`current_decision`, this marks the response as depending on the cohort.
    """
    decision = current_decision()
    return decision.variant if decision is not None else None


def _decided() -> Decision | None:
    # The decision if the request has one already; never makes one.
    if not has_request_context():
        return None
    return cast("Decision | None", request.environ.get("canarymw.decision"))


class _Pending:
    """One request outside split views: decided on the first read of its variant, and
    then marked in its ``start_response`` (which this object is)."""

    __slots__ = ("decision", "dispatch", "force", "query", "start_response")

    def __init__(self, dispatch: _Dispatch, environ: WSGIEnvironment, start_response: StartResponse) -> None:
        self.dispatch = dispatch
        self.start_response = start_response
        self.decision: Decision | None = None
        # Kept here because the force token is taken out of the environ before the app runs.
        self.force: str | None = environ.get(_FORCE)
        self.query: str = environ.get("QUERY_STRING", "")

    def decide(self, environ: WSGIEnvironment) -> Decision:
        decision = self.decision
        if decision is None:
            decision = self.decision = self.dispatch.rollout.decide(
                environ.get("HTTP_COOKIE"),
                environ.get("wsgi.url_scheme") == "https",
                self.force,
                self.query,
                environ,
            )
            environ["canarymw.decision"] = decision
        return decision

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        decision = self.decision
        if decision is not None:
            policy = self.dispatch.cache_control
            headers = finish_headers(headers, decision.set_cookie, policy, _NAMES, str, str)
        if exc_info is None:
            return self.start_response(status, headers)
        return self.start_response(status, headers, exc_info)


class _Dispatch:
    """``app.wsgi_app`` under :class:`Canary`: split views through the middleware, the
    rest straight to the app, marked only if it read its variant."""

    def __init__(self, app: Flask, wsgi_app: WSGIApplication, middleware: WSGICanaryMiddleware) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.middleware = middleware
        rollout = self.rollout = middleware.rollout
        self.cache_control = middleware.cache_control
        self._excluded = rollout.is_excluded if rollout.is_excluded else None
        self._force = rollout.force_token is not None
        # Request target -> whether it reaches a split view. Bounded like every cache of
        # client input: a flood of made-up URLs only costs each of them one match.
        self._split: BoundedCache[bool] = BoundedCache(*_ROUTES)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        get = environ.get
        path = get("PATH_INFO", "")
        if self._excluded is not None and self._excluded(path):
            return self.wsgi_app(environ, start_response)
        # Routing depends on these alone (the URL map is fixed once requests come in).
        # Only the path, last, can hold a newline: no two requests share a key by accident.
        target = f"{get('REQUEST_METHOD')}\n{get('wsgi.url_scheme')}\n{get('HTTP_HOST')}\n{path}"
        split = self._split.get(target)
        if split is None:
            split = self._reaches_split_view(environ)
            self._split.put(target, split)
        if split:
            return self.middleware(environ, start_response)
        pending = environ[_PENDING] = _Pending(self, environ, start_response)
        if self._force:
            _drop_force(environ)
        return self.wsgi_app(environ, pending)

    def _reaches_split_view(self, environ: WSGIEnvironment) -> bool:
        # What Flask's own routing will find when it dispatches this request.
        app = self.app
        try:
            adapter = app.create_url_adapter(app.request_class(environ, populate_request=False))
            rule, _ = adapter.match(return_rule=True)  # type: ignore[union-attr]
        except Exception:
            return False  # 404, 405, a redirect, a bad Host: Flask answers, no view runs
        if environ.get("REQUEST_METHOD") == "OPTIONS" and getattr(rule, "provide_automatic_options", False):
            return False  # Flask answers OPTIONS itself (Flask sets this on its rules)
        return getattr(app.view_functions.get(rule.endpoint), _SPLIT, False) is True


class Canary:
    """Flask extension (``init_app`` pattern): cohorts, per-view splits and outcomes.

    Args:
        app: Optional app to initialise at once.
        rollout: A :class:`~canarymw.Rollout` to use for every app; without it each app
            builds its own from ``CANARYMW_*`` config in :meth:`init_app`.
        sink: Where outcomes go (a sink or a list of sinks).
        shadow: Copies of the requests that reach the middleware go to this app too, and
            the answers are compared: a :class:`~canarymw.Shadow`, a WSGI app or an
            :class:`~canarymw.Upstream` (see docs/shadow.md).

    The extension never stores the app: per-app state lives in
    ``app.extensions["canarymw"]``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        rollout: Rollout | None = None,
        sink: Sink | Sequence[Sink] | None = None,
        shadow: Any = None,
    ) -> None:
        self._rollout = rollout
        self._sink = sink
        self._shadow = shadow
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Install the canary on ``app``: wrap ``app.wsgi_app`` and register the hooks."""
        if "canarymw" in app.extensions:
            raise RuntimeError("canarymw is already initialised on this app; call init_app once per app.")
        rollout = self._rollout or _rollout_from_config(app)
        record = app.config.get("CANARYMW_RECORD", "split")
        if record not in ("split", "all"):
            raise ValueError(f"CANARYMW_RECORD is {record!r}; use 'split' or 'all'.")
        middleware = WSGICanaryMiddleware(
            app.wsgi_app,
            new=None,
            rollout=rollout,
            sink=self._sink,
            cache_control=app.config.get("CANARYMW_CACHE_CONTROL", "private"),
            shadow=self._shadow,
        )
        middleware.split_only = record == "split"
        if record == "all":
            app.wsgi_app = middleware  # type: ignore[method-assign]
        else:
            app.wsgi_app = _Dispatch(app, app.wsgi_app, middleware)  # type: ignore[method-assign]
        app.extensions["canarymw"] = _State(rollout, middleware)
        app.before_request(_remember_route)
        # A proxy: only a template that uses the variable reads (and so marks) the variant.
        app.context_processor(lambda: {"canary_variant": _template_variant})

    @property
    def rollout(self) -> Rollout:
        """The rollout of the current app (needs an app context unless one was passed in)."""
        if self._rollout is not None:
            return self._rollout
        return _state().rollout

    @property
    def variant(self) -> str | None:
        """The current request's variant; see :func:`current_variant`."""
        return current_variant()

    def split(self, *, new: Callable[..., Any]) -> Callable[[F], F]:
        """Decorate the old view so that the ``new`` cohort is served by ``new`` instead.

        Both views get the same arguments. Only the responses of split views (and of
        views that read the variant) carry the cohort cookie and its caching headers.
        Exceptions from either view are recorded in the outcome (their type name) and
        then handled by Flask as usual.
        """
        if not callable(new):
            raise TypeError(f"Canary.split needs new= to be a view function, got {new!r}.")

        def decorate(old: F) -> F:
            @functools.wraps(old)
            def view(*args: Any, **kwargs: Any) -> Any:
                environ = request.environ
                decision = current_decision()
                environ["canarymw.split"] = True
                chosen = new if decision is not None and decision.variant == "new" else old
                try:
                    return current_app.ensure_sync(chosen)(*args, **kwargs)
                except Exception as exc:
                    environ["canarymw.error"] = type(exc).__name__
                    raise

            setattr(view, _SPLIT, True)
            return cast(F, view)

        return decorate


class CanaryLogFilter(logging.Filter):
    """Adds ``canary_variant`` and ``canary_rollout`` to every log record, so a format
    like ``%(canary_variant)s`` works everywhere.

    They are "-" until the request has a variant (in a split view, or after the view
    read it): logging never decides a request, so it never changes its caching.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        decision = _decided()
        record.canary_variant = decision.variant if decision else "-"
        record.canary_rollout = decision.rollout if decision else "-"
        return True


_template_variant = LocalProxy(current_variant)


def _state() -> _State:
    try:
        return cast(_State, current_app.extensions["canarymw"])
    except KeyError:
        raise RuntimeError("canarymw is not initialised on this app; call Canary().init_app(app).") from None


def _remember_route() -> None:
    rule = request.url_rule
    if rule is not None:
        request.environ["canarymw.route"] = rule.rule


def _rollout_from_config(app: Flask) -> Rollout:
    cfg = app.config
    key = cfg.get("CANARYMW_SECRET_KEY") or app.secret_key
    if not key:
        raise ValueError(
            "canarymw needs a secret key to sign cohort cookies: set CANARYMW_SECRET_KEY "
            "(or the app's SECRET_KEY) before init_app, or pass rollout=Rollout(...)."
        )
    exclude = cfg.get("CANARYMW_EXCLUDE")
    if exclude is None:
        exclude = [app.static_url_path] if app.static_url_path else []
    return Rollout(
        cfg.get("CANARYMW_NAME", "canary"),
        percent=cfg.get("CANARYMW_PERCENT", 0),
        secret_key=key,
        exclude=exclude,
        cookie_name=cfg.get("CANARYMW_COOKIE_NAME", "canarymw"),
        force_token=cfg.get("CANARYMW_FORCE_TOKEN"),
        force_query=cfg.get("CANARYMW_FORCE_QUERY", False),
    )
