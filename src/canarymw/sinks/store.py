"""``StoreSink``: whole-service outcome counters, added up in a shared store."""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections import Counter, deque
from itertools import compress, islice, repeat
from operator import floordiv, is_not, mul
from typing import TYPE_CHECKING

from .._runtime import RateLimit, reset_after_fork
from ..store._model import WINDOW, Counts
from ._base import Classifier, Outcome, default_classifier
from .memory import _BOUNDS

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger("canarymw")

_KEEP = 3600.0  # seconds of unflushed windows kept while the store is down


class StoreSink:
    """Counts outcomes per rollout, variant and 10-second window, and adds them to a store.

    Every process adds its counts to the same store (SQLite for one host, Redis for
    many), so any process, the CLI (``canarymw status``) or an operator page reads the
    whole service: requests, errors, exceptions, disconnects and a latency histogram
    (the 4% buckets of :class:`MemorySink`). Recording appends the outcome to a queue; a
    background thread counts the queue and adds the batch to the store every
    ``interval`` seconds (one round trip). Composes with other sinks (pass a list to the middleware).

    If the store cannot be reached the counts wait in memory (at most an hour of
    windows; older ones are dropped and counted in :attr:`dropped`) and go with the
    next flush that succeeds. A graceful stop flushes what is left (at exit, or call
    :meth:`close`); a process killed outright loses at most its last ``interval``.

    Args:
        store: A :class:`~canarymw.store.Store` or its URL.
        interval: Seconds between two flushes.
        classify: Decides whether an outcome is a success (default: status < 500 and no
            exception), as for :class:`MemorySink`.
    """

    def __init__(
        self, store: Store | str, *, interval: float = 1.0, classify: Classifier = default_classifier
    ) -> None:
        from ..store import Store as StoreProtocol
        from ..store import open_store

        if isinstance(store, str):
            store = open_store(store)
        if not isinstance(store, StoreProtocol):
            raise TypeError(
                f"StoreSink got store={store!r}; pass a store (SQLiteStore, RedisStore) or its URL."
            )
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0.01 <= interval <= 60:
            raise ValueError(f"StoreSink got interval={interval!r}; use a number of seconds from 0.01 to 60.")
        self.store = store
        self.interval = float(interval)
        self._classify = classify
        self.flushed = 0
        """Outcomes added to the store so far by this process."""
        self.dropped = 0
        """Outcomes dropped because the store stayed unreachable for more than an hour."""
        self.failures = 0
        """Flushes that failed (the counts were kept for the next one)."""
        self._log_limit = RateLimit(60.0)
        self._reset()
        reset_after_fork(self, StoreSink._reset)
        _flush_at_exit(self)

    def _reset(self) -> None:
        # Also in a forked child: the parent's counts and thread are not ours.
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, int], Counts] = {}
        self._queue: deque[Outcome] = deque()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False

    def __repr__(self) -> str:
        return f"StoreSink({self.store!r})"

    def record(self, outcome: Outcome) -> None:
        """Queue one outcome (thread-safe, lock-free; never does I/O): counting it is the
        flushing thread's work, off the request path."""
        self._queue.append(outcome)  # deque.append is atomic
        if self._thread is None:
            self._start()

    def _count(self) -> dict[tuple[str, str, int], Counts]:
        # Under the lock: what was queued, counted into the counts held back so far. Column
        # by column (zip, map and Counter loop in C), as MemorySink folds its batches.
        pending, queue = self._pending, self._queue
        batch = [queue.popleft() for _ in range(len(queue))]
        if not batch:
            return pending
        rollouts, variants, statuses, durations, errors, disconnected = islice(zip(*batch, strict=True), 6)
        timestamps = [o.timestamp for o in batch]
        windows = map(int, map(mul, map(floordiv, timestamps, repeat(WINDOW)), repeat(WINDOW)))
        keys = list(zip(rollouts, variants, windows, strict=True))
        if self._classify is default_classifier:
            failed = [s is None or s >= 500 or e is not None for s, e in zip(statuses, errors, strict=True)]
        else:
            failed = [not self._classify(o) for o in batch]
        buckets = Counter(zip(keys, map(bisect_left, repeat(_BOUNDS), durations), strict=True))
        sums: dict[tuple[str, str, int], float] = {}
        for key, duration in zip(keys, durations, strict=True):
            sums[key] = sums.get(key, 0.0) + duration
        requests = Counter(keys)
        failures = Counter(compress(keys, failed))
        exceptions = Counter(compress(keys, map(is_not, errors, repeat(None))))
        disconnects = Counter(compress(keys, disconnected))
        for key, n in requests.items():
            counts = pending.get(key)
            if counts is None:
                counts = pending[key] = Counts(key[0], key[1], key[2])
            counts.requests += n
            counts.errors += failures[key]
            counts.exceptions += exceptions[key]
            counts.disconnects += disconnects[key]
            counts.latency_sum += sums[key]
        for (key, bucket), n in buckets.items():
            held = pending[key].buckets
            held[bucket] = held.get(bucket, 0) + n
        return pending

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="canarymw-store-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        """Add what was counted so far to the store now; True if nothing is left over.

        ``timeout`` is accepted for symmetry with :class:`BackgroundSink`; the store's
        own timeouts bound the call.
        """
        with self._lock:
            batch = self._count()
            self._pending = {}
        if not batch:
            return True
        try:
            self.store.add_counts(list(batch.values()))
        except Exception as exc:  # never lose counts to a store hiccup: keep them for the next flush
            self.failures += 1
            if self._log_limit.due():
                log.warning(
                    "canarymw: StoreSink could not add counts to %r (%s); keeping them.", self.store, exc
                )
            self._keep(batch)
            return False
        self.flushed += sum(c.requests for c in batch.values())
        return True

    def _keep(self, batch: dict[tuple[str, str, int], Counts]) -> None:
        oldest = time.time() - _KEEP
        with self._lock:
            for key, counts in batch.items():
                if counts.window < oldest:
                    self.dropped += counts.requests
                    continue
                held = self._pending.get(key)
                if held is None:
                    self._pending[key] = counts
                else:
                    held.add(counts)

    def close(self, timeout: float | None = None) -> bool:
        """Flush what is left and stop the thread; True if everything reached the store."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else 5.0)
        return self.flush()


_live: weakref.WeakSet[StoreSink] = weakref.WeakSet()


def _flush_at_exit(sink: StoreSink) -> None:
    # A graceful stop (gunicorn's SIGTERM, uvicorn's shutdown) ends with interpreter exit.
    if not _live:
        atexit.register(_close_all)
    _live.add(sink)


def _close_all() -> None:
    for sink in list(_live):
        try:
            sink.close(timeout=2.0)
        except Exception:  # exit must go on
            pass
