"""A small progress bar for stderr, drawn only on a terminal."""

from __future__ import annotations

import shutil
import time
from typing import TextIO


class Progress:
    """Redraws one line in place: bar, count, rate and time left.

    Does nothing when ``stream`` is not a terminal (a log file or a CI job gets no
    escape-ridden lines), unless ``enabled`` says otherwise. Redraws at most ten times
    a second, so calling :meth:`update` often costs nothing.
    """

    def __init__(self, total: int, stream: TextIO, *, label: str = "requests", enabled: bool | None = None):
        self.total = max(total, 1)
        self.stream = stream
        self.label = label
        self.enabled = stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, *, force: bool = False) -> None:
        """Show ``done`` of ``total``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r" + self.line(done, now - self.started) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def line(self, done: int, elapsed: float) -> str:
        """The text of the bar for ``done`` after ``elapsed`` seconds."""
        done = min(done, self.total)
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f"{(self.total - done) / rate:.0f}s left" if rate > 0 and done < self.total else ""
        tail = f" {done}/{self.total} {self.label} {rate:.0f}/s {left}".rstrip()
        width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - len(tail) - 10))
        filled = width * done // self.total
        return f"{done * 100 // self.total:3d}% [{'#' * filled}{'.' * (width - filled)}]{tail}"

    def close(self, done: int) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self.update(done, force=True)
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()


class Ticker:
    """One status line redrawn in place (a run with no known end: ``demo --guard``).

    Like :class:`Progress`, draws only on a terminal and at most ten times a second;
    :meth:`clear` wipes the line, so that a message can be printed on its own line.
    """

    def __init__(self, stream: TextIO, *, enabled: bool | None = None):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def update(self, text: str) -> None:
        """Show ``text``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Wipe the line, if drawn."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
