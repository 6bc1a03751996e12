"""StoreSink: whole-service counters through both adapters, and through a store that fails."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canarymw import Rollout
from canarymw.sinks import Outcome
from canarymw.sinks.memory import _BOUNDS
from canarymw.sinks.store import StoreSink
from canarymw.store import WINDOW, Counts, MemoryStore

from ..conftest import KEY
from ..harness import ASGIKit, WSGIKit, make_outcome
from .test_follow import FlakyStore


def outcome(variant: str = "new", status: int | None = 200, duration: float = 0.01, **kw: object) -> Outcome:
    return make_outcome(variant, status, duration, **{"timestamp": 1_000_003.0, **kw})


def test_counts_per_variant_window_and_class() -> None:
    store = MemoryStore()
    sink = StoreSink(store, interval=60)
    sink.record(outcome(duration=0.002))
    sink.record(outcome(status=503))
    sink.record(outcome(status=None, error="Boom"))
    sink.record(outcome(disconnected=True))
    sink.record(outcome("old"))
    sink.record(outcome(timestamp=1_000_003.0 + WINDOW))
    assert store.read_counts(["r"], 0) == []  # nothing before a flush
    assert sink.flush() and sink.flushed == 6
    got = {(c.variant, c.window): c for c in store.read_counts(["r"], 0)}
    first = got[("new", 1_000_000)]
    assert (first.requests, first.errors, first.exceptions, first.disconnects) == (4, 2, 1, 1)
    assert first.latency_sum == pytest.approx(0.032)
    assert sum(first.buckets.values()) == 4
    low = min(first.buckets)
    assert _BOUNDS[low - 1] < 0.002 <= _BOUNDS[low]  # MemorySink's buckets
    assert got[("old", 1_000_000)].requests == 1 and got[("new", 1_000_010)].requests == 1
    sink.close()


def test_a_failing_store_keeps_the_counts_and_never_fails_a_request() -> None:
    store = FlakyStore()
    sink = StoreSink(store, interval=60)
    store.down = True
    now = time.time()
    for _ in range(5):
        sink.record(outcome(timestamp=now))
    assert sink.flush() is False and sink.failures == 1
    sink.record(outcome(timestamp=now))
    store.down = False
    assert sink.flush() is True
    counts = store.read_counts(["r"], 0)
    assert sum(c.requests for c in counts) == 6 and sink.dropped == 0 and sink.flushed == 6
    old = outcome(timestamp=time.time() - 7200)
    store.down = True
    sink.record(old)
    sink.flush()
    assert sink.dropped == 1  # older than an hour while the store was down


def test_through_the_adapters_the_store_sums_every_request(kit: WSGIKit | ASGIKit) -> None:
    store = MemoryStore()
    sink = StoreSink(store, interval=0.05)
    rollout = Rollout("r", percent=50, secret_key=KEY)
    app = kit.wrap(kit.echo("old"), kit.echo("new"), rollout, sink=sink)
    with kit.client(app) as client:
        for _ in range(40):
            assert client.get("/").status_code == 200
    deadline = time.monotonic() + 5
    while sink.flushed < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    counts = store.read_counts(["r"], 0)
    assert sum(c.requests for c in counts) == 40 and {c.variant for c in counts} <= {"old", "new"}
    assert sum(c.errors for c in counts) == 0
    sink.close()


def test_bad_arguments_are_sentences() -> None:
    with pytest.raises(TypeError, match="pass a store"):
        StoreSink(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval=0"):
        StoreSink(MemoryStore(), interval=0)


@pytest.mark.parametrize("classify", ["default", "custom"])
def test_counting_in_columns_matches_counting_one_by_one(classify: str) -> None:
    """The flushing thread counts a batch column by column; the result must be what
    counting each outcome on its own gives, for any mix of rollouts, variants, windows,
    statuses (None, 1xx-9xx, out of range), exceptions and disconnects."""
    import random

    rng = random.Random(7)
    outcomes = [
        outcome(
            rng.choice(["old", "new"]),
            rng.choice([200, 200, 302, 404, 499, 500, 503, 599, None, 99, 1200]),
            rng.lognormvariate(-4, 1.5),
            rollout=rng.choice(["r", "s"]),
            error=rng.choice([None, None, None, "Boom"]),
            disconnected=rng.random() < 0.1,
            timestamp=1_000_000.0 + rng.uniform(0, 35),
        )
        for _ in range(3000)
    ]

    rule = None if classify == "default" else slow_rule
    assert_counted_as_one_by_one(outcomes, rule, groups=8)


def slow_rule(o: Outcome) -> bool:
    return o.status == 200 and o.duration < 0.02


def assert_counted_as_one_by_one(
    outcomes: list[Outcome], rule: Callable[[Outcome], bool] | None, groups: int = 0
) -> None:
    """Flush ``outcomes`` through a StoreSink and compare with counting each on its own."""
    store = MemoryStore()
    sink = StoreSink(store, interval=60, **({} if rule is None else {"classify": rule}))
    for o in outcomes:
        sink.record(o)
    assert sink.flush()
    want: dict[tuple[str, str, int], Counts] = {}
    for o in outcomes:
        key = (o.rollout, o.variant, int(o.timestamp // WINDOW) * WINDOW)
        row = want.setdefault(key, Counts(*key))
        row.requests += 1
        row.errors += not (o.ok if rule is None else rule(o))
        row.exceptions += o.error is not None
        row.disconnects += bool(o.disconnected)
        row.latency_sum += o.duration
        b = bisect_left(_BOUNDS, o.duration)
        row.buckets[b] = row.buckets.get(b, 0) + 1
    names = sorted({o.rollout for o in outcomes})
    got = {(c.rollout, c.variant, c.window): c for c in store.read_counts(names, 0)}
    assert set(got) == set(want) and len(got) > groups
    for key, w in want.items():
        c = got[key]
        assert (c.requests, c.errors, c.exceptions, c.disconnects) == (
            w.requests,
            w.errors,
            w.exceptions,
            w.disconnects,
        ), key
        assert c.buckets == w.buckets, key
        if math.isnan(w.latency_sum):
            assert math.isnan(c.latency_sum)
        else:
            assert c.latency_sum == pytest.approx(w.latency_sum)
    sink.close()


_EDGES = [0.0, -0.0, -1.0, _BOUNDS[0], _BOUNDS[7], _BOUNDS[-1], _BOUNDS[-1] * 2, math.inf, 1e-9]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_counting_a_batch_of_few_groups_matches_counting_one_by_one(data: st.DataObject) -> None:
    """The common batch (few rollouts and variants, one or two windows) is counted group by
    group, with a sorted histogram; any mix of edge values must count as one by one."""
    window = data.draw(st.integers(100_000, 200_000)) * WINDOW
    span = data.draw(
        st.sampled_from([0.5, WINDOW - 1e-6, WINDOW, 1.5 * WINDOW, 2 * WINDOW - 1e-6, 3 * WINDOW])
    )
    start = data.draw(st.floats(0, WINDOW - 1e-6)) + window
    rollouts = data.draw(st.lists(st.sampled_from(["r", "s", "t"]), min_size=1, max_size=3, unique=True))
    variants = data.draw(st.lists(st.sampled_from(["old", "new", "x"]), min_size=1, max_size=3, unique=True))
    durations = st.one_of(
        st.floats(0, 5, allow_nan=False), st.sampled_from(_EDGES), st.sampled_from([math.nan, 7])
    )
    one = st.builds(
        outcome,
        st.sampled_from(variants),
        st.sampled_from([200, 200, 302, 500, 503, None, 99, 1200]),
        durations,
        rollout=st.sampled_from(rollouts),
        error=st.sampled_from([None, None, None, "Boom"]),
        disconnected=st.sampled_from([False, False, True]),
        timestamp=st.one_of(st.floats(start, start + span), st.sampled_from([window, window + WINDOW])),
    )
    outcomes = data.draw(st.lists(one, min_size=1, max_size=60))
    rule = data.draw(st.sampled_from([None, slow_rule]))
    assert_counted_as_one_by_one(outcomes, rule)


def test_a_plain_batch_takes_the_group_path() -> None:
    """The batch the figures in docs/benchmarks.md describe (one rollout, two variants, two
    windows at most) is counted by groups, not by ids."""
    from canarymw.sinks.store import _groups

    stamps = [1_000_008.0, 1_000_009.5, 1_000_010.0, 1_000_011.0]
    groups = _groups(["r"] * 4, ["old", "new", "old", "new"], stamps)
    assert groups is not None and len(groups) == 4
    assert dict(groups)[("r", "new", 1_000_010)] == [False, False, False, True]
    assert _groups(["r"] * 2, ["old"] * 2, [1_000_000.0, 1_000_020.0]) is None  # three windows
    assert _groups(["r"], ["old"], [math.nan]) is None
    assert _groups(["r"], ["old"], [-1.0]) is None
