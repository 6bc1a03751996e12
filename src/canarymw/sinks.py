"""Every outcome sink that needs no optional dependency, and the helpers the others share.

::

    BackgroundSink(*sinks, maxsize=...)   non-blocking, queue-backed wrapper (use it in production)
    CallableSink(fn)                      any function fn(outcome) as a sink
    JSONLinesSink(path)                   JSON lines shared by all worker processes (canarymw.jsonl)
    MemorySink, LoggingSink, FanoutSink   also exported by ``canarymw``
    outcome_class(outcome)                the bounded ``outcome`` label: 2xx ... exception, disconnect
    HealthSources                         canarymw's own counters, as read by the metrics sinks
    background_sinks(middleware)          the BackgroundSinks a middleware feeds, to close at shutdown

Sinks with an optional dependency live in :mod:`canarymw.prometheus` and
:mod:`canarymw.otel`. Where each kind of number lives (per process or whole service):
docs/outcomes.md.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, Final, Literal, NamedTuple

from ._background import BackgroundSink
from ._outcomes import FanoutSink, LoggingSink, MemorySink, Outcome, Sink
from ._rollout import Rollout
from .jsonl import JSONLinesSink

__all__ = [
    "DEFAULT_BUCKETS",
    "OUTCOME_CLASSES",
    "BackgroundSink",
    "CallableSink",
    "FanoutSink",
    "HealthSnapshot",
    "HealthSources",
    "JSONLinesSink",
    "LoggingSink",
    "MemorySink",
    "OutcomeClass",
    "Sink",
    "background_sinks",
    "outcome_class",
]

OutcomeClass = Literal["1xx", "2xx", "3xx", "4xx", "5xx", "exception", "disconnect"]

OUTCOME_CLASSES: Final[tuple[OutcomeClass, ...]] = (
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "exception",
    "disconnect",
)
"""Every value :func:`outcome_class` can return: the ``outcome`` label of the metrics sinks."""

DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Latency histogram bounds in seconds (1 ms to 30 s) used by the Prometheus and OpenTelemetry sinks."""

