"""The ramp policies under real gunicorn: 4 workers following one SQLite store through a
ramp down and up, and exactly who moves at each step.

For each policy a gunicorn master with 4 sync workers serves ``tests/apps/store_app.py``
on a free 127.0.0.1 port; the percent changes in the store, as ``canarymw set`` and
``canarymw rollback`` do, and each step starts once all 4 workers report its version.
300 visitors arrive at 50%, 100 more at 10%; then the percent goes to 60%, to 0% (a
rollback) and to 30%. At every step every visitor asks 3 times, each time on a new
connection, so any worker may answer: they must all give one answer, the same on every
worker, and it must be the policy's:

=========  ====================================  =====================================  ===========
step       monotone                              drain                                  pin
=========  ====================================  =====================================  ===========
50 -> 10   new with bucket >= 1000 move to old   nobody moves                           nobody moves
10 -> 60   old with bucket < 6000 move to new    old with bucket < 6000 move to new     nobody moves
rollback   everyone old                          everyone old                           everyone old
0 -> 30    new iff bucket < 3000                 new iff bucket < 3000                  new iff bucket < 3000
=========  ====================================  =====================================  ===========

Newcomers get new iff their bucket is under the percent's threshold, under every policy.
The variant recorded by ``drain`` and ``pin`` lives in the visitor's cookie, so a worker
that never saw the visitor gives the same answer as the one that recorded it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from canarymw._bucketing import bucket
from canarymw.store import change, open_store

from ..harness import by_bucket as frozen_rule
from .test_store_servers import NAME, at_version, gunicorn, hit, no_jar_client, workers_until

pytestmark = pytest.mark.server

EARLY = 300  # visitors who arrive at 50%
LATE = 100  # visitors who arrive at 10%
ASKS = 3  # requests per visitor and step


@dataclass
class Visitor:
    """One browser: the cohort cookie it holds, and what it got at each step."""

    cookie: str | None = None
    cohort: str = ""
    bucket: int = -1
    pids: set[int] = field(default_factory=set)
    got: dict[str, str] = field(default_factory=dict)  # step -> variant

    def moved(self, a: str, b: str) -> tuple[str, str] | None:
        """``(from, to)`` between steps ``a`` and ``b``, or None if it kept its variant."""
        if a in self.got and self.got[a] != self.got[b]:
            return self.got[a], self.got[b]
        return None


def visit(client: httpx.Client, base: str, visitor: Visitor, step: str) -> None:
    """``ASKS`` requests of ``visitor``, keeping every cookie it is given; one answer."""
    seen = set()
    for _ in range(ASKS):
        h = hit(client, base, visitor.cookie)
        assert h.status == 200, h
        if h.cookie is not None:
            visitor.cookie = h.cookie  # a first cookie, or one with a variant recorded anew
        if not visitor.cohort:
            visitor.cohort, visitor.bucket = h.cohort, h.bucket
            assert visitor.bucket == bucket(NAME, visitor.cohort)  # the frozen hash of its id
        assert (h.cohort, h.bucket) == (visitor.cohort, visitor.bucket), h
        seen.add(h.variant)
        visitor.pids.add(h.pid)
    assert len(seen) == 1, (step, seen, visitor)  # one answer, whichever worker gave it
    visitor.got[step] = seen.pop()


def by_bucket(v: Visitor, percent: float) -> str:
    return frozen_rule(v.bucket, percent)


# What each policy gives a visitor at a step: from its bucket, and its variant at the
# step before (None for a newcomer). Both steps of one epoch: the rollback starts one.
Rule = Callable[[Visitor, float, "str | None"], str]
RULES: dict[str, Rule] = {
    "monotone": lambda v, pct, before: by_bucket(v, pct),
    "drain": lambda v, pct, before: "new" if before == "new" else by_bucket(v, pct),
    "pin": lambda v, pct, before: before or by_bucket(v, pct),
}


def moves(people: Sequence[Visitor], a: str, b: str) -> dict[tuple[str, str], set[str]]:
    """Who moved between steps ``a`` and ``b``, by direction (cohort ids)."""
    out: dict[tuple[str, str], set[str]] = {("new", "old"): set(), ("old", "new"): set()}
    for v in people:
        m = v.moved(a, b)
        if m is not None:
            out[m].add(v.cohort)
    return out


def cohorts(people: Sequence[Visitor], keep: Callable[[Visitor], bool]) -> set[str]:
    return {v.cohort for v in people if keep(v)}


@pytest.mark.parametrize("policy", ["monotone", "drain", "pin"])
def test_ramp_down_and_up_under_four_workers(policy: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    early = [Visitor() for _ in range(EARLY)]
    late = [Visitor() for _ in range(LATE)]
    rule = RULES[policy]
    started = time.monotonic()
    env = {"CANARYMW_TEST_POLICY": policy, "CANARYMW_TEST_PERCENT": "50"}
    with (
        closing(open_store(url)) as store,
        gunicorn(url, workers=4, extra_env=env) as server,
        no_jar_client() as client,
    ):
        seeded = workers_until(server, 4, at_version(1), timeout=20)
        assert {(s["percent"], s["epoch"]) for s in seeded.values()} == {(50.0, 0)}

        def apply(action: str, percent: float | None = None) -> None:
            """Change the store, and wait until all 4 workers have applied the change."""
            state = change(store, NAME, action, percent=percent, by="test")
            reached = workers_until(server, 4, at_version(state.version), timeout=10)
            assert {(s["percent"], s["epoch"]) for s in reached.values()} == {
                (state.percent, state.assignment)
            }

        def step(name: str, people: Sequence[Visitor]) -> None:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda v: visit(client, server.base, v, name), people))

        step("50", early)
        apply("set", 10)
        step("10", early + late)
        apply("set", 60)
        step("60", early + late)
        apply("rollback")  # to 0%, and a new assignment epoch
        assert store.read([NAME])[NAME].assignment == 1
        step("0", early + late)
        apply("set", 30)
        step("30", early + late)
        final = workers_until(server, 4, lambda s: True, timeout=10)
    everyone = early + late
    elapsed = time.monotonic() - started

    # Every step, every visitor: the policy's answer (checked here as a rule, below as moves).
    for v in early:
        assert v.got["50"] == by_bucket(v, 50)
    for v in late:
        assert v.got["10"] == by_bucket(v, 10)  # newcomers go by the bucket, whatever the policy
    for v in early:
        assert v.got["10"] == rule(v, 10, v.got["50"]), (policy, v)
    for v in everyone:
        assert v.got["60"] == rule(v, 60, v.got["10"]), (policy, v)
        assert v.got["0"] == "old"
        assert v.got["30"] == by_bucket(v, 30)  # a new epoch: assigned afresh

    down, up = moves(early, "50", "10"), moves(everyone, "10", "60")
    assert not down["old", "new"]  # lowering the percent never moves anyone to new
    assert not up["new", "old"]  # and raising it never moves anyone to old
    if policy == "monotone":
        assert down["new", "old"] == cohorts(early, lambda v: 1000 <= v.bucket < 5000)
        assert up["old", "new"] == cohorts(everyone, lambda v: 1000 <= v.bucket < 6000)
    elif policy == "drain":
        assert down["new", "old"] == set()
        assert up["old", "new"] == cohorts(everyone, lambda v: v.got["10"] == "old" and v.bucket < 6000)
        assert cohorts(early, lambda v: 5000 <= v.bucket < 6000) <= up["old", "new"]
    else:
        assert down["new", "old"] == up["old", "new"] == set()
    back = cohorts(everyone, lambda v: v.got["60"] == "new" and v.got["30"] == "old")
    assert back == cohorts(everyone, lambda v: v.got["60"] == "new" and v.bucket >= 3000)

    # Enough of each kind that the checks above bite.
    new_late = sum(v.got["10"] == "new" for v in late)
    assert 1 <= new_late <= 25  # about 10% of 100 (mean 10, +-5 sigma)
    assert 100 <= sum(v.got["50"] == "new" for v in early) <= 200  # about half of 300
    assert sum(1000 <= v.bucket < 5000 for v in early) >= 70  # the monotone ramp-down moves these
    assert sum(5000 <= v.bucket < 6000 for v in early) >= 10  # drain moves these up at 60%
    # Every worker served, the same 4 throughout, and visitors crossed between them.
    pids = set().union(*(v.pids for v in everyone))
    assert pids == set(final) == set(seeded), (pids, final, seeded)
    crossed = sum(len(v.pids) >= 3 for v in everyone)
    assert crossed >= 0.9 * len(everyone), crossed
    print(
        f"{policy}: {len(everyone)} visitors, 4 workers, {elapsed:.1f} s; 50->10 moved "
        f"{len(down['new', 'old'])} new->old, 10->60 moved {len(up['old', 'new'])} old->new; "
        f"{new_late} of {LATE} newcomers at 10% got new; {crossed} saw 3 or more workers"
    )
