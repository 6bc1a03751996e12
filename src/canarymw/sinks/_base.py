"""The outcome data model and the sinks that need nothing else: the contract of every sink."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Final, Literal, NamedTuple, Protocol, runtime_checkable

from .._runtime import RateLimit

log = logging.getLogger("canarymw")


class Outcome(NamedTuple):
    """One finished request, recorded exactly once when its response has finished.

    An immutable named tuple rather than a frozen dataclass: one is built on every
    request, and a tuple is four times cheaper to create.
    """

    rollout: str
    """Name of the rollout that routed the request."""
    variant: str
    """``"old"`` or ``"new"``."""
    status: int | None
    """HTTP status sent, or None when no response was started."""
    duration: float
    """Seconds from routing to the end of the response (monotonic clock)."""
    error: str | None
    """Type name of the exception the app raised, or None."""
    disconnected: bool
    """True when the client went away before the response was complete."""
    method: str
    """Request method (``HEAD`` is routed like ``GET`` and recorded as ``HEAD``)."""
    route: str | None
    """Route template when the framework knows it, else None (never the raw path)."""
    timestamp: float
    """Wall-clock time (Unix seconds) at which the request was routed."""
    close_code: int | None = None
    """WebSocket close code sent by the app or received from the client; None for HTTP."""

    @property
    def ok(self) -> bool:
        """The default success rule: a response with status < 500 and no exception."""
        return self.error is None and self.status is not None and self.status < 500


Classifier = Callable[[Outcome], bool]


def default_classifier(outcome: Outcome) -> bool:
    """Success iff a response started with status < 500 and no exception was raised."""
    return outcome.ok


@runtime_checkable
class Sink(Protocol):
    """Where outcomes go. Implement ``record`` to plug in your own.

    Contract: ``record`` is called once per routed request, from the thread (or event
    loop) serving it, possibly from many threads at once, so it must be thread-safe and
    must return quickly without waiting on I/O. If it raises, the error is counted and
    logged (at most once a minute) and the response is not affected.
    """

    def record(self, outcome: Outcome) -> None:
        """Accept one outcome."""


class LoggingSink:
    """Logs one line per outcome (``logging``; default logger ``canarymw.outcomes``).

    Each record also carries the outcome's fields as ``record.canarymw`` (a dict) for
    structured formatters. Failed requests are logged at ``error_level``.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        error_level: int = logging.WARNING,
        classify: Classifier = default_classifier,
    ) -> None:
        self.logger = logger or logging.getLogger("canarymw.outcomes")
        self.level = level
        self.error_level = error_level
        self._classify = classify

    def record(self, outcome: Outcome) -> None:
        """Log one outcome."""
        level = self.level if self._classify(outcome) else self.error_level
        if not self.logger.isEnabledFor(level):
            return
        self.logger.log(
            level,
            "canary %s variant=%s method=%s route=%s status=%s duration_ms=%.2f error=%s disconnected=%s",
            outcome.rollout,
            outcome.variant,
            outcome.method,
            outcome.route or "-",
            outcome.status if outcome.status is not None else "-",
            outcome.duration * 1000.0,
            outcome.error or "-",
            outcome.disconnected,
            extra={"canarymw": outcome._asdict()},
        )


class FanoutSink:
    """Sends every outcome to several sinks; one failing sink never starves the others."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks: tuple[Sink, ...] = sinks
        self.guards = tuple(SinkGuard(s) for s in sinks)

    def record(self, outcome: Outcome) -> None:
        """Hand the outcome to each sink in turn, isolating their failures."""
        for guard in self.guards:
            guard.record(outcome)

    @property
    def errors(self) -> int:
        """Total failures of the child sinks."""
        return sum(g.errors for g in self.guards)


class SinkGuard:
    """Calls a sink, counting and (at most once per ``log_interval`` s) logging its failures."""

    __slots__ = ("_lock", "_log_due", "errors", "sink")

    def __init__(self, sink: Sink, log_interval: float = 60.0) -> None:
        self.sink = sink
        self.errors = 0
        self._log_due = RateLimit(log_interval)
        self._lock = threading.Lock()

    @property
    def total_errors(self) -> int:
        """Failures of the sink, including those a :class:`FanoutSink` isolated itself."""
        inner = self.sink
        return self.errors + (inner.errors if isinstance(inner, FanoutSink) else 0)

    def record(self, outcome: Outcome) -> None:
        """Record, never raising (``Exception`` subclasses are swallowed and counted)."""
        try:
            self.sink.record(outcome)
        except Exception:
            self.failed()

    def failed(self) -> None:
        """Count one failure of the sink; log it (with traceback) if none was logged lately.

        Call from inside the ``except`` block that caught the sink's exception.
        """
        with self._lock:
            self.errors += 1
        if self._log_due.due():
            log.exception(
                "canarymw: sink %r failed (%d failures so far); the response is unaffected",
                self.sink,
                self.errors,
            )


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
