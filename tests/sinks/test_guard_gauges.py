"""The guard's gauges: GuardCollector scraped through a real prometheus_client registry, and
GuardGauges read by the OpenTelemetry SDK's in-memory reader, as a guarded rollout moves
through its stages.

Each rollout is guarded for real (``Rollout(..., store=MemoryStore(), guard=...)``); its
controller's thread is stopped at once and the test drives it by hand (``tick(now=...)``),
so every step is deterministic.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from canarymw import Rollout
from canarymw.guard import Analysis, Guard
from canarymw.sinks.otel import GuardGauges
from canarymw.sinks.prometheus import GuardCollector
from canarymw.store import Counts, MemoryStore, operate
from canarymw.store._model import WINDOW

KEY = "guard-gauges-secret-0123456789abcd"
STAGES = ("ramping", "paused", "rolled-back", "done")
DECISIONS = ("rollback", "pause", "pass", "wait")


class Guarded:
    """A guarded rollout on its own MemoryStore, its controller driven by hand."""

    def __init__(self, name: str, latency: bool = False) -> None:
        self.store = MemoryStore()
        analysis = Analysis(latency_objective=0.5 if latency else None)
        guard = Guard(steps=(10, 50, 100), bake=0, min_requests=100, interval=3600, analysis=analysis)
        self.rollout = Rollout(name, percent=0, secret_key=KEY, store=self.store, guard=guard)
        controller = self.rollout.controller
        assert controller is not None
        controller.stop(release=False)  # its thread: at most the first look, already done
        self.controller = controller
        self.name = name
        self.started = time.time()
        # Takes the lease; starts the guard if the thread had not; then judges once (no
        # traffic yet: wait), whatever the thread managed to do before it stopped.
        self.tick(self.started)
        self.tick(self.started)
        state = self.state()
        assert state.stage == "ramping" and state.percent == 10
        self.since = state.guard_since or 0.0

    def state(self) -> Any:
        return self.store.read([self.name])[self.name]

    def tick(self, now: float) -> None:
        self.controller.tick(now=now)

    def traffic(self, old: tuple[int, int], new: tuple[int, int], windows: int = 6) -> float:
        """Counters in closed windows after the guard began; returns a time when they are closed."""
        first = (int(self.since) // WINDOW + 1) * WINDOW + WINDOW
        self.store.add_counts(
            [
                Counts(self.name, variant, first + i * WINDOW, requests=n, errors=e, buckets={176: n})
                for i in range(windows)
                for variant, (n, e) in (("old", old), ("new", new))
            ]
        )
        return first + (windows + 1) * WINDOW + 3

    def operate(self, action: Any, **kw: Any) -> None:
        made = operate(self.name, self.state(), action, by="alice", **kw)
        self.store.write(self.name, made[0].version - 1, *made)
        self.rollout._apply_state(made[0])  # what the follower does within its refresh time


@pytest.fixture
def make() -> Iterator[Callable[..., Guarded]]:
    made: list[Guarded] = []

    def build(name: str | None = None, **kw: Any) -> Guarded:
        g = Guarded(name or f"guarded-{uuid.uuid4().hex[:8]}", **kw)
        made.append(g)
        return g

    yield build
    for g in made:
        g.controller.stop()
        g.store.close()


# -- Prometheus ------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(registry: CollectorRegistry, metric: str, rollout: str, label: str) -> dict[str, float]:
    """``label value -> value`` of one metric for one rollout."""
    return {
        dict(labels)[label]: v
        for (name, labels), v in scrape(registry).items()
        if name == metric and dict(labels)["rollout"] == rollout
    }


def one_hot(current: str | None, names: tuple[str, ...]) -> dict[str, float]:
    return {n: 1.0 if n == current else 0.0 for n in names}


def test_prometheus_gauges_follow_the_stage_and_the_verdict(make: Callable[..., Guarded]) -> None:
    g = make("checkout")
    registry = CollectorRegistry()
    registry.register(GuardCollector(g.rollout))

    def stage() -> dict[str, float]:
        return series(registry, "canarymw_guard_stage", "checkout", "stage")

    def verdict() -> dict[str, float]:
        return series(registry, "canarymw_guard_verdict", "checkout", "decision")

    def e_values() -> dict[str, float]:
        return series(registry, "canarymw_guard_e_value", "checkout", "test")

    assert stage() == one_hot("ramping", STAGES)
    assert verdict() == one_hot("wait", DECISIONS) and e_values() == {"errors": 1.0}  # no traffic yet

    at = g.traffic(old=(900, 1), new=(100, 0))
    g.tick(at)  # no harm, enough exposure, no bake time: on to 50%
    assert g.state().percent == 50
    assert stage() == one_hot("ramping", STAGES) and verdict() == one_hot("pass", DECISIONS)

    # Harm at 50%: the guard rolls back, the gauges say so at the next scrape.
    g.since = g.state().stage_since
    at = g.traffic(old=(500, 1), new=(500, 60))
    g.tick(at)
    assert g.state().stage == "rolled-back"
    assert stage() == one_hot("rolled-back", STAGES)
    assert verdict() == one_hot("rollback", DECISIONS)
    assert e_values()["errors"] >= 20

    # An operator ships it anyway: done. The verdict stays the last one judged.
    g.operate("promote")
    assert stage() == one_hot("done", STAGES) and verdict() == one_hot("rollback", DECISIONS)

    # A process that does not hold the lease judges nothing and says so.
    g.controller.stop()
    assert stage() == one_hot("done", STAGES)
    assert verdict() == one_hot(None, DECISIONS) and e_values() == {}


def test_prometheus_e_values_per_test_and_several_rollouts(make: Callable[..., Guarded]) -> None:
    a, b = make("a-rollout", latency=True), make("b-rollout")
    registry = CollectorRegistry()
    collector = GuardCollector(b.rollout, namespace="shop")
    registry.register(collector)
    collector.add(a.rollout, a.rollout)  # once each
    assert [r.name for r in collector.rollouts()] == ["a-rollout", "b-rollout"]
    assert repr(collector) == "GuardCollector('a-rollout', 'b-rollout')"
    b.controller.stop()  # b's lease is another process's now: b reports no verdict
    b.operate("pause")
    assert series(registry, "shop_guard_e_value", "a-rollout", "test") == {"errors": 1.0, "latency": 1.0}
    assert series(registry, "shop_guard_e_value", "b-rollout", "test") == {}
    assert series(registry, "shop_guard_verdict", "b-rollout", "decision") == one_hot(None, DECISIONS)
    assert series(registry, "shop_guard_stage", "b-rollout", "stage") == one_hot("ramping", STAGES)
    got = scrape(registry)
    assert len([k for k in got if k[0] == "shop_guard_stage"]) == 2 * len(STAGES)
    assert len([k for k in got if k[0] == "shop_guard_verdict"]) == 2 * len(DECISIONS)


def test_prometheus_collector_checks_what_it_is_given(make: Callable[..., Guarded]) -> None:
    g = make()
    with pytest.raises(ValueError, match="has no guard"):
        GuardCollector(Rollout("plain", percent=5, secret_key=KEY))
    with pytest.raises(TypeError, match="pass a Rollout or a canary middleware"):
        GuardCollector(object())

    class Middleware:
        rollout = g.rollout

    assert GuardCollector(Middleware()).rollouts() == [g.rollout]
    registry = CollectorRegistry()
    registry.register(GuardCollector())
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # describe() names its families
        registry.register(GuardCollector(g.rollout))


def test_a_collected_rollout_is_no_longer_reported() -> None:
    g = Guarded("short-lived")
    registry = CollectorRegistry()
    collector = GuardCollector(g.rollout)
    registry.register(collector)
    assert series(registry, "canarymw_guard_stage", "short-lived", "stage") != {}
    g.controller.stop()
    del g
    gc.collect()
    assert collector.rollouts() == []
    assert not [k for k in scrape(registry) if k[0] == "canarymw_guard_stage"]


# -- OpenTelemetry ---------------------------------------------------------------------------


@pytest.fixture
def reader() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def observed(reader: InMemoryMetricReader) -> dict[str, dict[tuple[str, str], float]]:
    """``instrument -> {(rollout, label value): value}``."""
    data = reader.get_metrics_data()
    out: dict[str, dict[tuple[str, str], float]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points: list[Any] = list(metric.data.data_points)
                for p in points:
                    attrs = {k: str(v) for k, v in p.attributes.items()}
                    rollout = attrs.pop("canarymw.rollout")
                    ((_, label),) = attrs.items()
                    out.setdefault(metric.name, {})[(rollout, label)] = p.value
    return out


def test_otel_gauges_follow_the_stage_and_the_verdict(
    make: Callable[..., Guarded], reader: tuple[InMemoryMetricReader, MeterProvider]
) -> None:
    memory, provider = reader
    g = make("checkout", latency=True)
    gauges = GuardGauges(g.rollout, meter_provider=provider)
    assert repr(gauges) == "GuardGauges('checkout')"

    def view() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        got = observed(memory)
        return tuple(  # type: ignore[return-value]
            {label: v for (rollout, label), v in got.get(name, {}).items() if rollout == "checkout"}
            for name in ("canarymw.guard.stage", "canarymw.guard.verdict", "canarymw.guard.e_value")
        )

    stage, verdict, e = view()
    assert stage == one_hot("ramping", STAGES) and verdict == one_hot("wait", DECISIONS)
    assert e == {"errors": 1.0, "latency": 1.0}

    at = g.traffic(old=(900, 1), new=(100, 40))
    g.tick(at)
    stage, verdict, e = view()
    assert stage == one_hot("rolled-back", STAGES) and verdict == one_hot("rollback", DECISIONS)
    assert e["errors"] >= 40 and e["latency"] == 1.0

    g.operate("resume")  # a new attempt: ramping again (the stage an operator's resume sets)
    stage, verdict, _ = view()
    assert stage == one_hot("ramping", STAGES)
    g.controller.stop()
    stage, verdict, e = view()
    assert stage == one_hot("ramping", STAGES) and verdict == one_hot(None, DECISIONS) and e == {}


def test_otel_gauges_check_what_they_are_given(
    make: Callable[..., Guarded], reader: tuple[InMemoryMetricReader, MeterProvider]
) -> None:
    _, provider = reader
    with pytest.raises(ValueError, match="has no guard"):
        GuardGauges(Rollout("plain", percent=5, secret_key=KEY), meter_provider=provider)
    with pytest.raises(TypeError, match="pass a Rollout or a canary middleware"):
        GuardGauges("checkout", meter_provider=provider)
    g = make()
    gauges = GuardGauges(meter_provider=provider, prefix="")
    gauges.add(g.rollout, g.rollout)
    assert gauges.rollouts() == [g.rollout]


def test_importing_canarymw_imports_no_metrics_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, canarymw, canarymw.guard, canarymw.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
