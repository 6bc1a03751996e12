"""The store a ``canarymw`` command is given, in the tests of the CLI (here and in tests/guard)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from canarymw import cli
from canarymw.store import Store, open_store

from .conftest import REDIS_URL, delete_redis_keys


@dataclass
class Where:
    """A store URL the command is given, and a store object on the same backend to seed and check."""

    url: str
    store: Store


@contextlib.contextmanager
def where_for(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Where]:
    """A new store of ``kind`` (``sqlite``, ``redis`` or ``memory``), none of the CLI's
    environment variables set; the store is closed and its Redis keys deleted afterwards."""
    for name in (cli.STORE_ENV, cli.BY_ENV, cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"  # an absolute path: four slashes in all
        assert url.startswith("sqlite:////")
    elif kind == "redis":
        prefix = f"canarymw-cli-test-{uuid.uuid4().hex[:12]}:"
        url = f"{REDIS_URL}?prefix={prefix}"
    else:
        assert kind == "memory", kind
        url = f"memory://cli-test-{uuid.uuid4().hex[:12]}"
    store = open_store(url)
    store.names()  # creates the SQLite file, as the first process running a rollout does
    yield Where(url, store)
    store.close()
    if kind == "redis":
        delete_redis_keys(prefix)
