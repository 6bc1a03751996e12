"""How the adapters hand an outcome to the sink they were given (one function for both)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._base import CallableSink, FanoutSink, Outcome, Sink, SinkGuard
from .memory import _BATCH, MemorySink

_new_tuple = tuple.__new__


def direct_queue(guard: SinkGuard | None) -> MemorySink | None:
    """The MemorySink behind ``guard`` if outcomes may skip its ``record()`` call.

    :func:`record` then appends a plain field tuple to its queue and folds at
    ``_BATCH``: the work of ``record()`` without building an ``Outcome``. Not for
    subclasses, which may override ``record()``.
    """
    inner = guard.sink if guard is not None else None
    return inner if type(inner) is MemorySink else None


class _Adapter(Protocol):
    @property
    def _memory(self) -> MemorySink | None: ...
    @property
    def _record(self) -> Callable[[Outcome], None] | None: ...
    @property
    def _guard(self) -> SinkGuard | None: ...


def record(
    adapter: _Adapter,
    decision: Any,
    status: int | None,
    duration: float,
    error: str | None,
    disconnected: bool,
    method: str,
    route: str | None,
    wall: float,
    close_code: int | None = None,
) -> None:
    """Build one request's outcome from its :class:`~canarymw.Decision` and hand it to
    the adapter's sink.

    The one place the adapters' Python paths put the fields in ``Outcome`` order.
    Straight into a MemorySink's queue (see :func:`direct_queue`), else as an
    ``Outcome`` to the sink's ``record()``. A sink that raises is counted, never raised.
    """
    # One function, not a builder and a deliverer: a Python frame less per request.
    fields = (
        decision.rollout,
        decision.variant,
        status,
        duration,
        error,
        disconnected,
        method,
        route,
        wall,
        close_code,
    )
    try:
        memory = adapter._memory
        if memory is None:
            # tuple.__new__ skips _make's length check: all the fields are here.
            adapter._record(_new_tuple(Outcome, fields))  # type: ignore[misc]
        else:
            pending = memory._pending
            pending.append(fields)
            if len(pending) >= _BATCH:
                memory._fold(blocking=False)
    except Exception:
        adapter._guard.failed()  # type: ignore[union-attr]


def as_sink(sink: Sink | Sequence[Sink] | None) -> SinkGuard | None:
    """Normalise the ``sink=`` argument of the middlewares (one sink, a list, or None)."""
    if sink is None:
        return None
    if isinstance(sink, (list, tuple)):
        if not sink:
            return None
        inner: Sink = sink[0] if len(sink) == 1 else FanoutSink(*sink)
    else:
        inner = sink  # type: ignore[assignment]
    if not callable(getattr(inner, "record", None)):
        if not callable(inner):
            raise TypeError(
                f"sink {inner!r} has no record(outcome) method and is not callable; see canarymw.Sink."
            )
        inner = CallableSink(inner)
    return SinkGuard(inner)
