"""BackgroundSink: never blocks the request, counts every drop and failure, survives fork and exit."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from canarymw import MemorySink, Outcome, Rollout, WSGICanaryMiddleware
from canarymw.sinks import (
    OUTCOME_CLASSES,
    BackgroundSink,
    CallableSink,
    HealthSources,
    background_sinks,
    outcome_class,
)

from ..harness import WSGITransport

KEY = "test-secret-key-0123456789abcdef"


def make_outcome(variant: str = "new", status: int | None = 200, **kw: object) -> Outcome:
    fields: dict[str, object] = {
        "rollout": "r",
        "variant": variant,
        "status": status,
        "duration": 0.01,
        "error": None,
        "disconnected": False,
        "method": "GET",
        "route": None,
        "timestamp": 1.0,
    }
    fields.update(kw)
    return Outcome(**fields)  # type: ignore[arg-type]


class Gate:
    """A sink that blocks in record() until released (or for at most `hold` seconds)."""

    def __init__(self, hold: float = 10.0) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.seen: list[Outcome] = []

    def record(self, outcome: Outcome) -> None:
        self.entered.set()
        self.release.wait(self.hold)
        self.seen.append(outcome)


class Boom:
    def __init__(self) -> None:
        self.calls = 0

    def record(self, outcome: Outcome) -> None:
        self.calls += 1
        raise RuntimeError("sink down")


@pytest.fixture
def closing() -> Iterator[Callable[[BackgroundSink], BackgroundSink]]:
    """Close every BackgroundSink a test makes, so no consumer thread outlives it."""
    made: list[BackgroundSink] = []
    gates: list[Gate] = []

    def track(sink: BackgroundSink) -> BackgroundSink:
        made.append(sink)
        gates.extend(s for s in sink.sinks if isinstance(s, Gate))
        return sink

    yield track
    for gate in gates:
        gate.release.set()
    for sink in made:
        assert sink.close(timeout=5)
        assert not sink.running


def test_no_thread_until_the_first_record(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    before = threading.active_count()
    mem = MemorySink()
    bg = closing(BackgroundSink(mem))
    assert threading.active_count() == before
    assert not bg.running
    assert bg.flush(timeout=1)  # nothing recorded: nothing to wait for, still no thread
    assert not bg.running
    bg.record(make_outcome())
    assert bg.running
    assert [t.name for t in threading.enumerate()].count("canarymw-sink") >= 1
    assert bg.flush(timeout=5)
    assert mem.snapshot()["new"].requests == 1


def test_delivers_everything_in_order(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    seen: list[int] = []
    bg = closing(BackgroundSink(CallableSink(lambda o: seen.append(o.status or 0)), maxsize=100_000))
    for i in range(5000):
        bg.record(make_outcome(status=i))
    assert bg.flush(timeout=10)
    assert seen == list(range(5000))
    assert bg.stats() == {"processed": 5000, "dropped": 0, "errors": 0, "depth": 0, "maxsize": 100_000}


def test_a_lone_outcome_is_delivered_within_the_interval(
    closing: Callable[[BackgroundSink], BackgroundSink],
) -> None:
    got = threading.Event()
    bg = closing(BackgroundSink(CallableSink(lambda o: got.set()), interval=0.05))
    bg.record(make_outcome())  # starts the thread, which drains at once
    assert got.wait(2)
    got.clear()
    time.sleep(0.1)  # the consumer is asleep now; one outcome does not wake it early
    bg.record(make_outcome())
    assert got.wait(2)


@pytest.mark.parametrize(("size", "extra"), [(1, 1), (10, 0), (10, 7), (1000, 250)])
def test_overflow_drops_are_counted_exactly(
    closing: Callable[[BackgroundSink], BackgroundSink], size: int, extra: int
) -> None:
    gate = Gate()
    bg = closing(BackgroundSink(gate, maxsize=size))
    bg.record(make_outcome(status=0))  # taken by the consumer, which then blocks in the sink
    assert gate.entered.wait(5)
    t0 = time.perf_counter()
    for i in range(size + extra):
        bg.record(make_outcome(status=i + 1))
    elapsed = time.perf_counter() - t0
    assert bg.dropped == extra
    assert bg.depth == size
    assert elapsed < 1.0  # nothing waited for the blocked sink
    gate.release.set()
    assert bg.flush(timeout=5)
    assert [o.status for o in gate.seen] == list(range(size + 1))
    assert bg.processed == size + 1


def test_concurrent_producers_lose_nothing_uncounted(
    closing: Callable[[BackgroundSink], BackgroundSink],
) -> None:
    mem = MemorySink()
    bg = closing(BackgroundSink(mem, maxsize=64))
    per_thread, threads = 5000, 8

    def produce() -> None:
        for _ in range(per_thread):
            bg.record(make_outcome())

    workers = [threading.Thread(target=produce) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert bg.flush(timeout=10)
    delivered = mem.snapshot()["new"].requests
    assert delivered == bg.processed
    assert delivered + bg.dropped == per_thread * threads


def test_failing_sink_is_counted_and_logged_once_per_interval(
    closing: Callable[[BackgroundSink], BackgroundSink], caplog: pytest.LogCaptureFixture
) -> None:
    boom, mem = Boom(), MemorySink()
    bg = closing(BackgroundSink(boom, mem, log_interval=60))
    with caplog.at_level(logging.ERROR, logger="canarymw"):
        for _ in range(50):
            bg.record(make_outcome())
        assert bg.flush(timeout=5)
    assert boom.calls == 50
    assert bg.errors == 50
    assert mem.snapshot()["new"].requests == 50  # the other sink still got everything
    failures = [r for r in caplog.records if "failed in the background" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


def test_a_sink_raising_base_exceptions_does_not_kill_the_consumer(
    closing: Callable[[BackgroundSink], BackgroundSink], caplog: pytest.LogCaptureFixture
) -> None:
    def exits(outcome: Outcome) -> None:
        raise SystemExit(3)

    mem = MemorySink()
    bg = closing(BackgroundSink(CallableSink(exits), mem))
    with caplog.at_level(logging.CRITICAL, logger="canarymw"):
        for _ in range(3):
            bg.record(make_outcome())
        assert bg.flush(timeout=5)
    assert bg.errors == 3
    assert bg.running
    assert mem.snapshot()["new"].requests == 3


def test_drops_are_logged_once_per_interval(
    closing: Callable[[BackgroundSink], BackgroundSink], caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    bg = closing(BackgroundSink(gate, maxsize=1, log_interval=60))
    bg.record(make_outcome())
    assert gate.entered.wait(5)
    with caplog.at_level(logging.WARNING, logger="canarymw"):
        for _ in range(20):
            bg.record(make_outcome())
    assert bg.dropped == 19
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_flush_gives_up_after_its_timeout(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    gate = Gate()
    bg = closing(BackgroundSink(gate))
    bg.record(make_outcome())
    assert gate.entered.wait(5)
    t0 = time.perf_counter()
    assert bg.flush(timeout=0.2) is False
    assert 0.15 < time.perf_counter() - t0 < 2


def test_close_drains_then_drops_later_outcomes(
    closing: Callable[[BackgroundSink], BackgroundSink], caplog: pytest.LogCaptureFixture
) -> None:
    mem = MemorySink()
    bg = closing(BackgroundSink(mem))
    for _ in range(100):
        bg.record(make_outcome())
    assert bg.close(timeout=5)
    assert not bg.running
    assert mem.snapshot()["new"].requests == 100
    with caplog.at_level(logging.WARNING, logger="canarymw"):
        bg.record(make_outcome())
    assert bg.dropped == 1
    assert "closed" in caplog.text
    assert bg.close(timeout=1)  # idempotent
    assert bg.flush(timeout=1)


def test_close_before_any_record_starts_nothing() -> None:
    bg = BackgroundSink(MemorySink())
    assert bg.close(timeout=1)
    assert not bg.running
    bg.record(make_outcome())
    assert bg.dropped == 1
    assert not bg.running


def test_batch_and_flush_hooks_of_wrapped_sinks(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    class Batching:
        def __init__(self) -> None:
            self.batches: list[int] = []
            self.flushes = 0

        def record(self, outcome: Outcome) -> None:  # pragma: no cover - record_many is preferred
            raise AssertionError("record_many should be used")

        def record_many(self, outcomes: list[Outcome]) -> None:
            self.batches.append(len(outcomes))

        def flush(self) -> None:
            self.flushes += 1

    sink = Batching()
    gate = Gate()
    bg = closing(BackgroundSink(gate, sink, batch_size=100, maxsize=10_000))
    bg.record(make_outcome())
    assert gate.entered.wait(5)
    for _ in range(450):
        bg.record(make_outcome())
    gate.release.set()
    assert bg.flush(timeout=5)
    assert sum(sink.batches) == 451
    assert max(sink.batches) == 100
    assert sink.flushes >= 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"maxsize": 0}, ValueError, id="empty queue"),
        pytest.param({"maxsize": True}, ValueError, id="bool size"),
        pytest.param({"batch_size": -1}, ValueError, id="negative batch"),
        pytest.param({"interval": 0}, ValueError, id="busy loop"),
        pytest.param({"exit_timeout": float("nan")}, ValueError, id="nan timeout"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        BackgroundSink(MemorySink(), **kwargs)  # type: ignore[arg-type]


def test_needs_real_sinks() -> None:
    with pytest.raises(TypeError, match="at least one sink"):
        BackgroundSink()
    with pytest.raises(TypeError, match="no record"):
        BackgroundSink(object())  # type: ignore[arg-type]


def test_repr_names_the_wrapped_sinks() -> None:
    assert repr(BackgroundSink(MemorySink(), maxsize=5)).startswith("BackgroundSink(<canarymw.")


# -- through the real WSGI middleware ---------------------------------------------------
def _app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_a_sink_that_sleeps_10s_leaves_requests_fast(
    closing: Callable[[BackgroundSink], BackgroundSink],
) -> None:
    slow = Gate(hold=10.0)  # sleeps 10 s per outcome unless the test ends first
    mem = MemorySink()
    bg = closing(BackgroundSink(slow, mem, maxsize=1000))
    rollout = Rollout("sleepy", percent=50, secret_key=KEY)
    mw = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=bg)
    with httpx.Client(transport=WSGITransport(mw), base_url="http://test") as client:
        client.get("/")  # warm-up; the consumer is now asleep in the slow sink
        assert slow.entered.wait(5)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            assert client.get("/").status_code == 200
            times.append(time.perf_counter() - t0)
    assert max(times) < 0.5, max(times)
    assert mw.sink_errors == 0
    slow.release.set()
    assert bg.flush(timeout=5)
    assert sum(v.requests for v in mem.snapshot().values()) == 51


def test_a_raising_sink_never_reaches_the_client(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    bg = closing(BackgroundSink(Boom()))
    rollout = Rollout("boom", percent=100, secret_key=KEY)
    mw = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=bg)
    with httpx.Client(transport=WSGITransport(mw), base_url="http://test") as client:
        for _ in range(5):
            assert client.get("/").text == "ok"
    assert bg.flush(timeout=5)
    assert bg.errors == 5
    assert mw.sink_errors == 0


# -- processes ------------------------------------------------------------------------
def _run(code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_forked_child_gets_a_fresh_working_consumer() -> None:
    result = _run(
        """
        import os, sys, time
        from canarymw import MemorySink, Outcome
        from canarymw.sinks import BackgroundSink

        o = Outcome("r", "new", 200, 0.01, None, False, "GET", None, 1.0)
        mem = MemorySink()
        bg = BackgroundSink(mem)
        for _ in range(5):
            bg.record(o)
        assert bg.flush(5) and bg.running
        for _ in range(7):
            bg.record(o)  # queued in the parent at fork time: the parent's to deliver
        pid = os.fork()
        if pid == 0:
            ok = bg.depth == 0 and bg.processed == 0 and not bg.running
            for _ in range(3):
                bg.record(o)
            ok = ok and bg.flush(5) and bg.processed == 3 and bg.running
            n = mem.snapshot()["new"].requests  # 5 copied from the parent, then 3
            os._exit(0 if ok and n in (8, 9, 10, 11, 12, 13, 14, 15) and bg.processed == 3 else 1)
        _, status = os.waitpid(pid, 0)
        assert bg.flush(5)
        assert mem.snapshot()["new"].requests == 12, mem.snapshot()
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "child 0" in result.stdout


