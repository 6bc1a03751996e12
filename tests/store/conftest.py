"""One contract, every store: the ``backend`` fixture makes store objects on one backend."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from canarymw.store import MemoryStore, Store

from .redis_server import RedisServer, free_port

REDIS_URL = os.environ.get("CANARYMW_TEST_REDIS", "redis://127.0.0.1:6379/0")

Backend = Callable[[], Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A factory of store objects that share one backend (a file, a key prefix).

    ``memory`` has no backend to share: every call returns the same object.
    """
    made: list[Any] = []
    if request.param == "memory":
        only = MemoryStore()

        def make() -> Store:
            return only

    elif request.param == "sqlite":
        from canarymw.store.sqlite import SQLiteStore

        path = tmp_path / "state.db"

        def make() -> Store:
            store = SQLiteStore(path)
            made.append(store)
            return store

    else:
        from canarymw.store.redis import RedisStore

        prefix = f"canarymw-test-{uuid.uuid4().hex[:12]}:"

        def make() -> Store:
            store = RedisStore(REDIS_URL, prefix=prefix)
            made.append(store)
            return store

    yield make
    for store in made:
        store.close()
    if request.param == "redis":
        delete_redis_keys(prefix)


def delete_redis_keys(prefix: str) -> None:
    """Delete the keys under ``prefix`` on the shared Redis."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own on the shared Redis; its keys are deleted afterwards."""
    pytest.importorskip("redis")
    prefix = f"canarymw-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_redis_keys(prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of the test's own on a free port (killed at the end)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cluster_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A one-node cluster: every slot on one server, and CROSSSLOT checked all the same."""
    bus = str(free_port())  # the default, port + 10000, may be taken or out of range
    options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", bus)
    server = RedisServer(tmp_path / "cluster", *options)
    server.start()
    try:
        assert server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith(b"+OK")
        deadline = time.monotonic() + 5
        while b"cluster_state:ok" not in server.command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        yield server
    finally:
        server.kill()
