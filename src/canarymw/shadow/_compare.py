"""The comparison of two responses, and what it finds: sans-IO, shared by both adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

Result = Literal["match", "mismatch", "error", "timeout", "not-compared", "dropped"]
"""What became of one copy:

- ``match``: status, the compared headers and the body agreed (after the normaliser).
- ``mismatch``: at least one of them differed (:attr:`Comparison.differences` says which).
- ``error``: the shadow raised, broke off its response, or its upstream failed.
- ``timeout``: the shadow took longer than ``timeout``.
- ``not-compared``: no verdict possible (a body over ``max_body``, a primary that failed or
  whose client left, a request body that cannot be replayed); :attr:`Comparison.error` says why.
- ``dropped``: the copy was never sent: the queue was full.
"""

RESULTS: tuple[Result, ...] = ("match", "mismatch", "error", "timeout", "not-compared", "dropped")
Part = Literal["status", "headers", "body"]


@dataclass(frozen=True, slots=True)
class ShadowResponse:
    """One side of a comparison, as the normaliser sees it.

    ``headers`` holds only the compared headers the response has (lower-case names,
    repeated headers joined with ``", "``); ``body`` is the whole body (at most ``max_body``
    bytes). A normaliser returns a new one, e.g. ``dataclasses.replace(r, body=...)``.
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Comparison:
    """What became of one shadowed request: the record kept in samples and sent to sinks.

    Immutable. Bodies are never kept: a differing body is described by :attr:`body`
    (lengths, digests and the first difference, a few bytes of each side).
    """

    rollout: str
    variant: str
    """The primary's variant (``"old"`` or ``"new"``)."""
    route: str | None
    """The route template, when the framework named it (never the raw path)."""
    method: str
    path: str
    """The request's path and query, as the primary got them (for inspection)."""
    result: Result
    differences: tuple[Part, ...] = ()
    """For a mismatch: which parts differed, in the order status, headers, body."""
    primary_status: int | None = None
    shadow_status: int | None = None
    headers: tuple[tuple[str, str | None, str | None], ...] = ()
    """The compared headers that differ: ``(name, primary's value, shadow's value)``;
    None where a side lacks the header."""
    body: str | None = None
    """A short description of how the bodies differ, or None."""
    error: str | None = None
    """For ``error``: the exception type name; for ``not-compared``: the reason."""
    duration: float | None = None
    """Seconds the shadow took (None when it was not called)."""
    timestamp: float = 0.0
    """Unix time at which the primary request was routed."""


Normaliser = Callable[[ShadowResponse], ShadowResponse]


def pick_headers(headers: Iterable[tuple[str, str]], names: frozenset[str]) -> dict[str, str]:
    """The headers in ``names`` (lower case) as a dict, repeated ones joined with ``", "``."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in names:
            out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def differences(
    primary: ShadowResponse, shadow: ShadowResponse, bodies: bool
) -> tuple[tuple[Part, ...], tuple[tuple[str, str | None, str | None], ...], str | None]:
    """Which parts differ, the differing headers, and a description of the body difference.

    ``bodies`` False: the bodies are not compared (one was over the limit).
    """
    parts: list[Part] = []
    if primary.status != shadow.status:
        parts.append("status")
    names = sorted(primary.headers.keys() | shadow.headers.keys())
    changed = tuple(
        (n, primary.headers.get(n), shadow.headers.get(n))
        for n in names
        if primary.headers.get(n) != shadow.headers.get(n)
    )
    if changed:
        parts.append("headers")
    body = None
    if bodies and primary.body != shadow.body:
        parts.append("body")
        body = describe(primary.body, shadow.body)
    return tuple(parts), changed, body


def describe(a: bytes, b: bytes, context: int = 24) -> str:
    """Lengths, short digests and the first difference of two bodies, in one line."""
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, at - context // 2)

    def side(body: bytes) -> str:
        return f"{len(body)} bytes sha256:{hashlib.sha256(body).hexdigest()[:12]}"

    return (
        f"primary {side(a)}, shadow {side(b)}; first difference at byte {at}: "
        f"{a[start : at + context]!r} vs {b[start : at + context]!r}"
    )
