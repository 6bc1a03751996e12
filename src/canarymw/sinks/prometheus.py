"""Prometheus metrics for canary outcomes (needs ``pip install canarymw[prometheus]``).

::

    from canarymw import Rollout, WSGICanaryMiddleware
    from canarymw.sinks import BackgroundSink
    from canarymw.sinks.prometheus import PrometheusSink

    prom = PrometheusSink()
    sink = BackgroundSink(prom)
    app.wsgi_app = WSGICanaryMiddleware(app.wsgi_app, new=v2, rollout=rollout, sink=sink)
    prom.watch(app.wsgi_app)  # health: cookie rejections, sink errors, drops, queue depth

Metrics (the prefix is ``namespace``)::

    canarymw_requests_total{rollout, variant, outcome}            counter
    canarymw_request_duration_seconds{rollout, variant, outcome}  histogram
    canarymw_rollout_events_total{rollout, event}                 counter: Rollout.counters
    canarymw_rollout_percent{rollout}                             gauge
    canarymw_sink_errors_total{stage}                             counter: "request" | "background"
    canarymw_outcomes_dropped_total                               counter
    canarymw_queue_depth                                          gauge
    canarymw_shadow_comparisons_total{rollout, variant, result}   counter: shadow copies
    canarymw_shadow_mismatches_total{rollout, part}               counter: status | headers | body

``outcome`` is one of ``1xx 2xx 3xx 4xx 5xx exception disconnect`` (see
:func:`canarymw.sinks.outcome_class`); no label ever carries a path, a user or a cookie, so
the number of series is bounded by rollouts x 2 variants x 7 outcomes. Shadow comparisons
(:class:`~canarymw.Shadow`) reach the sink through the middleware it is given to; their
``result`` is one of :data:`canarymw.shadow.RESULTS`.

Guarded rollouts (``Rollout(..., guard=Guard(...))``, see :mod:`canarymw.guard`) have a
collector of their own, read at each scrape::

    from prometheus_client import REGISTRY
    from canarymw.sinks.prometheus import GuardCollector

    REGISTRY.register(GuardCollector(rollout))

    canarymw_guard_stage{rollout, stage}       gauge: 1 for the current stage, 0 for the others
    canarymw_guard_verdict{rollout, decision}  gauge: 1 for the decision of the last verdict
    canarymw_guard_e_value{rollout, test}      gauge: evidence of harm ("errors", "latency")

See :class:`GuardCollector` for where the values come from.

Under gunicorn (or any pre-fork server) set ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, call ``prometheus_client.multiprocess.mark_process_dead`` from a
``child_exit`` hook, and serve the metrics with a ``MultiProcessCollector``: a scrape
then sums every worker. docs/outcomes.md has the full setup.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..guard._readout import DECISIONS, STAGES, reading
from ._base import DEFAULT_BUCKETS, OUTCOME_CLASSES, Outcome, outcome_class
from ._health import GuardedRollouts, HealthSources

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..shadow import Comparison


__all__ = ["DEFAULT_BUCKETS", "GuardCollector", "PrometheusSink"]


_LABELS = ("rollout", "variant", "outcome")
_monotonic = time.monotonic


class _Series:
    """The cached label children of one (rollout, variant, outcome), plus batch state."""

    __slots__ = ("buckets", "count", "counter", "histogram", "raw", "sum")

    def __init__(self, counter: Any, histogram: Any, nbuckets: int) -> None:
        self.counter = counter
        self.histogram = histogram
        # prometheus_client keeps a histogram child's per-bucket and sum values in
        # _buckets and _sum (unchanged since its first releases). Incrementing them
        # once per batch, rather than observe() per outcome, cuts the consumer's
        # cost several times in multiprocess mode, where each increment is an mmap
        # write under a lock. Anything unexpected falls back to observe().
        raw: Any = getattr(histogram, "_buckets", None)
        total: Any = getattr(histogram, "_sum", None)
        ok = (
            isinstance(raw, list)
            and len(raw) == nbuckets
            and all(callable(getattr(v, "inc", None)) for v in raw)
            and callable(getattr(total, "inc", None))
        )
        self.raw: tuple[list[Any], Any] | None = (raw, total) if ok else None
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * nbuckets


class PrometheusSink:
    """Counts outcomes in ``prometheus_client`` metrics, per rollout, variant and outcome class.

    Thread-safe. :meth:`record` costs a few microseconds (one counter increment and one
    histogram observation), so put the sink behind a :class:`~canarymw.sinks.BackgroundSink`
    to keep even that off the request path; the background consumer then hands it
    whole batches through :meth:`record_many`, which updates each series once per
    batch (over 100,000 outcomes per second, multiprocess mode included).

    canarymw's own health counters are exported from the objects given to
    :meth:`watch` (or ``watch=``): they are read after each batch the background
    consumer delivers, on :meth:`flush`, and at most every ``health_interval``
    seconds from :meth:`record`. Until something is watched they stay at zero.

    Args:
        registry: Registry to register the metrics in; default the global
            ``prometheus_client.REGISTRY``; None registers them nowhere. Create one
            ``PrometheusSink`` per registry and process: a second one on the same
            registry raises ValueError.
        namespace: Metric name prefix.
        buckets: Histogram bucket upper bounds in seconds, increasing.
        watch: Objects whose health counters to export (see :meth:`watch`).
        health_interval: Least number of seconds between two health updates made by
            :meth:`record` itself.

    Raises:
        ValueError: Metric names already registered, or invalid buckets.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "canarymw",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        watch: Iterable[object] = (),
        health_interval: float = 1.0,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if any(b >= c for b, c in pairwise(bounds)) or not bounds or bounds[0] <= 0:
            raise ValueError(
                f"PrometheusSink needs increasing positive bucket bounds, got {list(buckets)!r}."
            )
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = bounds
        self.namespace = namespace
        self.health_interval = float(health_interval)
        p = namespace + "_" if namespace else ""
        try:
            self.requests = Counter(
                p + "requests",
                "Routed requests by rollout, variant and outcome class.",
                _LABELS,
                registry=registry,
            )
            self.duration = Histogram(
                p + "request_duration_seconds",
                "Time from routing to the end of the response, in seconds.",
                _LABELS,
                buckets=bounds,
                registry=registry,
            )
            self.rollout_events = Counter(
                p + "rollout_events",
                "Cohort events per rollout: assigned, cookie_rejected, cookie_reissued, key_errors, forced.",
                ("rollout", "event"),
                registry=registry,
            )
            self.rollout_percent = Gauge(
                p + "rollout_percent",
                "Share of cohorts sent to the new variant, 0 to 100.",
                ("rollout",),
                registry=registry,
                multiprocess_mode="livemostrecent",
            )
            self.sink_errors = Counter(
                p + "sink_errors",
                "Failures of outcome sinks: stage=request (called by the middleware) or background.",
                ("stage",),
                registry=registry,
            )
            self.dropped = Counter(
                p + "outcomes_dropped",
                "Outcomes dropped because a BackgroundSink queue was full or closed.",
                registry=registry,
            )
            self.shadow_comparisons = Counter(
                p + "shadow_comparisons",
                "Shadow copies by rollout, the primary's variant and result: match, mismatch, error, "
                "timeout, not-compared, dropped.",
                ("rollout", "variant", "result"),
                registry=registry,
            )
            self.shadow_mismatches = Counter(
                p + "shadow_mismatches",
                "Shadow mismatches by rollout and the part that differed: status, headers, body.",
                ("rollout", "part"),
                registry=registry,
            )
            self.queue_depth = Gauge(
                p + "queue_depth",
                "Outcomes waiting in BackgroundSink queues.",
                registry=registry,
                multiprocess_mode="livesum",
            )
        except ValueError as exc:
            raise ValueError(
                f"PrometheusSink could not register its metrics ({exc}); create one PrometheusSink "
                "per registry and process, or pass registry=CollectorRegistry()."
            ) from exc
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._series_lock = threading.Lock()
        self._sources = HealthSources()
        self._sync_lock = threading.Lock()
        self._seen: dict[tuple[str, ...], int] = {}
        self._next_sync = 0.0
        self.watch(*watch)

    # -- outcomes ----------------------------------------------------------------
    def _get(self, key: tuple[str, str, str]) -> _Series:
        with self._series_lock:
            series = self._series.get(key)
            if series is None:
                series = _Series(self.requests.labels(*key), self.duration.labels(*key), len(self._bounds))
                self._series[key] = series
            return series

    def record(self, outcome: Outcome) -> None:
        """Count one outcome (thread-safe; a few microseconds)."""
        key = (outcome.rollout, outcome.variant, outcome_class(outcome))
        series = self._series.get(key) or self._get(key)
        series.counter.inc()
        series.histogram.observe(_clean(outcome.duration))
        if self._sources and _monotonic() >= self._next_sync:
            self.flush()

    def record_comparison(self, comparison: Comparison) -> None:
        """Count one shadow comparison (see :class:`~canarymw.Shadow`; thread-safe)."""
        self.shadow_comparisons.labels(comparison.rollout, comparison.variant, comparison.result).inc()
        for part in comparison.differences:
            self.shadow_mismatches.labels(comparison.rollout, part).inc()

    def record_many(self, outcomes: Iterable[Outcome]) -> None:
        """Count a batch of outcomes, updating each series once (the BackgroundSink path)."""
        bounds = self._bounds
        touched: list[_Series] = []
        with self._series_lock:
            # One batch at a time per sink: the per-series accumulators are shared.
            for outcome in outcomes:
                key = (outcome.rollout, outcome.variant, outcome_class(outcome))
                series = self._series.get(key)
                if series is None:
                    series = _Series(
                        self.requests.labels(*key), self.duration.labels(*key), len(self._bounds)
                    )
                    self._series[key] = series
                if series.raw is None:
                    series.counter.inc()
                    series.histogram.observe(_clean(outcome.duration))
                    continue
                if not series.count:
                    touched.append(series)
                d = _clean(outcome.duration)
                series.count += 1
                series.sum += d
                series.buckets[bisect_left(bounds, d)] += 1
            for series in touched:
                parts = series.raw
                if parts is None:  # pragma: no cover - touched series always have them
                    continue
                raw, total = parts
                series.counter.inc(series.count)
                total.inc(series.sum)
                counts = series.buckets
                for i, n in enumerate(counts):
                    if n:
                        raw[i].inc(n)
                        counts[i] = 0
                series.count = 0
                series.sum = 0.0

    # -- health ------------------------------------------------------------------
    def watch(self, *sources: object) -> None:
        """Export the health counters of these objects too.

        Pass :class:`~canarymw.Rollout` objects (cohort events and percent),
        :class:`~canarymw.sinks.BackgroundSink` objects (drops, background sink errors,
        queue depth) or canary middlewares (request-path sink errors; their rollout
        and any BackgroundSink they feed are watched too). Watching an object twice
        counts it once. The request counter of each watched rollout is created at zero
        for every variant and outcome class, so rate() queries work before traffic.

        Raises:
            TypeError: An object of another kind.
        """
        for source in sources:
            self._sources.add(source)
        for name in self._sources.rollout_names():
            for variant in ("old", "new"):
                for cls in OUTCOME_CLASSES:
                    self.requests.labels(name, variant, cls)
        if sources:
            self.flush()

    def flush(self) -> None:
        """Copy the watched health counters into the metrics now.

        Called by :class:`~canarymw.sinks.BackgroundSink` after each batch it delivers.
        Counters only ever grow: a source whose count went down (a forked child
        starting from zero) contributes its new value.
        """
        if not self._sync_lock.acquire(blocking=False):
            return  # another thread is doing it
        try:
            self._next_sync = _monotonic() + self.health_interval
            snap = self._sources.snapshot()
            for (rollout, event), value in snap.events.items():
                self._advance(self.rollout_events.labels(rollout, event), ("event", rollout, event), value)
            for stage, value in snap.sink_errors.items():
                self._advance(self.sink_errors.labels(stage), ("errors", stage), value)
            self._advance(self.dropped, ("dropped",), snap.dropped)
            for rollout, pct in snap.percent.items():
                self.rollout_percent.labels(rollout).set(pct)
            self.queue_depth.set(snap.queue_depth)
        finally:
            self._sync_lock.release()

    def _advance(self, counter: Any, key: tuple[str, ...], value: int) -> None:
        last = self._seen.get(key, 0)
        delta = value - last if value >= last else value
        if delta:
            counter.inc(delta)
        self._seen[key] = value

    def __repr__(self) -> str:
        return f"PrometheusSink(namespace={self.namespace!r})"


