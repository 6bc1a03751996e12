"""The guard's controller: one thread per guarded rollout and process; the lease holder acts."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .._runtime import RateLimit, reset_after_fork
from ..store._model import HISTORY, WINDOW, Change, LeaseLost, RolloutState, Store, VersionConflict
from ._analysis import Verdict, windows_from_counts
from ._schedule import Guard, closed, percents_by_window, plan

if TYPE_CHECKING:
    from .._rollout import Rollout

log = logging.getLogger("canarymw")


@dataclass(frozen=True)
class Assessment:
    """A guarded rollout judged from a store: the verdict and what the schedule needs."""

    verdict: Verdict
    step_requests: int
    """Canary requests in the windows judged since the current step began."""
    next_check: float
    """Unix time the last window judged here will be followed by the next closed one."""


class Assessor:
    """Judges one guarded rollout from a store, reading only the windows closed since
    its last look (internal to the controller; :func:`assess` is the one-off form)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._key: tuple[float, str] | None = None
        self._running = guard.analysis.running()
        self._canary: list[tuple[float, int]] = []  # (window start, canary requests)

    def update(self, store: Store, name: str, state: RolloutState, now: float | None = None) -> Assessment:
        at = time.time() if now is None else now
        since = state.guard_since if state.guard_since is not None else state.updated_at
        key = (since, state.epoch)
        if key != self._key:  # a new attempt: the evidence starts again
            self._key = key
            self._running = self.guard.analysis.running()
            self._canary = []
        last = self._running.last
        # Windows that end after `since` (the first may have begun before it), then only
        # the ones after the newest judged: a closed window is judged once.
        counts = store.read_counts([name], since if last is None else last + WINDOW)
        fresh = [w for w in closed(windows_from_counts(counts), at) if last is None or w.start > last]
        if fresh:
            percents = percents_by_window(store.history(name, HISTORY), [w.start for w in fresh])
            for w in fresh:
                self._running.add(replace(w, percent=percents.get(int(w.start))))
                self._canary.append((w.start, w.new.requests))
        stage_since = state.stage_since if state.stage_since is not None else since
        step = sum(n for start, n in self._canary if start >= stage_since)
        return Assessment(self._running.verdict(), step, (int(at // WINDOW) + 1) * WINDOW + 2.5)


def assess(
    store: Store, name: str, state: RolloutState, guard: Guard, now: float | None = None
) -> Assessment:
    """Judge rollout ``name`` as its controller does: the closed windows since the guard
    began this attempt, each with the percent in force (from the audit log) for the
    sample-ratio check. Reads the store; for the CLI, an admin page, a test."""
    return Assessor(guard).update(store, name, state, now)


def holder_id() -> str:
    """Who this process is, in a lease: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Controller:
    """Runs a rollout's guard in this process (internal; see :class:`Guard`)."""

    def __init__(self, rollout: Rollout, store: Store, guard: Guard) -> None:
        self._rollout = weakref.ref(rollout)
        self.name = rollout.name
        self.store = store
        self.guard = guard
        self.holder = holder_id()
        self.token: int | None = None
        """The fencing token while this process holds the lease, else None."""
        self.last: Verdict | None = None
        self._assessor = Assessor(guard)
        self.errors = 0
        self._decision: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_limit = RateLimit(60.0)
        reset_after_fork(self, Controller._after_fork)

    def __repr__(self) -> str:
        return f"Controller({self.name!r}, holder={self.holder!r}, leading={self.token is not None})"

    def _after_fork(self) -> None:
        # A child is another contender: its own identity, no lease, its own thread.
        self.holder = holder_id()
        self.token = None
        self._stop = threading.Event()
        self._thread = None
        self.ensure_thread()

    def ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name=f"canarymw-guard-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True, timeout: float = 5.0) -> None:
        """Stop this process's controller (and give up the lease, so another takes over at once)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if release and self.token is not None:
            try:
                self.store.release(self.name, self.holder)
            except Exception:
                pass  # the lease then expires by itself
            self.token = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._rollout() is None:
                return
            try:
                self.tick()
            except Exception as exc:  # the guard must never end: the store comes back
                self.errors += 1
                self.token = None
                if self._log_limit.due():
                    log.warning(
                        "canarymw: the guard of rollout %r could not look (%s); retrying.", self.name, exc
                    )
            self._stop.wait(self.guard.interval)

    def tick(self, now: float | None = None) -> Change | None:
        """One look: take or renew the lease; if held, judge and act. Returns the change made."""
        token = self.store.lease(self.name, self.holder, self.guard.lease)
        self.token = token
        if token is None:
            return None
        at = time.time() if now is None else now
        state = self.store.read([self.name]).get(self.name)
        if state is None:
            return None  # not seeded yet: the follower does that
        verdict = None
        step = 0
        if state.stage == "ramping" and not state.paused and state.guard == self.guard.settings():
            got = self._assessor.update(self.store, self.name, state, at)
            verdict, step = got.verdict, got.step_requests
            self.last = verdict
        planned = plan(self.guard, self.name, state, verdict, step, at)
        change = None
        if planned is not None:
            try:
                self.store.write(self.name, state.version, *planned, fence=token)
                change = planned[1]
                rollout = self._rollout()
                if rollout is not None:
                    rollout._apply_state(planned[0])
            except VersionConflict:
                return None  # an operator acted meanwhile: look again next time
            except LeaseLost:
                self.token = None
                return None
            if change.action != "guard":
                log.warning("canarymw: rollout %r: %s", self.name, change.reason)
        if verdict is not None and (change is not None or verdict.decision != self._decision):
            self._decision = verdict.decision
            self._notify(verdict, change)
        return change

    def _notify(self, verdict: Verdict, change: Change | None) -> None:
        hook = self.guard.on_verdict
        if hook is None:
            return
        try:
            hook(self.name, verdict, change)
        except Exception:
            log.exception("canarymw: the on_verdict hook of rollout %r raised; ignored.", self.name)
