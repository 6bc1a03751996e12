"""The contract every store keeps: compare-and-set, the audit log, waiting, counters."""

from __future__ import annotations

import threading
import time

import pytest

from canarymw.store import Counts, RolloutState, Store, VersionConflict, on_start, operate

from .conftest import Backend


def seed(store: Store, name: str = "r", percent: float = 10) -> RolloutState:
    made = on_start(name, None, percent, now=1000.0)
    assert made is not None
    store.write(name, 0, *made)
    return made[0]


def test_an_empty_store_holds_nothing(backend: Backend) -> None:
    store = backend()
    assert isinstance(store, Store)
    assert store.read(["r", "s"]) == {} and store.names() == [] and store.history("r") == []


def test_create_then_compare_and_set(backend: Backend) -> None:
    store = backend()
    first = seed(store)
    assert store.read(["r", "other"]) == {"r": first} and store.names() == ["r"]
    again = on_start("r", None, 20, now=1001.0)
    assert again is not None
    with pytest.raises(VersionConflict, match="someone else changed it"):
        store.write("r", 0, *again)  # created meanwhile: never overwritten
    after, change = operate("r", first, "set", percent=25, by="alice", reason="looks good", now=1002.0)
    store.write("r", first.version, after, change)
    assert store.read(["r"])["r"] == after and after.version == 2
    stale, change2 = operate("r", first, "rollback", by="bob", now=1003.0)
    with pytest.raises(VersionConflict):
        store.write("r", first.version, stale, change2)  # bob read version 1; it is 2 now
    assert store.read(["r"])["r"] == after


def test_the_audit_log_keeps_every_change_in_order(backend: Backend) -> None:
    store = backend()
    state = seed(store)
    for i, action in enumerate(["set", "pause", "resume", "promote", "rollback"]):
        new, change = operate("r", state, action, by=f"op{i}", reason=f"step {i}", percent=30, now=1100.0 + i)
        store.write("r", state.version, new, change)
        state = new
    log = store.history("r")
    assert [c.action for c in log] == ["seed", "set", "pause", "resume", "promote", "rollback"]
    assert [c.version for c in log] == [1, 2, 3, 4, 5, 6]
    assert log[1].percent_before == 10 and log[1].percent_after == 30 and log[1].by == "op0"
    assert log[2].paused_after and not log[3].paused_after and log[-1].percent_after == 0
    assert [c.action for c in store.history("r", limit=2)] == ["promote", "rollback"]
    assert store.history("other") == []


def test_two_objects_on_one_backend_see_each_other(backend: Backend) -> None:
    a, b = backend(), backend()
    state = seed(a)
    assert b.read(["r"]) == {"r": state}
    new, change = operate("r", state, "set", percent=50, by="b", now=1200.0)
    b.write("r", state.version, new, change)
    assert a.read(["r"])["r"].percent == 50


def test_wait_returns_on_a_change_by_anyone(backend: Backend) -> None:
    watcher, writer = backend(), backend()
    watcher.wait(0)  # forget what happened before
    started = time.monotonic()
    assert watcher.wait(0.3) is False
    assert time.monotonic() - started >= 0.25
    state = seed(writer)
    assert watcher.wait(2.0) is True  # the change happened before the call: not lost

    def later() -> None:
        time.sleep(0.2)
        new, change = operate("r", state, "pause", by="ops", now=1300.0)
        writer.write("r", state.version, new, change)

    thread = threading.Thread(target=later)
    thread.start()
    started = time.monotonic()
    assert watcher.wait(5.0) is True
    assert time.monotonic() - started < 2.0
    thread.join()
    assert watcher.read(["r"])["r"].paused


def test_concurrent_writers_never_lose_a_change(backend: Backend) -> None:
    seed(backend())
    writers, each = 4, 10
    errors: list[BaseException] = []

    def work(i: int) -> None:
        store = backend()
        try:
            for j in range(each):
                while True:
                    current = store.read(["r"])["r"]
                    new, change = operate("r", current, "set", percent=j, by=f"w{i}", now=2000.0 + j)
                    try:
                        store.write("r", current.version, new, change)
                        break
                    except VersionConflict:
                        continue
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = backend()
    assert store.read(["r"])["r"].version == 1 + writers * each
    log = store.history("r", limit=1000)
    assert [c.version for c in log] == list(range(1, 2 + writers * each))


def test_counters_add_up_across_writers_and_windows(backend: Backend) -> None:
    a, b = backend(), backend()
    a.add_counts([Counts("r", "new", 1000, requests=3, errors=1, latency_sum=0.3, buckets={5: 2, 9: 1})])
    b.add_counts(
        [
            Counts("r", "new", 1000, requests=2, exceptions=1, errors=1, latency_sum=0.2, buckets={5: 2}),
            Counts("r", "old", 1000, requests=7, disconnects=1, latency_sum=0.7, buckets={4: 7}),
            Counts("r", "new", 1010, requests=1, latency_sum=0.1, buckets={9: 1}),
            Counts("s", "new", 1000, requests=9),
        ]
    )
    got = {(c.variant, c.window): c for c in a.read_counts(["r"], since=1000.0)}
    assert set(got) == {("new", 1000), ("old", 1000), ("new", 1010)}
    new = got[("new", 1000)]
    assert (new.requests, new.errors, new.exceptions, new.disconnects) == (5, 2, 1, 0)
    assert new.latency_sum == pytest.approx(0.5) and new.buckets == {5: 4, 9: 1}
    assert got[("old", 1000)].disconnects == 1 and got[("old", 1000)].buckets == {4: 7}
    later = a.read_counts(["r"], since=1010.0)  # the window 1000-1010 has ended by then
    assert [(c.variant, c.window) for c in later] == [("new", 1010)]
    assert {c.rollout for c in b.read_counts(["r", "s"], since=0)} == {"r", "s"}


def test_a_closed_store_can_be_used_again(backend: Backend) -> None:
    store = backend()
    state = seed(store)
    store.close()
    assert store.read(["r"]) == {"r": state}


def test_a_write_that_skips_versions_is_refused(backend: Backend) -> None:
    store = backend()
    state = seed(store)
    new, change = operate("r", state, "set", percent=20, by="a", now=1500.0)
    with pytest.raises(ValueError, match="from version 2 to 3"):
        store.write("r", 2, new, change)  # new is version 2: a caller's mistake, not a race
    with pytest.raises(ValueError, match="cannot be stored"):
        store.write("", 0, *on_start("", None, 5, now=1.0))  # type: ignore[misc]
    assert store.read(["r"])["r"] == state
