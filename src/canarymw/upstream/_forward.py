"""The sans-IO rules both proxies share: which headers go where, the target, framing, failures."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final
from urllib.parse import quote_from_bytes

from . import _h1
from ._errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    _HeadTimedOut,
)

if TYPE_CHECKING:
    from ._config import Upstream

_H1_ERRORS: Final[dict[type[_h1.H1Error], type[UpstreamError]]] = {
    _h1.ConnectFailed: UpstreamConnectError,
    _h1.ConnectTimedOut: UpstreamConnectTimeout,
    _h1.PoolTimedOut: UpstreamPoolTimeout,
    _h1.TimedOut: UpstreamTimeout,
    _h1.ProtocolFailed: UpstreamProtocolError,
}


# -- protocol tables -------------------------------------------------------------
# See: RFC 9110 §7.6.1 (hop-by-hop fields, and every field named in Connection);
# Proxy-Authorization/-Authenticate are meant for this hop too (RFC 9110 §11.7).
_HOP: Final = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
# The front server sends its own Date and Server; two of each would be malformed.
_RESPONSE_DROP: Final = frozenset(n.encode() for n in (*_HOP, "date", "server"))
# Request headers we rewrite ourselves or must not forward (Expect: 100-continue was
# the front server's business; Content-Length/Transfer-Encoding: we frame the body).
_REQUEST_DROP: Final = frozenset(
    (
        *_HOP,
        "host",
        "expect",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "via",
    )
)
# Forwarding headers that only a proxy should set, and that a client can forge: the
# upstream would take Forwarded: for=10.0.0.1;proto=https;host=admin at its word.
# See: RFC 7239 §8.1.
_CLIENT_FORWARDING: Final = frozenset(("forwarded", "x-real-ip"))


def _request_drop(trust_forwarded: bool) -> frozenset[str]:
    """The client's request headers that never reach the upstream: the rule for both proxies."""
    return _REQUEST_DROP if trust_forwarded else _REQUEST_DROP | _CLIENT_FORWARDING


_IDEMPOTENT: Final = frozenset(m.decode("ascii") for m in _h1.IDEMPOTENT)
_NO_BODY_STATUS: Final = frozenset((204, 304))
_FRAMED_BY_ENCODING: Final = frozenset((b"content-length",))

# RFC 3986 pchar plus "/", and query characters plus "%" (escapes already present stay).
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"
_QUERY_SAFE: Final = _PATH_SAFE + "?%"
_is_safe_path = re.compile(r"[A-Za-z0-9/!$&'()*+,;=:@\-._~]*").fullmatch
_is_safe_query = re.compile(r"[A-Za-z0-9/!$&'()*+,;=:@\-._~?%]*").fullmatch

_CHUNK: Final = 64 * 1024
_WATCH_ABOVE: Final = 256 * 1024  # ASGI bodies longer than this (or of unknown length) watch for disconnects
_VIA: Final = "canarymw"
_NAME_CACHE_MAX: Final = 2048
_LOG_EVERY: Final = 10.0  # seconds between two warnings about the same upstream


def _remove_dot_segments(path: str) -> str:
    """Resolve ``.`` and ``..`` segments, so a path can never climb above the upstream's prefix.

    See: RFC 3986 §5.2.4. Keeps a trailing slash; the result always starts with "/".
    """
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def _target(prefix: str, path: str, query: str, charset: str) -> bytes:
    """The request target: configured prefix, re-encoded path, sanitised query."""
    if not path.startswith("/"):
        # An absolute-form target that the server passed on as the path: only its path
        # counts, never its authority. See: RFC 9112 §3.2.2.
        path = "/" + (path.split("://", 1)[1].partition("/")[2] if "://" in path else path)
    if "/." in path:
        path = _remove_dot_segments(path)
    if not _is_safe_path(path):
        path = quote_from_bytes(path.encode(charset, "surrogateescape"), _PATH_SAFE)
    if query:
        if not _is_safe_query(query):
            query = quote_from_bytes(query.encode("latin-1", "replace"), _QUERY_SAFE)
        return f"{prefix}{path}?{query}".encode("ascii")
    return f"{prefix}{path}".encode("ascii")


def _connection_tokens(value: str) -> frozenset[bytes]:
    """Header names listed in a Connection value (besides close/keep-alive), lower case."""
    tokens = {t.strip().lower() for t in value.split(",")}
    tokens -= {"", "close", "keep-alive"}
    return frozenset(t.encode("latin-1") for t in tokens)


