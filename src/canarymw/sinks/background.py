"""BackgroundSink: hand outcomes to slow sinks without ever slowing a request.

The request thread appends the outcome to a bounded in-memory queue and returns; one
consumer thread per process (started on the first outcome, so after any fork) drains
the queue in batches into the wrapped sinks. When the queue is full the outcome is
dropped and counted, never waited for.

Why a ``deque`` and timed passes rather than ``queue.Queue``: ``Queue.put_nowait``
takes a condition variable on every call (about 1 us), and waking a sleeping thread
per outcome is a system call (several us on a VM). ``deque.append`` is atomic under
the GIL; the consumer wakes up on its own every ``interval`` and is woken early only
when a batch is waiting, so the request path costs a few hundred nanoseconds.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from .._runtime import RateLimit, reset_after_fork
from ._base import Outcome, Sink

log = logging.getLogger("canarymw")

_monotonic = time.monotonic


class _Marker:
    """Queued behind pending outcomes by flush() and close(): FIFO order means the
    consumer reaches it only after everything recorded before it."""

    __slots__ = ("done", "stop")

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.done = threading.Event()


_Target = tuple[
    Sink,
    Callable[[Outcome], object],
    Callable[[list[Outcome]], object] | None,
    Callable[[], object] | None,
]


class BackgroundSink:
    """Records outcomes into other sinks from a background thread; never blocks the caller.

    ::

        prom = PrometheusSink()
        sink = BackgroundSink(prom, JSONLinesSink("/var/log/app/canary"))
        app.wsgi_app = WSGICanaryMiddleware(app.wsgi_app, new=v2, rollout=rollout, sink=sink)

    :meth:`record` appends to a bounded queue and returns at once (well under 2 us): it
    never waits for a lock held by the consumer, for I/O or for a slow sink. One
    daemon consumer thread per process delivers the outcomes, in order, to each wrapped
    sink. It is started by the first :meth:`record` (never at import or construction),
    and a process forked afterwards (a gunicorn or multiprocessing worker) starts its
    own: the child begins with an empty queue and zeroed counters, because what the
    parent had queued is the parent's to deliver.

    What can go wrong, and what happens:

    * The queue is full (the sinks are slower than the traffic, or one is stuck): the
      outcome is dropped and counted in :attr:`dropped`, with a warning logged at most
      once per ``log_interval``. Drops are exact: every outcome is either delivered to
      the sinks or counted. With many threads recording at once the queue may briefly
      exceed ``maxsize`` by at most the number of those threads.
    * A wrapped sink raises: the failure is counted in :attr:`errors` and logged with
      its traceback at most once per ``log_interval``; the other sinks still get the
      outcome. A sink that blocks forever stalls only the consumer thread.
    * The process exits: an ``atexit`` hook delivers what is queued, waiting at most
      ``exit_timeout`` seconds, then gives up (the thread is a daemon).

    Wrapped sinks are called from the consumer thread only, one at a time, so they
    need not be thread-safe among themselves. Two optional methods are used when a
    wrapped sink has them: ``record_many(outcomes)`` receives a whole batch instead of
    one call per outcome (a raise counts as one failure), and ``flush()`` is called
    each time the queue has been drained, and by :meth:`flush` and :meth:`close`.

    Args:
        *sinks: The sinks to feed (at least one).
        maxsize: Most outcomes held in the queue; beyond it they are dropped.
        batch_size: Most outcomes handed to a sink's ``record_many`` at once; also how
            many waiting outcomes wake the consumer before its next timed pass.
        interval: Longest time, in seconds, an outcome waits in the queue while the
            sinks keep up: the consumer delivers at least this often.
        log_interval: Least number of seconds between two log messages about drops,
            and between two about sink failures.
        exit_timeout: Seconds the ``atexit`` hook waits for the queue to drain.
        name: Name of the consumer thread.

    Raises:
        TypeError: No sink was given, or one has no ``record`` method.
        ValueError: A size or duration is not positive.
    """

    def __init__(
        self,
        *sinks: Sink,
        maxsize: int = 10_000,
        batch_size: int = 256,
        interval: float = 0.1,
        log_interval: float = 60.0,
        exit_timeout: float = 2.0,
        name: str = "canarymw-sink",
    ) -> None:
        if not sinks:
            raise TypeError(
                "BackgroundSink needs at least one sink to feed, e.g. BackgroundSink(MemorySink())."
            )
        targets: list[_Target] = []
        for sink in sinks:
            record = getattr(sink, "record", None)
            if not callable(record):
                raise TypeError(f"BackgroundSink got {sink!r}, which has no record(outcome) method.")
            many = getattr(sink, "record_many", None)
            flush = getattr(sink, "flush", None)
            targets.append(
                (sink, record, many if callable(many) else None, flush if callable(flush) else None)
            )
        for label, value in (("maxsize", maxsize), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BackgroundSink needs {label} to be a positive integer, got {value!r}.")
        for label, number, least in (
            ("interval", interval, 1e-3),
            ("log_interval", log_interval, 0.0),
            ("exit_timeout", exit_timeout, 0.0),
        ):
            if not isinstance(number, (int, float)) or math.isnan(number) or number < least:
                raise ValueError(
                    f"BackgroundSink needs {label} to be a number of seconds >= {least}, got {number!r}."
                )
        self.sinks: tuple[Sink, ...] = sinks
        self.maxsize = maxsize
        self.batch_size = batch_size
        self.interval = float(interval)
        self.log_interval = float(log_interval)
        self.exit_timeout = float(exit_timeout)
        self.name = name
        self._targets = tuple(targets)
        self._reset()
        _track(self)

    def _reset(self) -> None:
        """Fresh per-process state: at construction, and in a forked child."""
        self._queue: deque[Outcome | _Marker] = deque()
        self._limit = self.maxsize
        # The consumer sleeps up to `interval` between passes; a record() that finds
        # `_wake_at` outcomes waiting while it sleeps wakes it early. 0 until the
        # thread exists, so that the first record() starts it.
        self._wake_at = 0
        self._idle = True
        self._thread: threading.Thread | None = None
        self._signal = threading.Lock()
        self._signal.acquire()
        self._lock = threading.Lock()
        self._closing: _Marker | None = None
        self.dropped = 0
        self.errors = 0
        self.processed = 0
        self._drop_log_due = RateLimit(self.log_interval)
        self._error_log_due = RateLimit(self.log_interval)

    # -- the request path --------------------------------------------------------
    def record(self, outcome: Outcome) -> None:
        """Queue one outcome, or drop and count it when the queue is full. Never blocks or raises."""
        q = self._queue
        n = len(q)
        if n < self._limit:
            q.append(outcome)
            # Waking a sleeping thread is a system call (several us on a VM), so a lone
            # outcome waits for the consumer's next timed pass instead.
            if n >= self._wake_at and self._idle:
                self._wake()
        else:
            self._drop()

    def _wake(self) -> None:
        self._idle = False
        if self._thread is None:
            self._start()
            return
        try:
            self._signal.release()
        except RuntimeError:
            pass  # another thread woke the consumer first

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            # Published before it runs, so the consumer recognises itself in flush().
            thread = self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._wake_at = min(self.batch_size, self.maxsize) - 1
            try:
                thread.start()
            except RuntimeError:
                # Interpreter shutting down or out of threads: the next record() retries.
                self._thread = None
                self._wake_at = 0
                self._idle = True
                log.warning("canarymw: %r could not start its consumer thread", self, exc_info=True)

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1
            dropped = self.dropped
        if self._drop_log_due.due():
            if self._closing is not None:
                log.warning("canarymw: %r is closed; %d outcomes dropped so far", self, dropped)
            else:
                log.warning(
                    "canarymw: outcome queue of %r is full (%d); %d outcomes dropped so far, "
                    "the responses are unaffected",
                    self,
                    self.maxsize,
                    dropped,
                )

    # -- the consumer thread -----------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        signal = self._signal
        size = self.batch_size
        interval = self.interval
        pending_flush = False
        while True:
            batch: list[Outcome] = []
            while True:
                try:
                    item = q.popleft()
                except IndexError:
                    break
                if isinstance(item, _Marker):
                    if batch:
                        self._dispatch(batch)
                        batch = []
                    self._flush_sinks()
                    pending_flush = False
                    if item.stop:
                        self._drain_after_stop(q)
                        item.done.set()
                        return
                    item.done.set()
                    continue
                batch.append(item)
                if len(batch) >= size:
                    self._dispatch(batch)
                    batch = []
                    pending_flush = True
            if batch:
                self._dispatch(batch)
                pending_flush = True
            if pending_flush:
                self._flush_sinks()
                pending_flush = False
            # Publish "idle" before the final length check: a producer that fills the
            # queue past _wake_at after the check sees _idle set and releases the
            # signal. A spurious release costs one empty pass.
            self._idle = True
            if len(q) >= self._wake_at:
                continue
            signal.acquire(timeout=interval)
            self._idle = False

    def _drain_after_stop(self, q: deque[Outcome | _Marker]) -> None:
        # Outcomes that passed the size check just before close() set the limit to 0.
        rest = [item for item in q if not isinstance(item, _Marker)]
        q.clear()
        if rest:
            self._dispatch(rest)
            self._flush_sinks()

    def _dispatch(self, batch: list[Outcome]) -> None:
        for sink, record, many, _ in self._targets:
            if many is not None:
                try:
                    many(batch)
                except BaseException as exc:  # a sink's SystemExit must not kill the consumer
                    self._failed(sink, exc)
                continue
            for outcome in batch:
                try:
                    record(outcome)
                except BaseException as exc:
                    self._failed(sink, exc)
        self.processed += len(batch)

    def _flush_sinks(self) -> None:
        for sink, _, _, flush in self._targets:
            if flush is not None:
                try:
                    flush()
                except BaseException as exc:
                    self._failed(sink, exc)

    def _failed(self, sink: Sink, exc: BaseException) -> None:
        self.errors += 1
        if self._error_log_due.due():
            log.error(
                "canarymw: sink %r failed in the background (%d failures so far); responses are unaffected",
                sink,
                self.errors,
                exc_info=exc,
            )

    # -- control -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Outcomes waiting in the queue right now (this process)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """True while this process's consumer thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything recorded before this call has reached the sinks.

        Then each wrapped sink's ``flush()`` has been called too. Returns True on
        success, False when ``timeout`` seconds passed first (a sink is slow or stuck;
        nothing is lost yet, delivery goes on in the background). Safe from any thread
        except the consumer itself, where it returns False at once.
        """
        closing = self._closing
        if closing is not None:
            return self._wait(closing, timeout)
        if self._thread is None and not self._queue:
            return True
        marker = _Marker(stop=False)
        self._queue.append(marker)
        self._wake()
        return self._wait(marker, timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Deliver what is queued, then stop the consumer thread.

        Outcomes recorded afterwards are dropped and counted in :attr:`dropped` (one
        recorded by another thread at the very moment of closing may be lost). Call
        it from a lifespan shutdown handler or a gunicorn ``worker_exit`` hook; the
        ``atexit`` hook calls it too. Idempotent. Returns True when everything was
        delivered within ``timeout`` seconds, False otherwise (delivery goes on in the
        background until the process exits).
        """
        with self._lock:
            marker = self._closing
            if marker is None:
                marker = self._closing = _Marker(stop=True)
                self._limit = 0
                start = self._thread is None
                if start and not self._queue:
                    marker.done.set()
                else:
                    self._queue.append(marker)
        if not marker.done.is_set():
            # Outside the lock: _start() takes it too.
            self._wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = self._wait(marker, timeout)
        thread = self._thread
        if ok and thread is not None and thread is not threading.current_thread():
            # The consumer returns right after marking the stop; wait for it to be gone,
            # so that `running` is False once close() has returned True.
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not ok:
            left = sum(1 for item in list(self._queue) if not isinstance(item, _Marker))
            log.warning("canarymw: %r did not deliver its last %d outcomes within %s s", self, left, timeout)
        return ok

    def _wait(self, marker: _Marker, timeout: float | None) -> bool:
        if threading.current_thread() is self._thread:
            return marker.done.is_set()
        return marker.done.wait(timeout)

    def stats(self) -> dict[str, int]:
        """This process's counters: ``processed``, ``dropped``, ``errors``, ``depth``, ``maxsize``."""
        return {
            "processed": self.processed,
            "dropped": self.dropped,
            "errors": self.errors,
            "depth": self.depth,
            "maxsize": self.maxsize,
        }

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.sinks)
        return f"BackgroundSink({inner}, maxsize={self.maxsize})"


