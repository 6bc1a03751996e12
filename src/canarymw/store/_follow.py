"""Following a store: one background thread per store object and process.

The thread seeds the store from code (or applies a deploy's percent, see ``on_start``),
then reads the state of every rollout that follows the store each time the store says
something changed (and at least every ``interval`` seconds), and hands newer states to
the rollouts. A store that fails is retried with backoff; the rollouts keep the last
state they had, and say how stale it is. The request path never touches any of this.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from .._runtime import RateLimit, reset_after_fork
from ._model import RolloutState, Store, StoreError, VersionConflict, on_start, operate, restore

if TYPE_CHECKING:
    from .._rollout import Rollout

log = logging.getLogger("canarymw")

_MAX_BACKOFF = 5.0
_followers: dict[int, Follower] = {}
_registry_lock = threading.Lock()


def follow(rollout: Rollout, store: Store, interval: float) -> Follower:
    """Make ``rollout`` follow ``store``: sync once now (bounded by the store's timeouts),
    then in the background. Returns the store's follower in this process."""
    with _registry_lock:
        follower = _followers.get(id(store))
        if follower is None or follower.store is not store:
            follower = _followers[id(store)] = Follower(store, interval)
    follower.add(rollout)
    return follower


class Follower:
    """The background reader of one store object (internal; see the module docstring)."""

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.rollouts: weakref.WeakSet[Rollout] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._log_limit = RateLimit(60.0)
        self.reads = 0
        reset_after_fork(self, Follower._after_fork)

    def add(self, rollout: Rollout) -> None:
        with self._lock:
            self.rollouts.add(rollout)
        try:
            self.sync([rollout])
        except Exception as exc:
            log.warning(
                "canarymw: the store of rollout %r cannot be read (%s); using the percent in code "
                "(%g%%) until it answers.",
                rollout.name,
                exc,
                rollout.percent,
            )
            rollout._store_failed(exc)
        self._ensure_thread()

    def _after_fork(self) -> None:
        # The parent's thread does not exist here: follow in a thread of our own.
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        if len(self.rollouts):
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="canarymw-store", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following (tests; the thread also ends when no rollout follows any more)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            rollouts = list(self.rollouts)
            if not rollouts:
                with _registry_lock:
                    if _followers.get(id(self.store)) is self:
                        del _followers[id(self.store)]
                return
            try:
                self.sync(rollouts)
                del rollouts  # let rollouts that are dropped meanwhile go
                failures = 0
                self.store.wait(self.interval)
            except Exception as exc:  # a store failure never ends following
                failures += 1
                self._failed(exc)
                if self._log_limit.due():
                    log.warning(
                        "canarymw: store %r failed (%s); keeping the last known state.", self.store, exc
                    )
                self._stop.wait(min(self.interval * 2 ** min(failures, 8), _MAX_BACKOFF))

    def _failed(self, exc: Exception) -> None:
        # A frame of its own: no reference to a rollout outlives it (they must be freeable).
        for rollout in list(self.rollouts):
            rollout._store_failed(exc)

    def sync(self, rollouts: list[Rollout]) -> None:
        """Read the rollouts' states (seeding or deploying first where due) and apply them."""
        names = sorted({r.name for r in rollouts})
        states = self.store.read(names)
        self.reads += 1
        for rollout in rollouts:
            if not rollout._store_started:
                states[rollout.name] = self._start(rollout, states.get(rollout.name))
                rollout._store_started = True
            elif rollout.name not in states and rollout._store_state is not None:
                states[rollout.name] = self._restore(rollout, rollout._store_state)
        now = time.time()
        for rollout in rollouts:
            state = states.get(rollout.name)
            if state is not None:
                rollout._apply_state(state, now)

    def _restore(self, rollout: Rollout, known: RolloutState) -> RolloutState:
        try:
            self.store.write(rollout.name, 0, *restore(rollout.name, known))
        except VersionConflict:
            pass  # another process restored it first: take theirs
        got = self.store.read([rollout.name]).get(rollout.name)
        if got is None:
            raise StoreError(f"rollout {rollout.name!r} could not be restored in the store.")
        return got

    def _start(self, rollout: Rollout, state: RolloutState | None) -> RolloutState:
        for _ in range(20):
            made = on_start(rollout.name, state, rollout._code_percent)
            if made is None:
                assert state is not None
                return state
            try:
                self.store.write(rollout.name, 0 if state is None else state.version, *made)
                return made[0]
            except VersionConflict:
                # Another worker seeded or deployed meanwhile: decide again on its state.
                state = self.store.read([rollout.name]).get(rollout.name)
        raise StoreError(f"rollout {rollout.name!r} kept changing while this process tried to start it.")


def change(
    store: Store,
    name: str,
    action: Any,
    *,
    by: str,
    reason: str = "",
    percent: float | None = None,
    expected_version: int | None = None,
) -> RolloutState:
    """Apply an operator's action to a rollout in ``store`` and return the new state.

    ``action`` is one of ``set`` (needs ``percent``), ``promote``, ``rollback``,
    ``pause``, ``resume``, ``reset``. The write is a compare-and-set on the version read just
    before (or on ``expected_version``): if someone else changed the rollout in
    between, :class:`VersionConflict` says so and nothing is written. An action that
    changes nothing (pausing a paused rollout) writes nothing and returns the state. Every process
    following the store applies the new state within its refresh time.
    """
    current = store.read([name]).get(name)
    if expected_version is not None and current is not None and current.version != expected_version:
        raise VersionConflict(
            f"rollout {name!r} is at version {current.version}, not {expected_version}: "
            "someone else changed it meanwhile; look at it again and retry."
        )
    new, entry = operate(name, current, action, by=by, reason=reason, percent=percent)
    assert current is not None  # operate raises UnknownRollout otherwise
    if (new.percent, new.paused, new.held, new.stage, new.assignment) == (
        current.percent,
        current.paused,
        current.held,
        current.stage,
        current.assignment,
    ):
        return current  # pausing a paused rollout (and the like) changes nothing: no version, no entry
    store.write(name, current.version, new, entry)
    return new
