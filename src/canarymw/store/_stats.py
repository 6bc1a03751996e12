"""Per-variant numbers from a store's outcome counters, as ``canarymw status`` shows them.

The counters of every process and window are summed first, then the quantiles are read
from the summed latency histogram, so they describe the whole service over the window
(to the 4% resolution of the buckets of :class:`~canarymw.MemorySink`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

from ..sinks.memory import _bucket_bounds, _quantile
from ._model import Counts

VARIANTS = ("old", "new")
"""The variants every rollout's summary holds, with or without traffic."""
SHADOW = "shadow"
"""The variant the counters of shadow comparisons are kept under (see
:meth:`StoreSink.record_comparison <canarymw.sinks.store.StoreSink.record_comparison>`):
no request is routed to it, so success rates, blended estimates and the guard leave it
out. Its ``errors`` are mismatches, ``exceptions`` the shadow's failures and timeouts,
``disconnects`` the copies dropped."""


@dataclass(frozen=True)
class VariantSummary:
    """The outcomes of one variant of one rollout, summed over windows and processes.

    Without requests the counts are 0 and the rates and latencies None (no traffic is
    not a success rate of 100%). Latencies are in seconds.
    """

    requests: int
    errors: int
    """Outcomes judged unsuccessful (5xx, exceptions, no response)."""
    exceptions: int
    disconnects: int
    error_rate: float | None
    """errors / requests; None without requests."""
    success_rate: float | None
    """1 - error_rate; None without requests."""
    latency_mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


_EMPTY = VariantSummary(0, 0, 0, 0, None, None, None, None, None, None)


def _summary(total: Counts) -> VariantSummary:
    n = total.requests
    if n <= 0:
        return _EMPTY
    buckets = {i: c for i, c in total.buckets.items() if c > 0}
    error_rate = total.errors / n
    p50 = p95 = p99 = None
    if buckets:
        # Clamp to what the buckets say was observed: no quantile below the lowest
        # non-empty bucket or above the highest one.
        low = _bucket_bounds(min(buckets))[0]
        high = _bucket_bounds(max(buckets))[1]
        # The histogram's own total: a process that counted a request without a
        # latency (none measured) must not shift the ranks.
        counted = sum(buckets.values())
        p50 = _quantile(buckets, counted, 0.50, low, high)
        p95 = _quantile(buckets, counted, 0.95, low, high)
        p99 = _quantile(buckets, counted, 0.99, low, high)
    return VariantSummary(
        requests=n,
        errors=total.errors,
        exceptions=total.exceptions,
        disconnects=total.disconnects,
        error_rate=error_rate,
        success_rate=1.0 - error_rate,
        latency_mean=total.latency_sum / n,
        p50=p50,
        p95=p95,
        p99=p99,
    )


def summarize(counts: Iterable[Counts], names: Iterable[str] = ()) -> dict[str, dict[str, VariantSummary]]:
    """Sum ``counts`` (any windows, any processes) into one summary per rollout and variant.

    Returns ``{rollout: {variant: VariantSummary}}``. Every rollout in ``counts`` or in
    ``names`` is present, and each has at least the variants ``old`` and ``new`` (empty
    ones without traffic), first; any other variant follows, sorted by name.
    """
    totals: dict[str, dict[str, Counts]] = {name: {} for name in names}
    for c in counts:
        per = totals.setdefault(c.rollout, {})
        total = per.get(c.variant)
        if total is None:
            total = per[c.variant] = Counts(c.rollout, c.variant, c.window)
        total.add(c)
    out: dict[str, dict[str, VariantSummary]] = {}
    for rollout in sorted(totals):
        per = totals[rollout]
        variants = [*VARIANTS, *sorted(per.keys() - set(VARIANTS))]
        out[rollout] = {v: _summary(per[v]) if v in per else _EMPTY for v in variants}
    return out


