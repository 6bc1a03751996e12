"""Outcomes (what happened to one routed request) and the sinks that receive them."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

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


_LOW = 1e-5
_GROWTH = 1.04
_SIZE = 512
_INV_LOG_GROWTH = 1 / math.log(_GROWTH)
_log = math.log


class _Histogram:
    """Fixed-size log-scale latency histogram: 4% relative resolution, 10 us to over an hour.

    Bucket 0 holds durations up to 10 us; bucket i >= 1 holds (10us*1.04^(i-1), 10us*1.04^i].
    """

    __slots__ = ("counts", "max", "min", "sum")
    LOW = _LOW
    GROWTH = _GROWTH
    SIZE = _SIZE

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def quantile(self, q: float, total: int) -> float | None:
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i == 0:
                    return self.min
                lo = self.LOW * self.GROWTH ** (i - 1)
                hi = lo * self.GROWTH
                # Geometric interpolation inside the bucket, clamped to what was seen.
                frac = (rank - seen) / c
                value: float = lo * (hi / lo) ** frac
                return min(max(value, self.min), self.max)
            seen += c
        return self.max


class _Stats:
    __slots__ = ("disconnects", "errors", "exceptions", "hist", "requests", "statuses")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.exceptions = 0
        self.disconnects = 0
        self.statuses: dict[int, int] = {}
        self.hist = _Histogram()


@dataclass(frozen=True, slots=True)
class VariantStats:
    """Aggregated outcomes of one variant, as returned by :meth:`MemorySink.snapshot`."""

    requests: int
    errors: int
    """Outcomes the classifier judged unsuccessful (5xx, exceptions, no response)."""
    exceptions: int
    disconnects: int
    statuses: dict[int, int]
    """Count per status class: ``{2: 950, 4: 12, 5: 3}`` means 2xx, 4xx, 5xx."""
    latency_mean: float | None
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    latency_max: float | None

    @property
    def error_rate(self) -> float:
        """errors / requests (0.0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def success_rate(self) -> float:
        """1 - error_rate (1.0 with no requests)."""
        return 1.0 - self.error_rate


class MemorySink:
    """Aggregates outcomes in this process: counts, error rate and latency quantiles.

    Thread-safe, constant memory (a 512-bucket histogram per rollout and variant, 4%
    latency resolution). The numbers are per process: under gunicorn or uvicorn with
    several workers each worker has its own ``MemorySink`` (see docs/outcomes.md for
    whole-service numbers).

    Args:
        classify: Decides whether an outcome is a success; default: status < 500 and
            no exception.
    """

    def __init__(self, classify: Classifier = default_classifier) -> None:
        self._classify = classify
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], _Stats] = {}

    def record(self, outcome: Outcome) -> None:
        """Add one outcome."""
        # Hot path: one lock, no allocation beyond the first outcome of a variant.
        rollout, variant, status, duration, error, disconnected = outcome[:6]
        if self._classify is default_classifier:
            failed = error is not None or status is None or status >= 500
        else:
            failed = not self._classify(outcome)
        if duration > _LOW:
            i = int(_log(duration / _LOW) * _INV_LOG_GROWTH) + 1
            if i >= _SIZE:
                i = _SIZE - 1
        else:
            i = 0
        with self._lock:
            st = self._stats.get((rollout, variant))
            if st is None:
                st = self._stats[(rollout, variant)] = _Stats()
            st.requests += 1
            if failed:
                st.errors += 1
            if error is not None:
                st.exceptions += 1
            if disconnected:
                st.disconnects += 1
            if status is not None:
                cls = status // 100
                st.statuses[cls] = st.statuses.get(cls, 0) + 1
            h = st.hist
            h.counts[i] += 1
            h.sum += duration
            if duration < h.min:
                h.min = duration
            if duration > h.max:
                h.max = duration

    def snapshot(self, rollout: str | None = None) -> dict[str, VariantStats]:
        """Per-variant statistics, for one rollout or summed over all of them.

        Returns a dict keyed ``"old"`` and ``"new"`` (only variants that have seen
        traffic). The result is a copy; later outcomes do not change it.
        """
        with self._lock:
            merged: dict[str, _Stats] = {}
            for (name, variant), st in self._stats.items():
                if rollout is not None and name != rollout:
                    continue
                acc = merged.setdefault(variant, _Stats())
                acc.requests += st.requests
                acc.errors += st.errors
                acc.exceptions += st.exceptions
                acc.disconnects += st.disconnects
                for k, v in st.statuses.items():
                    acc.statuses[k] = acc.statuses.get(k, 0) + v
                h = acc.hist
                h.counts = [a + b for a, b in zip(h.counts, st.hist.counts, strict=True)]
                h.sum += st.hist.sum
                h.min = min(h.min, st.hist.min)
                h.max = max(h.max, st.hist.max)
        out: dict[str, VariantStats] = {}
        for variant, st in sorted(merged.items()):
            n, h = st.requests, st.hist
            out[variant] = VariantStats(
                requests=n,
                errors=st.errors,
                exceptions=st.exceptions,
                disconnects=st.disconnects,
                statuses=dict(sorted(st.statuses.items())),
                latency_mean=h.sum / n if n else None,
                latency_p50=h.quantile(0.50, n),
                latency_p95=h.quantile(0.95, n),
                latency_p99=h.quantile(0.99, n),
                latency_max=h.max if n else None,
            )
        return out

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._stats.clear()


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

    __slots__ = ("_last_log", "_lock", "errors", "log_interval", "sink")

    def __init__(self, sink: Sink, log_interval: float = 60.0) -> None:
        self.sink = sink
        self.errors = 0
        self.log_interval = log_interval
        self._last_log = -math.inf
        self._lock = threading.Lock()

    def record(self, outcome: Outcome) -> None:
        """Record, never raising (``Exception`` subclasses are swallowed and counted)."""
        try:
            self.sink.record(outcome)
        except Exception:
            with self._lock:
                self.errors += 1
                now = time.monotonic()
                due = now - self._last_log >= self.log_interval
                if due:
                    self._last_log = now
            if due:
                log.exception(
                    "canarymw: sink %r failed (%d failures so far); the response is unaffected",
                    self.sink,
                    self.errors,
                )


def as_sink(sink: Sink | Sequence[Sink] | None) -> SinkGuard | None:
    """Normalise the ``sink=`` argument of the middlewares (one sink, a list, or None)."""
    if sink is None:
        return None
    if isinstance(sink, (list, tuple)):
        if not sink:
            return None
        inner: Sink = sink[0] if len(sink) == 1 else FanoutSink(*sink)
    else:
        inner = sink  # type: ignore[assignment]
    if not callable(getattr(inner, "record", None)):
        raise TypeError(f"sink {inner!r} has no record(outcome) method; see canarymw.Sink.")
    return SinkGuard(inner)
