"""Seeded simulations of the analysis: false rollbacks, power, drift, latency, split.

Every test draws from ``random.Random(seed)``: deterministic, so a failure is a change
of the code, not bad luck. The bounds are still chosen so that a correct implementation
would pass for almost any seed; each docstring says how sure.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import pytest

from canarymw.guard import Analysis, Evidence, Verdict, Window
from canarymw.store import Counts

from ._sim import binomial_cdf, binomial_quantile, bucket, counts, hits, window

ALPHA = 0.05
N = 20_000
PEEK = 100
SHARE = 0.10


def stop(
    rng: random.Random, p_canary: float, p_base: float = 0.01, max_canary: int | None = None
) -> int | None:
    """One run of N requests, 10% to the canary, a peek (one window) every 100 requests:
    the canary requests when the error test first reaches 1/alpha, or None."""
    ev = Evidence()
    seen = 0
    for _ in range(N // PEEK):
        nc = hits(rng, PEEK, SHARE)
        nb = PEEK - nc
        xc, xb = hits(rng, nc, p_canary), hits(rng, nb, p_base)
        seen += nc
        if nc and nb:
            ev.add(nc / PEEK, xc, xb)
        if ev.e_value >= 1 / ALPHA:
            return seen
        if max_canary is not None and seen >= max_canary:
            return None
    return None


def test_false_rollbacks_stay_below_alpha_however_often_one_peeks() -> None:
    """Type I error: 600 runs of 20,000 requests at equal error rates (1% vs 1%), peeking
    every 100 requests (200 looks a run). If the chance of a false rollback is at most
    alpha = 5%, the count exceeds the 99.9% quantile of Binomial(600, 0.05) with
    probability at most 0.1%: the bound holds with 99.9% confidence. (A broken
    martingale, or a z-test peeked so often, rolls back a quarter of the runs or more.)"""
    runs = 600
    bound = binomial_quantile(runs, ALPHA, 0.999)
    assert 40 <= bound <= 50  # the quantile itself: about 30 + 3.1 standard deviations
    rng = random.Random(20240601)
    false = sum(stop(rng, 0.01) is not None for _ in range(runs))
    assert false <= bound, f"{false} false rollbacks in {runs} runs (bound {bound})"


def test_a_doubled_error_rate_is_caught_within_2000_canary_requests() -> None:
    """Power: 2% vs 1%, caught within 2,000 canary requests in at least 80% of 300 runs.
    The simulation (bench/bench_guard.py) measures about 89%; with that power, fewer than
    240 of 300 happen with probability 2e-6 (computed below): 99.999% confidence."""
    runs = 300
    need = int(0.8 * runs)
    assert binomial_cdf(runs, 0.89, need - 1) < 1e-5
    rng = random.Random(7)
    caught = sum(stop(rng, 0.02, max_canary=2000) is not None for _ in range(runs))
    assert caught >= need, f"caught {caught} of {runs}"


def test_a_fivefold_error_rate_is_caught_within_150_canary_requests_at_the_median() -> None:
    """Power at 5x: the median canary requests until rollback is at most 150 over 200 runs
    (measured about 110). The median's exceeding 150 needs at least 100 of 200 runs slower
    than 150; at P(slower) = 0.33 (measured: 0.315) that has probability below 1e-6."""
    runs = 200
    assert 1 - binomial_cdf(runs, 0.33, runs // 2 - 1) < 1e-6
    rng = random.Random(11)
    stops = [stop(rng, 0.05) for _ in range(runs)]
    median = statistics.median([math.inf if s is None else s for s in stops])
    assert median <= 150, f"median {median}"


def drifting_day(rng: random.Random, windows: int = 150) -> tuple[bool, bool]:
    """A canary as good as the baseline while load varies 5x, the baseline's (and the
    canary's) error rate drifts from 0.5% to 2%, and the split ramps 5 -> 25 -> 50%.
    Returns whether the windowed test fired, and whether the same Evidence fed the
    totals (as one window, at every look) fired. The split is exact (the test conditions
    on each window's requests); the errors are random."""
    ev = Evidence()
    fired = fired_totals = False
    xc = nc = xb = nb = 0
    for t in range(windows):
        percent = (5, 25, 50)[3 * t // windows]
        load = int(2000 * (1 + 0.8 * math.sin(2 * math.pi * t / 100)))
        rate = 0.005 + 0.015 * t / windows
        c = round(load * percent / 100)
        b = load - c
        ec, eb = hits(rng, c, rate), hits(rng, b, rate)
        ev.add(c / (c + b), ec, eb)
        nc, xc, nb, xb = nc + c, xc + ec, nb + b, xb + eb
        fired = fired or ev.e_value >= 1 / ALPHA
        if not fired_totals:
            totals = Evidence()
            totals.add(nc / (nc + nb), xc, xb)
            fired_totals = totals.e_value >= 1 / ALPHA
        if fired and fired_totals:
            break
    return fired, fired_totals


def test_windows_keep_the_type_i_error_under_drift_where_totals_do_not() -> None:
    """Robustness: 150 drifting days with an equally good canary. The windowed test's
    false rollbacks stay below the 99.9% quantile of Binomial(150, 0.05) (99.9%
    confidence if its error is at most alpha); the same test on totals, which mixes the
    baseline's good hours with the canary's bad ones (Simpson's paradox), rolls back
    almost every run (measured: all of them)."""
    runs = 150
    rng = random.Random(3)
    results = [drifting_day(rng) for _ in range(runs)]
    windowed = sum(w for w, _ in results)
    totals = sum(t for _, t in results)
    assert windowed <= binomial_quantile(runs, ALPHA, 0.999)
    assert totals >= 0.9 * runs
    assert totals >= 5 * max(windowed, 1)


def latency_counts(rng: random.Random, variant: str, n: int, factor: float, start: int) -> Counts:
    """n requests with log-normal latencies (median 100 ms x factor, sigma 0.5), 1% errors,
    counted into the store's latency buckets."""
    got = Counter(bucket(rng.lognormvariate(math.log(0.1 * factor), 0.5)) for _ in range(n))
    return counts(variant, n, hits(rng, n, 0.01), start=start, buckets=dict(got))


def latency_run(seed: int, factor: float, windows: int = 200) -> tuple[int | None, Verdict]:
    """The window at which Analysis(latency_objective=0.25) first rolls back, and its verdict."""
    rng = random.Random(seed)
    judgement = Analysis(latency_objective=0.25).running()
    verdict = judgement.verdict()
    for t in range(windows):
        nc = hits(rng, PEEK, SHARE)
        nb = PEEK - nc
        start = t * 10
        judgement.add(
            Window(
                float(start),
                latency_counts(rng, "old", nb, 1.0, start),
                latency_counts(rng, "new", nc, factor, start),
            )
        )
        verdict = judgement.verdict()
        if verdict.decision == "rollback":
            return t, verdict
    return None, verdict


def test_the_bucket_helper_agrees_with_the_bucket_bounds() -> None:
    from canarymw.sinks.memory import _bucket_bounds

    for d in (1e-6, 0.0123, 0.1, 0.25, 0.258, 1.0, 3.7):
        lo, hi = _bucket_bounds(bucket(d))
        assert lo * (1 - 1e-12) <= d <= hi * (1 + 1e-12)


def test_the_latency_test_catches_30_percent_slower_and_spares_a_healthy_canary() -> None:
    """Objective 250 ms (258 ms at the bucket edge); 30% slower triples the share of slow
    requests (8.5% vs 2.9%). Seeded runs: each slow canary is rolled back for latency
    within 20,000 requests (measured: within 25 windows of 100); none of 5 healthy ones
    is rolled back (each has a chance of at most alpha = 5% of a false rollback), and
    each healthy one ends in a pass."""
    for seed in range(5):
        at, verdict = latency_run(seed, 1.3)
        assert at is not None, f"seed {seed}: not caught"
        assert verdict.latency is not None and verdict.latency.harm
        assert not verdict.errors.harm
        assert "requests over 258 ms" in verdict.sentence
        assert verdict.latency.ratio is not None and verdict.latency.ratio > 1.5
    for seed in range(100, 105):
        at, verdict = latency_run(seed, 1.0)
        assert at is None, f"seed {seed}: a healthy canary rolled back: {verdict.sentence}"
        assert verdict.decision == "pass"
        assert verdict.latency is not None and verdict.latency.e_value < 1 / verdict.latency.alpha


def split_run(seed: int, lose: float, windows: int = 100, load: int = 1000) -> tuple[int | None, Verdict]:
    """A 10% canary that silently loses ``lose`` of its requests (never counted), no errors:
    the window at which the verdict first pauses, and the verdict."""
    rng = random.Random(seed)
    judgement = Analysis().running()
    verdict = judgement.verdict()
    for t in range(windows):
        assigned = hits(rng, load, 0.10)
        nc = assigned - hits(rng, assigned, lose)
        judgement.add(window((nc, 0), (load - assigned, 0), start=t * 10.0, percent=10.0))
        verdict = judgement.verdict()
        assert verdict.ratio is not None
        if verdict.ratio.mismatch:
            return t, verdict
    return None, verdict


def test_the_sample_ratio_check_flags_a_lossy_canary_and_not_a_faithful_one() -> None:
    """A canary that loses 20% of its requests is paused within 45 windows of 1,000
    requests in each of 10 seeded runs (measured: 22 to 34; the check learns the spread
    of the counts over its first 20 windows, and judges with an upper estimate of it);
    none of 20 faithful splits is flagged over 100,000 requests (ratio_alpha 0.001: at
    most a 2% chance that any of 20 would be)."""
    for seed in range(10):
        at, verdict = split_run(seed, 0.20)
        assert at is not None and at < 45, f"seed {seed}: not flagged"
        assert verdict.decision == "pause"
        assert verdict.sentence.startswith("pause: the canary got ")
        assert verdict.ratio is not None
        assert verdict.ratio.canary_requests < 0.9 * verdict.ratio.expected_requests
    for seed in range(100, 120):
        at, verdict = split_run(seed, 0.0)
        assert at is None, f"seed {seed}: a faithful split flagged: {verdict.sentence}"
        assert verdict.decision == "pass"


def visitor_run(seed: int, lose: float, per_visitor: float, windows: int = 150) -> int | None:
    """A 10% canary whose visitors each make a geometric number of requests (mean
    ``per_visitor``) within a window, all to their variant; the canary silently loses
    ``lose`` of its requests. The window at which the split check first pauses, or None."""
    rng = random.Random(seed)
    judgement = Analysis().running()
    p = 1.0 / per_visitor
    log_q = math.log1p(-p)
    for t in range(windows):
        canary = baseline = 0
        for _ in range(200):  # visitors this window
            requests = 1 + int(math.log(1.0 - rng.random()) / log_q)
            if rng.random() < 0.10:
                canary += requests
            else:
                baseline += requests
        canary -= hits(rng, canary, lose)
        judgement.add(window((canary, 0), (baseline, 0), start=t * 10.0, percent=10.0))
        ratio = judgement.verdict().ratio
        assert ratio is not None
        if ratio.mismatch:
            return t
    return None


@pytest.mark.parametrize("per_visitor", [5.0, 20.0])
def test_visitors_making_many_requests_do_not_look_like_a_broken_split(per_visitor: float) -> None:
    """Requests are not independent: a visitor's all go to one variant, so the canary's
    count varies about ``per_visitor`` times more than a binomial's. A check that took
    requests for independent draws pauses most faithful splits within a few windows; the
    check learns the spread and flags none of 20 faithful runs of 150 windows (ratio_alpha
    0.001: at most a 2% chance that any of 20 would be, were the spread known), while
    still pausing a canary that loses half of its requests in each of 5 runs."""
    for seed in range(20):
        at = visitor_run(200 + seed, 0.0, per_visitor)
        assert at is None, f"seed {seed}: a faithful split paused at window {at}"
    for seed in range(5):
        assert visitor_run(300 + seed, 0.5, per_visitor) is not None, f"seed {seed}: a lossy canary passed"