def blended(old: VariantSummary, new: VariantSummary, percent: float) -> float | None:
    """The success rate the service would have with ``percent`` of cohorts on ``new``:
    ``s = s_new * w + s_old * (1 - w)`` with ``w = percent / 100``.

    Weighs the variants by the configured split instead of by the traffic that happened
    to arrive, so a bad ``new`` shows at its true share. None when a variant that has
    weight has no requests (nothing to estimate its success rate from).
    """
    w = percent / 100.0
    s_new = new.success_rate
    s_old = old.success_rate
    if (w > 0.0 and s_new is None) or (w < 1.0 and s_old is None):
        return None
    return (s_new or 0.0) * w + (s_old or 0.0) * (1.0 - w)


def blended_interval(
    old: VariantSummary, new: VariantSummary, percent: float, confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """The blended success estimate at ``percent`` with its uncertainty: ``(low, estimate, high)``.

    ``estimate`` is :func:`blended`'s ``s = s_new * w + s_old * (1 - w)`` with
    ``w = percent / 100``; ``low`` and ``high`` bound it at ``confidence`` (two-sided)
    by the normal approximation ``estimate -/+ z * sqrt(w**2 * v_new + (1 - w)**2 * v_old)``.
    Each variant's variance is Agresti-Coull's, ``v = p~ (1 - p~) / n~`` with
    ``n~ = n + z**2`` and ``p~ = (successes + z**2 / 2) / n~``: it never vanishes, so a
    canary without a single error in a few requests still gets an interval of honest
    width, not a zero-width certainty. The variants are independent samples, so their
    variances add with the squares of their weights. The bounds are clamped to [0, 1].

    Use it to project the success rate at another percent (the next step of a ramp,
    100%) from the numbers measured at this one: the interval then says how much the
    canary's few requests can tell. None when a variant that has weight has no
    requests (nothing to estimate its success rate from), like :func:`blended`.

    Raises:
        ValueError: ``confidence`` not strictly between 0 and 1, or ``percent`` not
            from 0 to 100.
    """
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise ValueError(
            f"confidence {confidence!r} cannot be used; give a number between 0 and 1 (exclusive)."
        )
    if not (isinstance(percent, int | float) and 0.0 <= percent <= 100.0):
        raise ValueError(f"percent {percent!r} cannot be used; give a number from 0 to 100.")
    estimate = blended(old, new, percent)
    if estimate is None:
        return None
    w = percent / 100.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    variance = 0.0
    for summary, weight in ((new, w), (old, 1.0 - w)):
        if weight > 0.0:
            variance += weight * weight * _adjusted_variance(summary, z)
    spread = z * math.sqrt(variance)
    return max(0.0, estimate - spread), estimate, min(1.0, estimate + spread)


def _adjusted_variance(summary: VariantSummary, z: float) -> float:
    # Agresti-Coull: add z**2 / 2 successes and as many failures, then the binomial variance.
    n = summary.requests + z * z
    p = (summary.requests - summary.errors + z * z / 2.0) / n
    return p * (1.0 - p) / n


def measured(summaries: Iterable[VariantSummary]) -> float | None:
    """The success rate of all requests together (None without any)."""
    requests = errors = 0
    for s in summaries:
        requests += s.requests
        errors += s.errors
    return 1.0 - errors / requests if requests else None


@dataclass(frozen=True)
class ShadowSummary:
    """The shadow comparisons of one rollout, summed over windows and processes.

    Latencies are the shadow's (seconds), over the copies it answered or failed.
    """

    copies: int
    """Copies sent or dropped."""
    compared: int
    """Copies the shadow answered, compared with the primary: matches and mismatches."""
    mismatches: int
    failures: int
    """The shadow raised, failed or timed out."""
    dropped: int
    """Never sent: the queue was full."""
    mismatch_rate: float | None
    """mismatches / compared; None before the first comparison."""
    p50: float | None
    p95: float | None


def shadow_summary(summary: VariantSummary) -> ShadowSummary | None:
    """The counters of the :data:`SHADOW` variant read as comparisons; None without any."""
    if not summary.requests:
        return None
    compared = summary.requests - summary.exceptions - summary.disconnects
    return ShadowSummary(
        copies=summary.requests,
        compared=compared,
        mismatches=summary.errors,
        failures=summary.exceptions,
        dropped=summary.disconnects,
        mismatch_rate=summary.errors / compared if compared > 0 else None,
        p50=summary.p50,
        p95=summary.p95,
    )
