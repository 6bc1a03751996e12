"""Users' assignments in a store, claimed and recorded off the request path.

A rollout with ``key=`` and ``store=`` asks the store, once per user and process, for
the user's assignment: the first one any process claims wins (``Store.claim``), so one
user gets one variant on every device. Until the answer arrives (or while the store
cannot be reached) the assignment the visitor already holds stands. One thread per
rollout and process, a bounded queue; a full queue drops the item and counts it.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from .._runtime import RateLimit, reset_after_fork
from ._model import Assignment, Store

if TYPE_CHECKING:
    from .._rollout import Rollout

log = logging.getLogger("canarymw")

QUEUE_SIZE = 10_000
"""Claims and records waiting for the store, per rollout and process, at most."""

_Item = tuple[bool, str, Assignment]  # (claim, user, assignment)


class Identities:
    """The background writer of one rollout's users to its store (internal)."""

    def __init__(self, rollout: Rollout, store: Store) -> None:
        self.rollout = rollout
        self.store = store
        self._log_limit = RateLimit(60.0)
        self._forget()
        reset_after_fork(self, Identities._forget)

    def _forget(self) -> None:
        # A child forked mid-claim starts empty: claims its parent had queued are not
        # its own, so the users they were for are asked again.
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for user in list(self.rollout._users):
            self.rollout._unconfirm(user)

    def claim(self, user: str, bucket: int, variant: str | None, epoch: int) -> None:
        """Ask the store for ``user``'s assignment, offering this one (first one wins)."""
        self._put((True, user, Assignment(bucket, variant, epoch)))

    def remember(self, user: str, bucket: int, variant: str, epoch: int) -> None:
        """Record the variant a ramp policy has just recorded for ``user``."""
        self._put((False, user, Assignment(bucket, variant, epoch)))

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.rollout._count("users_dropped")
            if item[0]:
                self.rollout._unconfirm(item[1])
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"canarymw-users-{self.rollout.name}", daemon=True
                    )
                    self._thread.start()

    def join(self, timeout: float = 5.0) -> bool:
        """Wait until every queued item was handled (for tests and graceful stops)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _run(self) -> None:
        rollout, store, ttl, jobs = self.rollout, self.store, self.rollout.user_memory, self._queue
        while True:
            is_claim, user, offered = jobs.get()
            try:
                if is_claim:
                    kept = store.claim(rollout.name, user, offered, ttl)
                    rollout._confirm(user, kept.bucket, kept.variant, kept.epoch)
                else:
                    store.remember(rollout.name, user, offered, ttl)
            except Exception as exc:
                rollout._count("store_errors")
                if is_claim:
                    rollout._unconfirm(user)
                if self._log_limit.due():
                    log.warning(
                        "canarymw: cannot keep users of rollout %r in the store (%s); each keeps the "
                        "assignment their cookie holds until it answers.",
                        rollout.name,
                        exc,
                    )
            finally:
                jobs.task_done()
