"""Rollouts following a store: seeding, deploys, live changes, faults, never going back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from canarymw import Rollout
from canarymw.store import (
    Counts,
    MemoryStore,
    RolloutState,
    StoreUnavailable,
    VersionConflict,
    open_store,
)
from canarymw.store._follow import _followers, change

from ..conftest import KEY
from .conftest import REDIS_URL, Backend


def until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``check()`` held (fails after ``timeout``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)
    return time.monotonic() - started


class FlakyStore(MemoryStore):
    """A MemoryStore that can be made unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the test store is down.")

    def read(self, names: list[str]) -> dict[str, RolloutState]:
        self._check()
        return super().read(names)

    def write(self, *args: Any) -> None:
        self._check()
        super().write(*args)

    def wait(self, timeout: float) -> bool:
        self._check()
        return super().wait(timeout)

    def add_counts(self, counts: list[Counts]) -> None:
        self._check()
        super().add_counts(counts)


def test_the_code_percent_seeds_and_a_second_process_follows(backend: Backend) -> None:
    first = Rollout("live", percent=10, secret_key=KEY, store=backend(), store_interval=0.2)
    assert first.percent == 10 and first.store_status()["version"] == 1
    second = Rollout("live", percent=10, secret_key=KEY, store=backend(), store_interval=0.2)
    assert second.store_status()["version"] == 1  # same code percent: nothing written
    assert [c.action for c in backend().history("live")] == ["seed"]
    change(backend(), "live", "set", percent=40, by="alice", reason="ramp")
    took = until(lambda: first.percent == 40 and second.percent == 40)
    assert took < 1.5
    assert first.store_status()["version"] == 2


def test_an_operator_change_survives_a_restart_and_a_deploy_applies(backend: Backend) -> None:
    Rollout("live", percent=10, secret_key=KEY, store=backend())
    change(backend(), "live", "set", percent=40, by="alice")
    restarted = Rollout("live", percent=10, secret_key=KEY, store=backend())
    assert restarted.percent == 40  # a restart with the same code never undoes it
    deployed = Rollout("live", percent=25, secret_key=KEY, store=backend())
    assert deployed.percent == 25
    assert [c.action for c in backend().history("live")] == ["seed", "set", "deploy"]
    until(lambda: restarted.percent == 25)


def test_a_deploy_does_not_undo_a_rollback(backend: Backend) -> None:
    Rollout("live", percent=10, secret_key=KEY, store=backend())
    change(backend(), "live", "rollback", by="ops", reason="errors")
    deployed = Rollout("live", percent=50, secret_key=KEY, store=backend())
    assert deployed.percent == 0
    log = backend().history("live")
    assert log[-1].action == "deploy-held" and "rolled back" in log[-1].reason


def test_setting_percent_in_code_writes_through(backend: Backend) -> None:
    a = Rollout("live", percent=10, secret_key=KEY, store=backend(), store_interval=0.2)
    b = Rollout("live", percent=10, secret_key=KEY, store=backend(), store_interval=0.2)
    a.percent = 30
    assert a.percent == 30  # at once here
    until(lambda: b.percent == 30)
    last = backend().history("live")[-1]
    assert (last.action, last.by, last.percent_after) == ("set", "code", 30)


def test_an_action_that_changes_nothing_writes_nothing(backend: Backend) -> None:
    Rollout("live", percent=10, secret_key=KEY, store=backend())
    paused = change(backend(), "live", "pause", by="a")
    assert change(backend(), "live", "pause", by="b") == paused  # no new version
    assert [c.action for c in backend().history("live")] == ["seed", "pause"]


def test_a_lost_race_is_an_error_never_an_overwrite(backend: Backend) -> None:
    Rollout("live", percent=10, secret_key=KEY, store=backend())
    change(backend(), "live", "set", percent=20, by="a")
    with pytest.raises(VersionConflict, match="someone else changed it"):
        change(backend(), "live", "set", percent=30, by="b", expected_version=1)
    assert backend().read(["live"])["live"].percent == 20


def test_workers_starting_together_seed_once(backend: Backend) -> None:
    made: list[Rollout] = []
    go = threading.Barrier(6)

    def start() -> None:
        go.wait()
        made.append(Rollout("herd", percent=15, secret_key=KEY, store=backend()))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c.action for c in backend().history("herd")] == ["seed"]
    assert {r.percent for r in made} == {15}


