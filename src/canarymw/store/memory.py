"""``MemoryStore``: shared rollout state inside one process (the reference store)."""

from __future__ import annotations

import threading
from collections import deque

from ._model import HISTORY, RETENTION, WINDOW, Change, Counts, RolloutState, check_write, conflict


class MemoryStore:
    """Rollout state, audit log and counters in this process's memory.

    For one-process apps, tests, and as the reference for the other stores: it keeps
    their contract (compare-and-set on the version, an audit entry with every change)
    without I/O. Nothing is shared with other processes; use :class:`SQLiteStore` for
    one host and :class:`RedisStore` for many.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, RolloutState] = {}
        self._log: dict[str, deque[Change]] = {}
        self._counts: dict[tuple[str, str, int], Counts] = {}
        self._seq = 0
        self._seen = 0

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._states)} rollouts)"

    def read(self, names: list[str]) -> dict[str, RolloutState]:
        with self._cond:
            return {n: self._states[n] for n in names if n in self._states}

    def write(self, name: str, expected_version: int, state: RolloutState, change: Change) -> None:
        check_write(name, expected_version, state, change)
        with self._cond:
            current = self._states.get(name)
            have = 0 if current is None else current.version
            if have != expected_version:
                raise conflict(name, have, expected_version)
            self._states[name] = state
            self._log.setdefault(name, deque(maxlen=HISTORY)).append(change)
            self._seq += 1
            self._cond.notify_all()

    def history(self, name: str, limit: int = 50) -> list[Change]:
        with self._cond:
            log = list(self._log.get(name, ()))
        return log[-limit:] if limit > 0 else []

    def names(self) -> list[str]:
        with self._cond:
            return sorted(self._states)

    def wait(self, timeout: float) -> bool:
        with self._cond:
            changed = self._cond.wait_for(lambda: self._seq != self._seen, timeout)
            self._seen = self._seq
            return bool(changed)

    def add_counts(self, counts: list[Counts]) -> None:
        with self._cond:
            if counts:
                oldest = max(c.window for c in counts) - RETENTION
                for key in [k for k in self._counts if k[2] < oldest]:
                    del self._counts[key]
            for c in counts:
                key = (c.rollout, c.variant, c.window)
                held = self._counts.get(key)
                if held is None:
                    held = self._counts[key] = Counts(c.rollout, c.variant, c.window)
                held.add(c)

    def read_counts(self, names: list[str], since: float) -> list[Counts]:
        wanted = set(names)
        out = []
        with self._cond:
            for (rollout, variant, window), held in sorted(self._counts.items()):
                if rollout in wanted and window + WINDOW > since:
                    copy = Counts(rollout, variant, window)
                    copy.add(held)
                    out.append(copy)
        return out

    def close(self) -> None:
        pass