_BY_HUNDRED: Final[dict[int, OutcomeClass]] = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def outcome_class(outcome: Outcome) -> OutcomeClass:
    """The bounded label that metrics sinks use for one outcome.

    ``"exception"`` when the app raised, else ``"disconnect"`` when the client went away
    before the response was complete, else the status class (``"2xx"`` ...). A request
    that started no response, or an impossible status, counts as ``"5xx"``: that is
    what the server sends the client in that case.
    """
    if outcome.error is not None:
        return "exception"
    if outcome.disconnected:
        return "disconnect"
    status = outcome.status
    if status is None:
        return "5xx"
    return _BY_HUNDRED.get(status // 100, "5xx")


class CallableSink:
    """Turns a plain function ``fn(outcome)`` into a :class:`~canarymw.Sink`.

    ::

        def to_analytics(outcome: Outcome) -> None:
            analytics.track("canary_request", outcome._asdict())

        sink = BackgroundSink(CallableSink(to_analytics))

    ``record`` calls ``fn`` in the caller's thread and lets its exceptions propagate
    (the middleware or :class:`~canarymw.sinks.BackgroundSink` counts them). ``fn`` must be
    thread-safe like any sink; if it does I/O, wrap the sink in a ``BackgroundSink`` so
    that the I/O happens off the request path. Usable as a decorator.

    Raises:
        TypeError: ``fn`` is not callable, or is an ``async def`` function (its coroutine
            would be created and never awaited).
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Outcome], object]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a function taking one Outcome, got {fn!r}.")
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            raise TypeError(
                f"CallableSink got the async function {fn!r}; sinks are called synchronously, "
                "so its coroutine would never run. Use a plain function (hand the outcome to "
                "your event loop with loop.call_soon_threadsafe if needed)."
            )
        self.fn = fn

    def record(self, outcome: Outcome) -> None:
        """Call the function with the outcome."""
        self.fn(outcome)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"CallableSink({name})"


# -- health sources ------------------------------------------------------------------
# What PrometheusSink and OpenTelemetrySink report about canarymw itself. The values
# live in the objects that count them (Rollout.counters, BackgroundSink, the
# middleware's sink guard); the metrics sinks read them through this registry.

_STAGES = ("request", "background")


class HealthSnapshot(NamedTuple):
    """canarymw's own counters, summed over the watched objects of this process."""

    events: dict[tuple[str, str], int]
    """``(rollout, event) -> count`` from ``Rollout.counters`` (assigned, cookie_rejected, ...)."""
    percent: dict[str, float]
    """``rollout -> percent`` currently configured."""
    sink_errors: dict[str, int]
    """``stage -> failures``: ``"request"`` (a sink called by the middleware raised) and
    ``"background"`` (a sink fed by a BackgroundSink raised)."""
    dropped: int
    """Outcomes BackgroundSinks dropped because their queue was full or closed."""
    queue_depth: int
    """Outcomes waiting in BackgroundSink queues."""


class HealthSources:
    """The objects whose health counters a metrics sink reports (see ``watch``).

    Accepts :class:`~canarymw.Rollout`, :class:`~canarymw.sinks.BackgroundSink` and the
    middlewares (anything with ``sink_errors`` and ``rollout``, whose rollout and
    background sinks are watched too). Watching an object twice counts it once.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[int, Rollout] = {}
        self._background: dict[int, BackgroundSink] = {}
        self._guards: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return bool(self._rollouts or self._background or self._guards)

    def add(self, source: object) -> None:
        """Watch ``source``; raises TypeError for an object of another kind."""
        with self._lock:
            self._add(source)

    def _add(self, source: object) -> None:
        if isinstance(source, Rollout):
            self._rollouts[id(source)] = source
        elif isinstance(source, BackgroundSink):
            self._background[id(source)] = source
        elif hasattr(source, "sink_errors") and isinstance(getattr(source, "rollout", None), Rollout):
            self._guards[id(source)] = source
            self._add(source.rollout)  # type: ignore[attr-defined]
            for inner in _unwrap(getattr(source, "sink", None)):
                self._add(inner)
        else:
            raise TypeError(
                f"cannot watch {source!r}: pass a Rollout, a BackgroundSink or a canary middleware."
            )

    def rollout_names(self) -> list[str]:
        """Names of the watched rollouts."""
        with self._lock:
            return sorted({r.name for r in self._rollouts.values()})

    def snapshot(self) -> HealthSnapshot:
        """Read every watched counter now."""
        with self._lock:
            rollouts = list(self._rollouts.values())
            background = list(self._background.values())
            guards = list(self._guards.values())
        events: dict[tuple[str, str], int] = {}
        percent: dict[str, float] = {}
        for r in rollouts:
            for event, count in list(r.counters.items()):
                key = (r.name, event)
                events[key] = events.get(key, 0) + count
            percent[r.name] = r.percent
        errors = dict.fromkeys(_STAGES, 0)
        for g in guards:
            errors["request"] += int(g.sink_errors)
        dropped = depth = 0
        for b in background:
            errors["background"] += b.errors
            dropped += b.dropped
            depth += b.depth
        return HealthSnapshot(events, percent, errors, dropped, depth)


def background_sinks(obj: object) -> list[BackgroundSink]:
    """The :class:`BackgroundSink` objects reachable from ``obj``.

    ``obj`` may be a middleware (its ``sink``), a sink guard, a ``FanoutSink``, a
    ``BackgroundSink`` or any other sink. For shutdown code that must flush or close
    whatever a middleware feeds::

        for sink in background_sinks(app.wsgi_app):
            sink.close(timeout=2)
    """
    if hasattr(obj, "sink_errors") and hasattr(obj, "sink"):
        obj = obj.sink
    return _unwrap(obj)


def _unwrap(sink: object) -> list[BackgroundSink]:
    """BackgroundSinks reachable from a sink, through guards and fan-outs."""
    found: list[BackgroundSink] = []
    seen: set[int] = set()
    todo = [sink]
    while todo:
        s = todo.pop()
        if id(s) in seen:
            continue
        seen.add(id(s))
        if isinstance(s, BackgroundSink):
            found.append(s)
        elif s is not None:
            inner = getattr(s, "sink", None)  # SinkGuard
            if inner is not None:
                todo.append(inner)
            todo.extend(getattr(s, "sinks", ()))  # FanoutSink
    return found