def test_cold_start_with_the_store_down_uses_code_then_catches_up(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    store.down = True
    with caplog.at_level(logging.WARNING, "canarymw"):
        r = Rollout("cold", percent=20, secret_key=KEY, store=store, store_interval=0.05)
    assert r.percent == 20 and "cannot be read" in caplog.text and "20%" in caplog.text
    assert r.store_status()["error"] == "the test store is down." and r.counters["store_errors"] >= 1
    assert r.decide(None).rollout == "cold"  # requests go on
    store.down = False
    until(lambda: r.store_status()["version"] == 1)  # seeded once the store answers
    assert r.store_status()["error"] is None
    change(store, "cold", "set", percent=60, by="ops")
    until(lambda: r.percent == 60)


def test_the_store_going_down_keeps_the_last_state_and_says_how_stale() -> None:
    store = FlakyStore()
    r = Rollout("down", percent=20, secret_key=KEY, store=store, store_interval=0.05)
    change(store, "down", "set", percent=35, by="ops")
    until(lambda: r.percent == 35)
    store.down = True
    store._cond.acquire()
    store._seq += 1  # wake the follower so it meets the failure now
    store._cond.notify_all()
    store._cond.release()
    until(lambda: r.store_status()["error"] is not None)
    time.sleep(0.2)
    status = r.store_status()
    assert r.percent == 35 and status["age"] >= 0.15 and status["version"] == 2
    decided = [r.decide(None).variant for _ in range(200)]
    assert 30 < decided.count("new") < 110  # still 35%
    store.down = False
    change(store, "down", "set", percent=50, by="ops")
    until(lambda: r.percent == 50 and r.store_status()["error"] is None)


def test_never_back_to_an_older_state() -> None:
    store = MemoryStore()
    r = Rollout("mono", percent=10, secret_key=KEY, store=store)
    newer = RolloutState(percent=70.0, version=9)
    r._apply_state(newer)
    r._apply_state(RolloutState(percent=5.0, version=8))
    assert r.percent == 70 and r.store_status()["version"] == 9


def test_switch_off_holds_whatever_the_store_says() -> None:
    store = MemoryStore()
    r = Rollout("off", percent=50, secret_key=KEY, store=store, store_interval=0.05)
    r.switch_off()
    change(store, "off", "promote", by="ops")
    time.sleep(0.2)
    assert r.percent == 0 and r.store_status()["switched_off"]
    assert store.read(["off"])["off"].percent == 100  # nothing written for this process


def test_the_follower_thread_ends_when_its_rollouts_are_gone() -> None:
    store = MemoryStore()
    r = Rollout("gone", percent=10, secret_key=KEY, store=store, store_interval=0.05)
    follower = _followers[id(store)]
    thread = follower._thread
    assert thread is not None and thread.is_alive()
    del r
    import gc

    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        gc.collect()  # the thread may have held it during a collection: collect again
        thread.join(0.1)
    assert not thread.is_alive() and id(store) not in _followers


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"store": 42}, TypeError, "pass a store"),
        ({"store": "postgres://x"}, ValueError, "unknown scheme 'postgres'"),
        ({"store": "nowhere"}, ValueError, "is not a URL"),
        ({"store": "sqlite://"}, ValueError, "names no file"),
        ({"store": "memory://", "store_interval": 0}, ValueError, "store_interval=0"),
    ],
)
def test_bad_store_settings_fail_at_construction(kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Rollout("bad", percent=10, secret_key=KEY, **kw)


def test_store_urls() -> None:
    assert open_store("memory://a") is open_store("memory://a")
    assert open_store("memory://a") is not open_store("memory://b")
    r = Rollout("url", percent=5, secret_key=KEY, store="memory://urls")
    assert r.store is open_store("memory://urls") and r.percent == 5
    with pytest.raises(AttributeError, match="fixed at construction"):
        r.store = MemoryStore()  # type: ignore[misc]


def test_store_errors_never_show_a_password() -> None:
    with pytest.raises(ValueError, match="unknown scheme") as caught:
        Rollout("pw", percent=5, secret_key=KEY, store="redsi://admin:hunter2@db.example:6379/0")
    assert "hunter2" not in str(caught.value) and "admin:***@db.example" in str(caught.value)


def test_status_says_when_the_state_was_applied() -> None:
    store = MemoryStore()
    r = Rollout("applied", percent=5, secret_key=KEY, store=store, store_interval=0.05)
    first = r.store_status()["applied_at"]
    assert first is not None and abs(first - time.time()) < 5
    before = time.time()
    change(store, "applied", "set", percent=9, by="ops")
    until(lambda: r.store_status()["version"] == 2)
    status = r.store_status()
    assert status["percent"] == 9 and status["applied_at"] >= before


def test_a_store_that_lost_the_rollout_gets_the_last_known_state_back(backend: Backend) -> None:
    a = Rollout("lost", percent=10, secret_key=KEY, store=backend(), store_interval=0.05)
    b = Rollout("lost", percent=10, secret_key=KEY, store=backend(), store_interval=0.05)
    change(backend(), "lost", "set", percent=40, by="ops")
    until(lambda: a.percent == 40 and b.percent == 40)
    store = backend()
    if isinstance(store, MemoryStore):
        with store._cond:
            store._states.clear()  # what a restarted Redis without persistence looks like
            store._seq += 1
            store._cond.notify_all()
    else:
        for name in ("lost",):
            _forget(store, name)
    until(lambda: "lost" in backend().read(["lost"]))
    back = backend().read(["lost"])["lost"]
    assert back.percent == 40 and back.version == 3  # not the code's 10; one version up
    assert backend().history("lost")[-1].action == "restore"
    change(backend(), "lost", "set", percent=60, by="ops")
    until(lambda: a.percent == 60 and b.percent == 60)  # both follow on from there


def _forget(store: Any, name: str) -> None:
    from canarymw.store.redis import RedisStore
    from canarymw.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            conn.execute("DELETE FROM state WHERE name = ?", (name,))
    elif isinstance(store, RedisStore):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.delete(f"{store.prefix}{{{name}}}:state")
        client.publish(f"{store.prefix}changes", "{}")
        client.close()


def test_a_process_seeding_a_store_that_lost_the_rollout_is_followed_by_all() -> None:
    # Redis restarted empty, and a new worker seeded it (version 1, the code's percent)
    # before the old ones restored: the old ones must follow that, and every change after.
    store = MemoryStore()
    old = Rollout("epoch", percent=30, secret_key=KEY, store=store, store_interval=0.05)
    change(store, "epoch", "set", percent=55, by="ops")
    until(lambda: old.percent == 55)
    with store._cond:
        store._states.clear()
    new = Rollout("epoch", percent=30, secret_key=KEY, store=store, store_interval=0.05)
    assert new.percent == 30 and new.store_status()["version"] == 1
    until(lambda: old.percent == 30)  # a new epoch: version 1 is not "older" than 2
    change(store, "epoch", "rollback", by="ops")
    until(lambda: old.percent == 0 and new.percent == 0)  # the kill switch reaches everyone