# -- process-wide hooks ------------------------------------------------------------
# The exit hook is installed once, on the first BackgroundSink, never at import.
# Instances are held weakly so that a discarded sink (and its thread, once idle) is not
# kept alive here.
_instances: weakref.WeakSet[BackgroundSink] = weakref.WeakSet()
_exit_hook = threading.Lock()


def _track(sink: BackgroundSink) -> None:
    reset_after_fork(sink, BackgroundSink._reset)
    _instances.add(sink)
    if _exit_hook.acquire(blocking=False):  # never released: the hook is installed once
        atexit.register(_close_all_at_exit)


def _close_all_at_exit() -> None:
    for sink in list(_instances):
        if sink._thread is not None and sink._closing is None:
            sink.close(sink.exit_timeout)


def background_sinks(obj: object) -> list[BackgroundSink]:
    """The :class:`BackgroundSink` objects reachable from ``obj``.

    ``obj`` may be a middleware (its ``sink``), a sink guard, a ``FanoutSink``, a
    ``BackgroundSink`` or any other sink. For shutdown code that must flush or close
    whatever a middleware feeds::

        for sink in background_sinks(app.wsgi_app):
            sink.close(timeout=2)
    """
    if hasattr(obj, "sink_errors") and hasattr(obj, "_guard"):
        obj = obj._guard
    return _unwrap(obj)


def _unwrap(sink: object) -> list[BackgroundSink]:
    """BackgroundSinks reachable from a sink, through guards and fan-outs."""
    found: list[BackgroundSink] = []
    seen: set[int] = set()
    todo = [sink]
    while todo:
        s = todo.pop()
        if id(s) in seen:
            continue
        seen.add(id(s))
        if isinstance(s, BackgroundSink):
            found.append(s)
        elif s is not None:
            inner = getattr(s, "sink", None)  # SinkGuard
            if inner is not None:
                todo.append(inner)
            todo.extend(getattr(s, "sinks", ()))  # FanoutSink
    return found
