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

``Canary`` wraps ``app.wsgi_app`` with :class:`~canarymw.WSGICanaryMiddleware` (with
``new=None``: the app branches itself), so cookies, caching headers and outcomes work
exactly as for two whole apps. By default only requests that reached a split view are
recorded as outcomes (``CANARYMW_RECORD = "split"``); ``"all"`` records every request.

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
``canary_rollout`` attributes through :class:`CanaryLogFilter`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from flask import Flask, current_app, has_request_context, request

from ._outcomes import Sink
from ._rollout import Decision, Rollout
from .wsgi import WSGICanaryMiddleware

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Canary", "CanaryLogFilter", "current_decision", "current_variant"]


class _State:
    __slots__ = ("middleware", "rollout")

    def __init__(self, rollout: Rollout, middleware: WSGICanaryMiddleware) -> None:
        self.rollout = rollout
        self.middleware = middleware


def current_decision() -> Decision | None:
    """The :class:`~canarymw.Decision` of the current request, or None (excluded path,
    no request context, or no canary installed)."""
    if not has_request_context():
        return None
    return cast("Decision | None", request.environ.get("canarymw.decision"))


def current_variant() -> str | None:
    """``"old"`` or ``"new"`` for the current request, or None when not routed."""
    decision = current_decision()
    return decision.variant if decision is not None else None


class Canary:
    """Flask extension (``init_app`` pattern): cohorts, per-view splits and outcomes.

    Args:
        app: Optional app to initialise at once.
        rollout: A :class:`~canarymw.Rollout` to use for every app; without it each app
            builds its own from ``CANARYMW_*`` config in :meth:`init_app`.
        sink: Where outcomes go (a sink or a list of sinks).

    The extension never stores the app: per-app state lives in
    ``app.extensions["canarymw"]``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        rollout: Rollout | None = None,
        sink: Sink | Sequence[Sink] | None = None,
    ) -> None:
        self._rollout = rollout
        self._sink = sink
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
        )
        middleware.split_only = record == "split"
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions["canarymw"] = _State(rollout, middleware)
        app.before_request(_remember_route)
        app.context_processor(lambda: {"canary_variant": current_variant()})

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

        Both views get the same arguments. Exceptions from either are recorded in the
        outcome (their type name) and then handled by Flask as usual.
        """
        if not callable(new):
            raise TypeError(f"Canary.split needs new= to be a view function, got {new!r}.")

        def decorate(old: F) -> F:
            @functools.wraps(old)
            def view(*args: Any, **kwargs: Any) -> Any:
                environ = request.environ
                decision = environ.get("canarymw.decision")
                environ["canarymw.split"] = True
                chosen = new if decision is not None and decision.variant == "new" else old
                try:
                    return current_app.ensure_sync(chosen)(*args, **kwargs)
                except Exception as exc:
                    environ["canarymw.error"] = type(exc).__name__
                    raise

            return cast(F, view)

        return decorate


class CanaryLogFilter(logging.Filter):
    """Adds ``canary_variant`` and ``canary_rollout`` to every log record ("-" outside a
    routed request), so a format like ``%(canary_variant)s`` works everywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        decision = current_decision()
        record.canary_variant = decision.variant if decision else "-"
        record.canary_rollout = decision.rollout if decision else "-"
        return True


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
