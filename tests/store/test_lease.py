"""The controller lease and fenced writes, on every store: who holds a rollout's lease,
its fencing token, and writes refused once the lease changed hands or expired.

The races run contenders in threads (sharing a store object, and each with its own, so
its own connections) and in processes started with ``spawn``; every contender logs when
it surely held the lease and which fenced writes went through, and the logs are checked
against each other afterwards.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import random
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from canarymw.store import (
    Lease,
    LeaseLost,
    MemoryStore,
    RolloutState,
    Store,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    on_start,
    open_store,
    operate,
)

from .conftest import REDIS_URL, Backend
from .redis_server import RedisServer, free_port

TTL = 0.05
"""Seconds of a contender's lease in the races: short, so that leases expire often."""
POLL = 0.005
"""Seconds a contender sleeps between two calls (to retry, or before it renews)."""
RACE = 0.25
"""Seconds every race runs."""
MARGIN = 0.002
"""Seconds of slack in the hold check: Redis counts a lease's expiry in whole ms."""


def seed(store: Store, name: str = "r", fence: int | None = None) -> RolloutState:
    made = on_start(name, None, 10, now=1000.0)
    assert made is not None
    store.write(name, 0, *made, fence=fence)
    return made[0]


def bump(store: Store, state: RolloutState, percent: float, fence: int | None = None) -> RolloutState:
    new, change = operate("r", state, "set", percent=percent, by="ctl", now=state.updated_at + 1)
    store.write("r", state.version, new, change, fence=fence)
    return new


# -- one holder at a time -------------------------------------------------------------------


def test_a_free_lease_is_taken_and_renewed_with_its_token(backend: Backend) -> None:
    store = backend()
    assert store.lease_info("r") is None
    token = store.lease("r", "a", 5)
    assert isinstance(token, int) and token >= 1
    info = store.lease_info("r")
    assert isinstance(info, Lease) and (info.holder, info.token) == ("a", token)
    assert 4 < info.expires_in <= 5
    assert store.lease("r", "a", 30) == token  # a renewal keeps the token
    renewed = store.lease_info("r")
    assert renewed is not None and renewed.token == token and 29 < renewed.expires_in <= 30
    assert store.names() == [] and store.read(["r"]) == {}  # a lease needs no rollout state
    assert store.lease_info("s") is None and store.lease("s", "b", 5) is not None  # per rollout
    assert store.lease("forever", "c", 1e300) is not None and store.lease("forever", "d", 1) is None
    forever = store.lease_info("forever")
    assert forever is not None and forever.expires_in > 1e8


def test_another_holder_waits_until_the_lease_expires(backend: Backend) -> None:
    store, other = backend(), backend()
    token = store.lease("r", "a", 0.2)
    assert token is not None
    time.sleep(0.1)
    assert store.lease("r", "a", 0.2) == token  # renewed: 0.2 s from now
    assert other.lease("r", "b", 5) is None  # held: nothing changes
    info = other.lease_info("r")
    assert info is not None and (info.holder, info.token) == ("a", token) and info.expires_in <= 0.2
    time.sleep(0.15)  # past the first expiry, not the renewed one
    assert other.lease("r", "b", 5) is None
    time.sleep(0.1)
    assert other.lease_info("r") is None and store.lease_info("r") is None
    taken = other.lease("r", "b", 5)
    assert taken is not None and taken > token
    assert store.lease("r", "a", 5) is None
    info = store.lease_info("r")
    assert info is not None and (info.holder, info.token) == ("b", taken)


def test_a_released_lease_is_free_at_once(backend: Backend) -> None:
    store, other = backend(), backend()
    token = store.lease("r", "a", 30)
    assert token is not None
    other.release("r", "b")  # b holds none: nothing happens
    other.release("nothing-here", "b")
    assert other.lease("r", "b", 30) is None
    store.release("r", "a")
    assert store.lease_info("r") is None
    taken = other.lease("r", "b", 30)
    assert taken is not None and taken > token
    store.release("r", "a")  # no longer a's: b keeps it
    info = store.lease_info("r")
    assert info is not None and (info.holder, info.token) == ("b", taken)


