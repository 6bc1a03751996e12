"""Analysis: the verdicts, their sentences and notes, the arguments, and the windows."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from canarymw.guard import Analysis, Evidence, RatioCheck, Verdict, Window, windows_from_counts
from canarymw.guard import Test as HarmTest  # not "Test*": pytest would collect it
from canarymw.guard._analysis import slow_count
from canarymw.sinks.memory import _bucket_bounds

from ._sim import bucket, counts, window

EDGE_250 = 0.25800901359130773  # the bucket edge 250 ms rounds up to
J = bucket(0.2)  # a bucket well below 250 ms
SLOW = bucket(0.4)  # a bucket well above it


def verdict(*windows: Window, **kw: Any) -> Verdict:
    return Analysis(**kw).judge(windows)


# -- decisions and sentences ------------------------------------------------------------


def test_no_traffic_at_all_is_a_wait() -> None:
    v = verdict()
    assert v.decision == "wait"
    assert v.sentence == "wait: no traffic yet; no traffic is neither a pass nor a failure"
    assert (v.windows, v.share, v.ratio, v.latency, v.notes) == (0, None, None, None, ())
    assert v.errors.e_value == 1.0 and not v.errors.harm
    assert verdict(window((0, 0), (0, 0), percent=10.0)).sentence == v.sentence


def test_a_canary_without_requests_is_a_wait_whatever_the_baseline_does() -> None:
    v = verdict(window((0, 0), (1500, 900)))
    assert v.decision == "wait"
    assert v.sentence == (
        "wait: the canary has had no requests (baseline 1,500); no traffic is neither a pass nor a failure"
    )
    assert v.share == 0.0


def test_under_min_requests_is_a_wait_even_with_harm() -> None:
    v = verdict(window((30, 25), (300, 1)))
    assert v.decision == "wait"
    assert v.sentence == "wait: the canary has had 30 of the 50 requests needed before any decision"
    assert v.errors.harm  # the evidence is there; the decision waits for the exposure
    # One request short, then exactly the minimum (not ">" but ">=").
    assert verdict(window((89, 7), (810, 3)), min_requests=90).decision == "wait"
    assert verdict(window((90, 7), (810, 3)), min_requests=90).decision == "rollback"


def test_harm_is_a_rollback_with_its_numbers() -> None:
    v = verdict(window((90, 7), (810, 3)))
    ev = Evidence()
    ev.add(0.1, 7, 3)
    assert v.errors.e_value == pytest.approx(ev.e_value)
    assert round(v.errors.e_value) == 2130
    assert v.decision == "rollback"
    assert v.sentence == (
        "rollback: canary 7 errors / 90 requests vs baseline 3 / 810 at 10% of traffic; "
        "harm is certain at alpha 0.05 (e-value 2,130)"
    )
    assert v.errors.ratio == pytest.approx(21.0)  # (7/90) / (3/810)
    assert (v.errors.canary, v.errors.canary_requests, v.errors.baseline, v.errors.baseline_requests) == (
        7,
        90,
        3,
        810,
    )
    assert v.errors.alpha == 0.05 and v.errors.harm
    assert v.share == pytest.approx(0.1)


def test_the_alpha_decides_and_is_in_the_sentence() -> None:
    # e-value 2,130: harm at alpha 0.01 (needs 100) but not at 0.0001 (needs 10,000).
    assert (
        "harm is certain at alpha 0.01 (e-value 2,130)"
        in verdict(window((90, 7), (810, 3)), alpha=0.01).sentence
    )
    assert verdict(window((90, 7), (810, 3)), alpha=0.0001).decision == "pass"


def test_the_threshold_is_exactly_1_over_alpha() -> None:
    ev = Evidence()
    ev.add(0.1, 7, 3)
    e = ev.e_value
    assert verdict(window((90, 7), (810, 3)), alpha=1 / e * (1 + 1e-9)).decision == "rollback"
    assert verdict(window((90, 7), (810, 3)), alpha=1 / e * (1 - 1e-9)).decision == "pass"


def test_a_healthy_canary_passes() -> None:
    v = verdict(window((1000, 10), (9000, 90), percent=10.0))
    assert v.decision == "pass"
    assert v.sentence.startswith(
        "pass: canary 10 errors / 1,000 requests vs baseline 90 / 9,000 at 10% of traffic; "
        "no harm found at alpha 0.05 (e-value "
    )
    assert v.notes == ()
    assert v.ratio is not None and not v.ratio.mismatch


def test_a_split_mismatch_is_a_pause() -> None:
    # One window, before the check has learnt the spread of request counts: only a gross
    # mismatch (a tenth of the canary's share) is caught this early.
    v = verdict(window((200, 0), (19800, 0), percent=10.0))
    assert v.decision == "pause"
    assert v.sentence == (
        "pause: the canary got 200 requests where its percent called for 2,000; the split is not what "
        "it should be (sample-ratio mismatch at alpha 0.001, e-value 6.4e+06)"
    )
    assert v.ratio is not None and v.ratio.mismatch and not v.ratio.judging
    assert (v.ratio.canary_requests, v.ratio.expected_requests, v.ratio.alpha) == (200, 2000.0, 0.001)


def test_a_fine_mismatch_waits_for_the_spread_to_be_learnt() -> None:
    # Half the canary's share in one window could be a few heavy visitors: no pause yet.
    v = verdict(window((500, 0), (9500, 0), percent=10.0))
    assert v.decision == "pass" and v.ratio is not None and not v.ratio.mismatch
    assert v.ratio.dispersion is not None and v.ratio.dispersion > 1


def test_a_canary_that_gets_too_much_is_a_mismatch_too() -> None:
    assert verdict(window((5000, 0), (5000, 0), percent=10.0)).decision == "pause"


def test_harm_beats_a_split_mismatch() -> None:
    v = verdict(window((3000, 300), (7000, 7), percent=10.0))
    assert v.ratio is not None and v.ratio.mismatch
    assert v.decision == "rollback"


def test_windows_without_one_percent_are_not_split_checked() -> None:
    v = verdict(window((500, 0), (9500, 0)))  # percent None: changed during the window
    assert v.ratio is None and v.decision == "pass"
    assert v.notes == ("no window had one percent throughout; the split was not checked",)
    # At 100% (or 0%) the window is counted but carries no information.
    v100 = verdict(window((500, 0), (0, 0), percent=100.0))
    assert v100.ratio is not None and v100.ratio.e_value == pytest.approx(1.0)
    assert v100.decision == "pass" and v100.errors.ratio is None


def test_the_split_check_only_uses_windows_with_a_percent() -> None:
    v = verdict(
        window((500, 0), (9500, 0), start=0.0),  # would be a mismatch at 10%
        window((100, 0), (900, 0), start=10.0, percent=10.0),
    )
    assert v.ratio is not None and not v.ratio.mismatch
    assert (v.ratio.canary_requests, v.ratio.expected_requests) == (100, 100.0)


def latency_window(canary_slow: int, baseline_slow: int, errors: tuple[int, int] = (0, 0)) -> Window:
    new = counts("new", 100, errors[0], buckets={J: 100 - canary_slow, SLOW: canary_slow})
    old = counts("old", 900, errors[1], buckets={J: 900 - baseline_slow, SLOW: baseline_slow})
    return Window(0.0, old, new, 10.0)


def test_latency_harm_is_a_rollback_with_its_sentence() -> None:
    v = verdict(latency_window(40, 10), latency_objective=0.25)
    assert v.latency is not None and v.latency.harm and not v.errors.harm
    assert (v.latency.canary, v.latency.canary_requests, v.latency.baseline, v.latency.baseline_requests) == (
        40,
        100,
        10,
        900,
    )
    assert v.latency.alpha == pytest.approx(0.025) and v.errors.alpha == pytest.approx(0.025)
    assert v.decision == "rollback"
    assert v.sentence.startswith(
        "rollback: canary 40 requests over 258 ms / 100 requests vs baseline 10 / 900 at 10% of traffic; "
        "harm is certain at alpha 0.025 (e-value "
    )


def test_errors_are_reported_first_when_both_harm() -> None:
    v = verdict(latency_window(40, 10, errors=(20, 2)), latency_objective=0.25)
    assert v.errors.harm and v.latency is not None and v.latency.harm
    assert v.sentence.startswith("rollback: canary 20 errors / 100 requests")


def test_the_latency_weight_splits_alpha() -> None:
    v = verdict(latency_window(0, 0), latency_objective=0.25, alpha=0.01, latency_weight=0.2)
    assert v.latency is not None
    assert v.latency.alpha == pytest.approx(0.002) and v.errors.alpha == pytest.approx(0.008)
    assert verdict(latency_window(0, 0), alpha=0.01).errors.alpha == 0.01  # no latency test: all of it


def test_no_latency_objective_no_latency_test() -> None:
    v = verdict(latency_window(40, 10))
    assert v.latency is None and v.decision == "pass"


def tail_window(canary: dict[int, int]) -> Window:
    old = counts("old", 1000, 0, buckets={250: 1000})
    new = counts("new", sum(canary.values()), 0, buckets=canary)
    return Window(0.0, old, new, 10.0)


def test_tails_are_noted_not_judged() -> None:
    v = verdict(tail_window({250: 90, 268: 10}))
    assert v.decision == "pass"
    p95, p99 = v.notes
    assert p95.startswith("the canary's p95 is 1.99x the baseline's (360 ms vs 181 ms")
    assert p99.startswith("the canary's p99 is 2.02x the baseline's (366 ms vs 181 ms")
    assert v.new.p95 is not None and v.old.p95 is not None
    assert f"{v.new.p95 / v.old.p95:.2f}x" in p95


def test_only_the_tail_that_grew_is_noted() -> None:
    v = verdict(tail_window({250: 98, 268: 2}))  # p95 in the baseline's bucket, p99 not
    assert len(v.notes) == 1 and v.notes[0].startswith("the canary's p99 is ")
    assert verdict(tail_window({250: 90, 268: 10}), tail_ratio=3.0).notes == ()
    assert verdict(tail_window({250: 100})).notes == ()


# -- judge and running ----------------------------------------------------------------


def random_windows(seed: int, n: int = 40) -> list[Window]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        nc, nb = rng.randrange(0, 60), rng.randrange(0, 500)
        new = counts(
            "new",
            nc,
            rng.randrange(0, 4),
            start=i * 10,
            buckets={bucket(0.1): nc // 2, bucket(0.3): nc - nc // 2},
        )
        old = counts(
            "old", nb, rng.randrange(0, 6), start=i * 10, buckets={bucket(0.1): nb - nb // 5, SLOW: nb // 5}
        )
        out.append(Window(float(i * 10), old, new, rng.choice([None, 10.0, 12.0])))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_judge_equals_running_fed_window_by_window(seed: int) -> None:
    ws = random_windows(seed)
    analysis = Analysis(latency_objective=0.25)
    running = analysis.running()
    assert running.verdict() == analysis.judge([])
    assert running.last is None
    for i, w in enumerate(ws):
        running.add(w)
        assert running.verdict() == analysis.judge(ws[: i + 1])
    assert running.windows == len(ws) and running.last == ws[-1].start
    shuffled = ws[:]
    random.Random(seed).shuffle(shuffled)
    assert analysis.judge(shuffled) == running.verdict()  # any order: judge sorts
    assert running.verdict().windows == len(ws)


def test_the_verdict_sums_both_variants() -> None:
    ws = random_windows(5)
    v = Analysis().judge(ws)
    assert v.new.requests == sum(w.new.requests for w in ws)
    assert v.old.errors == sum(w.old.errors for w in ws)
    assert v.share == pytest.approx(v.new.requests / (v.new.requests + v.old.requests))


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"alpha": math.nan}, "alpha=nan"),
        ({"alpha": math.inf}, "alpha=inf"),
        ({"alpha": True}, "alpha=True"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": 1}, "alpha=1"),
        ({"alpha": -0.05}, "alpha=-0.05"),
        ({"alpha": "0.05"}, "alpha='0.05'"),
        ({"ratio_alpha": 0.0}, "ratio_alpha=0.0"),
        ({"ratio_alpha": 1.5}, "ratio_alpha=1.5"),
        ({"latency_weight": 1.0}, "latency_weight=1.0"),
        ({"latency_weight": math.nan}, "latency_weight=nan"),
        ({"min_requests": 0}, "min_requests=0"),
        ({"min_requests": -5}, "min_requests=-5"),
        ({"min_requests": True}, "min_requests=True"),
        ({"min_requests": 50.0}, "min_requests=50.0"),
        ({"latency_objective": 0}, "latency_objective=0"),
        ({"latency_objective": -0.1}, "latency_objective=-0.1"),
        ({"latency_objective": math.nan}, "latency_objective=nan"),
        ({"latency_objective": math.inf}, "latency_objective=inf"),
        ({"latency_objective": False}, "latency_objective=False"),
        ({"tail_ratio": 0.9}, "tail_ratio=0.9"),
        ({"tail_ratio": math.inf}, "tail_ratio=inf"),
        ({"harm_ratios": []}, "harm_ratios=[]"),
        ({"harm_ratios": [(1.0, 1.0)]}, "harm_ratios=[(1.0, 1.0)]"),
        ({"harm_ratios": [(0.5, 1.0)]}, "harm_ratios=[(0.5, 1.0)]"),
        ({"harm_ratios": [(2.0, 0.0)]}, "harm_ratios=[(2.0, 0.0)]"),
        ({"harm_ratios": [(2.0, 1.0), (math.inf, 1.0)]}, "harm_ratios="),
        ({"harm_ratios": [(2.0, math.nan)]}, "harm_ratios="),
    ],
)
def test_invalid_arguments_raise_a_sentence(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=r"^Analysis got .*; use .*\.$") as info:
        Analysis(**kw)
    assert needle in str(info.value)


def test_valid_arguments_are_kept() -> None:
    a = Analysis(alpha=0.01, min_requests=1, ratio_alpha=0.0001, tail_ratio=1, harm_ratios=[(2, 1), (4, 3)])
    assert (a.alpha, a.min_requests, a.ratio_alpha, a.tail_ratio) == (0.01, 1, 0.0001, 1.0)
    assert a.harm_ratios == ((2.0, 1.0), (4.0, 3.0))  # as given, so stored settings rebuild it exactly
    # The weights weigh relative to each other: the evidence is that of the normalised mixture.
    raw, normal = Evidence(a.harm_ratios), Evidence([(2.0, 0.25), (4.0, 0.75)])
    raw.add(0.1, 3, 20)
    normal.add(0.1, 3, 20)
    assert raw.e_value == pytest.approx(normal.e_value, rel=1e-12)
    assert a.latency_objective is None
    assert repr(a) == "Analysis(alpha=0.01, min_requests=1, latency_objective=None)"


def test_the_latency_objective_is_rounded_up_to_a_bucket_edge() -> None:
    a = Analysis(latency_objective=0.25)
    assert a.latency_objective == EDGE_250
    j = bucket(0.25)
    assert _bucket_bounds(j)[1] == EDGE_250  # an edge...
    assert _bucket_bounds(j)[0] < 0.25 <= EDGE_250  # ...the first at or above the objective
    assert Analysis(latency_objective=EDGE_250).latency_objective == EDGE_250  # an edge stays
    assert Analysis(latency_objective=1e-7).latency_objective == 1e-5  # the first bucket's edge
    for seconds in (0.001, 0.05, 0.3, 1.0, 2.5, 30.0):
        edge = Analysis(latency_objective=seconds).latency_objective
        assert edge is not None and seconds <= edge < seconds * 1.0401


def test_a_request_just_above_the_objective_is_slow_at_every_bucket_edge() -> None:
    """Every edge an objective can round to: the bucket right above it counts as slow, the
    one below it does not (for example a 1.03 s request with an objective of 1 s)."""
    for j in range(1, 500):
        objective = Analysis(latency_objective=_bucket_bounds(j)[1]).latency_objective
        assert objective is not None
        got = slow_count(counts("new", 3, buckets={j: 1, j + 1: 10, j + 2: 100}), objective)
        assert got == 110, f"bucket edge {j} ({objective} s): {got} slow"


def test_a_slow_request_at_a_1_second_objective() -> None:
    new = counts("new", 100, buckets={bucket(0.5): 90, bucket(1.03): 10})
    old = counts("old", 900, buckets={bucket(0.5): 900})
    v = verdict(Window(0.0, old, new, None), latency_objective=1.0)
    assert v.latency is not None and v.latency.canary == 10


# -- windows from a store's counters ---------------------------------------------------


def test_windows_from_counts_groups_sums_and_sorts() -> None:
    got = windows_from_counts(
        [
            counts("new", 5, 1, start=20, buckets={3: 5}),
            counts("old", 50, 2, start=0),
            counts("new", 7, 0, start=0),
            counts("new", 3, 1, start=20, buckets={3: 2, 4: 1}),  # another process, same window
            counts("old", 40, 0, start=20),
            counts("old", 60, 1, start=10),  # no canary in this window
        ]
    )
    assert [w.start for w in got] == [0.0, 10.0, 20.0]
    assert all(isinstance(w.start, float) for w in got)
    assert [(w.old.requests, w.new.requests) for w in got] == [(50, 7), (60, 0), (40, 8)]
    assert got[2].new.errors == 2 and got[2].new.buckets == {3: 7, 4: 1}
    assert got[1].new.errors == 0 and got[1].new.variant == "new" and got[1].new.window == 10
    assert [w.percent for w in got] == [None, None, None]
    assert windows_from_counts([]) == []


def test_windows_from_counts_fills_a_missing_baseline_and_applies_percents() -> None:
    got = windows_from_counts(
        [counts("new", 5, start=30), counts("old", 9, start=40), counts("new", 1, start=40)],
        {30: 100.0, 40: 25.0, 50: 5.0},
    )
    assert [(w.start, w.percent) for w in got] == [(30.0, 100.0), (40.0, 25.0)]
    assert (got[0].old.requests, got[0].old.variant, got[0].old.window) == (0, "old", 30)
    assert windows_from_counts([counts("new", 5, start=30)], {})[0].percent is None


def test_windows_from_counts_do_not_change_their_input() -> None:
    a = counts("new", 5, 1, start=0, buckets={1: 5})
    b = counts("new", 3, 0, start=0, buckets={1: 3})
    windows_from_counts([a, b])
    assert (a.requests, a.buckets, b.requests) == (5, {1: 5}, 3)


def test_harm_and_mismatch_start_at_exactly_1_over_alpha() -> None:
    assert HarmTest("errors", 0, 0, 0, 0, None, 4.0, 0.25).harm
    assert not HarmTest("errors", 0, 0, 0, 0, None, math.nextafter(4.0, 0), 0.25).harm
    assert RatioCheck(0, 0.0, 1000.0, 0.001).mismatch == (1000.0 >= 1 / 0.001)
    assert RatioCheck(0, 0.0, 4.0, 0.25).mismatch
    assert not RatioCheck(0, 0.0, math.nextafter(4.0, 0), 0.25).mismatch
