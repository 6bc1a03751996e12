"""Process-wide plumbing: one after-fork registry, one rate limit for repeated log lines,
and the bounded cache every cache of client input uses."""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")

_resets: weakref.WeakKeyDictionary[Any, Callable[[Any], object]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_installed = False


def reset_after_fork(owner: T, reset: Callable[[T], object]) -> None:
    """Call ``reset(owner)`` in every child forked while ``owner`` is alive.

    For state a child must not share with its parent (pooled ids, sockets, queues,
    threads). ``reset`` is called with no lock held and must not block. Pass the class's
    function (``Pool._forget``), not a bound method, or ``owner`` is never freed. The
    fork hook is installed on first use, never at import.
    """
    global _installed
    with _lock:
        _resets[owner] = reset
        if _installed or not hasattr(os, "register_at_fork"):
            return
        _installed = True
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    global _lock
    # Only the forking thread survives: a lock another thread held stays held forever.
    _lock = threading.Lock()
    for owner, reset in list(_resets.items()):
        reset(owner)


class RateLimit:
    """Answers True at most once per ``interval`` seconds (thread-safe).

    For log lines about failures that repeat on every request: the first is logged,
    then one per interval, with the running count the caller keeps.
    """

    __slots__ = ("_last", "_lock", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True if nothing was let through during the last ``interval`` seconds."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return False
            self._last = now
            return True


V = TypeVar("V")


class BoundedCache(dict[str, V]):
    """A dict bounded in entries and in key characters that evicts its oldest eighth.

    A flood of new keys (forged or farmed cookies, junk neighbour cookies) only ever
    pushes out the oldest entries, never the whole cache at once; a miss costs the
    client a re-check, never correctness. Reads are plain ``dict.get``; writes go
    through :meth:`put` under a lock.
    """

    __slots__ = ("_chars", "_lock", "max_chars", "max_items", "max_key")

    def __init__(self, max_items: int, max_chars: int, max_key: int) -> None:
        super().__init__()
        self.max_items = max_items
        self.max_chars = max_chars
        self.max_key = max_key
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, key: str, value: V) -> None:
        size = len(key)
        if size > self.max_key:
            return
        with self._lock:
            if self.pop(key, None) is None:
                self._chars += size
            self[key] = value  # (re)inserted last: recently used entries go last
            while len(self) > self.max_items or self._chars > self.max_chars:
                for old in list(islice(self, max(1, len(self) // 8))):
                    del self[old]
                    self._chars -= len(old)

    def clear(self) -> None:
        with self._lock:
            super().clear()
            self._chars = 0
