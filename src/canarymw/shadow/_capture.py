"""One response as it streams past (the primary's or the shadow's), and the verdict on two."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from ._compare import Comparison, Result, ShadowResponse, differences, pick_headers
from ._config import Shadow

_perf = time.perf_counter


class Capture:
    """Status, headers and up to ``limit`` body bytes of one response."""

    __slots__ = ("chunks", "complete", "headers", "limit", "over", "size", "status")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.over = False  # more than ``limit`` bytes (or a body we cannot see)
        self.complete = False  # the whole response went by

    def take(self, data: bytes) -> None:
        if self.over or not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.over = True
            self.chunks = []
        else:
            self.chunks.append(bytes(data))

    def response(self, shadow: Shadow) -> ShadowResponse:
        return ShadowResponse(
            self.status or 0, pick_headers(self.headers, shadow.headers), b"".join(self.chunks)
        )


@dataclass(frozen=True, slots=True)
class Copy:
    """What is known of a copied request when its primary finishes."""

    rollout: str
    variant: str
    route: str | None
    method: str
    path: str
    timestamp: float


def skipped(copy: Copy, result: Result, reason: str | None) -> Comparison:
    """The record of a copy that was never sent (``dropped``, ``not-compared``)."""
    return Comparison(
        copy.rollout, copy.variant, copy.route, copy.method, copy.path, result, error=reason,
        timestamp=copy.timestamp,
    )  # fmt: skip


def verdict(
    shadow: Shadow,
    copy: Copy,
    primary: Capture,
    got: Capture,
    error: str | None,
    started: float,
) -> Comparison:
    """Compare the shadow's response ``got`` with the primary's, once the shadow is done."""
    duration = _perf() - started
    base = Comparison(
        copy.rollout, copy.variant, copy.route, copy.method, copy.path, "match",
        primary_status=primary.status, shadow_status=got.status, duration=duration,
        timestamp=copy.timestamp,
    )  # fmt: skip
    if error is None and duration > shadow.timeout:
        error = "timeout"
    if error == "timeout":
        return replace(base, result="timeout", error="timeout")
    if error is None and (got.status is None or not got.complete):
        error = "IncompleteResponse"
    if error is not None:
        return replace(base, result="error", error=error)
    mine, theirs = primary.response(shadow), got.response(shadow)
    normalize = shadow.normalize
    if normalize is not None:
        try:
            mine, theirs = normalize(mine), normalize(theirs)
        except Exception as exc:
            return replace(base, result="error", error=f"normalize raised {type(exc).__name__}")
    bodies = not (primary.over or got.over)
    parts, headers, body = differences(mine, theirs, bodies)
    if parts:
        return replace(base, result="mismatch", differences=parts, headers=headers, body=body)
    if not bodies:
        side = "the primary's" if primary.over else "the shadow's"
        return replace(base, result="not-compared", error=f"{side} body is over max_body")
    return base


def strip_cookie(header: str, name: str) -> str:
    """A ``Cookie`` header without the cookie ``name`` (lenient: any piece without ``=``
    or with another name stays as it was). Pieces end at ``;`` or at ``,`` (two headers
    a WSGI server joined), as :func:`canarymw._cookie.find_values` reads them."""
    if name + "=" not in header:
        return header
    kept = []
    for part in header.split(";"):
        pieces = part.split(",")
        if any(p.partition("=")[0].strip() == name for p in pieces):
            part = ",".join(p for p in pieces if p.partition("=")[0].strip() != name)
        if part.strip(" ,"):
            kept.append(part)
    return ";".join(kept).strip(" ;,")


def status_code(line: str) -> int | None:
    try:
        return int(line[:3])
    except ValueError:
        return None
