"""Where outcomes go: every sink, and the contract for your own.

::

    Outcome, Sink                         one finished request; the protocol a sink implements
    MemorySink, VariantStats              per-variant counts and latency quantiles (one process)
    LoggingSink, FanoutSink               a log line per outcome; several sinks as one
    CallableSink(fn)                      any function fn(outcome) as a sink
    BackgroundSink(*sinks, maxsize=...)   non-blocking, queue-backed wrapper (use it in production)
    JSONLinesSink(path)                   JSON lines shared by all worker processes
    outcome_class(outcome)                the bounded ``outcome`` label: 2xx ... exception, disconnect
    HealthSources                         canarymw's own counters, as read by the metrics sinks
    background_sinks(middleware)          the BackgroundSinks a middleware feeds, to close at shutdown

Each sink has one home: the dependency-free ones are importable from here (and the most
used from ``canarymw``); the two with an optional dependency from their module only,
:mod:`canarymw.sinks.prometheus` (``PrometheusSink``) and :mod:`canarymw.sinks.otel`
(``OpenTelemetrySink``). ``python -m canarymw.sinks.jsonl DIR`` prints the whole-service
numbers of a JSON-lines directory. Where each kind of number lives (per process or whole
service): docs/outcomes.md.
"""

from ._base import (
    DEFAULT_BUCKETS,
    OUTCOME_CLASSES,
    CallableSink,
    Classifier,
    FanoutSink,
    LoggingSink,
    Outcome,
    OutcomeClass,
    Sink,
    SinkGuard,
    default_classifier,
    outcome_class,
)
from ._health import HealthSnapshot, HealthSources
from .background import BackgroundSink, background_sinks
from .jsonl import JSONLinesSink
from .memory import MemorySink, VariantStats

__all__ = [
    "DEFAULT_BUCKETS",
    "OUTCOME_CLASSES",
    "BackgroundSink",
    "CallableSink",
    "Classifier",
    "FanoutSink",
    "HealthSnapshot",
    "HealthSources",
    "JSONLinesSink",
    "LoggingSink",
    "MemorySink",
    "Outcome",
    "OutcomeClass",
    "Sink",
    "SinkGuard",
    "VariantStats",
    "background_sinks",
    "default_classifier",
    "outcome_class",
]