def test_atexit_delivers_the_queue_and_a_stuck_sink_cannot_hang_exit(tmp_path: object) -> None:
    result = _run(
        """
        import time, threading
        from canarymw import Outcome
        from canarymw.sinks import BackgroundSink
        from canarymw.sinks import CallableSink

        got = []
        import atexit
        atexit.register(lambda: print("delivered", len(got)))  # registered first: runs last
        o = Outcome("r", "new", 200, 0.01, None, False, "GET", None, 1.0)
        def slow(outcome):
            time.sleep(0.001)
            got.append(outcome)
        bg = BackgroundSink(CallableSink(slow), exit_timeout=10)
        stuck = BackgroundSink(CallableSink(lambda o: threading.Event().wait()), exit_timeout=0.3)
        for _ in range(300):
            bg.record(o)
            stuck.record(o)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "delivered 300" in result.stdout
    assert "did not deliver" in result.stderr


# -- small helpers --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        pytest.param(make_outcome(status=200), "2xx", id="ok"),
        pytest.param(make_outcome(status=302), "3xx", id="redirect"),
        pytest.param(make_outcome(status=404), "4xx", id="not found"),
        pytest.param(make_outcome(status=503), "5xx", id="unavailable"),
        pytest.param(make_outcome(status=101), "1xx", id="switching"),
        pytest.param(make_outcome(status=None), "5xx", id="no response"),
        pytest.param(make_outcome(status=999), "5xx", id="impossible status"),
        pytest.param(make_outcome(status=200, error="KeyError"), "exception", id="raised mid-body"),
        pytest.param(make_outcome(status=None, error="KeyError"), "exception", id="raised"),
        pytest.param(make_outcome(status=200, disconnected=True), "disconnect", id="client left"),
    ],
)
def test_outcome_class(outcome: Outcome, expected: str) -> None:
    assert outcome_class(outcome) == expected
    assert expected in OUTCOME_CLASSES


def test_callable_sink() -> None:
    seen: list[Outcome] = []

    @CallableSink
    def sink(outcome: Outcome) -> None:
        seen.append(outcome)

    sink.record(make_outcome())
    assert len(seen) == 1
    assert "sink" in repr(sink)


def test_callable_sink_lets_errors_propagate_to_the_guard() -> None:
    def fails(outcome: Outcome) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        CallableSink(fails).record(make_outcome())


def test_callable_sink_rejects_what_cannot_work() -> None:
    async def coro(outcome: Outcome) -> None:  # pragma: no cover - never called
        pass

    class AsyncCallable:
        async def __call__(self, outcome: Outcome) -> None:  # pragma: no cover - never called
            pass

    with pytest.raises(TypeError, match="async"):
        CallableSink(coro)
    with pytest.raises(TypeError, match="async"):
        CallableSink(AsyncCallable())
    with pytest.raises(TypeError, match="function"):
        CallableSink(42)  # type: ignore[arg-type]


def test_health_sources_follow_a_middleware_to_its_parts() -> None:
    rollout = Rollout("h", percent=10, secret_key=KEY)
    bg = BackgroundSink(MemorySink())
    mw = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=[bg, MemorySink()])
    sources = HealthSources()
    assert not sources
    sources.add(mw)
    sources.add(rollout)  # already watched through the middleware: counted once
    snap = sources.snapshot()
    assert snap.percent == {"h": 10.0}
    assert snap.events[("h", "assigned")] == 0
    assert snap.sink_errors == {"request": 0, "background": 0}
    assert snap.dropped == 0
    assert snap.queue_depth == 0
    assert sources.rollout_names() == ["h"]
    with pytest.raises(TypeError, match="cannot watch"):
        sources.add(object())


def test_failing_batch_and_flush_hooks_are_counted(
    closing: Callable[[BackgroundSink], BackgroundSink],
) -> None:
    class Broken:
        def record(self, outcome: Outcome) -> None:  # pragma: no cover - record_many is preferred
            pass

        def record_many(self, outcomes: list[Outcome]) -> None:
            raise OSError("disk full")

        def flush(self) -> None:
            raise OSError("still full")

    bg = closing(BackgroundSink(Broken(), log_interval=0))
    bg.record(make_outcome())
    assert bg.flush(timeout=5)
    assert bg.errors >= 3  # the batch, the flush after the drain, the flush asked for


def test_a_sink_cannot_wait_for_its_own_consumer(closing: Callable[[BackgroundSink], BackgroundSink]) -> None:
    results: list[bool] = []
    holder: list[BackgroundSink] = []

    def reentrant(outcome: Outcome) -> None:
        results.append(holder[0].flush(timeout=5))

    bg = closing(BackgroundSink(CallableSink(reentrant)))
    holder.append(bg)
    t0 = time.perf_counter()
    bg.record(make_outcome())
    assert bg.flush(timeout=5)
    assert results == [False]
    assert time.perf_counter() - t0 < 2  # returned at once instead of deadlocking


def test_outcomes_racing_close_are_still_delivered(
    closing: Callable[[BackgroundSink], BackgroundSink],
) -> None:
    gate, mem = Gate(), MemorySink()
    bg = closing(BackgroundSink(gate, mem))
    bg.record(make_outcome())
    assert gate.entered.wait(5)
    assert bg.close(timeout=0.05) is False  # the consumer is stuck; the stop marker is queued
    bg._queue.append(make_outcome())  # as if a record() had passed the size check just before
    gate.release.set()
    assert bg.close(timeout=5)
    assert mem.snapshot()["new"].requests == 2


def test_a_consumer_that_cannot_start_is_retried(
    closing: Callable[[BackgroundSink], BackgroundSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mem = MemorySink()
    bg = closing(BackgroundSink(mem))

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with caplog.at_level(logging.WARNING, logger="canarymw"):
        bg.record(make_outcome())  # queued; no thread, no exception
    assert not bg.running
    assert "could not start" in caplog.text
    monkeypatch.undo()
    bg.record(make_outcome())
    assert bg.flush(timeout=5)
    assert mem.snapshot()["new"].requests == 2


def test_background_sinks_reachable_from_a_middleware() -> None:
    rollout = Rollout("find", percent=10, secret_key=KEY)
    first, second = BackgroundSink(MemorySink()), BackgroundSink(MemorySink())
    mw = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=[first, MemorySink(), second])
    assert {id(s) for s in background_sinks(mw)} == {id(first), id(second)}
    assert background_sinks(first) == [first]
    assert background_sinks(MemorySink()) == []
    single = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=first)
    assert background_sinks(single) == [first]


def test_consumer_is_gone_once_close_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() returning True means the thread has exited, not merely been told to."""
    import canarymw.sinks.background as background

    class SlowToLeave(threading.Event):
        # The consumer lingers after marking the stop, as a preempted thread may.
        def set(self) -> None:
            super().set()
            time.sleep(0.05)

    class Marker(background._Marker):
        def __init__(self, stop: bool) -> None:
            super().__init__(stop)
            self.done = SlowToLeave()

    monkeypatch.setattr(background, "_Marker", Marker)
    bg = BackgroundSink(MemorySink())
    bg.record(Outcome("r", "old", 200, 0.001, None, False, "GET", None, 0.0))
    assert bg.close(timeout=5)
    assert not bg.running