def _response_headers(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers that go to the client, names as the upstream spelled them.

    Hop-by-hop fields and those named in ``Connection`` go; so does ``Content-Length``
    when ``Transfer-Encoding`` came too: the body was read by its chunks, and the front
    server frames it again, so that length would make the client read too little, or
    the next response as the rest of this one. See: RFC 9112 §6.3.
    """
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    named: frozenset[bytes] = frozenset()
    for name, value in fields:
        lower = name.lower()
        if lower in _RESPONSE_DROP:
            if lower == b"connection":
                named |= _connection_tokens(value.decode("latin-1"))
            elif lower == b"transfer-encoding":
                named |= _FRAMED_BY_ENCODING
            continue
        append((name, value))
    if named:
        out = [h for h in out if h[0].lower() not in named]
    return out


def _forwarding(
    proxy: _Proxy,
    host: bytes | None,
    prior_for: list[bytes],
    client: bytes | None,
    https: bool,
    version: str,
    prior_via: list[bytes],
) -> list[tuple[bytes, bytes]]:
    """The fields a proxy sets for the upstream: Host, X-Forwarded-*, Via (both proxies).

    ``host`` is the client's (its Host, else the server's name); ``prior_for`` and
    ``prior_via`` are the client's X-Forwarded-For and Via values, kept and appended to.
    See: RFC 9110 §7.2 (Host), §7.6.3 (Via).
    """
    out = [(b"host", host if proxy._preserve_host and host else proxy._authority)]
    forwarded = [*prior_for, client] if client else prior_for
    if forwarded:
        out.append((b"x-forwarded-for", b", ".join(forwarded)))
    out.append((b"x-forwarded-proto", b"https" if https else b"http"))
    if host:
        out.append((b"x-forwarded-host", host))
    out.append((b"via", b", ".join([*prior_via, f"{version} {_VIA}".encode("latin-1")])))
    return out


def _may_fall_back(
    cls: type[UpstreamError], method: str, replay: bytes | None, started: bool, cap: int
) -> bool:
    """Whether old may serve a request the upstream failed (both proxies).

    Always when nothing reached the upstream (it was unavailable and no body was sent);
    after sending, only an idempotent request whose body was buffered (``replay``,
    at most ``cap`` bytes), since old then gets exactly the same request.
    """
    if replay is None:
        return issubclass(cls, UpstreamUnavailable) and not started
    return issubclass(cls, UpstreamUnavailable) or (method in _IDEMPOTENT and len(replay) <= cap)


def _status_line(status: int, reason: bytes) -> str:
    phrase = reason.decode("latin-1").strip() if reason else ""
    if not phrase or not phrase.isprintable():
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
    return f"{status} {phrase}"


def _error_body(cls: type[UpstreamError]) -> bytes:
    if cls.status == 504:
        return b"Gateway Timeout: the upstream server did not answer in time.\n"
    return b"Bad Gateway: the upstream server could not be reached or failed.\n"


def _classify(exc: BaseException) -> type[UpstreamError] | None:
    """Our exception class for a client failure (ours or httpcore's), or None when it is not one."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, _h1.H1Error):
        return _H1_ERRORS.get(type(exc), UpstreamProtocolError)
    if isinstance(exc, _HeadTimedOut):
        return UpstreamTimeout
    try:
        import httpcore
    except ImportError:
        return None
    if isinstance(exc, httpcore.ConnectTimeout):
        return UpstreamConnectTimeout
    if isinstance(exc, httpcore.ConnectError):
        return UpstreamConnectError
    if isinstance(exc, httpcore.PoolTimeout):
        return UpstreamPoolTimeout
    if isinstance(exc, httpcore.TimeoutException):
        return UpstreamTimeout
    if isinstance(exc, (httpcore.NetworkError, httpcore.ProtocolError)):
        return UpstreamProtocolError
    return None


class _Proxy:
    """What both proxies copy from their Upstream, once, off the request path."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._prefix = upstream._prefix
        self._cap = upstream.max_replay_body
        self._preserve_host = upstream.preserve_host
        self._drop = _request_drop(upstream.trust_forwarded)
        self._extensions = upstream._extensions
        self._scheme, self._host, self._port = upstream._scheme, upstream._host, upstream._port
        self._authority = upstream._authority.encode("latin-1")
