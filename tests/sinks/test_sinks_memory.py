"""MemorySink against a straightforward reference, across batches, threads and rollouts."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable

import pytest

from canarymw import MemorySink, Outcome, Rollout, VariantStats, WSGICanaryMiddleware

EMPTY = VariantStats(
    requests=0,
    errors=0,
    exceptions=0,
    disconnects=0,
    statuses={},
    latency_mean=None,
    latency_p50=None,
    latency_p95=None,
    latency_p99=None,
    latency_max=None,
)


def _outcomes(n: int, seed: int, mix: str = "mixed") -> list[Outcome]:
    """``mixed``: two rollouts, both variants, some exceptions and disconnects;
    ``one variant``: one rollout and variant; ``clean``: that, and no exception or
    disconnect (the batches MemorySink counts by status alone)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        error = None if mix == "clean" else rng.choice([None] * 20 + ["ValueError"])
        status = None if error and rng.random() < 0.5 else rng.choice([200] * 30 + [201, 302, 404, 500, 503])
        out.append(
            Outcome(
                "checkout-v2" if mix != "mixed" else rng.choice(["checkout-v2", "search-v3"]),
                "old" if mix != "mixed" else rng.choice(["old"] * 4 + ["new"]),
                status,
                rng.lognormvariate(-5, 1),
                error,
                mix != "clean" and rng.random() < 0.03,
                "GET",
                None,
                1_700_000_000.0,
            )
        )
    return out


def _reference(outcomes: list[Outcome], rollout: str | None) -> dict[str, dict[str, object]]:
    ref: dict[str, dict[str, object]] = {}
    for variant in ("new", "old"):
        mine = [o for o in outcomes if o.variant == variant and rollout in (None, o.rollout)]
        if not mine:
            ref[variant] = {"requests": 0, "errors": 0, "exceptions": 0, "disconnects": 0, "statuses": {}}
            continue
        statuses: dict[int, int] = {}
        for o in mine:
            if o.status is not None:
                statuses[o.status // 100] = statuses.get(o.status // 100, 0) + 1
        durations = sorted(o.duration for o in mine)
        ref[variant] = {
            "requests": len(mine),
            "errors": sum(not o.ok for o in mine),
            "exceptions": sum(o.error is not None for o in mine),
            "disconnects": sum(o.disconnected for o in mine),
            "statuses": dict(sorted(statuses.items())),
            "mean": math.fsum(durations) / len(durations),
            "max": durations[-1],
            "durations": durations,
        }
    return ref


@pytest.mark.parametrize("mix", ["mixed", "one variant", "clean"])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5_000])
def test_snapshot_matches_a_reference_from_many_threads(n: int, mix: str) -> None:
    outcomes = _outcomes(n, seed=n, mix=mix)
    sink = MemorySink()
    chunks = [outcomes[i::4] for i in range(4)]
    threads = [threading.Thread(target=lambda c=c: [sink.record(o) for o in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rollout in (None, "checkout-v2", "search-v3"):
        got = sink.snapshot(rollout)
        ref = _reference(outcomes, rollout)
        assert sorted(got) == sorted(ref)
        for variant, want in ref.items():
            stats = got[variant]
            assert stats.requests == want["requests"]
            assert stats.errors == want["errors"]
            assert stats.exceptions == want["exceptions"]
            assert stats.disconnects == want["disconnects"]
            assert stats.statuses == want["statuses"]
            if not want["requests"]:
                assert stats == EMPTY
                continue
            assert stats.latency_mean == pytest.approx(want["mean"], rel=1e-9)
            assert stats.latency_max == want["max"]
            # Quantiles come from a log histogram with 4% buckets: each lies between the
            # samples around its rank, give or take one bucket.
            durations = want["durations"]
            assert isinstance(durations, list)
            for q, got_q in ((0.5, stats.latency_p50), (0.95, stats.latency_p95), (0.99, stats.latency_p99)):
                rank = math.ceil(q * len(durations))
                low = durations[max(0, rank - 2)] / 1.05
                high = durations[min(len(durations) - 1, rank)] * 1.05
                assert got_q is not None and low <= got_q <= high, (q, got_q, low, high)


def test_recording_after_a_snapshot_adds_up() -> None:
    first, second = _outcomes(300, seed=1), _outcomes(700, seed=2)
    sink = MemorySink()
    for o in first:
        sink.record(o)
    sink.snapshot()
    for o in second:
        sink.record(o)
    total = sum(s.requests for s in sink.snapshot().values())
    assert total == 1000
    sink.reset()
    assert sink.snapshot() == {"old": EMPTY, "new": EMPTY}


def test_a_variant_without_traffic_is_in_the_snapshot_with_zeros() -> None:
    # A dashboard reads snapshot()["new"] from the first second of a rollout at 0%.
    sink = MemorySink()
    assert sink.snapshot() == {"old": EMPTY, "new": EMPTY}
    for o in _outcomes(300, seed=3, mix="one variant"):
        sink.record(o)
    snap = sink.snapshot()
    assert sorted(snap) == ["new", "old"]
    assert snap["old"].requests == 300 and snap["new"] == EMPTY
    assert snap["new"].error_rate == 0.0 and snap["new"].latency_p95 is None
    assert sink.snapshot("checkout-v2")["new"] == EMPTY
    assert sink.snapshot("not-seen-yet") == {"old": EMPTY, "new": EMPTY}


def test_a_variant_without_traffic_with_a_custom_classifier() -> None:
    sink = MemorySink(classify=lambda o: o.status == 200)
    sink.record(Outcome("r", "new", 404, 0.01, None, False, "GET", None, 1.0))
    snap = sink.snapshot()
    assert snap["new"].errors == 1 and snap["old"] == EMPTY


def test_a_rollout_at_zero_percent_reports_new_with_zeros() -> None:
    sink = MemorySink()
    rollout = Rollout("zero", percent=0, secret_key="test-secret-key-0123456789abcdef")

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"old"]

    mw = WSGICanaryMiddleware(app, new=None, rollout=rollout, sink=sink)
    for _ in range(3):
        body = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
        list(body)
        body.close()  # type: ignore[attr-defined]
    snap = sink.snapshot()
    assert snap["old"].requests == 3 and snap["new"].requests == 0