def test_tokens_grow_with_every_handover(backend: Backend) -> None:
    stores = [backend() for _ in range(3)]
    tokens: list[int] = []
    for i in range(30):
        store, holder = stores[i % 3], f"h{i % 3}"
        ttl = 0.02 if i % 5 == 4 else 30  # every fifth handover is by expiry, not release
        token = store.lease("r", holder, ttl)
        assert token is not None, f"handover {i}"
        assert store.lease("r", holder, ttl) == token
        tokens.append(token)
        if ttl < 1:
            time.sleep(0.03)
            if i % 10 == 9:  # its own expired lease, taken again: a new token all the same
                again = store.lease("r", holder, 30)
                assert again is not None and again > token
                tokens.append(again)
                store.release("r", holder)
        else:
            store.release("r", holder)
    assert tokens == sorted(set(tokens)), tokens


# -- fenced writes --------------------------------------------------------------------------


def test_a_fenced_write_with_the_current_token_goes_through(backend: Backend) -> None:
    store = backend()
    token = store.lease("r", "ctl", 30)
    assert token is not None
    state = seed(store, fence=token)  # a creation may be fenced too
    state = bump(store, state, 30, fence=token)
    assert store.lease("r", "ctl", 30) == token
    state = bump(store, state, 40, fence=token)
    assert store.read(["r"]) == {"r": state} and [c.version for c in store.history("r")] == [1, 2, 3]


def test_a_stale_fence_after_a_takeover_writes_nothing(backend: Backend) -> None:
    store, other = backend(), backend()
    old = store.lease("r", "ctl-1", 30)
    assert old is not None
    state = bump(store, seed(store, fence=old), 20, fence=old)
    store.release("r", "ctl-1")
    new = other.lease("r", "ctl-2", 30)
    assert new is not None and new > old
    history = store.history("r")
    message = f"rollout 'r' is controlled by another process now (lease token {new}, ours {old}); "
    with pytest.raises(LeaseLost) as info:
        bump(store, state, 90, fence=old)  # the version is right: only the fence is stale
    assert str(info.value) == message + "this write was refused."
    assert isinstance(info.value, StoreError)
    assert store.read(["r"]) == {"r": state} and store.history("r") == history
    with pytest.raises(LeaseLost):
        bump(store, state, 90, fence=new + 1)  # a token never given
    state = bump(other, state, 50, fence=new)
    assert store.read(["r"]) == {"r": state}


def test_a_fence_of_an_expired_or_missing_lease_writes_nothing(backend: Backend) -> None:
    store = backend()
    with pytest.raises(LeaseLost, match=r"the controller lease of rollout 'r' expired or was released"):
        seed(store, fence=1)  # no lease was ever taken
    assert store.read(["r"]) == {} and store.names() == [] and store.history("r") == []
    state = seed(store)
    token = store.lease("r", "ctl", 0.05)
    assert token is not None
    state = bump(store, state, 20, fence=token)
    time.sleep(0.08)  # paused (by GC, a partition) past the lease; nobody took over
    with pytest.raises(LeaseLost, match=rf"expired or was released \(ours had token {token}\); this"):
        bump(store, state, 30, fence=token)
    assert store.read(["r"]) == {"r": state} and len(store.history("r")) == 2
    again = store.lease("r", "ctl", 30)
    assert again is not None and again > token  # the write needs the new token now
    with pytest.raises(LeaseLost):
        bump(store, state, 30, fence=token)
    store.release("r", "ctl")
    with pytest.raises(LeaseLost, match="expired or was released"):
        bump(store, state, 30, fence=again)
    other = store.lease("s", "ctl", 30)  # the lease of another rollout is no fence for this one
    assert other is not None
    with pytest.raises(LeaseLost):
        bump(store, state, 30, fence=other)
    assert store.read(["r"]) == {"r": state} and len(store.history("r")) == 2


def test_operators_are_never_fenced(backend: Backend) -> None:
    store = backend()
    state = seed(store)
    token = store.lease("r", "ctl", 30)
    assert token is not None
    before = bump(store, state, 70)  # an operator writes without a fence while a controller holds
    state = bump(store, before, 80, fence=token)
    stale, change = operate("r", before, "pause", by="ops", now=3000.0)
    with pytest.raises(VersionConflict):  # but compare-and-set still holds
        store.write("r", before.version, stale, change)
    store.release("r", "ctl")
    state = bump(store, state, 0)
    assert store.read(["r"]) == {"r": state}


