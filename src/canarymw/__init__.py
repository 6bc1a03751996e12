"""canarymw: canary releases and blue/green switches inside your WSGI or ASGI app.

Every visitor gets a stable cohort (a signed cookie or your user id); a frozen hash of
it picks the variant, so raising the percentage keeps everyone who already had the new
code, and ``0`` sends everyone back at once. Each request is routed in-process to the
old or the new implementation, and what happened is recorded per variant.

Public names (everything else is private)::

    Rollout, Decision                        configuration, live percent, the decision
    WSGICanaryMiddleware, ASGICanaryMiddleware
    Outcome, Sink, MemorySink, VariantStats, LoggingSink, FanoutSink
    BackgroundSink, CallableSink             non-blocking dispatch; any function as a sink
    bucket, BUCKETS                          the frozen bucketing hash
    Upstream                                 another server as old or new (proxied; extra "upstream")
    Shadow                                   copy requests to a second app and compare (shadow=)

Integrations and optional sinks live in submodules that import their dependency:
``canarymw.flask`` (Canary), ``canarymw.starlette`` (split, CanaryRoute),
``canarymw.sinks.prometheus``, ``canarymw.sinks.otel``, ``canarymw.sinks.jsonl``, ``canarymw.sinks``;
``canarymw.shadow`` holds the shadow's report and comparison types;
``canarymw.upstream`` holds the upstream exceptions (httpx is imported only when used);
``canarymw.store`` shares a rollout's live state across processes and hosts
(``Rollout(..., store=...)``; redis-py is imported only by ``RedisStore``).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from . import _compat as _compat  # first: it picks the build of the modules imported below
from ._bucketing import BUCKETS, bucket
from ._rollout import Decision, Rollout
from ._version import __version__
from .asgi import ASGICanaryMiddleware
from .shadow import Shadow
from .sinks import (
    BackgroundSink,
    CallableSink,
    FanoutSink,
    LoggingSink,
    MemorySink,
    Outcome,
    Sink,
    VariantStats,
)
from .wsgi import WSGICanaryMiddleware

if _compat.IS_COMPILED:
    _compat.restore_docstrings()
if _TYPE_CHECKING:
    from .upstream import Upstream

__all__ = [
    "BUCKETS",
    "ASGICanaryMiddleware",
    "BackgroundSink",
    "CallableSink",
    "Decision",
    "FanoutSink",
    "LoggingSink",
    "MemorySink",
    "Outcome",
    "Rollout",
    "Shadow",
    "Sink",
    "Upstream",
    "VariantStats",
    "WSGICanaryMiddleware",
    "__version__",
    "bucket",
]


for _name in __all__:
    # Public names are documented, pickled and shown as canarymw.Name, wherever they live.
    if _name in globals() and hasattr(globals()[_name], "__module__"):
        globals()[_name].__module__ = __name__


def __getattr__(name: str) -> _Any:
    # The proxy (and its HTTP client) loads on first use, not with the package.
    if name == "Upstream":
        from .upstream import Upstream

        return Upstream
    raise AttributeError(f"module 'canarymw' has no attribute {name!r}")
