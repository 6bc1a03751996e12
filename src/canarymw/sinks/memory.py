"""``MemorySink``: per-variant counts and latency quantiles of one process."""

from __future__ import annotations

import math
import threading
from array import array
from bisect import bisect_right
from collections import Counter, deque
from dataclasses import dataclass
from itertools import compress, islice
from operator import itemgetter
from struct import pack
from typing import Any

from ._base import Classifier, Outcome, default_classifier

_LOW = 1e-5
_GROWTH = 1.04
_SIZE = 512
_BOUNDS = [_LOW * _GROWTH**i for i in range(_SIZE - 1)]  # upper bound of buckets 0 .. SIZE-2
_BATCH = 256
_COMPACT = 1 << 16
_RV = itemgetter(0, 1)
_VARIANTS = frozenset(("old", "new"))  # always in a snapshot, with or without traffic


def _bucket_bounds(i: int) -> tuple[float, float]:
    if i == 0:
        return 0.0, _LOW
    lo = _LOW * _GROWTH ** (i - 1)
    return lo, lo * _GROWTH


def _quantile(counts: dict[int, int], total: int, q: float, low: float, high: float) -> float | None:
    """Quantile from a sparse log histogram, interpolated inside the bucket and clamped
    to the observed ``[low, high]``."""
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i in sorted(counts):
        c = counts[i]
        if seen + c >= rank:
            lo, hi = _bucket_bounds(i)
            frac = (rank - seen) / c
            value: float = lo + (hi - lo) * frac if i == 0 else lo * (hi / lo) ** frac
            return min(max(value, low), high)
        seen += c
    return high


