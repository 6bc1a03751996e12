"""``StoreSink``: whole-service outcome counters, added up in a shared store."""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import compress, count, repeat, starmap
from math import isfinite
from operator import add, and_, eq, floordiv, ge, is_not, mul, not_, or_, sub, truth
from typing import TYPE_CHECKING, Any, TypeVar

from .._runtime import RateLimit, reset_after_fork
from ..store._model import IDLE_REPORT, PROCESS_ROLLOUTS, WINDOW, Counts, ProcessReport
from ..store._stats import SHADOW
from ._base import Classifier, Outcome, default_classifier
from .memory import _BOUNDS

if TYPE_CHECKING:
    from ..shadow import Comparison
    from ..store import Store

log = logging.getLogger("canarymw")

_T = TypeVar("_T")
_KEEP = 3600.0  # seconds of unflushed windows kept while the store is down
_TIMESTAMP = Outcome._fields.index("timestamp")
_SLOTS = len(_BOUNDS) + 1  # latency buckets per key id in one int: id * _SLOTS + bucket
_STATUSES = frozenset([None, *range(100, 1000)])
_FAILING = frozenset([None, *range(500, 1000)])  # the default classifier's failures, by status


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

    The loss is visible: after every flush that added outcomes (and every 10 s while
    there is nothing to add) the sink reports this process to the store's
    ledger (:meth:`Store.report_process <canarymw.store.Store.report_process>`, one
    small write), and once more after the final flush of a graceful stop, as closed.
    :func:`canarymw.store.lost` then names the processes that stopped without it, with
    an estimate of what each took along. A report that fails is counted in
    :attr:`report_failures` and sent again with the next flush; it never costs counts.

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
        self.report_failures = 0
        """Reports to the store's ledger that failed (the counts they followed were added)."""
        self.process = ""
        """This process's id in the store's ledger, ``HOST:PID:RANDOM`` (new in a forked child)."""
        self._log_limit = RateLimit(60.0)
        self._merged = _takes_report(store)
        self._reset()
        reset_after_fork(self, StoreSink._reset)
        _flush_at_exit(self)

    def _reset(self) -> None:
        # Also in a forked child: the parent's counts, thread and ledger entry are not ours.
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, int], Counts] = {}
        self._queue: deque[Outcome] = deque()
        self._comparisons: deque[Comparison] = deque()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self.flushed = self.dropped = self.failures = self.report_failures = 0
        self.process = f"{socket.gethostname() or 'localhost'}:{os.getpid()}:{secrets.token_hex(3)}"
        self._started_at = time.time()
        self._rollouts: set[str] = set()
        self._report_lock = threading.Lock()
        self._reported_at: float | None = None  # monotonic time of the last report that got through
        self._report_due = False  # the last report failed: send one with the next flush
        self._idle_reported = False  # the last report said: nothing to add, next within IDLE_REPORT
        self._closed_reported = False  # the ledger says closed: everything was added

    def __repr__(self) -> str:
        return f"StoreSink({self.store!r})"

    def record(self, outcome: Outcome) -> None:
        """Queue one outcome (thread-safe, lock-free; never does I/O): counting it is the
        flushing thread's work, off the request path."""
        self._queue.append(outcome)  # deque.append is atomic
        if self._thread is None:
            self._start()

    def record_comparison(self, comparison: Comparison) -> None:
        """Queue one shadow comparison (see :class:`~canarymw.Shadow`), counted as the
        variant ``"shadow"`` of its rollout: ``requests`` every copy sent or dropped,
        ``errors`` the mismatches, ``exceptions`` the shadow's failures and timeouts,
        ``disconnects`` the copies dropped, latency the shadow's. Copies that could not
        be compared for another reason are not counted. Thread-safe, never does I/O."""
        if comparison.result != "not-compared":
            self._comparisons.append(comparison)
            if self._thread is None:
                self._start()

    def _count_comparisons(self, pending: dict[tuple[str, str, int], Counts]) -> None:
        queue = self._comparisons
        for _ in range(len(queue)):
            c = queue.popleft()
            key = (c.rollout, SHADOW, int(c.timestamp) // WINDOW * WINDOW)
            counts = pending.get(key)
            if counts is None:
                counts = pending[key] = Counts(*key)
            counts.requests += 1
            counts.errors += c.result == "mismatch"
            counts.exceptions += c.result in ("error", "timeout")
            counts.disconnects += c.result == "dropped"
            if c.duration is not None:
                counts.latency_sum += c.duration
                bucket = bisect_left(_BOUNDS, c.duration)
                counts.buckets[bucket] = counts.buckets.get(bucket, 0) + 1

    def _count(self) -> dict[tuple[str, str, int], Counts]:
        # Under the lock: what was queued, counted into the counts held back so far, column
        # by column with every per-outcome pass in C. A batch holds few groups (rollouts x
        # variants x one or two windows): each is picked out with one mask, and its latency
        # histogram read off its sorted durations, one C bisect per bucket bound they span.
        pending, queue = self._pending, self._queue
        if self._comparisons:
            self._count_comparisons(pending)
        batch = list(starmap(queue.popleft, repeat((), len(queue))))  # exactly what was there
        if not batch:
            return pending
        cols = list(zip(*batch, strict=False))
        groups = _groups(cols[0], cols[1], cols[_TIMESTAMP])
        if groups is None:  # many groups, or times whose window cannot be read off min and max
            self._count_by_ids(batch, cols, pending)
            return pending
        statuses, durations, errors, disconnected = cols[2:6]
        default = self._classify is default_classifier
        raised = None if errors.count(None) == len(errors) else list(map(is_not, errors, repeat(None)))
        failing: list[bool] | None = None  # per outcome, where the status alone does not tell
        if not default:
            failing = [not self._classify(o) for o in batch]
        elif not _STATUSES.issuperset(statuses):  # a status outside 100-999: the rule itself
            failing = [s is None or s >= 500 for s in statuses]
        mixed = any(disconnected)
        for key, mask in groups:
            picked = _pick(durations, mask)
            if not picked:
                continue
            counts = pending.get(key)
            if counts is None:
                counts = pending[key] = Counts(key[0], key[1], key[2])
            counts.requests += len(picked)
            failed: Sequence[bool]
            if failing is None:
                failed = list(map(_FAILING.__contains__, _pick(statuses, mask)))
            else:
                failed = _pick(failing, mask)
            if raised is not None:
                caught = _pick(raised, mask)
                counts.exceptions += sum(caught)
                if default:
                    failed = list(map(or_, failed, caught))
            counts.errors += sum(failed)
            if mixed:
                counts.disconnects += sum(map(truth, _pick(disconnected, mask)))
            total = sum(picked)
            counts.latency_sum += total
            _histogram(picked, counts.buckets, exact=not isfinite(total))
        return pending

    def _count_by_ids(
        self, batch: list[Outcome], cols: list[tuple[Any, ...]], pending: dict[tuple[str, str, int], Counts]
    ) -> None:
        # Any batch: each outcome's (rollout, variant, window) is hashed once, into a small
        # int id (the position of the key's first outcome), and the passes run over ints.
        rollouts, variants, statuses, durations, errors, disconnected = cols[:6]
        # Window numbers (floor(t) // WINDOW is floor(t / WINDOW) for t >= 0); times WINDOW per key.
        windows = map(floordiv, map(int, cols[_TIMESTAMP]), repeat(WINDOW))
        # A key's id is the position of its first outcome in the batch (setdefault keeps it).
        index: dict[tuple[str, str, int], int] = {}  # (rollout, variant, window number) -> id
        ids = list(map(index.setdefault, zip(rollouts, variants, windows, strict=True), count()))
        raised = list(map(is_not, errors, repeat(None)))
        if self._classify is default_classifier and _STATUSES.issuperset(statuses):
            failed = list(map(or_, map(_FAILING.__contains__, statuses), raised))
        elif self._classify is default_classifier:  # a status outside 100-999: the rule itself
            failed = [s is None or s >= 500 or e for s, e in zip(statuses, raised, strict=True)]
        else:
            failed = [not self._classify(o) for o in batch]
        requests = Counter(ids)
        failures = Counter(compress(ids, failed))
        exceptions = Counter(compress(ids, raised))
        disconnects = Counter(compress(ids, disconnected))
        buckets = Counter(
            map(add, map(mul, ids, repeat(_SLOTS)), map(bisect_left, repeat(_BOUNDS), durations))
        )
        single = len(index) == 1
        keys: dict[int, tuple[str, str, int]] = {}
        for (rollout, variant, number), i in index.items():
            keys[i] = key = (rollout, variant, number * WINDOW)
            counts = pending.get(key)
            if counts is None:
                counts = pending[key] = Counts(key[0], key[1], key[2])
            counts.requests += requests[i]
            counts.errors += failures[i]
            counts.exceptions += exceptions[i]
            counts.disconnects += disconnects[i]
            counts.latency_sum += (
                sum(durations) if single else sum(compress(durations, map(eq, ids, repeat(i))))
            )
        for slot, n in buckets.items():
            i, bucket = divmod(slot, _SLOTS)
            held = pending[keys[i]].buckets
            held[bucket] = held.get(bucket, 0) + n

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
        return self._flush(final=False)

    def _flush(self, final: bool) -> bool:
        with self._lock:
            batch = self._count()
            self._pending = {}
        if not batch:
            self._report(0, final)
            return True
        added = sum(c.requests for c in batch.values())
        rollouts = self._rollouts
        for rollout, _, _ in batch:
            if len(rollouts) >= PROCESS_ROLLOUTS:
                break
            rollouts.add(rollout)
        if not self._merged:  # a store of another kind: the counters, then the report apart
            if self._add(batch, added, None) is None:
                return False
            self._report(added, final)
            return True
        with self._report_lock:  # the counters and the report, in one round trip
            report = self._ledger_entry(added, final, self.flushed + added)
            kept = self._add(batch, added, report)
            if kept is None:
                return False
            self._reported(report, None if kept else "the store kept the counters only")
        return True

    def _add(
        self, batch: dict[tuple[str, str, int], Counts], added: int, report: ProcessReport | None
    ) -> bool | None:
        """Add the counters (and the report, if any): whether the report was kept too, or
        None if the counters were not added (they are kept for the next flush)."""
        try:
            if report is None:
                self.store.add_counts(list(batch.values()))
                kept = True
            else:
                kept = self.store.add_counts(list(batch.values()), report) is not False
        except Exception as exc:  # never lose counts to a store hiccup: keep them for the next flush
            self.failures += 1
            if self._log_limit.due():
                log.warning(
                    "canarymw: StoreSink could not add counts to %r (%s); keeping them.", self.store, exc
                )
            self._keep(batch)
            return None
        self.flushed += added
        return kept

    def _report(self, added: int, final: bool) -> None:
        """Report this process to the store's ledger after a flush that succeeded, if due:
        after one that added outcomes, at a graceful stop, after a failed report, and once
        it has reported at all, after its first flush with nothing to add (that report
        says the next comes within IDLE_REPORT seconds, not one interval) and then every
        IDLE_REPORT seconds. Never raises."""
        now = time.monotonic()
        with self._report_lock:
            if not added and not self._report_due:
                if self._reported_at is None:
                    return  # it never added anything: nothing to account for
                if final:
                    if self._closed_reported:
                        return
                elif self._idle_reported and now - self._reported_at < IDLE_REPORT:
                    return
            report = self._ledger_entry(added, final, self.flushed)
            try:
                self.store.report_process(report)
            except Exception as exc:  # the counts are in: only the ledger lags behind
                self._reported(report, exc)
                return
            self._reported(report, None)

    def _ledger_entry(self, added: int, final: bool, flushed: int) -> ProcessReport:
        return ProcessReport(
            process=self.process,
            started_at=self._started_at,
            last_flush_at=time.time(),
            flushed=flushed,
            last_batch=added,
            interval=self.interval,
            closed=final or self._closed_reported,
            rollouts=tuple(sorted(self._rollouts)),
            next_within=self.interval if added else IDLE_REPORT + self.interval,
        )

    def _reported(self, report: ProcessReport, failure: object) -> None:
        # Under _report_lock: what the ledger now holds, or that a report is due again.
        if failure is not None:
            self.report_failures += 1
            self._report_due = True
            if self._log_limit.due():
                log.warning(
                    "canarymw: StoreSink could not report this process to the ledger of %r (%s); "
                    "its counts were added.",
                    self.store,
                    failure,
                )
            return
        self._reported_at = time.monotonic()
        self._report_due = False
        self._idle_reported = not report.last_batch
        self._closed_reported = report.closed

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
        """Flush what is left and stop the thread; True if everything reached the store.

        Then the store's ledger says this process closed (unless the thread was still in
        a flush of its own after ``timeout``: what that one carries is not known yet)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else 5.0)
        idle = thread is None or thread is threading.current_thread() or not thread.is_alive()
        return self._flush(final=idle)


def _takes_report(store: Store) -> bool:
    # A store written before add_counts took the ledger report still works, reporting apart.
    try:
        return "report" in inspect.signature(store.add_counts).parameters
    except (TypeError, ValueError):
        return False


_GROUPS = 16  # more (rollout, variant, window) groups in one batch: counted by ids instead


def _pick(col: Sequence[_T], mask: list[bool] | None) -> Sequence[_T]:
    return col if mask is None else list(compress(col, mask))


def _groups(
    rollouts: Sequence[str], variants: Sequence[str], stamps: Sequence[float]
) -> list[tuple[tuple[str, str, int], list[bool] | None]] | None:
    """The batch's (rollout, variant, window) groups, each with the mask that picks its
    outcomes (None: all of them); None if the batch spans more than two windows, holds
    times that are not plain non-negative numbers, or too many groups."""
    lo, hi = min(stamps), max(stamps)
    if not 0 <= lo <= hi < 1e15:  # also NaN, which no comparison lets through
        return None
    first, last = int(lo) // WINDOW, int(hi) // WINDOW  # int(t) // WINDOW is floor(t / WINDOW) for t >= 0
    if last - first > 1:
        return None
    names, kinds = set(rollouts), set(variants)
    if len(names) * len(kinds) * (last - first + 1) > _GROUPS:
        return None
    pairs: list[tuple[tuple[str, str], list[bool] | None]]
    if len(names) == 1 and len(kinds) == 1:
        pairs = [((rollouts[0], variants[0]), None)]
    elif len(names) == 1:
        order = list(kinds)
        masks = [list(map(eq, variants, repeat(v))) for v in order[:-1]]
        # The last variant's mask: with two, the complement of the first.
        masks.append(
            list(map(not_, masks[0])) if len(masks) == 1 else list(map(eq, variants, repeat(order[-1])))
        )
        pairs = [((rollouts[0], v), mask) for v, mask in zip(order, masks, strict=True)]
    else:
        both = list(zip(rollouts, variants, strict=True))
        pairs = [((r, v), list(map(eq, both, repeat((r, v))))) for r in names for v in kinds]
    if first == last:
        return [((r, v, first * WINDOW), mask) for (r, v), mask in pairs]
    # Two windows: t >= the boundary (an int) exactly when int(t) is, so one comparison splits them.
    late = list(map(ge, stamps, repeat(last * WINDOW)))
    early = list(map(not_, late))
    out: list[tuple[tuple[str, str, int], list[bool] | None]] = []
    for (r, v), mask in pairs:
        for number, side in ((first, early), (last, late)):
            out.append(((r, v, number * WINDOW), side if mask is None else list(map(and_, mask, side))))
    return out


def _histogram(durations: Sequence[float], into: dict[int, int], exact: bool) -> None:
    """Add ``durations`` to the latency buckets ``into``: bucket i counts the d with
    ``bisect_left(_BOUNDS, d) == i``. Read off the sorted durations, one bisect per bound
    they span; ``exact`` counts one by one (NaN and infinities, which a sort does not place)."""
    if exact:
        found: Iterable[tuple[int, int]] = Counter(map(bisect_left, repeat(_BOUNDS), durations)).items()
    else:
        found = _sorted_buckets(sorted(durations))
    if not into:  # a window's first counts in this flush, the usual case
        into.update(found)
        return
    for bucket, n in found:
        into[bucket] = into.get(bucket, 0) + n


def _sorted_buckets(ordered: list[float]) -> Iterable[tuple[int, int]]:
    # Bucket i < last holds the d with _BOUNDS[i - 1] < d <= _BOUNDS[i]: how many are at most
    # each bound the batch spans (one C bisect per bound), differenced; the last takes the rest.
    first, last = bisect_left(_BOUNDS, ordered[0]), bisect_left(_BOUNDS, ordered[-1])
    ends = list(map(bisect_right, repeat(ordered), _BOUNDS[first:last]))
    ends.append(len(ordered))
    sizes = list(map(sub, ends, [0, *ends[:-1]]))
    return compress(zip(count(first), sizes), sizes)


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