def test_lease_arguments_are_checked(backend: Backend) -> None:
    store = backend()
    for ttl in (0, -1, math.nan, math.inf, -math.inf, True, "1", None):
        with pytest.raises(ValueError, match=r"ttl .* cannot be used; give a finite number"):
            store.lease("r", "a", ttl)  # type: ignore[arg-type]
    for holder in ("", None, 3):
        with pytest.raises(ValueError, match=r"lease holder .* cannot be used; name the holder"):
            store.lease("r", holder, 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="lease holder"):
            store.release("r", holder)  # type: ignore[arg-type]
    for name in ("", " ", "x" * 201, 7):
        with pytest.raises(ValueError, match="rollout name"):
            store.lease(name, "a", 1)  # type: ignore[arg-type]
    made = on_start("r", None, 10, now=1000.0)
    assert made is not None
    for fence in ("1", True, 1.0):
        with pytest.raises(ValueError, match="is not a lease token"):
            store.write("r", 0, *made, fence=fence)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must take it from version"):  # check_write comes first
        store.write("r", 5, *made, fence=1)
    assert store.read(["r"]) == {} and store.lease_info("r") is None


# -- races ----------------------------------------------------------------------------------


@dataclass
class Log:
    """What one contender saw in a race."""

    holder: str
    holds: list[tuple[int, float, float]] = field(default_factory=list)
    """(token, from, to): it surely held the lease between the end of a lease() call that
    returned the token and the start of that call plus TTL (an empty span if slow)."""
    releases: list[tuple[int, float]] = field(default_factory=list)
    """(token, when it started to release it): the token's spans end there."""
    writes: list[tuple[int, int]] = field(default_factory=list)
    """(version, token) of every fenced write that went through."""
    refused_stale: int = 0
    """Fenced writes refused after a pause past the TTL (every one must be)."""


def contend(store: Store, name: str, holder: str, seed: int, clock: Callable[[], float]) -> Log:
    """Race for the lease for RACE seconds; while holding it, write under its fence, then
    in turn keep it, release it, keep it, or pause past its expiry and try a stale write."""
    rng = random.Random(seed)
    log = Log(holder)
    done = 0
    end_at = clock() + RACE
    while clock() < end_at:
        start = clock()
        token = store.lease(name, holder, TTL)
        if token is None:
            time.sleep(rng.uniform(0, POLL))
            continue
        log.holds.append((token, clock(), start + TTL))
        if not _fenced_write(store, name, holder, token, rng, log):
            continue  # lost while writing: a slow moment (the check below says it was fair)
        done += 1
        step = done % 4
        if step == 1:  # release, and give the others a moment to take over
            log.releases.append((token, clock()))
            store.release(name, holder)
            time.sleep(2 * POLL)
        elif step == 3:  # a pause (GC, a partition) outlives the lease; the write must fail
            time.sleep(TTL + 0.01)
            if _fenced_write(store, name, holder, token, rng, log):
                raise AssertionError(f"{holder} wrote with token {token} after its lease expired")
            log.refused_stale += 1
        else:
            time.sleep(POLL)  # then renew
    return log


def _fenced_write(store: Store, name: str, holder: str, token: int, rng: random.Random, log: Log) -> bool:
    state = store.read([name])[name]
    new, change = operate(name, state, "set", percent=rng.randint(0, 100), by=holder, reason=f"token {token}")
    try:
        store.write(name, state.version, new, change, fence=token)
    except (LeaseLost, VersionConflict):
        return False
    log.writes.append((new.version, token))
    return True


def check_race(logs: list[Log], store: Store, name: str) -> None:
    # One holder per token: every take hands out a token of its own.
    owner: dict[int, str] = {}
    for log in logs:
        for token, _, _ in log.holds:
            assert owner.setdefault(token, log.holder) == log.holder, f"token {token} given twice"
    # At most one holder at any moment: a token's first sure moment comes after the last
    # sure moment of every smaller token (its expiry or release came first).
    released = {token: at for log in logs for token, at in log.releases}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for log in logs:
        for token, since, until in log.holds:
            first[token] = min(first.get(token, since), since)
            last[token] = max(last.get(token, -math.inf), min(until, released.get(token, until)))
    latest = -math.inf
    for token in sorted(first):
        assert first[token] >= latest - MARGIN, f"token {token} was held while a smaller one was"
        latest = max(latest, last[token])
    # The fenced writes that went through: one after the other, their tokens never going
    # back, exactly those the store logged (a stale one would break the token order).
    writes = sorted(w for log in logs for w in log.writes)
    versions = [v for v, _ in writes]
    tokens = [t for _, t in writes]
    assert versions == list(range(2, 2 + len(writes))), versions
    assert tokens == sorted(tokens), tokens
    logged = [(c.version, c.reason) for c in store.history(name, limit=1000)[1:]]
    assert logged == [(v, f"token {t}") for v, t in writes]
    # The race did what it is for: handovers, several writers, stale writes refused.
    assert len(owner) >= 3 and len({owner[t] for t in tokens}) >= 2, owner
    assert sum(log.refused_stale for log in logs) >= 1


