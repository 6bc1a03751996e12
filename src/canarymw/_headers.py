"""Header rules of both adapters and the proxies: our response headers, the cookie join."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T", str, bytes)
# Header lists are typed Iterable[Any]: ASGI allows any 2-item iterables (lists included),
# and the compiled build checks every declared type at run time.


def joined_cookie(headers: Iterable[Any]) -> bytes | None:
    """The ASGI request's ``cookie`` headers joined with ``"; "``, or None if it has none.

    One join, linear however many headers there are.
    See: RFC 9113 §8.2.3 (HTTP/2 splits cookies; rejoin with "; ")
    """
    found: bytes | None = None
    more: list[bytes] | None = None
    for name, value in headers:  # a loop, not a comprehension: one frame less per request
        if name == b"cookie":
            if found is None:
                found = value
            elif more is None:
                more = [found, value]
            else:
                more.append(value)
    return found if more is None else b"; ".join(more)


def caching_headers(
    vary: str | None, cache_control: str | None, policy: str | None
) -> tuple[str | None, str | None]:
    """Return the ``Vary`` and ``Cache-Control`` values a cohort-dependent response needs.

    Each is None when the app's own value (given, or None if absent) is already right.
    ``Cookie`` is merged into ``Vary`` (never replacing the app's tokens), and ``policy``
    (normally ``"private"``) is added to ``Cache-Control`` unless the app already said
    ``private``, ``no-store`` or ``public``: an explicit ``public`` is the app's choice.
    See: RFC 9110 §12.5.5 (Vary), RFC 9111 §5.2.2 (Cache-Control).
    """
    new_vary: str | None = None
    if vary is None or not vary.strip():
        new_vary = "Cookie"
    else:
        tokens = {t.strip().lower() for t in vary.split(",")}
        if "*" not in tokens and "cookie" not in tokens:
            new_vary = f"{vary}, Cookie"
    new_cc: str | None = None
    if policy:
        if cache_control is None or not cache_control.strip():
            new_cc = policy
        else:
            directives = {d.split("=", 1)[0].strip().lower() for d in cache_control.split(",")}
            if not directives & {"private", "no-store", "public"}:
                new_cc = f"{policy}, {cache_control}"
    return new_vary, new_cc


def with_ours(
    headers: Iterable[Any],
    ours: list[tuple[T, T]],
    set_cookie: T | None,
    policy: str | None,
    names: tuple[T, T, T],
    dec: Callable[[T], str],
    enc: Callable[[str], T],
    fold: bool,
) -> list[tuple[T, T]]:
    """A new list: the app's response headers with ours added (the rule of both adapters).

    ``ours`` are the pairs to append as they are (``Vary: Cookie``, ``Cache-Control``,
    and the ``Set-Cookie`` when there is one) when the app set neither ``Vary`` nor
    ``Cache-Control``: the common case. Otherwise the values are merged by
    :func:`finish_headers`. ``fold``: compare names case-insensitively (WSGI); ASGI
    response header names are lower case by the spec, and so must ``names`` be then.
    """
    if fold:
        vary, cache_control = names[0].lower(), names[1].lower()
        for name, _ in headers:
            low = name.lower()
            if low == vary or low == cache_control:  # noqa: SIM109 - no tuple built per header
                return finish_headers(headers, set_cookie, policy, names, dec, enc)
    else:
        exact_vary, exact_cache_control = names[0], names[1]
        for name, _ in headers:
            if name == exact_vary or name == exact_cache_control:  # noqa: SIM109
                return finish_headers(headers, set_cookie, policy, names, dec, enc)
    return [*headers, *ours]


def finish_headers(
    headers: Iterable[Any],
    set_cookie: T | None,
    policy: str | None,
    names: tuple[T, T, T],
    dec: Callable[[T], str],
    enc: Callable[[str], T],
) -> list[tuple[T, T]]:
    """Return a new header list with our cookie and the caching headers merged in.

    ``names`` are the header names as written for new headers, in the list's type:
    ``(Vary, Cache-Control, Set-Cookie)``; existing headers match case-insensitively. The
    input is never mutated. Repeated ``Vary``/``Cache-Control`` lines are read as one
    comma-joined value and the merged value replaces the first line.
    """
    vary_w, cc_w, sc_w = names
    vary_n, cc_n = vary_w.lower(), cc_w.lower()
    out = list(headers)
    vary_i = cc_i = -1
    vary: list[str] = []
    cc: list[str] = []
    for i, (name, value) in enumerate(out):
        low = name.lower()
        if low == vary_n:
            if vary_i < 0:
                vary_i = i
            vary.append(dec(value))
        elif low == cc_n:
            if cc_i < 0:
                cc_i = i
            cc.append(dec(value))
    new_vary, new_cc = caching_headers(
        ", ".join(vary) if vary else None, ", ".join(cc) if cc else None, policy
    )
    if new_vary is not None:
        if vary_i < 0:
            out.append((vary_w, enc(new_vary)))
        else:
            out[vary_i] = (out[vary_i][0], enc(new_vary))
            out[vary_i + 1 :] = [h for h in out[vary_i + 1 :] if h[0].lower() != vary_n]
            cc_i = next((i for i, h in enumerate(out) if h[0].lower() == cc_n), -1)
    if new_cc is not None:
        if cc_i < 0:
            out.append((cc_w, enc(new_cc)))
        else:
            out[cc_i] = (out[cc_i][0], enc(new_cc))
            out[cc_i + 1 :] = [h for h in out[cc_i + 1 :] if h[0].lower() != cc_n]
    if set_cookie is not None:
        out.append((sc_w, set_cookie))
    return out
