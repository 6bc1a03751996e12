"""Lifespan for two apps: each runs in a task of its own, driven message by message."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ._types import ASGIApp, Message, Scope

log = logging.getLogger("canarymw")


class _Event(Protocol):
    def set(self) -> None: ...
    def is_set(self) -> bool: ...
    async def wait(self) -> Any: ...


class LifespanApp:
    """One app's lifespan, run in a task of its own; messages alternate with ours."""

    __slots__ = (
        "_inbox",
        "_inbox_ready",
        "_new_event",
        "_reply",
        "_reply_ready",
        "app",
        "done",
        "error",
        "label",
        "received",
        "scope",
        "started",
    )

    def __init__(self, label: str, app: ASGIApp, scope: Scope) -> None:
        self.label = label
        self.app = app
        self.scope = scope
        self.received = False
        """The app called receive(): it speaks lifespan, so an exception is a failure."""
        self.started = False
        self.done = False
        self.error: Exception | None = None
        self._inbox: Message = {}
        self._reply: Message | None = None
        self._reply_ready: _Event | None = None

    def bind(self, new_event: Callable[[], _Event]) -> None:
        self._new_event = new_event
        self._inbox_ready = new_event()

    async def run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            if self._reply_ready is not None:
                self._reply_ready.set()

    async def _receive(self) -> Message:
        await self._inbox_ready.wait()
        self.received = True
        message = self._inbox
        self._inbox_ready = self._new_event()
        return message

    async def _send(self, message: Message) -> None:
        self._reply = message
        if self._reply_ready is not None:
            self._reply_ready.set()

    async def exchange(self, message: Message, phase: str) -> str | None:
        """Deliver ``message``; return None if the phase went well, else why it failed.

        An app that ends before it received the startup message does not support
        lifespan: that is not a failure, and ``started`` stays False.
        """
        self._reply = None
        if not self.done:
            self._reply_ready = self._new_event()
            self._inbox = message
            self._inbox_ready.set()
            await self._reply_ready.wait()
        reply = self._reply
        if reply is None:
            if self.error is not None and self.received:
                return "".join(traceback.format_exception(self.error)).rstrip()
            if self.error is not None:
                log.debug("canarymw: the %s app does not support lifespan (%r)", self.label, self.error)
            return None
        kind = reply.get("type")
        if kind == f"lifespan.{phase}.complete":
            self.started = True
            return None
        if kind == f"lifespan.{phase}.failed":
            return str(reply.get("message") or f"lifespan.{phase}.failed")
        return f"sent {kind!r} in reply to lifespan.{phase}"


T = TypeVar("T")


async def run_beside(main: Callable[[], Awaitable[T]], *apps: LifespanApp) -> T:
    """Await ``main()`` while each app's lifespan runs in its own task; then cancel stragglers.

    Uses anyio when it is installed (it is with Starlette and FastAPI), so trio works
    too; plain asyncio otherwise.
    """
    try:
        import anyio
    except ImportError:
        anyio = None  # type: ignore[assignment]
    if anyio is not None:
        for app in apps:
            app.bind(anyio.Event)
        async with anyio.create_task_group() as tg:
            for app in apps:
                tg.start_soon(app.run)
            try:
                return await main()
            finally:
                tg.cancel_scope.cancel()
    import asyncio

    for app in apps:
        app.bind(asyncio.Event)
    tasks = [asyncio.ensure_future(app.run()) for app in apps]
    try:
        return await main()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
