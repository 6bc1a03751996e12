"""Where comparisons go: per-route counters and samples in memory, and the sinks that
take comparisons (``record_comparison``), such as the store's counters and Prometheus."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._runtime import RateLimit
from ._compare import RESULTS, Comparison, Part, Result

log = logging.getLogger("canarymw")

MAX_ROUTES = 1000
"""Routes counted one by one; comparisons of any further route count under ``OTHER``."""
OTHER = "(other routes)"
NO_ROUTE = "-"
"""The key of requests whose route template is not known (raw paths are never keys)."""


@dataclass(frozen=True)
class RouteReport:
    """The comparisons of one route (or of all of them), counted since the start.

    ``counts`` has every :data:`~canarymw.shadow.Result` as a key; ``parts`` counts the
    mismatches by what differed (a mismatch of status and body counts in both).
    """

    counts: Mapping[Result, int]
    parts: Mapping[Part, int]
    samples: tuple[Comparison, ...] = ()
    """The newest mismatches (and failures), oldest first, at most ``samples`` of them."""

    @property
    def compared(self) -> int:
        """Copies that got a verdict: matches and mismatches."""
        return self.counts["match"] + self.counts["mismatch"]

    @property
    def mismatch_rate(self) -> float | None:
        """Mismatches per compared copy; None before the first comparison."""
        compared = self.compared
        return self.counts["mismatch"] / compared if compared else None


@dataclass(frozen=True)
class ShadowReport:
    """What a :class:`~canarymw.Shadow` has seen in this process (``shadow.report()``)."""

    total: RouteReport
    """All routes together (its ``samples`` are empty: see each route's)."""
    routes: Mapping[str, RouteReport] = field(default_factory=dict)
    """Per route template; ``"-"`` for requests without one."""
    queued: int = 0
    """Copies waiting for a free slot right now."""
    running: int = 0
    """Copies being sent and compared right now."""
    sink_errors: int = 0
    """Times a sink's ``record_comparison`` raised."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for a debug endpoint or a log line)."""

        def one(r: RouteReport) -> dict[str, Any]:
            return {
                "counts": dict(r.counts),
                "parts": dict(r.parts),
                "compared": r.compared,
                "mismatch_rate": r.mismatch_rate,
                "samples": [_sample(s) for s in r.samples],
            }

        return {
            "total": one(self.total),
            "routes": {k: one(v) for k, v in self.routes.items()},
            "queued": self.queued,
            "running": self.running,
            "sink_errors": self.sink_errors,
        }


def _sample(c: Comparison) -> dict[str, Any]:
    return {
        "rollout": c.rollout,
        "variant": c.variant,
        "route": c.route,
        "request": f"{c.method} {c.path}",
        "result": c.result,
        "differences": list(c.differences),
        "primary_status": c.primary_status,
        "shadow_status": c.shadow_status,
        "headers": [list(h) for h in c.headers],
        "body": c.body,
        "error": c.error,
        "duration": c.duration,
        "timestamp": c.timestamp,
    }


class _Route:
    __slots__ = ("counts", "parts", "samples")

    def __init__(self, samples: int) -> None:
        self.counts: dict[Result, int] = dict.fromkeys(RESULTS, 0)
        self.parts: dict[Part, int] = {"status": 0, "headers": 0, "body": 0}
        self.samples: deque[Comparison] = deque(maxlen=samples)

    def report(self, samples: bool = True) -> RouteReport:
        return RouteReport(dict(self.counts), dict(self.parts), tuple(self.samples) if samples else ())


class Recorder:
    """Counts comparisons per route, keeps samples, and hands each to the sinks given
    (thread-safe: WSGI workers and event loops record at once)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._total = _Route(0)
        self.sink_errors = 0
        self._log_limit = RateLimit(60.0)

    def reset(self) -> None:
        with self._lock:
            self._routes = {}
            self._total = _Route(0)
            self.sink_errors = 0

    def record(self, comparison: Comparison, sinks: tuple[Any, ...]) -> None:
        key = comparison.route or NO_ROUTE
        with self._lock:
            route = self._routes.get(key)
            if route is None:
                if len(self._routes) >= MAX_ROUTES:
                    key = OTHER
                    route = self._routes.get(key)
                if route is None:
                    route = self._routes[key] = _Route(self.samples)
            for r in (route, self._total):
                r.counts[comparison.result] += 1
                for part in comparison.differences:
                    r.parts[part] += 1
            if comparison.result in ("mismatch", "error", "timeout") and self.samples:
                route.samples.append(comparison)
        for sink in sinks:
            try:
                sink.record_comparison(comparison)
            except Exception as exc:
                with self._lock:
                    self.sink_errors += 1
                if self._log_limit.due():
                    log.warning(
                        "canarymw: %r failed to record a shadow comparison (%s: %s); %d failures so far.",
                        sink,
                        type(exc).__name__,
                        exc,
                        self.sink_errors,
                    )

    def report(self, queued: int, running: int) -> ShadowReport:
        with self._lock:
            routes = {k: r.report() for k, r in sorted(self._routes.items())}
            total = self._total.report(samples=False)
        return ShadowReport(total, routes, queued, running, self.sink_errors)


def comparison_sinks(sink: object) -> tuple[Any, ...]:
    """The sinks reachable from a middleware's sink that take comparisons (a
    ``record_comparison`` method), through guards, fan-outs and background sinks."""
    found: list[Any] = []
    seen: set[int] = set()
    todo = [sink]
    while todo:
        s = todo.pop()
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        if callable(getattr(s, "record_comparison", None)):
            found.append(s)
            continue
        todo.append(getattr(s, "sink", None))  # SinkGuard
        todo.extend(getattr(s, "sinks", ()))  # FanoutSink, BackgroundSink
    return tuple(found)
