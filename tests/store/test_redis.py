"""RedisStore beyond the contract: its keys, URLs, secrets, faults, fork and cluster.

Real Redis only: the shared one (a unique key prefix per test, deleted afterwards) and
private ``redis-server`` processes on free ports, killed and restarted mid-test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from canarymw.store import Counts, RolloutState, StoreUnavailable, VersionConflict, on_start, operate

from .conftest import REDIS_URL
from .redis_server import RedisServer

redis = pytest.importorskip("redis")

from canarymw.store.redis import RedisStore  # noqa: E402


def seed(store: RedisStore, name: str = "r", percent: float = 10) -> RolloutState:
    made = on_start(name, None, percent, now=1000.0)
    assert made is not None
    store.write(name, 0, *made)
    return made[0]


def bump(store: RedisStore, state: RolloutState, percent: float, name: str = "r") -> RolloutState:
    new, change = operate(name, state, "set", percent=percent, by="ops", now=state.updated_at + 1)
    store.write(name, state.version, new, change)
    return new


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """A key prefix of its own on the shared Redis; its keys are deleted afterwards."""
    return redis_prefix


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def stores() -> Iterator[Callable[[RedisStore], RedisStore]]:
    """Closes every store a test registers, whatever happens."""
    made: list[RedisStore] = []
    yield lambda store: made.append(store) or store
    for store in made:
        store.close()


def test_importing_the_store_package_does_not_import_redis() -> None:
    code = "import sys, canarymw, canarymw.store; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_keys_hold_state_log_names_and_a_notification(
    prefix: str, raw: redis.Redis, stores: Callable[[RedisStore], RedisStore]
) -> None:
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    listener = raw.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"{prefix}changes")
    try:
        state = seed(store)
        held = raw.hgetall(f"{prefix}{{r}}:state")
        assert held[b"version"] == b"1" and RolloutState.from_json(held[b"json"]) == state
        assert raw.llen(f"{prefix}{{r}}:log") == 1
        assert raw.smembers(f"{prefix}names") == {b"r"}
        message = None
        deadline = time.monotonic() + 2
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
        assert message is not None and json.loads(message["data"]) == {"rollout": "r", "version": 1}
    finally:
        listener.close()


def test_a_conflict_names_the_version_held(prefix: str, stores: Callable[[RedisStore], RedisStore]) -> None:
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    seeded = seed(store)
    state = bump(store, seeded, 30)
    stale, change = operate("r", seeded, "pause", by="bob", now=2000.0)  # bob read version 1
    with pytest.raises(VersionConflict, match=r"rollout 'r' is at version 2, not 1: someone else"):
        store.write("r", 1, stale, change)
    assert store.read(["r"])["r"] == state and len(store.history("r")) == 2


def test_the_prefix_in_the_url_is_honoured(
    prefix: str, raw: redis.Redis, stores: Callable[[RedisStore], RedisStore]
) -> None:
    store = stores(RedisStore(f"{REDIS_URL}?prefix={prefix}&health_check_interval=5"))
    assert store.prefix == prefix and prefix in repr(store)
    seed(store)
    assert raw.exists(f"{prefix}{{r}}:state") and not raw.exists("canarymw:{r}:state")
    other = stores(RedisStore(REDIS_URL, prefix=prefix))
    assert other.names() == ["r"]


def test_the_password_stays_out_of_repr_and_errors(stores: Callable[[RedisStore], RedisStore]) -> None:
    for url in ("redis://:secret@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=secret"):
        store = stores(RedisStore(url))
        assert "secret" not in repr(store) and "127.0.0.1:1" in repr(store)
        calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (store.read, (["r"],)),
            (seed, (store,)),
            (store.history, ("r",)),
            (store.names, ()),
            (store.add_counts, ([Counts("r", "new", 1000, requests=1)],)),
            (store.read_counts, (["r"], 0)),
            (store.wait, (0.1,)),
        ]
        for call, args in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                call(*args)
            assert time.monotonic() - started < 2.0
            message = str(caught.value)
            assert "127.0.0.1:1" in message and "secret" not in message, message
            assert message.endswith("."), message


def test_auth_failures_and_foreign_keys_are_unavailable(
    tmp_path: Path, prefix: str, raw: redis.Redis, stores: Callable[[RedisStore], RedisStore]
) -> None:
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "auth", "--requirepass", "right-one", "--unixsocket", str(sock))
    server.start()
    try:
        wrong = stores(RedisStore(f"redis://:wrong-one@127.0.0.1:{server.port}/0"))
        with pytest.raises(StoreUnavailable) as caught:
            wrong.read(["r"])
        message = str(caught.value)
        assert f"127.0.0.1:{server.port}" in message and "wrong-one" not in message, message
        by_socket = stores(RedisStore(f"unix://{sock}?db=0&password=right-one&prefix={prefix}"))
        assert f"unix://{sock}" in repr(by_socket) and "right-one" not in repr(by_socket)
        assert by_socket.wait(0) is True
        state = seed(by_socket)
        assert by_socket.read(["r"]) == {"r": state} and by_socket.wait(2.0) is True
    finally:
        server.kill()
    raw.set(f"{prefix}{{x}}:state", "not a hash")  # a key someone else put there
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        store.read(["x"])


def test_the_audit_log_is_capped(
    prefix: str, raw: redis.Redis, stores: Callable[[RedisStore], RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    import canarymw.store.redis as module

    assert module._HISTORY == 1000  # as MemoryStore; a smaller cap keeps this test fast
    monkeypatch.setattr(module, "_HISTORY", 20)
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    state = seed(store)
    for i in range(24):
        state = bump(store, state, i)
    assert state.version == 25 and raw.llen(f"{prefix}{{r}}:log") == 20
    log = store.history("r", limit=5000)
    assert [c.version for c in log] == list(range(6, 26))
    assert [c.version for c in store.history("r", limit=3)] == [23, 24, 25]
    assert store.history("r", limit=0) == []


def test_counters_expire_and_expired_windows_are_forgotten(
    prefix: str, raw: redis.Redis, stores: Callable[[RedisStore], RedisStore]
) -> None:
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    store.add_counts(
        [
            Counts("r", "new", 1000, requests=2, errors=1, latency_sum=0.25, buckets={7: 2}),
            Counts("r", "old:v1", 1010, requests=1),  # a colon in a variant name
        ]
    )
    key = f"{prefix}{{r}}:c:1000:new"
    assert raw.hgetall(key) == {b"requests": b"2", b"errors": b"1", b"latency_sum": b"0.25", b"b:7": b"2"}
    for k in (key, f"{prefix}{{r}}:windows", f"{prefix}{{r}}:c:1010:old:v1"):
        assert 0 < raw.ttl(k) <= 8 * 24 * 3600
    got = store.read_counts(["r"], since=0)
    assert [(c.variant, c.window) for c in got] == [("new", 1000), ("old:v1", 1010)]
    raw.delete(key)  # as if it had expired
    assert [(c.variant, c.window) for c in store.read_counts(["r"], since=0)] == [("old:v1", 1010)]
    assert raw.zrange(f"{prefix}{{r}}:windows", 0, -1) == [b"1010:old:v1"]


def test_a_client_passed_in_is_left_open(prefix: str, stores: Callable[[RedisStore], RedisStore]) -> None:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        store = stores(RedisStore(client, prefix=prefix))
        assert "6379" in repr(store)
        assert store.wait(0) is True  # subscribed
        state = seed(store)
        store.add_counts([Counts("r", "new", 1000, requests=1, buckets={3: 1})])
        assert store.read(["r"]) == {"r": state} and store.names() == ["r"]
        assert [c.action for c in store.history("r")] == ["seed"]
        assert store.read_counts(["r"], 0)[0].buckets == {3: 1}
        connection = client.client_id()
        store.close()
        alive = {int(c["id"]) for c in client.client_list()}
        assert connection in alive  # the client's own connection was not closed
        assert store.read(["r"]) == {"r": state}  # and the store works on
    finally:
        client.close()


def test_wait_drains_every_pending_notification(
    prefix: str, stores: Callable[[RedisStore], RedisStore]
) -> None:
    watcher = stores(RedisStore(REDIS_URL, prefix=prefix))
    writer = stores(RedisStore(REDIS_URL, prefix=prefix))
    assert watcher.wait(0) is True  # the first call subscribes, and says "read now"
    state = seed(writer)
    for percent in (20, 30, 40):
        state = bump(writer, state, percent)
    assert watcher.wait(2.0) is True
    started = time.monotonic()
    assert watcher.wait(0.2) is False
    assert 0.15 < time.monotonic() - started < 1.0


def test_a_restarted_redis_is_used_again_by_the_same_objects(
    private_redis: RedisServer, stores: Callable[[RedisStore], RedisStore]
) -> None:
    url = private_redis.url
    store = stores(RedisStore(url, prefix="t:", connect_timeout=0.5, timeout=0.5))
    watcher = stores(RedisStore(url, prefix="t:", connect_timeout=0.5, timeout=0.5))
    assert watcher.wait(0) is True
    state = seed(store)
    assert watcher.wait(2.0) is True

    private_redis.kill()
    for call in (lambda: store.read(["r"]), lambda: bump(store, state, 50), store.names):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{private_redis.port}"):
            call()
        assert time.monotonic() - started < 2.0
    for _ in range(3):  # the subscription broke: wait polls or says Redis is down, never hangs
        started = time.monotonic()
        try:
            assert watcher.wait(0.3) is True
        except StoreUnavailable:
            pass
        assert time.monotonic() - started < 1.5

    private_redis.start()  # empty: no persistence
    assert store.read(["r"]) == {}
    state = seed(store)
    deadline = time.monotonic() + 5
    subscribers = 0
    while subscribers == 0 and time.monotonic() < deadline:
        try:
            watcher.wait(0.3)
        except StoreUnavailable:
            time.sleep(0.1)
        subscribers = dict(redis_numsub(url, "t:changes")).get(b"t:changes", 0)
    assert subscribers == 1, "the watcher did not subscribe again"
    while watcher.wait(0):  # catch up: a subscription made anew says "read now" once
        pass

    def later() -> None:
        time.sleep(0.2)
        bump(store, state, 60)

    thread = threading.Thread(target=later)
    thread.start()
    started = time.monotonic()
    assert watcher.wait(5.0) is True
    assert time.monotonic() - started < 1.0
    thread.join()
    assert watcher.read(["r"])["r"].percent == 60


def redis_numsub(url: str, channel: str) -> list[tuple[bytes, int]]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.pubsub_numsub(channel))
    finally:
        client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_connections(
    prefix: str, stores: Callable[[RedisStore], RedisStore]
) -> None:
    store = stores(RedisStore(REDIS_URL, prefix=prefix))
    assert store.wait(0) is True  # subscribed
    state = seed(store)
    assert store.wait(2.0) is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if store._pubsub is None and store.read(["r"])["r"] == state:
                bump(store, state, 70)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.wait(2.0) is True  # the parent's subscription still works
    assert store.read(["r"])["r"].percent == 70


def test_a_cluster_client_works(
    cluster_redis: RedisServer, stores: Callable[[RedisStore], RedisStore]
) -> None:
    from redis.cluster import RedisCluster

    client = RedisCluster(host="127.0.0.1", port=cluster_redis.port, socket_timeout=1)
    try:
        store = stores(RedisStore(client, prefix="c:"))
        assert "cluster" in repr(store)
        assert store.wait(0) is True
        state = seed(store)
        seed(store, "s")
        with pytest.raises(VersionConflict):
            seed(store)
        state = bump(store, state, 40)
        assert store.read(["r", "s", "x"])["r"] == state and store.names() == ["r", "s"]
        assert [c.action for c in store.history("r")] == ["seed", "set"]
        assert store.wait(1.0) is True
        store.add_counts([Counts("r", "new", 1000, requests=2), Counts("s", "old", 1000, requests=3)])
        assert [(c.rollout, c.requests) for c in store.read_counts(["r", "s"], 0)] == [("r", 2), ("s", 3)]
    finally:
        client.close()
