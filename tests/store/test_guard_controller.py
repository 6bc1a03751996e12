"""The guard's controller on every store: one leader among contenders, takeover when the
leader stops or dies, fenced writes after a lost lease, and actions from counters.

Controllers here are driven by hand (``tick(now=...)``) on rollouts that follow no
store, so each step is deterministic; the lease still runs on the store's own clock.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from canarymw import Rollout
from canarymw.guard import Analysis, Guard, Verdict
from canarymw.guard._controller import Controller
from canarymw.store import Change, Counts, LeaseLost, RolloutState, Store, on_start, operate
from canarymw.store._model import WINDOW

from .conftest import Backend

NAME = "guarded"
KEY = "guard-controller-secret-0123456789"
T0 = 1_800_000_000.0  # a window boundary: the guard starts here in every test


def guard(**kw: Any) -> Guard:
    settings: dict[str, Any] = {
        "steps": (10, 50, 100),
        "bake": 0,
        "min_requests": 100,
        "deadline": 3600,
        "interval": 0.05,
        "lease": 0.3,
    }
    settings.update(kw)
    return Guard(**settings)


def seeded(store: Store, percent: float = 0) -> RolloutState:
    made = on_start(NAME, None, percent, now=T0 - 100)
    assert made is not None
    store.write(NAME, 0, *made)
    return made[0]


def controller(store: Store, g: Guard) -> Controller:
    # A rollout that follows no store: nothing runs in the background; the test ticks.
    return Controller(Rollout(NAME, percent=0, secret_key=KEY), store, g)


def contenders(backend: Backend, g: Guard, n: int) -> tuple[Store, list[Controller]]:
    """A store with the rollout seeded, and ``n`` controllers, each on a store object of its own."""
    store = backend()
    seeded(store)
    return store, [controller(backend(), g) for _ in range(n)]


def state(store: Store) -> RolloutState:
    return store.read([NAME])[NAME]


def traffic(store: Store, start: float, *, windows: int, old: tuple[int, int], new: tuple[int, int]) -> None:
    """Counts for ``windows`` windows from ``start``: (requests, errors) per variant and window."""
    counts = []
    for i in range(windows):
        w = int(start) + i * WINDOW
        counts.append(Counts(NAME, "old", w, requests=old[0], errors=old[1]))
        counts.append(Counts(NAME, "new", w, requests=new[0], errors=new[1]))
    store.add_counts(counts)


def test_one_leader_among_three_and_takeover_on_release(backend: Backend) -> None:
    store, (a, b, c) = contenders(backend, guard(), 3)
    made = a.tick(now=T0)
    assert made is not None and made.action == "guard" and made.percent_after == 10
    assert a.token is not None
    assert b.tick(now=T0) is None and b.token is None
    assert c.tick(now=T0) is None and c.token is None
    info = store.lease_info(NAME)
    assert info is not None and info.holder == a.holder and info.token == a.token
    first = a.token
    a.stop()  # gives the lease up: another takes over at its next look, not after the expiry
    assert store.lease_info(NAME) is None
    b.tick(now=T0 + 1)
    assert b.token is not None and b.token > first
    assert c.tick(now=T0 + 1) is None and c.token is None
    # Only the first leader acted: one guard entry.
    assert [e.action for e in store.history(NAME)] == ["seed", "guard"]


def test_a_dead_leader_is_replaced_within_two_lease_periods(backend: Backend) -> None:
    g = guard(lease=0.3)
    _, (a, b) = contenders(backend, g, 2)
    a.tick(now=T0)
    assert a.token is not None
    died = time.monotonic()
    # a stops looking without releasing (killed); b keeps looking every interval.
    while b.token is None:
        b.tick(now=T0 + 1)
        assert time.monotonic() - died < 2 * g.lease, "no takeover within two lease periods"
        time.sleep(g.interval)
    assert b.token > (a.token or 0)


def test_a_leader_that_lost_its_lease_cannot_write(backend: Backend) -> None:
    store, (a, b) = contenders(backend, guard(lease=0.2), 2)
    a.tick(now=T0)
    stale = a.token
    assert stale is not None
    time.sleep(0.3)  # a is frozen (a long GC pause, a partition) past its lease
    b.tick(now=T0 + 1)
    assert b.token is not None and b.token > stale
    before = state(store)
    # a wakes up in the middle of a look: it believes its old token and tries to act.
    a.store.lease = lambda name, holder, ttl: stale  # type: ignore[method-assign]
    assert a.tick(now=T0 + 7200) is None  # the deadline passed: a would pause the rollout
    assert a.token is None
    assert state(store) == before
    after, change = operate(NAME, before, "pause", by="x")
    with pytest.raises(LeaseLost, match="another process"):
        store.write(NAME, before.version, after, change, fence=stale)


def test_a_healthy_canary_advances_step_by_step(backend: Backend) -> None:
    store = backend()
    seeded(store)
    g = guard(bake=30)
    c = controller(store, g)
    c.tick(now=T0)
    assert state(store).percent == 10 and state(store).stage == "ramping"
    traffic(store, T0, windows=2, old=(900, 9), new=(100, 1))
    # Windows closed, but the bake time has not passed: no step yet.
    assert c.tick(now=T0 + 2 * WINDOW + 3) is None
    made = c.tick(now=T0 + 31)
    assert made is not None and made.action == "advance" and made.percent_after == 50
    assert made.by == "canarymw-guard" and made.reason.startswith("advance to 50%: pass:")
    assert state(store).stage_since == T0 + 31
    # The next step needs its own requests: the earlier windows do not count for it.
    assert c.tick(now=T0 + 70) is None
    traffic(store, T0 + 40, windows=1, old=(500, 5), new=(500, 5))
    made = c.tick(now=T0 + 80)
    assert made is not None and made.percent_after == 100
    final = state(store)
    assert final.stage == "done" and final.percent == 100
    assert c.tick(now=T0 + 200) is None  # done: nothing left to do
    actions = [e.action for e in store.history(NAME)]
    assert actions == ["seed", "guard", "advance", "advance"]


def test_harm_rolls_back_and_pauses_and_tells_the_hook(backend: Backend) -> None:
    store = backend()
    seeded(store)
    heard: list[tuple[str, Verdict, Change | None]] = []

    def hook(name: str, verdict: Verdict, change: Change | None) -> None:
        heard.append((name, verdict, change))
        raise RuntimeError("the chat service is down")  # never stops the guard

    g = guard(on_verdict=hook, analysis=Analysis(min_requests=50))
    c = controller(store, g)
    c.tick(now=T0)
    traffic(store, T0, windows=3, old=(900, 3), new=(100, 10))
    made = c.tick(now=T0 + 3 * WINDOW + 3)
    assert made is not None and made.action == "auto-rollback"
    s = state(store)
    assert (s.percent, s.paused, s.held, s.stage) == (0.0, True, True, "rolled-back")
    assert s.verdict is not None and s.verdict.startswith(
        "rollback: canary 30 errors / 300 requests vs baseline 9 /"
    )
    assert "harm is certain at alpha 0.05" in s.verdict
    assert made.extra["decision"] == "rollback" and made.extra["errors_e_value"] >= 20
    assert [(n, v.decision, ch.action if ch else None) for n, v, ch in heard] == [
        (NAME, "rollback", "auto-rollback")
    ]
    # Rolled back: the guard waits for an operator; resume starts a new attempt.
    assert c.tick(now=T0 + 100) is None
    after, change = operate(NAME, s, "resume", by="alice", now=T0 + 200)
    store.write(NAME, s.version, after, change)
    assert (after.stage, after.percent, after.guard_since, after.paused) == ("ramping", 10, T0 + 200, False)
    assert c.tick(now=T0 + 201) is None  # a new attempt: the old windows do not count against it
    traffic(store, T0 + 200, windows=1, old=(900, 9), new=(100, 1))
    made = c.tick(now=T0 + 215)
    assert made is not None and made.action == "advance" and made.percent_after == 50


def test_an_operator_pause_stops_the_guard_until_resumed(backend: Backend) -> None:
    store = backend()
    seeded(store)
    c = controller(store, guard(bake=0))
    c.tick(now=T0)
    s = state(store)
    paused, change = operate(NAME, s, "pause", by="bob", now=T0 + 1)
    store.write(NAME, s.version, paused, change)
    traffic(store, T0, windows=2, old=(900, 9), new=(100, 1))
    assert c.tick(now=T0 + 60) is None  # paused: no advance, whatever the counters say
    resumed, change = operate(NAME, paused, "resume", by="bob", now=T0 + 61)
    store.write(NAME, paused.version, resumed, change)
    # While paused the canary kept serving its percent: that exposure counts for the step.
    made = c.tick(now=T0 + 62)
    assert made is not None and made.action == "advance" and made.percent_after == 50


def test_a_lost_compare_and_set_is_no_error(backend: Backend) -> None:
    store = backend()
    seeded(store)
    c = controller(store, guard())
    real_read = store.read

    def read_then_operator_acts(names: list[str]) -> dict[str, RolloutState]:
        got = real_read(names)
        s = got[NAME]
        after, change = operate(NAME, s, "set", percent=5, by="carol", now=T0)
        store.write(NAME, s.version, after, change)  # between the guard's read and write
        return got

    c.store.read = read_then_operator_acts  # type: ignore[method-assign]
    assert c.tick(now=T0) is None
    assert c.token is not None  # still the leader; it looks again next time
    assert state(store).percent == 5 and state(store).updated_by == "carol"


def test_the_rollout_runs_its_controller_in_the_background() -> None:
    from canarymw.store import MemoryStore

    store = MemoryStore()
    rollout = Rollout(NAME, percent=0, secret_key=KEY, store=store, guard=guard(steps=(20, 100)))
    try:
        deadline = time.monotonic() + 5
        while store.read([NAME]).get(NAME) is None or store.read([NAME])[NAME].stage is None:
            assert time.monotonic() < deadline, "the controller never started the guard"
            time.sleep(0.02)
        s = store.read([NAME])[NAME]
        assert s.stage == "ramping" and s.percent == 20
        deadline = time.monotonic() + 5
        while rollout.percent != 20:  # applied here at once, not at the next read
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert rollout.controller is not None and rollout.controller.token is not None
    finally:
        assert rollout.controller is not None
        rollout.controller.stop()


def test_guard_needs_a_guard_object() -> None:
    with pytest.raises(TypeError, match=r"pass a canarymw\.guard\.Guard"):
        Rollout(NAME, percent=0, secret_key=KEY, guard={"steps": [1, 100]})  # type: ignore[arg-type]


def test_both_middlewares_feed_a_guarded_rollouts_store(kit: Any) -> None:
    from canarymw.sinks.store import StoreSink
    from canarymw.store import MemoryStore

    store = MemoryStore()
    rollout = Rollout(NAME, percent=50, secret_key=KEY, store=store, guard=guard(interval=30, lease=90))
    try:
        app = kit.raw_wrap(kit.echo("old"), kit.echo("new"), rollout)  # no sink given
        with kit.client(app) as client:
            for _ in range(40):
                client.cookies.clear()
                assert client.get("/").status_code == 200
        sinks = list(app._guard.sink.sinks) if hasattr(app._guard.sink, "sinks") else [app._guard.sink]
        added = [s for s in sinks if isinstance(s, StoreSink)]
        assert len(added) == 1 and added[0].store is store
        assert added[0].flush(timeout=5)
        counted = {c.variant: c.requests for c in store.read_counts([NAME], 0.0)}
        assert sum(counted.values()) == 40 and counted.get("new", 0) > 0
        # A sink that already feeds the store is not doubled; one StoreSink per store is shared.
        again = kit.raw_wrap(kit.echo("old"), kit.echo("new"), rollout, sink=added[0])
        assert again._guard.sink is added[0]
        other = kit.raw_wrap(kit.echo("old"), kit.echo("new"), rollout)
        assert other._guard.sink is app._guard.sink
    finally:
        assert rollout.controller is not None
        rollout.controller.stop()


def test_an_unguarded_rollout_gets_no_sink_added(kit: Any) -> None:
    from canarymw.store import MemoryStore

    rollout = Rollout(NAME, percent=50, secret_key=KEY, store=MemoryStore())
    app = kit.raw_wrap(kit.echo("old"), kit.echo("new"), rollout)
    assert app._guard is None
