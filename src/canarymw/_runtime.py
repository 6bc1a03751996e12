"""Process-wide plumbing: one after-fork registry, one rate limit for repeated log lines."""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable
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
