"""One contract, every store: the ``backend`` fixture makes store objects on one backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from canarymw.store import MemoryStore, Store

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
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