def _clean(duration: float) -> float:
    # A NaN or negative duration would poison the histogram sum forever.
    return duration if duration >= 0.0 else 0.0


# -- guarded rollouts ------------------------------------------------------------------


class GuardCollector(GuardedRollouts):
    """Reports the stage, verdict and evidence of guarded rollouts at each scrape.

    A ``prometheus_client`` custom collector: register it yourself, once per registry::

        REGISTRY.register(GuardCollector(rollout, other_rollout))

    Metrics (the prefix is ``namespace``), one series per rollout and label value::

        canarymw_guard_stage{rollout, stage}       1 for the current stage, 0 for the
                                                   others: ramping, paused, rolled-back, done
        canarymw_guard_verdict{rollout, decision}  1 for the decision of the last verdict,
                                                   0 for the others: rollback, pause, pass, wait
        canarymw_guard_e_value{rollout, test}      the evidence of harm of the last verdict,
                                                   per test (errors; latency when tested)

    The values are this process's knowledge, read when scraped: the stage comes from
    the last state the process applied from the store, so every process reports it
    (all 0 before the guard has started; a pause by an operator keeps the stage, see
    ``canarymw status``). The verdict and the e-values come from the process whose
    controller holds the lease, the only one that judges: the others report the
    verdict at 0 for every decision and no e-value. So take the maximum over processes
    (``max by (rollout, decision)``) when a service runs several. Under a pre-fork
    server with ``PROMETHEUS_MULTIPROC_DIR`` a custom collector only reports the
    process that serves the scrape; scrape each worker (or use
    :class:`~canarymw.sinks.otel.GuardGauges`, per process) to see the leader's verdict.

    Rollouts are held by weak references: one that is garbage collected stops being
    reported.

    Args:
        rollouts: Guarded :class:`~canarymw.Rollout` objects (or canary middlewares
            running them); more with :meth:`add`.
        namespace: Metric name prefix.

    Raises:
        TypeError: An object that is not a rollout or a middleware.
        ValueError: A rollout without a guard.
    """

    def __init__(self, *rollouts: object, namespace: str = "canarymw") -> None:
        self.namespace = namespace
        super().__init__(*rollouts)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        p = self.namespace + "_" if self.namespace else ""
        return (
            GaugeMetricFamily(
                p + "guard_stage",
                "Stage of a guarded rollout: 1 for the current one (ramping, paused, rolled-back, done).",
                labels=("rollout", "stage"),
            ),
            GaugeMetricFamily(
                p + "guard_verdict",
                "Decision of the guard's last verdict, in the process leading it: 1 for the current one.",
                labels=("rollout", "decision"),
            ),
            GaugeMetricFamily(
                p + "guard_e_value",
                "Evidence of harm of the guard's last verdict, per test; harm at 1/alpha of the test.",
                labels=("rollout", "test"),
            ),
        )

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (so a registry spots a name used twice)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """The metric families with this process's values now (called at each scrape)."""
        stage_family, verdict_family, e_family = self._families()
        decisions = DECISIONS
        for rollout in self.rollouts():
            stage, verdict = reading(rollout)
            stages = STAGES if stage is None or stage in STAGES else (*STAGES, stage)
            for s in stages:
                stage_family.add_metric([rollout.name, s], 1.0 if s == stage else 0.0)
            decision = None if verdict is None else verdict.decision
            for d in decisions:
                verdict_family.add_metric([rollout.name, d], 1.0 if d == decision else 0.0)
            if verdict is not None:
                for test in (verdict.errors, verdict.latency):
                    if test is not None:
                        e_family.add_metric([rollout.name, test.name], test.e_value)
        yield stage_family
        yield verdict_family
        yield e_family

    def __repr__(self) -> str:
        return f"GuardCollector({', '.join(repr(r.name) for r in self.rollouts())})"
