"""OpenTelemetry metrics for canary outcomes (needs ``pip install canarymw[otel]``).

::

    from canarymw.sinks import BackgroundSink
    from canarymw.sinks.otel import OpenTelemetrySink

    otel = OpenTelemetrySink()          # uses the global MeterProvider
    sink = BackgroundSink(otel)
    app.wsgi_app = WSGICanaryMiddleware(app.wsgi_app, new=v2, rollout=rollout, sink=sink)
    otel.watch(app.wsgi_app)

Only the OpenTelemetry *API* is imported; which SDK, exporter and reader you configure
is up to you (OTLP push, a Prometheus reader, ...). Instruments (the prefix is
``prefix``)::

    canarymw.requests          Counter        {request}  canarymw.rollout, canarymw.variant, canarymw.outcome
    canarymw.request.duration  Histogram      s          same attributes
    canarymw.rollout.events    ObservableCounter         canarymw.rollout, canarymw.event
    canarymw.rollout.percent   ObservableGauge           canarymw.rollout
    canarymw.sink.errors       ObservableCounter         canarymw.stage ("request" | "background")
    canarymw.outcomes.dropped  ObservableCounter
    canarymw.queue.depth       ObservableGauge
    canarymw.shadow.comparisons Counter       {copy}     canarymw.rollout, canarymw.variant, canarymw.result

The values are per process, as everything in OpenTelemetry is: each worker reports its
own and the backend sums them (give each process its own ``service.instance.id``).

Guarded rollouts (``Rollout(..., guard=Guard(...))``, see :mod:`canarymw.guard`) have
observable gauges of their own, read at each collection::

    from canarymw.sinks.otel import GuardGauges

    GuardGauges(rollout)                # uses the global MeterProvider

    canarymw.guard.stage    ObservableGauge  canarymw.rollout, canarymw.stage: 1 current, 0 others
    canarymw.guard.verdict  ObservableGauge  canarymw.rollout, canarymw.decision: 1 last verdict
    canarymw.guard.e_value  ObservableGauge  canarymw.rollout, canarymw.test ("errors", "latency")

See :class:`GuardGauges` for where the values come from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from opentelemetry import metrics

from .._version import __version__
from ..guard._readout import DECISIONS, STAGES, reading
from ._base import DEFAULT_BUCKETS, Outcome, outcome_class
from ._health import GuardedRollouts, HealthSnapshot, HealthSources

if TYPE_CHECKING:
    from ..shadow import Comparison

__all__ = ["DEFAULT_BUCKETS", "GuardGauges", "OpenTelemetrySink"]


_Attrs = dict[str, str]


class OpenTelemetrySink:
    """Records outcomes through the OpenTelemetry metrics API.

    Thread-safe. :meth:`record` adds to a counter and records a histogram value, using
    one cached attribute dict per (rollout, variant, outcome class); attributes never
    carry a path, a user or a cookie. Put the sink behind a
    :class:`~canarymw.sinks.BackgroundSink` to keep the SDK's work off the request path.

    canarymw's health counters (cohort events, sink errors, drops, queue depth) are
    observable instruments read at each collection from the objects given to
    :meth:`watch`; nothing is reported for them until something is watched.

    Args:
        meter_provider: Where to get the meter; default the global provider (a no-op
            until the application installs an SDK).
        prefix: Instrument name prefix.
        buckets: Histogram bucket bounds in seconds, passed as an advisory (API 1.30
            and later): a view configured in the SDK takes precedence.
        watch: Objects whose health counters to report (see :meth:`watch`).
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        prefix: str = "canarymw",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        watch: Iterable[object] = (),
    ) -> None:
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("canarymw", __version__)
        p = prefix + "." if prefix else ""
        self.prefix = prefix
        self.requests = meter.create_counter(
            p + "requests",
            unit="{request}",
            description="Routed requests by rollout, variant and outcome class.",
        )
        try:
            self.duration = meter.create_histogram(
                p + "request.duration",
                unit="s",
                description="Time from routing to the end of the response.",
                explicit_bucket_boundaries_advisory=[float(b) for b in buckets],
            )
        except TypeError:  # opentelemetry-api < 1.30 has no advisory: the SDK's default buckets
            self.duration = meter.create_histogram(
                p + "request.duration",
                unit="s",
                description="Time from routing to the end of the response.",
            )
        self.shadow_comparisons = meter.create_counter(
            p + "shadow.comparisons",
            unit="{copy}",
            description="Shadow copies by rollout, the primary's variant and result (match, mismatch, ...).",
        )
        self._sources = HealthSources()
        self._attrs: dict[tuple[str, str, str], _Attrs] = {}
        self._lock = threading.Lock()
        meter.create_observable_counter(
            p + "rollout.events",
            callbacks=[self._observe_events],
            unit="{event}",
            description="Cohort events per rollout: assigned, cookie_rejected, cookie_reissued, ...",
        )
        meter.create_observable_gauge(
            p + "rollout.percent",
            callbacks=[self._observe_percent],
            unit="%",
            description="Share of cohorts sent to the new variant, 0 to 100.",
        )
        meter.create_observable_counter(
            p + "sink.errors",
            callbacks=[self._observe_errors],
            unit="{error}",
            description="Failures of outcome sinks, by stage (request or background).",
        )
        meter.create_observable_counter(
            p + "outcomes.dropped",
            callbacks=[self._observe_dropped],
            unit="{outcome}",
            description="Outcomes dropped because a BackgroundSink queue was full or closed.",
        )
        meter.create_observable_gauge(
            p + "queue.depth",
            callbacks=[self._observe_depth],
            unit="{outcome}",
            description="Outcomes waiting in BackgroundSink queues.",
        )
        self.watch(*watch)

    def _attributes(self, key: tuple[str, str, str]) -> _Attrs:
        with self._lock:
            attrs = self._attrs.get(key)
            if attrs is None:
                attrs = self._attrs[key] = {
                    "canarymw.rollout": key[0],
                    "canarymw.variant": key[1],
                    "canarymw.outcome": key[2],
                }
            return attrs

    def record(self, outcome: Outcome) -> None:
        """Count one outcome and record its duration."""
        key = (outcome.rollout, outcome.variant, outcome_class(outcome))
        attrs = self._attrs.get(key) or self._attributes(key)
        self.requests.add(1, attrs)
        d = outcome.duration
        self.duration.record(d if d >= 0.0 else 0.0, attrs)

    def record_comparison(self, comparison: Comparison) -> None:
        """Count one shadow comparison (see :class:`~canarymw.Shadow`)."""
        self.shadow_comparisons.add(
            1,
            {
                "canarymw.rollout": comparison.rollout,
                "canarymw.variant": comparison.variant,
                "canarymw.result": comparison.result,
            },
        )

    def record_many(self, outcomes: Iterable[Outcome]) -> None:
        """Record a batch: one counter add per attribute set, one histogram value per outcome."""
        counts: dict[tuple[str, str, str], int] = {}
        record = self.duration.record
        for outcome in outcomes:
            key = (outcome.rollout, outcome.variant, outcome_class(outcome))
            attrs = self._attrs.get(key) or self._attributes(key)
            counts[key] = counts.get(key, 0) + 1
            d = outcome.duration
            record(d if d >= 0.0 else 0.0, attrs)
        for k, n in counts.items():
            self.requests.add(n, self._attrs[k])

    def watch(self, *sources: object) -> None:
        """Report the health counters of these objects too.

        Accepts :class:`~canarymw.Rollout`, :class:`~canarymw.sinks.BackgroundSink` and canary
        middlewares (their rollout and BackgroundSinks are watched too); watching an
        object twice counts it once.

        Raises:
            TypeError: An object of another kind.
        """
        for source in sources:
            self._sources.add(source)

    # -- observable callbacks (run by the SDK at each collection) ------------------
    def _snapshot(self) -> HealthSnapshot | None:
        return self._sources.snapshot() if self._sources else None

    def _observe_events(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        snap = self._snapshot()
        if snap is None:
            return []
        return [
            metrics.Observation(count, {"canarymw.rollout": rollout, "canarymw.event": event})
            for (rollout, event), count in sorted(snap.events.items())
        ]

    def _observe_percent(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        snap = self._snapshot()
        if snap is None:
            return []
        return [
            metrics.Observation(pct, {"canarymw.rollout": name}) for name, pct in sorted(snap.percent.items())
        ]

    def _observe_errors(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        snap = self._snapshot()
        if snap is None:
            return []
        return [metrics.Observation(n, {"canarymw.stage": stage}) for stage, n in snap.sink_errors.items()]

    def _observe_dropped(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        snap = self._snapshot()
        return [] if snap is None else [metrics.Observation(snap.dropped)]

    def _observe_depth(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        snap = self._snapshot()
        return [] if snap is None else [metrics.Observation(snap.queue_depth)]

    def __repr__(self) -> str:
        return f"OpenTelemetrySink(prefix={self.prefix!r})"


# -- guarded rollouts ------------------------------------------------------------------
# The same readings as canarymw.sinks.prometheus.GuardCollector (kept apart so that
# neither module imports the other's client library).


class GuardGauges(GuardedRollouts):
    """Reports the stage, verdict and evidence of guarded rollouts as observable gauges.

    The OpenTelemetry counterpart of :class:`canarymw.sinks.prometheus.GuardCollector`::

        GuardGauges(rollout, other_rollout, meter_provider=provider)

    Instruments (the prefix is ``prefix``), read at each collection::

        canarymw.guard.stage    {canarymw.rollout, canarymw.stage}     1 for the current stage,
                                0 for the others: ramping, paused, rolled-back, done
        canarymw.guard.verdict  {canarymw.rollout, canarymw.decision}  1 for the decision of the
                                last verdict, 0 for the others: rollback, pause, pass, wait
        canarymw.guard.e_value  {canarymw.rollout, canarymw.test}      the evidence of harm of
                                the last verdict, per test (errors; latency when tested)

    The values are this process's knowledge: the stage comes from the last state the
    process applied from the store, so every process reports it (all 0 before the guard
    has started; a pause by an operator keeps the stage). The verdict and the e-values
    come from the process whose controller holds the lease, the only one that judges:
    the others report the verdict at 0 for every decision and no e-value, so take the
    maximum over processes in the backend.

    Create one per meter provider; rollouts are held by weak references (one that is
    garbage collected stops being reported).

    Args:
        rollouts: Guarded :class:`~canarymw.Rollout` objects (or canary middlewares
            running them); more with :meth:`add`.
        meter_provider: Where to get the meter; default the global provider.
        prefix: Instrument name prefix.

    Raises:
        TypeError: An object that is not a rollout or a middleware.
        ValueError: A rollout without a guard.
    """

    def __init__(
        self, *rollouts: object, meter_provider: metrics.MeterProvider | None = None, prefix: str = "canarymw"
    ) -> None:
        self.prefix = prefix
        super().__init__(*rollouts)
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("canarymw", __version__)
        p = prefix + "." if prefix else ""
        meter.create_observable_gauge(
            p + "guard.stage",
            callbacks=[self._observe_stage],
            unit="1",
            description=(
                "Stage of a guarded rollout: 1 for the current one (ramping, paused, rolled-back, done)."
            ),
        )
        meter.create_observable_gauge(
            p + "guard.verdict",
            callbacks=[self._observe_verdict],
            unit="1",
            description=(
                "Decision of the guard's last verdict, in the process leading it: 1 for the current one."
            ),
        )
        meter.create_observable_gauge(
            p + "guard.e_value",
            callbacks=[self._observe_e_value],
            unit="1",
            description=(
                "Evidence of harm of the guard's last verdict, per test; harm at 1/alpha of the test."
            ),
        )

    # -- observable callbacks (run by the SDK at each collection) ------------------
    def _observe_stage(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        out = []
        for rollout in self.rollouts():
            stage, _ = reading(rollout)
            stages = STAGES if stage is None or stage in STAGES else (*STAGES, stage)
            out += [
                metrics.Observation(
                    1 if s == stage else 0, {"canarymw.rollout": rollout.name, "canarymw.stage": s}
                )
                for s in stages
            ]
        return out

    def _observe_verdict(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        out = []
        decisions = DECISIONS
        for rollout in self.rollouts():
            _, verdict = reading(rollout)
            decision = None if verdict is None else verdict.decision
            out += [
                metrics.Observation(
                    1 if d == decision else 0, {"canarymw.rollout": rollout.name, "canarymw.decision": d}
                )
                for d in decisions
            ]
        return out

    def _observe_e_value(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        out = []
        for rollout in self.rollouts():
            _, verdict = reading(rollout)
            if verdict is None:
                continue
            out += [
                metrics.Observation(
                    test.e_value, {"canarymw.rollout": rollout.name, "canarymw.test": test.name}
                )
                for test in (verdict.errors, verdict.latency)
                if test is not None
            ]
        return out

    def __repr__(self) -> str:
        return f"GuardGauges({', '.join(repr(r.name) for r in self.rollouts())})"
