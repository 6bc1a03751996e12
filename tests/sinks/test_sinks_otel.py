"""OpenTelemetrySink: the same instruments through the OTel metrics API, read in memory."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from canarymw import Outcome, Rollout
from canarymw.sinks import DEFAULT_BUCKETS, BackgroundSink
from canarymw.sinks.otel import OpenTelemetrySink

from ..harness import make_outcome

KEY = "test-secret-key-0123456789abcdef"


def outcome(variant: str = "new", status: int | None = 200, duration: float = 0.02, **kw: Any) -> Outcome:
    return make_outcome(variant, status, duration, **kw)


class OTel(NamedTuple):
    reader: InMemoryMetricReader
    provider: MeterProvider


@pytest.fixture
def otel() -> Iterator[OTel]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield OTel(reader, provider)
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "canarymw"
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def by_attrs(pts: list[Any]) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(p.attributes.items())): p for p in pts}


def test_counter_and_histogram_by_rollout_variant_and_outcome(otel: OTel) -> None:
    sink = OpenTelemetrySink(meter_provider=otel.provider)
    sink.record(outcome("new", 200, 0.003))
    sink.record(outcome("new", 200, 0.004))
    sink.record(outcome("new", 503, 0.2))
    sink.record(outcome("old", 200, 0.04, disconnected=True))
    sink.record(outcome("old", None, 1.5, error="KeyError"))
    sink.record(outcome("old", 200, -1.0))
    got = points(otel.reader)
    requests = by_attrs(got["canarymw.requests"])
    key = (("canarymw.outcome", "2xx"), ("canarymw.rollout", "r"), ("canarymw.variant", "new"))
    assert requests[key].value == 2
    assert sum(p.value for p in requests.values()) == 6
    classes = {dict(k)["canarymw.outcome"] for k in requests}
    assert classes == {"2xx", "5xx", "disconnect", "exception"}
    hist = by_attrs(got["canarymw.request.duration"])
    assert hist[key].count == 2
    assert hist[key].sum == pytest.approx(0.007)
    assert list(hist[key].explicit_bounds) == list(DEFAULT_BUCKETS)
    assert hist[key].bucket_counts[1] == 0 and hist[key].bucket_counts[2] == 2  # (2.5 ms, 5 ms]
    assert sum(p.count for p in hist.values()) == 6
    # No health instrument reports anything until something is watched.
    assert "canarymw.outcomes.dropped" not in got or not got["canarymw.outcomes.dropped"]


def test_record_many_equals_one_by_one() -> None:
    rng = random.Random(7)
    batch = [
        outcome(rng.choice(["old", "new"]), rng.choice([200, 404, 500, None]), rng.random() * 2)
        for _ in range(500)
    ]
    results = []
    for mode in ("one", "many"):
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        sink = OpenTelemetrySink(meter_provider=provider, prefix="x")
        if mode == "one":
            for o in batch:
                sink.record(o)
        else:
            sink.record_many(batch[:250])
            sink.record_many(batch[250:])
        got = points(reader)
        results.append(
            (
                {k: p.value for k, p in by_attrs(got["x.requests"]).items()},
                {
                    k: (p.count, round(p.sum, 9), list(p.bucket_counts))
                    for k, p in by_attrs(got["x.request.duration"]).items()
                },
            )
        )
        provider.shutdown()
    assert results[0] == results[1]


def test_health_instruments_read_watched_objects(otel: OTel) -> None:
    rollout = Rollout("otel-health", percent=20, secret_key=KEY)
    sink = OpenTelemetrySink(meter_provider=otel.provider, watch=[rollout])
    bg = BackgroundSink(sink, maxsize=5)
    sink.watch(bg)
    rollout.counters["cookie_rejected"] = 4
    for _ in range(3):
        bg.record(outcome(rollout="otel-health"))
    assert bg.flush(timeout=5)
    got = points(otel.reader)
    events = {dict(k)["canarymw.event"]: p.value for k, p in by_attrs(got["canarymw.rollout.events"]).items()}
    assert events["cookie_rejected"] == 4
    assert events["assigned"] == 0
    assert [p.value for p in got["canarymw.rollout.percent"]] == [20.0]
    errors = {dict(k)["canarymw.stage"]: p.value for k, p in by_attrs(got["canarymw.sink.errors"]).items()}
    assert errors == {"request": 0, "background": 0}
    assert [p.value for p in got["canarymw.outcomes.dropped"]] == [0]
    assert [p.value for p in got["canarymw.queue.depth"]] == [0]
    assert sum(p.value for p in got["canarymw.requests"]) == 3
    assert bg.close(timeout=5)
    assert repr(sink) == "OpenTelemetrySink(prefix='canarymw')"


def test_uses_the_global_provider_by_default() -> None:
    # With no SDK installed globally the API hands out no-op instruments: recording works.
    sink = OpenTelemetrySink()
    sink.record(outcome())
    sink.record_many([outcome(), outcome(status=500)])


def test_an_api_without_bucket_advice_still_works(otel: OTel, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = otel.provider.get_meter("canarymw")
    real = type(meter).create_histogram

    def old_api(self: Any, name: str, unit: str = "", description: str = "", **kw: Any) -> Any:
        if kw:
            raise TypeError("unexpected keyword argument 'explicit_bucket_boundaries_advisory'")
        return real(self, name, unit, description)

    monkeypatch.setattr(type(meter), "create_histogram", old_api)
    sink = OpenTelemetrySink(meter_provider=otel.provider, prefix="old")
    sink.record(outcome())
    assert points(otel.reader)["old.request.duration"][0].count == 1
