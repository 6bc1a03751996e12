from collections.abc import Awaitable, Callable, Iterable
from typing import Any

def respond(
    mw: Any, app: Any, decision: Any, environ: Any, start_response: Any, wall: float
) -> Iterable[bytes]: ...
def configure(
    perf_counter: Callable[[], float],
    codes: dict[str, int],
    parse_status: Callable[[str], int | None],
    slow_start: Callable[..., Any],
    record_outcome: Callable[[Any, tuple[Any, ...]], None],
    sink_failed: Callable[[Any, Exception], None],
    fold: Callable[[Any], None],
    batch: int,
    decision_fields: tuple[int, int, int],
    /,
) -> None: ...
def router(
    mw: Any, cached: Callable[[str], Any] | None, extra: list[tuple[bytes, bytes]], /
) -> Callable[[Any, Any, Any], Awaitable[None]]: ...
def configure_asgi(send: Callable[..., Any], wall: Callable[[], float], /) -> None: ...
