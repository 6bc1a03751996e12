"""Outcomes as JSON lines: one file that every worker process appends to, and a reader.

::

    from canarymw.sinks import BackgroundSink
    from canarymw.sinks.jsonl import JSONLinesSink, read_stats

    sink = BackgroundSink(JSONLinesSink("/var/log/myapp/canary/"))
    ...
    read_stats("/var/log/myapp/canary/")   # {"old": VariantStats(...), "new": ...}

or from a shell: ``python -m canarymw.sinks.jsonl /var/log/myapp/canary/``.

Each outcome is one line, a JSON object with the :class:`~canarymw.Outcome` fields
plus ``pid`` (``close_code`` is null except for websockets)::

    {"rollout":"checkout-v2","variant":"new","status":200,"duration":0.0123,"error":null,
     "disconnected":false,"method":"GET","route":"/cart/<id>","timestamp":1717000000.5,
     "close_code":null,"pid":4242}

Why several processes can share one file: it is opened with ``O_APPEND`` and every
write is one ``write()`` of whole lines totalling at most ``PIPE_BUF`` bytes (4096 on
Linux), so on a local file system appends from different processes never interleave
inside a line (network file systems such as NFS do not promise this: give each host
its own directory). Lines are kept under that size by shortening long strings.

Rotation is by size: when the file has reached ``max_bytes``, the writer that notices
first renames it to ``<stem>.<UTC time>.<pid>-<n><suffix>`` (a name no other process
can pick, so nothing is overwritten) while holding an ``flock`` on it that other
rotators also take; the others notice the rename on their next write and reopen.
Everything in the directory stays readable by :func:`read_outcomes`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._runtime import reset_after_fork
from ._base import Classifier, Outcome, default_classifier
from .memory import MemorySink, VariantStats

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: rotation is then not serialised across processes
    fcntl = None  # type: ignore[assignment]


__all__ = ["DEFAULT_FILENAME", "JSONLinesSink", "read_outcomes", "read_stats"]

log = logging.getLogger("canarymw")

DEFAULT_FILENAME = "canarymw-outcomes.jsonl"
"""File name used when :class:`JSONLinesSink` is given a directory."""

LINE_LIMIT: int = min(getattr(select, "PIPE_BUF", 512), 4096)
"""Most bytes per ``write()``: ``PIPE_BUF``, the size POSIX makes atomic even when the
path is a pipe or FIFO; appends to a local regular file never interleave anyway."""
_FIELD_MAX = 120  # characters per string field when a line must be shortened
_STRINGS = ("rollout", "variant", "method", "route", "error")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode(outcome: Outcome, pid: int) -> bytes:
    """One outcome as a JSON line (newline included), at most ``LINE_LIMIT`` bytes."""
    obj: dict[str, Any] = outcome._asdict()
    d = obj["duration"]
    obj["duration"] = d if d >= 0.0 and d != math.inf else 0.0
    obj["pid"] = pid
    line = (_dumps(obj) + "\n").encode()
    if len(line) <= LINE_LIMIT:
        return line
    for name in _STRINGS:
        value = obj[name]
        if isinstance(value, str) and len(value) > _FIELD_MAX:
            obj[name] = value[:_FIELD_MAX]
    obj["truncated"] = True
    line = (_dumps(obj) + "\n").encode()
    if len(line) > LINE_LIMIT:  # pragma: no cover - only with a tiny PIPE_BUF
        for name in _STRINGS:
            obj[name] = obj[name] if name == "variant" else None
        line = (_dumps(obj) + "\n").encode()
    return line


class JSONLinesSink:
    """Appends each outcome to a JSON lines file, safely shared by several processes.

    Thread-safe and fork-safe: threads of one process share one file descriptor, and
    every process (gunicorn workers included) may write the same path at once. Each
    :meth:`record` is a blocking ``write()`` system call, so wrap the sink in a
    :class:`~canarymw.sinks.BackgroundSink` to keep disk I/O off the request path; the
    background consumer then calls :meth:`record_many`, which writes up to
    ``PIPE_BUF`` bytes of whole lines per call.

    Errors (disk full, permissions) raise ``OSError`` from ``record``; the middleware
    or the ``BackgroundSink`` counts and logs them, and the next call tries again. A
    short write (disk full mid-line) leaves a partial line that :func:`read_outcomes`
    skips.

    Args:
        path: The file to append to, or an existing directory (or a path ending with
            a separator, created if missing) to write ``canarymw-outcomes.jsonl`` in.
        max_bytes: Rotate once the file has reached this size; 0 never rotates.
        backup_count: Rotated files to keep (the oldest are deleted); None keeps all.
            A process that has not yet noticed a rotation may still append to the
            newest rotated file, so keep at least one.
        mode: Permission bits of a newly created file (before the umask).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 64 * 1024 * 1024,
        backup_count: int | None = 10,
        mode: int = 0o644,
    ) -> None:
        raw = os.fspath(path)
        p = Path(raw)
        if p.is_dir() or raw.endswith((os.sep, "/")):
            p = p / DEFAULT_FILENAME
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"JSONLinesSink needs max_bytes to be an integer >= 0, got {max_bytes!r}.")
        if backup_count is not None and (not isinstance(backup_count, int) or backup_count < 0):
            raise ValueError(
                f"JSONLinesSink needs backup_count to be None or an integer >= 0, got {backup_count!r}."
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.mode = mode
        self._counter = itertools.count(1)
        self._after_fork()
        reset_after_fork(self, JSONLinesSink._after_fork)

    def _after_fork(self) -> None:
        # In a forked child the inherited descriptor still appends correctly (the open
        # file description is shared), but a lock held by another parent thread is
        # held forever: replace it.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fd: int | None = getattr(self, "_fd", None)

    # -- writing -------------------------------------------------------------------
    def record(self, outcome: Outcome) -> None:
        """Append one line (one ``write()`` call)."""
        self._write([encode(outcome, self._pid)])

    def record_many(self, outcomes: Iterable[Outcome]) -> None:
        """Append a batch, in writes of at most ``PIPE_BUF`` bytes of whole lines."""
        pid = self._pid
        self._write([encode(o, pid) for o in outcomes])

    def _write(self, lines: Sequence[bytes]) -> None:
        with self._lock:
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                if size + len(line) > LINE_LIMIT and chunk:
                    self._append(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._append(b"".join(chunk))

    def _append(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            fd = self._fd = os.open(self.path, _FLAGS, self.mode)
        if self.max_bytes and os.fstat(fd).st_size >= self.max_bytes:
            fd = self._rotate(fd)
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")

    def _rotate(self, fd: int) -> int:
        rotated = False
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            mine = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            # Only the file we hold is renamed, and only if it is still the current
            # one: a writer that lost the race just reopens.
            if (
                current is not None
                and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
                and mine.st_size >= self.max_bytes
            ):
                os.rename(self.path, self._rotated_name())
                rotated = True
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._fd = None
        fd = self._fd = os.open(self.path, _FLAGS, self.mode)
        if rotated and self.backup_count is not None:
            self._prune()
        return fd

    def _rotated_name(self) -> Path:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        p = self.path
        return p.with_name(f"{p.stem}.{now}.{os.getpid()}-{next(self._counter)}{p.suffix}")

    def rotated_files(self) -> list[Path]:
        """Rotated files of this sink, oldest first."""
        p = self.path
        prefix, suffix = p.stem + ".", p.suffix
        names = [
            c
            for c in p.parent.iterdir()
            if c.name.startswith(prefix) and c.name.endswith(suffix) and c.name != p.name
        ]
        return sorted(names, key=lambda c: c.name)

    def _prune(self) -> None:
        keep = self.backup_count
        assert keep is not None
        files = self.rotated_files()
        for old in files[: max(len(files) - keep, 0)]:
            with contextlib.suppress(FileNotFoundError):  # another process pruned it
                old.unlink()

    def close(self) -> None:
        """Close the file descriptor; a later :meth:`record` reopens the file."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"JSONLinesSink({str(self.path)!r})"


# -- reading -----------------------------------------------------------------------
def _files(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted((c for c in p.iterdir() if c.suffix == ".jsonl" and c.is_file()), key=lambda c: c.name)
    return [p]


def _outcome(obj: Any) -> Outcome:
    if not isinstance(obj, dict):
        raise TypeError("not a JSON object")
    status = _int_or_none(obj, "status")
    return Outcome(
        rollout=str(obj["rollout"]),
        variant=str(obj["variant"]),
        status=status,
        duration=float(obj["duration"]),
        error=None if obj.get("error") is None else str(obj["error"]),
        disconnected=bool(obj.get("disconnected", False)),
        method=str(obj.get("method", "GET")),
        route=None if obj.get("route") is None else str(obj["route"]),
        timestamp=float(obj.get("timestamp", 0.0)),
        close_code=_int_or_none(obj, "close_code"),
    )


def _int_or_none(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} is not an integer")
    return value


def read_outcomes(path: str | os.PathLike[str], *, strict: bool = False) -> Iterator[Outcome]:
    """Yield the outcomes stored at ``path``: one file, or every ``*.jsonl`` file in a directory.

    Files are read in name order, which puts rotated files first, oldest first. A
    final line without its newline (being written right now) is ignored. Any other
    line that is not a valid outcome raises ValueError when ``strict``, else it is
    skipped and the number skipped per file is logged as a warning.
    """
    for file in _files(path):
        bad = 0
        with open(file, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    outcome = _outcome(json.loads(raw))
                except (ValueError, TypeError, KeyError) as exc:
                    if strict:
                        raise ValueError(f"{file}:{number}: not a canarymw outcome ({exc})") from exc
                    bad += 1
                    continue
                yield outcome
        if bad:
            log.warning("canarymw: skipped %d malformed lines in %s", bad, file)


def read_stats(
    path: str | os.PathLike[str],
    *,
    rollout: str | None = None,
    since: float | None = None,
    classify: Classifier = default_classifier,
) -> dict[str, VariantStats]:
    """Per-variant statistics of the outcomes stored at ``path`` (file or directory).

    The whole-service counterpart of :meth:`MemorySink.snapshot
    <canarymw.MemorySink.snapshot>`: same numbers, computed the same way, over every
    process that wrote there, and likewise always with both ``"old"`` and ``"new"``
    (zero counts and None latencies for a variant with no outcomes).

    Args:
        path: A file, or a directory whose ``*.jsonl`` files are all read.
        rollout: Only this rollout; default all, summed.
        since: Only outcomes with ``timestamp >= since`` (Unix seconds).
        classify: Success rule, as for ``MemorySink``.
    """
    agg = MemorySink(classify)
    record = agg.record
    for outcome in read_outcomes(path):
        if since is not None and outcome.timestamp < since:
            continue
        record(outcome)
    return agg.snapshot(rollout)


def _format(stats: dict[str, VariantStats]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    rows = [
        f"{'variant':<8} {'requests':>9} {'errors':>7} {'error %':>8} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    ]
    for name, st in stats.items():
        rows.append(
            f"{name:<8} {st.requests:>9} {st.errors:>7} {st.error_rate * 100:>8.2f} "
            f"{ms(st.latency_p50):>8} {ms(st.latency_p95):>8} {ms(st.latency_p99):>8}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None, out: Callable[[str], object] = print) -> int:
    """``python -m canarymw.sinks.jsonl PATH [ROLLOUT]``: print per-variant stats of a JSON lines store."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m canarymw.sinks.jsonl", description=main.__doc__)
    parser.add_argument("path", help="a .jsonl file or a directory of them")
    parser.add_argument("rollout", nargs="?", help="only this rollout (default: all)")
    args = parser.parse_args(argv)
    stats = read_stats(args.path, rollout=args.rollout)
    out(_format(stats) if any(st.requests for st in stats.values()) else "no outcomes")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