def clock_of(store: Store) -> Callable[[], float]:
    """The clock the store's leases expire by (Redis: its server's, on this host)."""
    return time.monotonic if isinstance(store, MemoryStore) else time.time


def race_in_threads(stores: list[Store], name: str = "r") -> None:
    seed(stores[0], name)
    logs: list[Log | None] = [None] * len(stores)
    errors: list[BaseException] = []
    go = threading.Barrier(len(stores))

    def run(i: int) -> None:
        try:
            go.wait(timeout=10)
            logs[i] = contend(stores[i], name, f"t{i}", seed=i, clock=clock_of(stores[i]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    check_race([log for log in logs if log is not None], stores[0], name)


@pytest.mark.parametrize("contenders", [2, 3])
def test_contenders_in_threads_sharing_a_store(backend: Backend, contenders: int) -> None:
    store = backend()
    race_in_threads([store] * contenders)


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
@pytest.mark.parametrize("contenders", [2, 3])
def test_contenders_in_threads_with_their_own_connections(backend: Backend, contenders: int) -> None:
    stores = [backend() for _ in range(contenders)]
    assert len({id(s) for s in stores}) == contenders
    race_in_threads(stores)


def url_of(store: Store) -> str:
    from canarymw.store.redis import RedisStore
    from canarymw.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return f"sqlite:///{store.path}"
    assert isinstance(store, RedisStore)
    return f"{REDIS_URL}?prefix={quote(store.prefix)}"


def contend_in_process(url: str, holder: str, seed: int, races: list[tuple[str, Any]], results: Any) -> None:
    """A spawned process's part: connect, then for each (rollout, barrier) of ``races`` wait
    for the others and race; send back the logs, or what went wrong."""
    store = open_store(url)
    try:
        logs = []
        for name, go in races:
            store.lease_info(name)  # connected (and the file opened) before the start
            go.wait(timeout=60)
            logs.append((name, contend(store, name, holder, seed, clock=time.time)))
        results.put(("ok", logs))
    except BaseException:
        for _, go in races:
            go.abort()  # the others stop waiting for this one
        results.put(("error", f"{holder}: {traceback.format_exc()}"))
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
def test_contenders_in_processes(backend: Backend) -> None:
    # One start for two races (starting a process costs more than a race): processes 0 and
    # 1 race for rollout "two", then all three for rollout "three".
    store = backend()
    seed(store, "two")
    seed(store, "three")
    ctx = multiprocessing.get_context("spawn")
    two, three = ctx.Barrier(2), ctx.Barrier(3)
    results = ctx.Queue()
    races = [[("two", two), ("three", three)]] * 2 + [[("three", three)]]
    processes = [
        ctx.Process(target=contend_in_process, args=(url_of(store), f"p{i}", i, joins, results))
        for i, joins in enumerate(races)
    ]
    for p in processes:
        p.start()
    try:
        got = [results.get(timeout=60) for _ in processes]
    except queue.Empty:
        pytest.fail("a contending process sent no log back")
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    results.close()
    errors = [detail for status, detail in got if status != "ok"]
    assert not errors, "\n".join(errors)
    for name, contenders in (("two", 2), ("three", 3)):
        logs = [log for _, logs in got for race, log in logs if race == name]
        assert len(logs) == contenders
        check_race(logs, store, name)


# -- backend specifics ----------------------------------------------------------------------


def test_an_sqlite_file_of_schema_1_gains_the_lease_table(tmp_path: Path) -> None:
    from canarymw.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, SQLiteStore

    path = tmp_path / "old.db"
    made = on_start("r", None, 10, now=1000.0)
    assert made is not None
    state, change = made
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _MIGRATIONS[0]:  # a file as the first release left it
        conn.execute(statement)
    conn.execute("INSERT INTO state VALUES ('r', 1, ?)", (state.to_json(),))
    conn.execute("INSERT INTO audit (name, version, json) VALUES ('r', 1, ?)", (change.to_json(),))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = SQLiteStore(path)
    try:
        assert store.read(["r"]) == {"r": state} and store.history("r") == [change]
        token = store.lease("r", "ctl", 30)
        assert token is not None
        assert bump(store, state, 40, fence=token).version == 2
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 2  # the version that brought the lease table
    assert conn.execute("SELECT holder, token FROM lease").fetchall() == [("ctl", token)]
    conn.close()


def test_an_sqlite_release_keeps_the_token_row(tmp_path: Path) -> None:
    from canarymw.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "state.db")
    try:
        token = store.lease("r", "ctl", 30)
        store.release("r", "ctl")
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT name, holder, token, expires_at FROM lease").fetchall() == [
        ("r", None, token, 0)
    ]
    conn.close()


