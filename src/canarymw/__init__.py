"""canarymw: canary releases and blue/green switches inside your WSGI or ASGI app.

Every visitor gets a stable cohort (a signed cookie or your user id); a frozen hash of
it picks the variant, so raising the percentage keeps everyone who already had the new
code, and ``0`` sends everyone back at once. Each request is routed in-process to the
old or the new implementation, and what happened is recorded per variant.

Public names (everything else is private)::

    Rollout, Decision                        configuration, live percent, the decision
    WSGICanaryMiddleware, ASGICanaryMiddleware
    Outcome, Sink, MemorySink, VariantStats, LoggingSink, FanoutSink
    bucket, BUCKETS                          the frozen bucketing hash
    canarymw.flask.Canary                    Flask extension (imports Flask lazily)
"""

from ._bucketing import BUCKETS, bucket
from ._outcomes import FanoutSink, LoggingSink, MemorySink, Outcome, Sink, VariantStats
from ._rollout import Decision, Rollout
from ._version import __version__
from .wsgi import WSGICanaryMiddleware

__all__ = [
    "BUCKETS",
    "Decision",
    "FanoutSink",
    "LoggingSink",
    "MemorySink",
    "Outcome",
    "Rollout",
    "Sink",
    "VariantStats",
    "WSGICanaryMiddleware",
    "__version__",
    "bucket",
]
