"""``MemoryStore``: shared rollout state inside one process (the reference store)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from ._model import (
    HISTORY,
    IDENTITY_KEEP,
    PROCESS_KEEP,
    RETENTION,
    WINDOW,
    Assignment,
    Change,
    Counts,
    Lease,
    ProcessReport,
    RolloutState,
    check_assignment,
    check_fence,
    check_holder,
    check_name,
    check_report,
    check_ttl,
    check_write,
    conflict,
    lease_lost,
    user_digest,
)


@dataclass(slots=True)
class _Held:
    holder: str | None  # None once released
    token: int
    expires_at: float  # time.monotonic()


class MemoryStore:
    """Rollout state, audit log, counters and their ledger in this process's memory.

    For one-process apps, tests, and as the reference for the other stores: it keeps
    their contract (compare-and-set on the version, an audit entry with every change)
    without I/O. Nothing is shared with other processes; use :class:`SQLiteStore` for
    one host and :class:`RedisStore` for many. Controller leases expire by this
    process's monotonic clock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, RolloutState] = {}
        self._log: dict[str, deque[Change]] = {}
        self._counts: dict[tuple[str, str, int], Counts] = {}
        # Kept after a release or an expiry: the next holder's token must be larger.
        self._leases: dict[str, _Held] = {}
        self._processes: dict[str, ProcessReport] = {}
        self._users: dict[tuple[str, str], tuple[Assignment, float]] = {}
        self._seq = 0
        self._seen = 0

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._states)} rollouts)"

    def read(self, names: list[str]) -> dict[str, RolloutState]:
        with self._cond:
            return {n: self._states[n] for n in names if n in self._states}

    def write(
        self, name: str, expected_version: int, state: RolloutState, change: Change, fence: int | None = None
    ) -> None:
        """Store ``state`` and log ``change`` if the version is still ``expected_version``
        (and, with ``fence``, the lease still carries that token); see :class:`Store`."""
        check_write(name, expected_version, state, change)
        check_fence(fence)
        with self._cond:
            if fence is not None:
                held = self._current(name, time.monotonic())
                if held is None or held.token != fence:
                    raise lease_lost(name, None if held is None else held.token, fence)
            current = self._states.get(name)
            have = 0 if current is None else current.version
            if have != expected_version:
                raise conflict(name, have, expected_version)
            self._states[name] = state
            self._log.setdefault(name, deque(maxlen=HISTORY)).append(change)
            self._seq += 1
            self._cond.notify_all()

    def lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the controller lease of ``name`` for ``ttl`` seconds; the fencing
        token, or None while another holder's lease is unexpired. See :class:`Store`."""
        check_name(name)
        check_holder(holder)
        seconds = check_ttl(ttl)
        with self._cond:
            now = time.monotonic()
            current = self._current(name, now)
            if current is not None:
                if current.holder != holder:
                    return None
                current.expires_at = now + seconds
                return current.token
            held = self._leases.get(name)
            token = 1 if held is None else held.token + 1
            self._leases[name] = _Held(holder, token, now + seconds)
            return token

    def release(self, name: str, holder: str) -> None:
        """Give up ``holder``'s lease of ``name`` now (nothing if it holds none)."""
        check_name(name)
        check_holder(holder)
        with self._cond:
            held = self._leases.get(name)
            if held is not None and held.holder == holder:
                held.holder = None
                held.expires_at = 0.0

    def lease_info(self, name: str) -> Lease | None:
        """Who holds the unexpired lease of ``name``, its token and seconds left; or None."""
        check_name(name)
        with self._cond:
            now = time.monotonic()
            held = self._current(name, now)
            if held is None or held.holder is None:  # the second test is for mypy
                return None
            return Lease(held.holder, held.token, held.expires_at - now)

    def _current(self, name: str, now: float) -> _Held | None:
        """The unexpired lease of ``name``, if anyone holds it."""
        held = self._leases.get(name)
        if held is None or held.holder is None or held.expires_at <= now:
            return None
        return held

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

    def add_counts(self, counts: list[Counts], report: ProcessReport | None = None) -> bool:
        if report is None:
            self._add(counts)
            return True
        check_report(report)  # a report no store would keep is refused before anything is added
        self._add(counts)
        try:
            self.report_process(report)
        except Exception:  # the counters are in: the caller sends the report again
            return False
        return True

    def _add(self, counts: list[Counts]) -> None:
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

    def report_process(self, report: ProcessReport) -> None:
        """Keep ``report`` as its process's ledger entry; entries silent for more than
        :data:`PROCESS_KEEP` seconds go. See :class:`Store`."""
        check_report(report)
        oldest = time.time() - PROCESS_KEEP
        with self._cond:
            self._processes[report.process] = report
            for key in [k for k, r in self._processes.items() if r.last_flush_at < oldest]:
                del self._processes[key]

    def processes(self, since: float = 0.0) -> list[ProcessReport]:
        with self._cond:
            return sorted(
                (r for r in self._processes.values() if r.last_flush_at >= since), key=lambda r: r.process
            )

    def claim(self, name: str, user: str, assignment: Assignment, ttl: float) -> Assignment:
        """Keep ``assignment`` for ``user`` unless an unexpired one is held; the one kept."""
        key = self._user_key(name, user, assignment, ttl)
        with self._cond:
            now = time.monotonic()
            held = self._users.get(key)
            kept = assignment if held is None or held[1] <= now else held[0]
            self._users[key] = (kept, now + ttl)
            if len(self._users) > IDENTITY_KEEP:
                for k in [k for k, (_, until) in self._users.items() if until <= now]:
                    del self._users[k]
            return kept

    def remember(self, name: str, user: str, assignment: Assignment, ttl: float) -> None:
        """Replace ``user``'s assignment for ``ttl`` seconds."""
        key = self._user_key(name, user, assignment, ttl)
        with self._cond:
            self._users[key] = (assignment, time.monotonic() + ttl)

    @staticmethod
    def _user_key(name: str, user: str, assignment: Assignment, ttl: float) -> tuple[str, str]:
        check_name(name)
        check_assignment(assignment)
        check_ttl(ttl)
        return name, user_digest(user)

    def close(self) -> None:
        pass
