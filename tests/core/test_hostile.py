"""Hostile input against the core: the cohort caches and the cookie parser on their own.

Each attack here was once a defect: memory and CPU amplification through the cohort
cookie caches. The same attacks through both adapters are in ``adapters/test_hostile.py``.
"""

from __future__ import annotations

import pytest

import canarymw._rollout
from canarymw import Rollout
from canarymw._cookie import find_values
from canarymw._runtime import BoundedCache

from ..attacks import KEY, CountingCodec, cohort_cookie, forged_values


# -- 1. memory amplification through the returning-visitor cache ------------------------
def test_a_flood_of_farmed_cookies_evicts_only_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid cookies farmed by the thousand push out old entries a slice at a time,
    never the whole cache: most honest visitors are still recognised without a check."""
    monkeypatch.setattr(canarymw._rollout, "_CACHE_SIZE", 800)
    rollout = Rollout("hostile", percent=50, secret_key=KEY)
    honest = [cohort_cookie(rollout) for _ in range(700)]
    farmed = [cohort_cookie(rollout) for _ in range(200)]
    for cookie in honest + farmed:
        rollout.decide(cookie)
    remembered = [rollout.cached(cookie) is not None for cookie in honest]
    assert sum(remembered) >= 500, f"{sum(remembered)} of 700 honest visitors remembered"
    assert not any(remembered[:50]) and all(remembered[-500:])  # the oldest went first
    assert len(rollout._seen) <= 800 and len(rollout._by_header) <= 800
    codec = rollout._codec = CountingCodec(rollout._codec)  # type: ignore[assignment]
    assert rollout.decide(honest[-1]).set_cookie is None and codec.checks == 0


def test_the_bounded_cache_keeps_its_budget_and_evicts_a_slice() -> None:
    cache: BoundedCache[int] = BoundedCache(max_items=80, max_chars=1_000, max_key=100)
    for i in range(80):
        cache.put(f"k{i:03d}", i)
    assert len(cache) == 80
    cache.put("k080", 80)  # one over: the oldest tenth go, not everything
    assert 60 <= len(cache) < 80 and "k080" in cache and "k000" not in cache and "k079" in cache
    cache.put("x" * 101, -1)  # longer than max_key: never held
    assert "x" * 101 not in cache
    for i in range(100):
        cache.put(f"{i:03d}" + "y" * 97, i)  # 100-character keys: 10 fit in 1,000
    assert sum(map(len, cache)) <= 1_000 and cache._chars == sum(map(len, cache))
    cache.put("k001", 1)
    cache.put("k001", 2)  # a key put again counts once
    assert cache._chars == sum(map(len, cache))
    cache.clear()
    assert cache._chars == 0 and not cache


# -- 2. CPU amplification through many cohort values in one header ----------------------
def test_find_values_stops_at_its_limit() -> None:
    header = forged_values(1_000)
    assert len(find_values(header, "canarymw", 2)) == 2
    assert len(find_values(header, "canarymw")) == 1_000
