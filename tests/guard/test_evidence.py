"""Evidence: the mixture likelihood ratio of a conditional binomial, checked against the
likelihood ratio computed directly, and its martingale property computed exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from canarymw.guard import HARM_RATIOS, Evidence
from canarymw.guard._analysis import SRM_RATIOS

Cell = tuple[float, int, int]  # (pi, k, m): k of k + m events on the side with share pi

WINDOWS: list[Cell] = [(0.1, 3, 20), (0.05, 0, 41), (0.25, 9, 14), (0.5, 6, 5), (0.01, 1, 90), (0.1, 0, 0)]


def direct_lr(r: float, windows: Sequence[Cell]) -> float:
    """The likelihood ratio of "odds r times the shares' odds" against the shares, straight
    from the binomial likelihoods (not the log form the library uses)."""
    lr = 1.0
    for pi, k, m in windows:
        if not (k or m) or not 0.0 < pi < 1.0:
            continue
        q = pi * r / (pi * r + 1.0 - pi)  # the event's chance of being on pi's side under r
        lr *= (q / pi) ** k * ((1.0 - q) / (1.0 - pi)) ** m
    return lr


def direct_mixture(ratios: Sequence[tuple[float, float]], windows: Sequence[Cell]) -> float:
    total = sum(w for _, w in ratios)
    return math.fsum(w / total * direct_lr(r, windows) for r, w in ratios)


def evidence(ratios: Sequence[tuple[float, float]], windows: Sequence[Cell]) -> float:
    ev = Evidence(ratios)
    for pi, k, m in windows:
        ev.add(pi, k, m)
    return ev.e_value


@pytest.mark.parametrize("r", [1.5, 2.0, 5.0, 0.5, 0.8])
def test_a_single_ratio_is_the_likelihood_ratio(r: float) -> None:
    got = evidence([(r, 1.0)], WINDOWS)
    assert got == pytest.approx(direct_lr(r, WINDOWS), rel=1e-10)
    # And window by window: each add multiplies by that window's ratio.
    ev = Evidence([(r, 1.0)])
    for i, cell in enumerate(WINDOWS):
        ev.add(*cell)
        assert ev.e_value == pytest.approx(direct_lr(r, WINDOWS[: i + 1]), rel=1e-10)


def test_one_event_on_the_canary_side_by_hand() -> None:
    # pi = 0.1, r = 2: q = 0.2 / 1.1; one event on the canary's side gives q / pi = 2 / 1.1.
    assert evidence([(2.0, 1.0)], [(0.1, 1, 0)]) == pytest.approx(2 / 1.1, rel=1e-12)
    # One on the other side: (1 - q) / (1 - pi) = 1 / 1.1.
    assert evidence([(2.0, 1.0)], [(0.1, 0, 1)]) == pytest.approx(1 / 1.1, rel=1e-12)


@pytest.mark.parametrize(
    "ratios",
    [HARM_RATIOS, SRM_RATIOS, ((2.0, 3.0), (4.0, 1.0)), ((1.5, 0.2), (10.0, 0.8))],
)
def test_the_mixture_is_the_weighted_mean_of_the_ratios(ratios: Sequence[tuple[float, float]]) -> None:
    got = evidence(ratios, WINDOWS)
    assert got == pytest.approx(direct_mixture(ratios, WINDOWS), rel=1e-10)
    # Not the product nor the mean of the per-window mixtures: the mixture is over whole paths.
    per_window = math.prod(direct_mixture(ratios, [c]) for c in WINDOWS)
    assert not math.isclose(got, per_window, rel_tol=1e-6)


def test_weights_are_normalised() -> None:
    assert evidence([(2.0, 3.0), (4.0, 1.0)], WINDOWS) == pytest.approx(
        evidence([(2.0, 0.75), (4.0, 0.25)], WINDOWS), rel=1e-12
    )


@pytest.mark.parametrize("ratios", [HARM_RATIOS, SRM_RATIOS, ((3.0, 1.0),)])
def test_the_e_value_is_1_before_any_event(ratios: Sequence[tuple[float, float]]) -> None:
    ev = Evidence(ratios)
    assert ev.e_value == pytest.approx(1.0, rel=1e-12)
    ev.add(0.3, 0, 0)  # a window without events
    assert ev.e_value == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("cell", [(0.0, 5, 7), (1.0, 5, 7), (0.2, 0, 0), (-0.1, 3, 0), (1.5, 0, 3)])
def test_windows_without_information_change_nothing(cell: Cell) -> None:
    # pi 0 or 1: one side had no requests; no events: nothing to compare.
    ev = Evidence()
    for c in WINDOWS[:3]:
        ev.add(*c)
    before = ev.e_value
    ev.add(*cell)
    assert ev.e_value == before


def test_events_on_either_side_move_the_evidence_the_right_way() -> None:
    ev = Evidence()
    ev.add(0.1, 0, 30)  # every event on the baseline's side: evidence against harm
    assert ev.e_value < 1.0
    ev2 = Evidence()
    ev2.add(0.1, 5, 5)  # half of the events on a side with 10% of requests: evidence of harm
    assert ev2.e_value > 1.0


def test_the_e_value_does_not_depend_on_the_order_of_the_windows() -> None:
    rng = random.Random(7)
    cells: list[Cell] = [
        (rng.choice([0.01, 0.05, 0.1, 0.5]), rng.randrange(6), rng.randrange(40)) for _ in range(60)
    ]
    expected = evidence(HARM_RATIOS, cells)
    for _ in range(5):
        rng.shuffle(cells)
        assert evidence(HARM_RATIOS, cells) == pytest.approx(expected, rel=1e-9)


def test_overflow_gives_inf_not_an_error() -> None:
    ev = Evidence()
    ev.add(0.01, 1_000_000, 0)  # log e-value in the millions
    assert ev.e_value == math.inf
    ev.add(0.5, 3, 3)  # and it stays usable
    assert ev.e_value == math.inf


def test_underflow_gives_0_not_an_error() -> None:
    ev = Evidence()
    ev.add(0.5, 0, 1_000_000)
    assert ev.e_value == 0.0


def pmf(n: int, k: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1.0 - p) ** (n - k)


@pytest.mark.parametrize("ratios", [HARM_RATIOS, SRM_RATIOS, ((2.0, 1.0),), ((1.2, 0.5), (30.0, 0.5))])
@pytest.mark.parametrize("pi", [0.01, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 2, 7, 40, 150])
def test_the_per_window_ratio_has_expectation_1_under_the_null(
    ratios: Sequence[tuple[float, float]], pi: float, n: int
) -> None:
    """Exact: sum over every k of Binomial(n, pi)'s pmf times the e-value after one window
    of k canary events and n - k baseline ones. 1 means a fair bet: a test martingale."""
    expectation = math.fsum(pmf(n, k, pi) * evidence(ratios, [(pi, k, n - k)]) for k in range(n + 1))
    assert expectation == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("pi", [0.05, 0.3])
def test_the_mixture_is_a_martingale_after_earlier_windows(pi: float) -> None:
    """The mixture's expected next value, given the windows so far, is its current value
    (not just 1): the property Ville's inequality needs."""
    past: list[Cell] = [(0.1, 4, 20), (0.25, 2, 13)]
    now = evidence(HARM_RATIOS, past)
    n = 25
    nxt = math.fsum(pmf(n, k, pi) * evidence(HARM_RATIOS, [*past, (pi, k, n - k)]) for k in range(n + 1))
    assert nxt == pytest.approx(now, rel=1e-9)
    assert now != pytest.approx(1.0)  # the check is not the trivial one


def test_under_harm_the_expectation_grows() -> None:
    # The same sum under a doubled odds: the bet wins on average (it is not a constant 1).
    pi, n, r = 0.1, 40, 2.0
    q = pi * r / (pi * r + 1 - pi)
    grown = math.fsum(pmf(n, k, q) * evidence(HARM_RATIOS, [(pi, k, n - k)]) for k in range(n + 1))
    assert grown > 1.5


def test_the_default_mixtures() -> None:
    assert math.fsum(w for _, w in HARM_RATIOS) == pytest.approx(1.0)
    assert all(r > 1 for r, _ in HARM_RATIOS)
    assert max(HARM_RATIOS, key=lambda p: p[1])[0] == 2.0
    # The sample-ratio mixture bets both ways, symmetrically.
    assert sorted(round(r, 12) for r, _ in SRM_RATIOS) == sorted(round(1 / r, 12) for r, _ in SRM_RATIOS)
