"""Shared helpers of the guard's tests: a fast seeded binomial sampler and window builders."""

from __future__ import annotations

import math
import random
from bisect import bisect_left

from canarymw.guard import Window
from canarymw.sinks.memory import _BOUNDS
from canarymw.store import Counts


def hits(rng: random.Random, n: int, p: float) -> int:
    """Binomial(n, p) by geometric gaps (as bench/bench_guard.py): cost grows with the hits, not n."""
    if p <= 0.0 or n <= 0:
        return 0
    if p >= 1.0:
        return n
    log_q = math.log1p(-p)
    count = 0
    i = -1
    while True:
        i += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if i >= n:
            return count
        count += 1


def bucket(seconds: float) -> int:
    """The latency bucket a store's counters put ``seconds`` in (as StoreSink and MemorySink do:
    bucket ``i`` holds ``_BOUNDS[i-1] < d <= _BOUNDS[i]``)."""
    return bisect_left(_BOUNDS, seconds)


def counts(variant: str, requests: int, errors: int = 0, start: int = 0, **kw: object) -> Counts:
    return Counts("r", variant, start, requests=requests, errors=errors, **kw)  # type: ignore[arg-type]


def window(
    canary: tuple[int, int],
    baseline: tuple[int, int],
    start: float = 0.0,
    percent: float | None = None,
) -> Window:
    """A window from (requests, errors) of the canary and of the baseline."""
    s = int(start)
    return Window(
        start,
        counts("old", baseline[0], baseline[1], start=s),
        counts("new", canary[0], canary[1], start=s),
        percent,
    )


def binomial_quantile(n: int, p: float, level: float) -> int:
    """The smallest ``c`` with ``P(Binomial(n, p) <= c) >= level``, exactly (math.comb)."""
    total = 0.0
    for c in range(n + 1):
        total += math.comb(n, c) * p**c * (1.0 - p) ** (n - c)
        if total >= level:
            return c
    return n


def binomial_cdf(n: int, p: float, c: int) -> float:
    """``P(Binomial(n, p) <= c)``, exactly (math.comb)."""
    return math.fsum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(c + 1))
