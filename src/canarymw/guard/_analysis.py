"""Canary-vs-baseline analysis: anytime-valid tests on per-window counts (sans-IO).

The error test conditions on the errors of each window: under "no harm" an error is
the canary's with probability ``pi`` (the canary's share of the window's requests),
whatever the baseline's rate is that window; under harm the canary's rate is ``r``
times the baseline's, so the odds of an error being the canary's grow ``r``-fold. The
likelihood ratio of ``r`` against ``r = 1`` is a test martingale per error, a weighted
mixture of them over a grid of ``r`` is one too, and by Ville's inequality it exceeds
``1/alpha`` with probability at most ``alpha`` under no harm, however often one looks.
Windows with changing load, split or baseline rate are each compared within
themselves; nothing compares totals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..sinks.memory import _bucket_bounds
from ..store._model import Counts
from ..store._stats import VariantSummary, _summary

Decision = Literal["rollback", "pause", "pass", "wait"]

HARM_RATIOS: tuple[tuple[float, float], ...] = ((1.5, 0.1), (2.0, 0.45), (3.0, 0.2), (5.0, 0.15), (10.0, 0.1))
"""The default mixture of the harm tests: (rate ratio, weight) pairs. Most weight sits
on a doubling, which is the regression a canary at a few percent exists to catch
early; the larger ratios make a grave regression stop sooner."""

SRM_RATIOS: tuple[tuple[float, float], ...] = tuple(
    (r, 1.0 / 8) for r in (0.5, 0.8, 0.9, 0.95, 1 / 0.95, 1 / 0.9, 1 / 0.8, 2.0)
)
"""The mixture of the sample-ratio test: odds ratios of the canary's share of requests
against the configured one, both ways."""


@dataclass(frozen=True)
class Window:
    """What both variants saw in one time window, as the analysis takes it.

    ``percent`` is the share of cohorts configured for ``new`` during the whole window,
    or None if it changed within it (such a window is left out of the sample-ratio
    check only).
    """

    start: float
    old: Counts
    new: Counts
    percent: float | None = None


@dataclass(frozen=True)
class Test:
    """One anytime-valid one-sided test of harm: the canary's count against the baseline's."""

    name: str
    """``errors`` or ``latency``."""
    canary: int
    """Events (errors, or requests over the objective) of the canary."""
    canary_requests: int
    baseline: int
    baseline_requests: int
    ratio: float | None
    """Estimated canary/baseline rate ratio over the windows (Mantel-Haenszel), None
    without events or without requests on one side."""
    e_value: float
    """Evidence of harm: the mixture likelihood ratio. Under no harm it exceeds
    ``1/alpha`` with probability at most ``alpha`` at any time."""
    alpha: float
    """The level this test was held to (its share of the analysis's alpha)."""

    @property
    def harm(self) -> bool:
        """Whether the evidence of harm crossed ``1/alpha``."""
        return self.e_value >= 1.0 / self.alpha


@dataclass(frozen=True)
class RatioCheck:
    """The sample-ratio check: did each variant get the share of requests it was configured for?"""

    canary_requests: int
    expected_requests: float
    """What the canary should have received at the configured percents (same windows)."""
    e_value: float
    alpha: float
    dispersion: float | None = None
    """How many times more the canary's request count varies than independent requests
    would (an upper estimate; visitors making several requests raise it); None before
    any window."""
    judging: bool = False
    """Whether the check has learnt the spread from enough windows to judge finely
    (before, it assumes a large spread and catches only a gross mismatch)."""

    @property
    def mismatch(self) -> bool:
        return self.e_value >= 1.0 / self.alpha


@dataclass(frozen=True)
class Verdict:
    """The analysis's answer: a decision, its numbers, and one sentence saying why.

    ``decision``: ``rollback`` (harm is established), ``pause`` (a health check
    failed: the split is not what it should be), ``pass`` (enough exposure and no
    harm found) or ``wait`` (not enough exposure yet, or no traffic at all: no
    traffic is never a pass and never a failure).
    """

    decision: Decision
    sentence: str
    errors: Test
    latency: Test | None
    ratio: RatioCheck | None
    old: VariantSummary
    new: VariantSummary
    share: float | None
    """The canary's share of requests over the windows judged (None without requests)."""
    windows: int
    """Windows judged."""
    notes: tuple[str, ...] = field(default=())
    """What else is worth saying (a tail that grew, a check that could not run)."""


def _fmt_n(n: float) -> str:
    return f"{n:,.0f}"


def _fmt_e(e: float) -> str:
    if e >= 1e6:
        return f"{e:.1e}"
    return f"{e:.3g}" if e < 100 else f"{e:,.0f}"


class Evidence:
    """A mixture likelihood ratio of a conditional binomial, grown one window at a time.

    Per window ``add(pi, k, m)``: ``k`` of ``k + m`` events fell on the side that had
    share ``pi`` of the requests. :attr:`e_value` is the weighted mixture over
    ``ratios`` (odds ratios, with weights summing to 1) of the likelihood ratios of
    "the odds are ``r`` times higher" against "the odds are as the shares say". It is
    a test martingale under the null: its chance of ever reaching ``1/alpha`` is at
    most ``alpha``. For simulations and custom pipelines; :class:`Analysis` uses it.
    """

    __slots__ = ("_logs", "_steps")

    def __init__(self, ratios: Sequence[tuple[float, float]] = HARM_RATIOS) -> None:
        total = sum(w for _, w in ratios)
        self._steps = [(float(r), math.log(float(r))) for r, _ in ratios]
        self._logs = [math.log(w / total) for _, w in ratios]

    def add(self, pi: float, k: float, m: float) -> None:
        """Take one window's events: ``k`` on the side with share ``pi``, ``m`` on the other
        (fractional counts weigh a window less: a quasi-likelihood for overdispersed ones)."""
        if not (k or m) or not 0.0 < pi < 1.0:
            return  # no events, or one side had no requests: no information
        logs = self._logs
        for i, (r, log_r) in enumerate(self._steps):
            # log(q/pi) and log((1-q)/(1-pi)) with q = pi*r / (pi*r + 1 - pi)
            log_den = math.log(pi * r + 1.0 - pi)
            logs[i] += k * (log_r - log_den) - m * log_den

    @property
    def e_value(self) -> float:
        """The evidence so far (1 before any event)."""
        logs = self._logs
        top = max(logs)
        try:
            return math.exp(top + math.log(sum(math.exp(v - top) for v in logs)))
        except OverflowError:
            return math.inf


class _Harm:
    # The one-sided harm test, one window at a time: is the canary's event rate higher?
    __slots__ = ("alpha", "ev", "kb", "kc", "mh_den", "mh_num", "name", "nb", "nc")

    def __init__(self, name: str, alpha: float, ratios: Sequence[tuple[float, float]]) -> None:
        self.name = name
        self.alpha = alpha
        self.ev = Evidence(ratios)
        self.kc = self.nc = self.kb = self.nb = 0
        self.mh_num = self.mh_den = 0.0

    def add(self, kc: int, nc: int, kb: int, nb: int) -> None:
        self.kc += kc
        self.nc += nc
        self.kb += kb
        self.nb += nb
        if nc > 0 and nb > 0:  # else the window says nothing about the ratio
            n = nc + nb
            self.mh_num += kc * nb / n
            self.mh_den += kb * nc / n
            self.ev.add(nc / n, kc, kb)

    def result(self) -> Test:
        ratio = self.mh_num / self.mh_den if self.mh_den > 0 else None
        return Test(self.name, self.kc, self.nc, self.kb, self.nb, ratio, self.ev.e_value, self.alpha)


RATIO_WARMUP = 20
"""Windows whose spread the sample-ratio check learns from before it judges finely."""
COARSE_DISPERSION = 50.0
"""The spread assumed until then (a visitor making up to about 50 requests in a window):
only a gross mismatch, such as a variant that gets no requests at all, pauses early."""


class _Ratio:
    # The two-sided sample-ratio check, one window at a time. Requests are not
    # independent draws: a visitor's requests all go to one variant, so the canary's
    # count varies more than a binomial's (about the requests per visitor in a window
    # times more). The check learns that spread (the dispersion) from earlier windows,
    # around the share each percent actually got so that a real mismatch does not pass
    # for spread, and tempers each window's likelihood by it (quasi-likelihood). It
    # judges only after RATIO_WARMUP windows, with an upper bound of the dispersion.
    __slots__ = ("alpha", "ev", "expected", "got", "pooled", "spread", "spread_n", "windows")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.ev = Evidence(SRM_RATIOS)
        self.got = 0
        self.expected = 0.0
        self.windows = 0
        self.spread = 0.0  # sum of squared standardised residuals
        self.spread_n = 0
        self.pooled: dict[float, tuple[int, int]] = {}  # share -> (canary, all) requests so far

    def dispersion(self) -> float:
        """Upper estimate of the variance of the canary's count over a binomial's (>= 1)."""
        n = self.spread_n
        if n == 0:
            return math.inf
        # Five windows' worth of "no extra spread" as a prior, and a margin that shrinks
        # as windows accumulate: an underestimate would raise false pauses.
        return max(1.0, (self.spread + 5.0) / (n + 5)) * (1.0 + 2.0 / math.sqrt(n))

    def add(self, k: int, n: int, share: float) -> None:
        self.windows += 1
        self.got += k
        self.expected += n * share
        if n <= 0 or not 0.0 < share < 1.0:
            return
        phi = self.dispersion()
        if self.spread_n < RATIO_WARMUP:
            phi = max(phi, COARSE_DISPERSION) if math.isfinite(phi) else COARSE_DISPERSION
        self.ev.add(share, k / phi, (n - k) / phi)
        seen_k, seen_n = self.pooled.get(share, (0, 0))
        q = (seen_k + 0.5) / (seen_n + 1.0) if seen_n else share
        if 0.0 < q < 1.0:
            self.spread += (k - n * q) ** 2 / (n * q * (1.0 - q))
            self.spread_n += 1
        self.pooled[share] = (seen_k + k, seen_n + n)

    def result(self) -> RatioCheck | None:
        if not self.windows:
            return None
        judged = self.spread_n > RATIO_WARMUP
        return RatioCheck(
            self.got,
            self.expected,
            self.ev.e_value,
            self.alpha,
            self.dispersion() if self.spread_n else None,
            judged,
        )


def slow_count(counts: Counts, objective: float) -> int:
    """Outcomes of ``counts`` whose latency bucket lies wholly above ``objective`` seconds."""
    return sum(n for i, n in counts.buckets.items() if i > 0 and _bucket_bounds(i - 1)[1] >= objective)


class Analysis:
    """Judges canary (``new``) against baseline (``old``) from per-window counts.

    Sans-IO and deterministic: feed it :class:`Window` objects (from a store's
    counters, or from your own metrics system) and read the :class:`Verdict`. Looking
    as often as you like is safe: every test is anytime-valid.

    Args:
        alpha: The chance of a false rollback the analysis allows over the whole life
            of the rollout, at every look. Split among the harm tests in use (errors,
            and latency when ``latency_objective`` is set) in proportion to ``weights``.
        min_requests: Canary requests needed before any decision (``rollback``,
            ``pause`` or ``pass``); before that the verdict is ``wait``.
        latency_objective: Seconds; a request slower than this counts as slow, and a
            canary with a larger share of slow requests than the baseline (in the same
            windows) is harm. Rounded up to the next edge of the 4% latency buckets.
            None: latency is not tested (its tails are still reported).
        latency_weight: The share of ``alpha`` given to the latency test when it runs.
        ratio_alpha: Level of the sample-ratio check (a mismatch pauses, never rolls
            back). The check learns how much more than independent draws the request
            counts vary (visitors make several requests, all to one variant) over its
            first 20 windows; until then only a gross mismatch pauses.
        tail_ratio: Above this ratio of the canary's p99 to the baseline's, the verdict
            notes it (the tails are described, not tested: a tail is a few requests).
        harm_ratios: The mixture of rate ratios the harm tests bet on, as (ratio,
            weight) pairs; only the weights' proportions matter.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        min_requests: int = 50,
        latency_objective: float | None = None,
        latency_weight: float = 0.5,
        ratio_alpha: float = 0.001,
        tail_ratio: float = 1.25,
        harm_ratios: Sequence[tuple[float, float]] = HARM_RATIOS,
    ) -> None:
        for label, value in (
            ("alpha", alpha),
            ("ratio_alpha", ratio_alpha),
            ("latency_weight", latency_weight),
        ):
            if not _finite(value) or not 0.0 < float(value) < 1.0:
                raise ValueError(f"Analysis got {label}={value!r}; use a number between 0 and 1 (exclusive).")
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
            raise ValueError(f"Analysis got min_requests={min_requests!r}; use a whole number of at least 1.")
        if latency_objective is not None and (not _finite(latency_objective) or latency_objective <= 0):
            raise ValueError(
                f"Analysis got latency_objective={latency_objective!r}; use seconds above 0, or None."
            )
        if not _finite(tail_ratio) or tail_ratio < 1.0:
            raise ValueError(f"Analysis got tail_ratio={tail_ratio!r}; use a number of at least 1.")
        pairs = [(float(r), float(w)) for r, w in harm_ratios]
        if not pairs or any(not (_finite(r) and r > 1.0 and _finite(w) and w > 0) for r, w in pairs):
            raise ValueError(
                f"Analysis got harm_ratios={harm_ratios!r}; use (ratio above 1, weight above 0) pairs."
            )
        self.alpha = float(alpha)
        self.min_requests = min_requests
        self.latency_objective = None if latency_objective is None else _bucket_edge(float(latency_objective))
        """The objective in force: the one given, rounded up to a bucket edge."""
        self.latency_weight = float(latency_weight)
        self.ratio_alpha = float(ratio_alpha)
        self.tail_ratio = float(tail_ratio)
        self.harm_ratios = tuple(pairs)
        """The (ratio, weight) pairs as given; :class:`Evidence` normalises the weights (kept
        as given, so the settings a store holds rebuild the very same analysis)."""

    def __repr__(self) -> str:
        return (
            f"Analysis(alpha={self.alpha:g}, min_requests={self.min_requests}, "
            f"latency_objective={self.latency_objective})"
        )

    def judge(self, windows: Iterable[Window]) -> Verdict:
        """The verdict on these windows (any order; each window is compared within itself)."""
        running = self.running()
        for w in sorted(windows, key=lambda w: w.start):
            running.add(w)
        return running.verdict()

    def running(self) -> Judgement:
        """An incremental judgement: add windows as they close, read the verdict at any
        time. The same verdict as :meth:`judge` on the same windows, without going over
        the old windows again (a rollout guarded for a week has 60,000 of them)."""
        return Judgement(self)

    def _decide(
        self,
        errors: Test,
        latency: Test | None,
        ratio: RatioCheck | None,
        old: VariantSummary,
        new: VariantSummary,
        share: float | None,
    ) -> tuple[Decision, str]:
        at = "" if share is None else f" at {share * 100:.3g}% of traffic"
        if new.requests == 0:
            if old.requests == 0:
                return "wait", "wait: no traffic yet; no traffic is neither a pass nor a failure"
            return "wait", (
                f"wait: the canary has had no requests (baseline {_fmt_n(old.requests)}); "
                "no traffic is neither a pass nor a failure"
            )
        if new.requests < self.min_requests:
            return "wait", (
                f"wait: the canary has had {_fmt_n(new.requests)} of the {_fmt_n(self.min_requests)} "
                "requests needed before any decision"
            )
        for test in (errors, latency):
            if test is not None and test.harm:
                what = (
                    "errors" if test.name == "errors" else f"requests over {_fmt_s(self.latency_objective)}"
                )
                return "rollback", (
                    f"rollback: canary {_fmt_n(test.canary)} {what} / "
                    f"{_fmt_n(test.canary_requests)} requests "
                    f"vs baseline {_fmt_n(test.baseline)} / {_fmt_n(test.baseline_requests)}{at}; "
                    f"harm is certain at alpha {test.alpha:g} (e-value {_fmt_e(test.e_value)})"
                )
        if ratio is not None and ratio.mismatch:
            return "pause", (
                f"pause: the canary got {_fmt_n(ratio.canary_requests)} requests where its percent "
                f"called for {_fmt_n(ratio.expected_requests)}; the split is not what it should be "
                f"(sample-ratio mismatch at alpha {ratio.alpha:g}, e-value {_fmt_e(ratio.e_value)})"
            )
        found = (
            f"canary {_fmt_n(errors.canary)} errors / {_fmt_n(errors.canary_requests)} requests vs baseline "
            f"{_fmt_n(errors.baseline)} / {_fmt_n(errors.baseline_requests)}{at}"
        )
        return (
            "pass",
            f"pass: {found}; no harm found at alpha {self.alpha:g} (e-value {_fmt_e(errors.e_value)})",
        )

    def _notes(
        self, old: VariantSummary, new: VariantSummary, ratio: RatioCheck | None, objective: float | None
    ) -> tuple[str, ...]:
        notes = []
        for q in ("p95", "p99"):
            a, b = getattr(old, q), getattr(new, q)
            if a and b and b / a >= self.tail_ratio:
                notes.append(f"the canary's {q} is {b / a:.2f}x the baseline's ({_fmt_s(b)} vs {_fmt_s(a)})")
        if ratio is None and new.requests:
            notes.append("no window had one percent throughout; the split was not checked")
        return tuple(notes)


class Judgement:
    """Windows judged so far by an :class:`Analysis` (see :meth:`Analysis.running`)."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        objective = analysis.latency_objective
        lat_alpha = analysis.alpha * analysis.latency_weight if objective is not None else 0.0
        self._errors = _Harm("errors", analysis.alpha - lat_alpha, analysis.harm_ratios)
        self._latency = None if objective is None else _Harm("latency", lat_alpha, analysis.harm_ratios)
        self._ratio = _Ratio(analysis.ratio_alpha)
        self._old = Counts("", "old", 0)
        self._new = Counts("", "new", 0)
        self.windows = 0
        """Windows added."""
        self.last: float | None = None
        """The start of the newest window added (None before the first)."""

    def add(self, window: Window) -> None:
        """Take one more window (each window once; a window is compared within itself)."""
        old, new = window.old, window.new
        self._errors.add(new.errors, new.requests, old.errors, old.requests)
        objective = self.analysis.latency_objective
        if self._latency is not None and objective is not None:
            self._latency.add(
                slow_count(new, objective), new.requests, slow_count(old, objective), old.requests
            )
        if window.percent is not None:
            self._ratio.add(new.requests, new.requests + old.requests, window.percent / 100.0)
        self._old.add(old)
        self._new.add(new)
        self.windows += 1
        self.last = window.start if self.last is None else max(self.last, window.start)

    def verdict(self) -> Verdict:
        """The verdict on the windows added so far."""
        a = self.analysis
        errors = self._errors.result()
        latency = None if self._latency is None else self._latency.result()
        ratio = self._ratio.result()
        s_old, s_new = _summary(self._old), _summary(self._new)
        n = s_old.requests + s_new.requests
        share = s_new.requests / n if n else None
        notes = a._notes(s_old, s_new, ratio, a.latency_objective)
        decision, sentence = a._decide(errors, latency, ratio, s_old, s_new, share)
        return Verdict(decision, sentence, errors, latency, ratio, s_old, s_new, share, self.windows, notes)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _bucket_edge(seconds: float) -> float:
    i = 0
    while _bucket_bounds(i)[1] < seconds:
        i += 1
    return _bucket_bounds(i)[1]


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def windows_from_counts(
    counts: Iterable[Counts], percents: Mapping[int, float] | None = None
) -> list[Window]:
    """Group a store's counters of one rollout into :class:`Window` objects, oldest first.

    ``percents`` maps a window's start to the percent in force during all of it
    (windows absent from it get None: the split is not checked there).
    """
    by: dict[int, dict[str, Counts]] = {}
    for c in counts:
        if c.variant not in ("old", "new"):
            continue  # shadow comparisons are not requests: no window of theirs is judged
        held = by.setdefault(c.window, {}).setdefault(c.variant, Counts(c.rollout, c.variant, c.window))
        held.add(c)
    out = []
    for start in sorted(by):
        per = by[start]
        old = per.get("old") or Counts("", "old", start)
        new = per.get("new") or Counts("", "new", start)
        out.append(Window(float(start), old, new, None if percents is None else percents.get(start)))
    return out
