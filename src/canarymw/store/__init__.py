"""Shared rollout state: one percent for every worker of every host, changed live.

::

    rollout = Rollout("checkout-v2", percent=10, secret_key=KEY, store="redis://127.0.0.1:6379/0")

A store holds, per rollout, its :class:`RolloutState` (percent, paused, a version that
grows with every change, who changed it and why), an audit log of :class:`Change`
entries, outcome :class:`Counts` from every process, and a ledger of those processes
(a :class:`ProcessReport` each: what it added, whether it stopped gracefully; :func:`lost`
finds the ones killed before their final flush). Three stores keep one
contract: :class:`MemoryStore` (one process), :class:`~canarymw.store.sqlite.SQLiteStore`
(one host, many processes) and :class:`~canarymw.store.redis.RedisStore` (many hosts;
needs the ``redis`` extra). :func:`open_store` makes one from a URL.

Code and store: the percent in code seeds the store when it holds nothing for the
rollout. After that the store is the truth, so a redeploy never undoes an operator's
rollback or pause. A deploy whose code percent differs from the one the store last saw
from code applies it (audited, by ``deploy``) unless an operator has paused or rolled
the rollout back since (see :func:`on_start`).

The request path never waits for a store: each process keeps the last state it read,
and one background thread per store follows changes (see docs/stores.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._follow import change
from ._model import (
    GUARD_ACTIONS,
    OPERATOR_ACTIONS,
    WINDOW,
    Action,
    Assignment,
    Change,
    Counts,
    Lease,
    LeaseLost,
    ProcessReport,
    RolloutState,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownRollout,
    VersionConflict,
    lost,
    on_start,
    operate,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "GUARD_ACTIONS",
    "OPERATOR_ACTIONS",
    "WINDOW",
    "Action",
    "Assignment",
    "Change",
    "Counts",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "ProcessReport",
    "RedisStore",
    "RolloutState",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UnknownRollout",
    "VersionConflict",
    "change",
    "lost",
    "on_start",
    "open_store",
    "operate",
]

_MEMORY: dict[str, MemoryStore] = {}


def open_store(url: str) -> Store:
    """A store from a URL: ``memory://[name]``, ``sqlite:///path/to/file.db``,
    ``redis://host:port/db`` or ``rediss://...`` (``?prefix=...`` sets the key prefix).

    ``memory://name`` gives the same object for the same name within a process. SQLite
    URLs read like SQLAlchemy's: ``sqlite:///state.db`` is relative to the working
    directory, ``sqlite:////var/lib/app/state.db`` absolute.
    """
    if not isinstance(url, str):
        raise TypeError(f"a store URL must be a string, not {type(url).__name__}.")
    scheme, sep, rest = url.partition("://")
    shown = _redact(url)
    if not sep:
        raise ValueError(
            f"store {shown!r} is not a URL; use memory://, sqlite:///path/to/state.db or redis://host:6379/0."
        )
    scheme = scheme.lower()
    if scheme == "memory":
        return _MEMORY.setdefault(rest, MemoryStore())
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"store {shown!r} names no file; use sqlite:///state.db (three slashes).")
        from .sqlite import SQLiteStore

        return SQLiteStore(rest[1:])
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(
        f"store {shown!r} has an unknown scheme {scheme!r}; use memory, sqlite, redis or rediss."
    )


def _redact(url: str) -> str:
    # Error messages end up in logs: never a password.
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.partition(':')[0]}:***@{tail}"


def __getattr__(name: str) -> Any:
    # The SQLite and Redis stores load their modules (and redis-py) only when used.
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'canarymw.store' has no attribute {name!r}")