@dataclass(frozen=True, slots=True)
class VariantStats:
    """Aggregated outcomes of one variant, as returned by :meth:`MemorySink.snapshot`."""

    requests: int
    errors: int
    """Outcomes the classifier judged unsuccessful (5xx, exceptions, no response)."""
    exceptions: int
    disconnects: int
    statuses: dict[int, int]
    """Count per status class: ``{2: 950, 4: 12, 5: 3}`` means 2xx, 4xx, 5xx."""
    latency_mean: float | None
    """Seconds; the latency fields are None when the variant has no requests."""
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    latency_max: float | None

    @property
    def error_rate(self) -> float:
        """errors / requests (0.0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def success_rate(self) -> float:
        """1 - error_rate (1.0 with no requests)."""
        return 1.0 - self.error_rate


class MemorySink:
    """Aggregates outcomes in this process: counts, error rate and latency quantiles.

    Thread-safe and lock-free for the request: ``record`` appends to a deque; every 256
    outcomes are folded in one batch whose per-outcome work runs in C (transposed with
    ``zip``, counted with ``Counter``, durations appended to an ``array``). Durations
    are kept exactly until 65,536 of a variant have gathered, then compacted into a
    512-bucket log histogram (4% resolution); mean, min and max stay exact. Memory is
    bounded.

    The numbers are per process: under gunicorn or uvicorn with several workers each
    worker has its own ``MemorySink`` (see docs/outcomes.md for whole-service numbers).

    Args:
        classify: Decides whether an outcome is a success; default: status < 500 and
            no exception.
    """

    def __init__(self, classify: Classifier = default_classifier) -> None:
        self._classify = classify
        self._lock = threading.Lock()
        self._pending: deque[Outcome | tuple[Any, ...]] = deque()  # plain tuples from the adapters
        # (rollout, variant, status, error, disconnected) -> count
        self._counts: Counter[tuple[str, str, int | None, str | None, bool]] = Counter()
        self._failed: Counter[tuple[str, str]] = Counter()  # with a custom classifier only
        self._durations: dict[tuple[str, str], array[float]] = {}
        self._hist: dict[tuple[str, str], list[int]] = {}
        self._range: dict[tuple[str, str], list[float]] = {}  # [sum, min, max]

    def record(self, outcome: Outcome) -> None:
        """Add one outcome (thread-safe; never waits on a lock)."""
        pending = self._pending
        pending.append(outcome)  # deque.append is atomic
        if len(pending) >= _BATCH:
            self._fold(blocking=False)

    def _fold(self, *, blocking: bool) -> None:
        if not self._lock.acquire(blocking):
            return  # another thread is folding and will take ours too
        try:
            pending = self._pending
            # Only the lock holder pops, so the first len() items are ours to take.
            batch = list(islice(iter(pending.popleft, None), len(pending)))
            if not batch:
                return
            # Columns (rollout, variant, status, duration, error, disconnected, ...): the
            # per-outcome work below all runs in C.
            # The first six columns only: zip builds one column per next().
            names, variants, statuses, durations, errors, disconnected = islice(zip(*batch, strict=False), 6)
            n = len(batch)
            counts = self._counts
            if self._classify is not default_classifier:
                classify = self._classify
                # The adapters queue plain tuples (see _dispatch.Outlet).
                self._failed.update(_RV(o) for o in map(Outcome._make, batch) if not classify(o))
            kinds: dict[tuple[str, str], tuple[float, ...]]
            if names.count(names[0]) == n and variants.count(variants[0]) == n:
                # The usual batch: one rollout and variant, no exception, no disconnect.
                # Counting statuses alone spares building and hashing a key per outcome.
                rv = (names[0], variants[0])
                if errors.count(None) == n and disconnected.count(False) == n:
                    for status, c in Counter(statuses).items():
                        counts[rv[0], rv[1], status, None, False] += c
                else:
                    counts.update(zip(names, variants, statuses, errors, disconnected, strict=True))
                kinds = {rv: durations}
            else:
                counts.update(zip(names, variants, statuses, errors, disconnected, strict=True))
                pairs = list(zip(names, variants, strict=True))
                kinds = {rv: tuple(compress(durations, map(rv.__eq__, pairs))) for rv in set(pairs)}
            for rv, ds in kinds.items():
                arr = self._durations.get(rv)
                if arr is None:
                    arr = self._durations[rv] = array("d")
                # Packed in one call: array.extend() would parse each float on its own.
                arr.frombytes(pack(f"{len(ds)}d", *ds))
                if len(arr) >= _COMPACT:
                    self._compact(rv, arr)
        finally:
            self._lock.release()

    def _compact(self, rv: tuple[str, str], arr: array[float]) -> None:
        # Sorting and bisecting run in C: no Python-level work per duration.
        ds = sorted(arr)
        del arr[:]
        if not ds:
            return
        r = self._range.get(rv)
        if r is None:
            r = self._range[rv] = [0.0, math.inf, 0.0]
        r[0] += math.fsum(ds)
        r[1] = min(r[1], ds[0])
        r[2] = max(r[2], ds[-1])
        hist = self._hist.get(rv)
        if hist is None:
            hist = self._hist[rv] = [0] * _SIZE
        below = 0
        for i, bound in enumerate(_BOUNDS):
            upto = bisect_right(ds, bound)
            hist[i] += upto - below
            below = upto
            if upto == len(ds):
                break
        else:
            hist[_SIZE - 1] += len(ds) - below

    def snapshot(self, rollout: str | None = None) -> dict[str, VariantStats]:
        """Per-variant statistics, for one rollout or summed over all of them.

        Returns a dict with both ``"old"`` and ``"new"`` keys, always: a variant that
        has seen no traffic (``new`` at 0%, a rollout not seen yet) has zero counts,
        empty ``statuses``, ``error_rate`` 0.0 and every latency field None ("no
        data", which a 0 would misreport as an instant response). The result is a
        copy; later outcomes do not change it.
        """
        self._fold(blocking=True)
        with self._lock:
            for rv, arr in self._durations.items():
                self._compact(rv, arr)
            counts = list(self._counts.items())
            failed = dict(self._failed)
            hists = {rv: list(h) for rv, h in self._hist.items()}
            ranges = {rv: list(r) for rv, r in self._range.items()}
        custom = self._classify is not default_classifier
        acc: dict[str, dict[str, Any]] = {}
        for (name, variant, status, error, disconnected), n in counts:
            if rollout is not None and name != rollout:
                continue
            a = acc.setdefault(variant, {"n": 0, "errors": 0, "exc": 0, "disc": 0, "classes": {}})
            a["n"] += n
            if not custom and (error is not None or status is None or status >= 500):
                a["errors"] += n
            if error is not None:
                a["exc"] += n
            if disconnected:
                a["disc"] += n
            if status is not None:
                a["classes"][status // 100] = a["classes"].get(status // 100, 0) + n
        out: dict[str, VariantStats] = {}
        for variant in sorted(acc.keys() | _VARIANTS):
            if variant not in acc:
                out[variant] = VariantStats(0, 0, 0, 0, {}, None, None, None, None, None)
                continue
            a = acc[variant]
            keys = [rv for rv in hists if rv[1] == variant and rollout in (None, rv[0])]
            hist = [sum(col) for col in zip(*(hists[rv] for rv in keys), strict=True)]
            total = sum(ranges[rv][0] for rv in keys)
            low = min(ranges[rv][1] for rv in keys)
            high = max(ranges[rv][2] for rv in keys)
            n = a["n"]
            if custom:
                a["errors"] = sum(failed.get(rv, 0) for rv in keys)
            sparse = {i: c for i, c in enumerate(hist) if c}
            out[variant] = VariantStats(
                requests=n,
                errors=a["errors"],
                exceptions=a["exc"],
                disconnects=a["disc"],
                statuses=dict(sorted(a["classes"].items())),
                latency_mean=total / n,
                latency_p50=_quantile(sparse, n, 0.50, low, high),
                latency_p95=_quantile(sparse, n, 0.95, low, high),
                latency_p99=_quantile(sparse, n, 0.99, low, high),
                latency_max=high,
            )
        return out

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._fold(blocking=True)
        with self._lock:
            self._counts.clear()
            self._failed.clear()
            self._durations.clear()
            self._hist.clear()
            self._range.clear()