def test_sqlite_lease_errors_are_unavailable(tmp_path: Path) -> None:
    from canarymw.store.sqlite import SQLiteStore

    missing = SQLiteStore(tmp_path / "missing" / "state.db")
    for call in (
        lambda: missing.lease("r", "a", 1),
        lambda: missing.release("r", "a"),
        lambda: missing.lease_info("r"),
    ):
        with pytest.raises(StoreUnavailable, match="does not exist"):
            call()
    store = SQLiteStore(tmp_path / "state.db", timeout=0.1)
    try:
        state = seed(store)
        token = store.lease("r", "a", 30)
        holder = sqlite3.connect(store.path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match=r"while taking the controller lease of rollout 'r'"):
                store.lease("r", "a", 30)
            with pytest.raises(StoreUnavailable, match="locked by another connection"):
                bump(store, state, 20, fence=token)
        finally:
            holder.rollback()
            holder.close()
        assert bump(store, state, 20, fence=token).version == 2  # and it recovers
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_the_redis_lease_is_a_hash_that_never_expires(backend: Backend) -> None:
    import redis

    from canarymw.store.redis import RedisStore

    store = backend()
    assert isinstance(store, RedisStore)
    key = f"{store.prefix}{{r}}:lease"
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        token = store.lease("r", "ctl", 0.05)
        held = raw.hgetall(key)
        assert held[b"holder"] == b"ctl" and int(held[b"token"]) == token
        assert raw.ttl(key) == -1  # the token must outlive every holder
        time.sleep(0.07)
        assert raw.exists(key) and store.lease_info("r") is None
        again = store.lease("r", "ctl", 30)
        store.release("r", "ctl")
        held = raw.hgetall(key)
        assert b"holder" not in held and int(held[b"token"]) == again and raw.ttl(key) == -1
        raw.delete(key)  # as if Redis had restarted without persistence
        time.sleep(0.005)
        after_loss = store.lease("r", "ctl", 30)
        assert after_loss is not None and again is not None and after_loss > again
    finally:
        raw.close()


def test_redis_lease_errors_are_unavailable() -> None:
    from canarymw.store.redis import RedisStore

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2, timeout=0.2)
    made = on_start("r", None, 10, now=1000.0)
    assert made is not None
    try:
        for doing, call in (
            ("take the controller lease of rollout 'r'", lambda: store.lease("r", "a", 1)),
            ("release the controller lease of rollout 'r'", lambda: store.release("r", "a")),
            ("read the controller lease of rollout 'r'", lambda: store.lease_info("r")),
            ("write rollout 'r'", lambda: store.write("r", 0, *made, fence=1)),
        ):
            with pytest.raises(StoreUnavailable, match=rf"cannot {doing} on Redis at redis://127\.0\.0\.1"):
                call()
    finally:
        store.close()


def test_fenced_writes_work_on_a_redis_cluster(cluster_redis: RedisServer) -> None:
    from redis.cluster import RedisCluster

    from canarymw.store.redis import RedisStore

    client = RedisCluster(host="127.0.0.1", port=cluster_redis.port, socket_timeout=1)
    store = RedisStore(client, prefix="c:")
    try:
        token = store.lease("r", "ctl", 30)
        assert token is not None and store.lease("r", "other", 30) is None
        state = bump(store, seed(store, fence=token), 30, fence=token)
        store.release("r", "ctl")
        info = store.lease_info("r")
        assert info is None
        taken = store.lease("r", "other", 30)
        assert taken is not None and taken > token
        with pytest.raises(LeaseLost, match="controlled by another process now"):
            bump(store, state, 60, fence=token)
        assert store.read(["r"]) == {"r": state} and store.names() == ["r"]
    finally:
        store.close()
        client.close()
