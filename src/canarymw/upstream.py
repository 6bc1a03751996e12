"""Upstreams: route a cohort to another server, from WSGI or ASGI, safely.

Blue/green usually means two deployments at two addresses. An :class:`Upstream` is
accepted wherever the middlewares take an app, as ``old`` or ``new``::

    from canarymw import ASGICanaryMiddleware, Rollout, Upstream, WSGICanaryMiddleware

    rollout = Rollout("api-v2", percent=5, secret_key=os.environ["CANARY_KEY"])

    # WSGI: the app stays the old variant, 5% of cohorts go to the green deployment
    app.wsgi_app = WSGICanaryMiddleware(app.wsgi_app, new=Upstream("http://10.0.0.2:8002"),
                                        rollout=rollout)
    # ASGI: both variants are upstreams (a proxy that only splits)
    app = ASGICanaryMiddleware(Upstream("http://10.0.0.1:8001"),
                               new=Upstream("http://10.0.0.2:8002"), rollout=rollout)

Each middleware turns an upstream into a WSGI app (:meth:`Upstream.wsgi_app`) or an
ASGI app (:meth:`Upstream.asgi_app`) when it is constructed, and hands it the old
app to fall back on. Both can also be used on their own as a plain proxy app.
The WSGI proxy's HTTP/1.1 client is canarymw's own (standard library only, see
``canarymw._h1``); the ASGI proxy needs the ``upstream`` extra
(``pip install 'canarymw[upstream]'``) and drives httpx's connection engine, httpcore,
directly. Neither has a cookie jar, follows redirects or reads proxy settings from the
environment, none of which a gateway wants.

Connections
    One connection pool per process for WSGI (created on the first request, so
    every gunicorn worker gets its own after the fork, and thread-safe for threaded
    workers), one per event loop for ASGI (closed at lifespan shutdown). Idle
    connections are kept for ``keepalive_expiry`` seconds, shorter than the usual
    server keep-alive timeouts (gunicorn 2 s, uvicorn 5 s) so that a connection is
    not reused just as the server closes it. There is no cookie jar anywhere: a
    ``Set-Cookie`` from the upstream goes to the client that caused it and nowhere
    else, and each request carries only its own client's ``Cookie``.

Streaming
    Request bodies up to ``max_replay_body`` bytes are read first and sent with a
    ``Content-Length`` (so they can be replayed, see below); larger ones are
    streamed as they arrive (WSGI: ``wsgi.input``, chunked uploads included where
    the server sets ``wsgi.input_terminated``; ASGI: ``receive()``). Responses
    are streamed back chunk by chunk as the upstream produces them, never buffered,
    so server-sent events work (give them a ``read_timeout`` longer than their
    heartbeat, or None). The upstream response is always closed: at the end, when
    the server closes the WSGI iterable early, when an ASGI ``send()`` raises or the
    request's task is cancelled, and when an ASGI client disconnects from a server
    that drops ``send()`` silently afterwards (before ASGI 2.4): bodies of unknown
    length or over 256 KiB are copied by a task of their own while the request's
    task waits for ``http.disconnect``. Redirects are passed to the client, never
    followed.

Headers (both directions)
    Hop-by-hop headers are removed: ``Connection``, ``Keep-Alive``, ``Proxy-*``,
    ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` and every header named in
    ``Connection`` (See: RFC 9110 §7.6.1). Requests also lose ``Expect`` (the front
    server already answered ``100-continue``). ``Host`` is the upstream's address,
    or the client's ``Host`` with ``preserve_host=True``; either way the connection
    goes to the configured address: the target is built from configuration and the
    re-encoded path (dot segments removed), so neither an absolute-form request
    target nor ``Host`` can point it elsewhere. ``X-Forwarded-For`` gets the
    client's address appended (the client's own value is kept but never trusted for
    anything), ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set, and
    ``Via`` gets ``1.1 canarymw`` (See: RFC 9110 §7.6.3). The client's ``Forwarded``
    (See: RFC 7239) and ``X-Real-IP`` are dropped, since anyone can send
    ``Forwarded: for=10.0.0.1;proto=https``; ``trust_forwarded=True`` passes them on
    unchanged, for a trusted front proxy that sets them. Repeated ``Cookie``
    headers (HTTP/2) are joined with ``"; "`` (See: RFC 9113 §8.2.3). Responses keep
    every ``Set-Cookie`` as its own header; the upstream's ``Date`` and ``Server``
    are dropped because the front server sends its own, and so is its
    ``Content-Length`` when ``Transfer-Encoding`` came too (the body is framed by
    its chunks; See: RFC 9112 §6.3). A transfer coding other than ``chunked``
    (``gzip, chunked``) cannot be undone by a proxy: it is a protocol error.

Failures
    ======================================  ===========================  ==================
    what happened                           with ``fallback`` and old    otherwise
    ======================================  ===========================  ==================
    refused, DNS, connect or pool timeout   old serves it (any method)   502, or 504 (timeouts)
    (nothing was sent)
    lost, malformed or timed out after the  old serves it if the method  502, or 504 (timeouts)
    request was sent (``head_timeout``      is idempotent and the body
    included)                               was buffered (replayable)
    broke off after the response started    the client connection is aborted (never a
                                            truncated 200): WSGI raises from the body
                                            iterable, ASGI raises after the start message
    upstream answered 5xx                   passed through as it is
    ======================================  ===========================  ==================

    Every failure names itself in ``environ["canarymw.error"]`` (ASGI:
    ``scope["canarymw.error"]``) before anything else happens, so the
    :class:`~canarymw.Outcome` of the request counts it against the variant whose
    upstream failed, even when the fallback then served a 200. The names are those
    of the exception classes below. 502 and 504 answers have a short plain-text body.

Exceptions::

    UpstreamError                   any upstream failure (.status: 502 or 504)
    ├── UpstreamUnavailable         nothing was sent: safe to send elsewhere
    │   ├── UpstreamConnectError    refused, DNS failure, unreachable (502)
    │   ├── UpstreamConnectTimeout  (504)
    │   └── UpstreamPoolTimeout     no pooled connection became free in time (504)
    ├── UpstreamProtocolError       after sending: reset, closed, malformed answer (502)
    ├── UpstreamTimeout             after sending: read or write timeout (504)
    └── UpstreamAborted             the response broke off after it had started

Only :class:`UpstreamAborted` reaches the server (raised to abort the connection);
the others are handled as the table says.

Limits: HTTP/1.1 only (``http://`` and ``https://`` upstreams); WebSocket
connections cannot be proxied: they go to the fallback when there is one (recorded
as ``UpstreamWebSocketUnsupported``) and are refused otherwise, so exclude websocket
routes from the rollout when the new variant is an upstream. On trio, long ASGI
bodies are copied without the disconnect watcher. The ASGI proxy's parser (h11) skips
any number of interim ``1xx`` answers, where the WSGI one refuses a 17th: there only
``head_timeout`` bounds them. See also ``docs/upstreams.md``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote_from_bytes, urlsplit

from . import _h1

if TYPE_CHECKING:
    import ssl

    import anyio
    import httpcore
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = [
    "Upstream",
    "UpstreamAborted",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamPoolTimeout",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

log = logging.getLogger("canarymw")


# -- exceptions ------------------------------------------------------------------
class UpstreamError(Exception):
    """An upstream failed; :attr:`status` is the answer a client gets when nothing else can."""

    status: int = 502


class UpstreamUnavailable(UpstreamError):
    """No connection could be used, so nothing was sent: any request may go elsewhere."""


class UpstreamConnectError(UpstreamUnavailable):
    """The connection was refused, the name did not resolve, or the host is unreachable."""


class UpstreamConnectTimeout(UpstreamUnavailable):
    """Connecting took longer than ``connect_timeout``."""

    status = 504


class UpstreamPoolTimeout(UpstreamUnavailable):
    """Every pooled connection stayed busy for ``pool_timeout`` seconds."""

    status = 504


class UpstreamProtocolError(UpstreamError):
    """After the request was (perhaps partly) sent: connection lost or answer malformed."""


class UpstreamTimeout(UpstreamError):
    """After the request was (perhaps partly) sent: a read or a write timed out."""

    status = 504


class UpstreamAborted(UpstreamError):
    """The response broke off after it had started; raised so the server aborts the connection."""


class _IncompleteBody(Exception):
    """The client sent fewer body bytes than announced (it went away)."""


class _HeadTimedOut(Exception):
    """ASGI: the upstream's response head took longer than ``head_timeout``."""


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


def _check_seconds(name: str, value: object, also: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Upstream got {name}={value!r}; use a number of seconds above 0{also}.")
    return float(value)


def _check_timeout(name: str, value: object) -> float | None:
    return None if value is None else _check_seconds(name, value, " or None (no limit)")


# -- the public configuration object ---------------------------------------------------
_LIVE: weakref.WeakSet[Upstream] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A pool made before the fork belongs to the parent: its sockets and locks are
    # shared state. Forget it (no I/O, no locking); the child makes its own.
    for upstream in list(_LIVE):
        upstream._forget_pools()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Upstream:
    """Another server that a variant's requests are proxied to (HTTP/1.1, pooled, streamed).

    Pass it as ``old`` or ``new`` to :class:`~canarymw.WSGICanaryMiddleware` or
    :class:`~canarymw.ASGICanaryMiddleware`; see the module documentation for the
    header handling and the failure table.

    Args:
        url: ``http://host:port`` or ``https://host:port``, optionally with a path
            prefix (``http://10.0.0.2:8002/v2`` sends ``/items`` to ``/v2/items``).
            The only place the upstream's address ever comes from.
        connect_timeout: Seconds to open a connection. A refused or timed-out
            connection sent nothing, so the request can fall back to old.
        read_timeout: Seconds to wait for each read: the response head, then each
            body chunk. ``None`` waits forever (long polls, quiet event streams).
        head_timeout: Seconds for the whole response head, from the end of the request
            to the last header line, interim ``1xx`` answers included. ``read_timeout``
            bounds each read only, so without it an upstream that sends its head a byte
            at a time (or ``100 Continue`` again and again) holds the request for as long
            as it likes. ``"auto"``: twice ``read_timeout`` (60 s by default), which lets
            an honest head that took almost ``read_timeout`` to start still arrive in
            pieces, or no limit when ``read_timeout`` is ``None`` (a long poll's head
            comes when its event does). ``None``: no limit.
        write_timeout: Seconds to wait for each write of the request.
        pool_timeout: Seconds to wait for a free pooled connection when all
            ``max_connections`` are busy.
        fallback: When this upstream is ``new``, serve with ``old`` instead of
            answering 502/504 whenever that is safe (see the failure table). The
            outcome still records the failure against ``new``.
        preserve_host: Send the client's ``Host`` instead of the upstream's address
            (for upstreams that serve several virtual hosts or build absolute links).
        trust_forwarded: Pass the client's ``Forwarded`` and ``X-Real-IP`` headers to
            the upstream unchanged. Off by default: they are dropped, because any client
            can claim ``Forwarded: for=10.0.0.1;proto=https``. Turn it on only behind a
            front proxy that sets (and overwrites) them itself. ``X-Forwarded-*`` are
            handled the same way either way.
        max_replay_body: Request bodies up to this many bytes are buffered before
            sending, so that an idempotent request can be replayed to old after the
            upstream failed mid-request; larger bodies are streamed and answered
            with 502/504 in that case. ``0`` streams every body.
        max_connections: Connections per process (WSGI) or per event loop (ASGI).
        keepalive_expiry: Seconds an idle connection is kept for reuse. Keep it below
            the upstream's keep-alive timeout.
        ssl_context: For ``https://`` upstreams: the context to verify them with
            (default: the system's default verification).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float | None = 30.0,
        write_timeout: float | None = 30.0,
        pool_timeout: float = 5.0,
        head_timeout: float | Literal["auto"] | None = "auto",
        fallback: bool = True,
        preserve_host: bool = False,
        trust_forwarded: bool = False,
        max_replay_body: int = 64 * 1024,
        max_connections: int = 100,
        keepalive_expiry: float = 1.5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(url, str):
            raise ValueError(
                f"Upstream needs its URL as a string such as 'http://127.0.0.1:8002', got {url!r}."
            )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"Upstream got url={url!r}, which is not a valid URL ({exc}).") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"Upstream got url={url!r}; use an http:// or https:// URL with a host, "
                "such as 'http://127.0.0.1:8002'."
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"Upstream got url={url!r} with credentials in it; send an Authorization header "
                "from the app instead, so no secret sits in configuration logs."
            )
        if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
            raise ValueError(
                f"Upstream got url={url!r} with a query or fragment; the client's query is forwarded, "
                "so give only scheme, host, port and an optional path prefix."
            )
        if not url.isascii() or any(c.isspace() for c in url):
            raise ValueError(
                f"Upstream got url={url!r}; use an ASCII URL without spaces (punycode for IDNs)."
            )
        self.url = url
        self.connect_timeout = _check_seconds("connect_timeout", connect_timeout)
        self.read_timeout = _check_timeout("read_timeout", read_timeout)
        self.write_timeout = _check_timeout("write_timeout", write_timeout)
        self.pool_timeout = _check_seconds("pool_timeout", pool_timeout)
        head: float | None = None
        if head_timeout == "auto":
            head = None if self.read_timeout is None else 2 * self.read_timeout
        elif head_timeout is not None:
            head = _check_seconds("head_timeout", head_timeout, ", None (no limit) or 'auto'")
        self.head_timeout = head
        if not isinstance(fallback, bool):
            raise ValueError(f"Upstream got fallback={fallback!r}; use True or False.")
        if not isinstance(preserve_host, bool):
            raise ValueError(f"Upstream got preserve_host={preserve_host!r}; use True or False.")
        if not isinstance(trust_forwarded, bool):
            raise ValueError(f"Upstream got trust_forwarded={trust_forwarded!r}; use True or False.")
        if isinstance(max_replay_body, bool) or not isinstance(max_replay_body, int) or max_replay_body < 0:
            raise ValueError(
                f"Upstream got max_replay_body={max_replay_body!r}; use a number of bytes, 0 or more."
            )
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(
                f"Upstream got max_connections={max_connections!r}; use a whole number, 1 or more."
            )
        self.keepalive_expiry = _check_seconds("keepalive_expiry", keepalive_expiry)
        self.fallback = fallback
        self.preserve_host = preserve_host
        self.trust_forwarded = trust_forwarded
        self.max_replay_body = max_replay_body
        self.max_connections = max_connections
        self.ssl_context = ssl_context

        self._scheme = parts.scheme.encode("ascii")
        host = parts.hostname
        self._host = host.encode("ascii")
        self._port = port if port is not None else (443 if parts.scheme == "https" else 80)
        authority = f"[{host}]" if ":" in host else host
        if port is not None:
            authority = f"{authority}:{port}"
        self._authority = authority
        self._prefix = parts.path.rstrip("/")
        self._extensions: dict[str, Any] = {
            "timeout": {
                "connect": self.connect_timeout,
                "read": self.read_timeout,
                "write": self.write_timeout,
                "pool": self.pool_timeout,
            }
        }
        self._lock = threading.Lock()
        self._pool: _h1.Pool | None = None
        self._async_pools: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, httpcore.AsyncConnectionPool
        ] = weakref.WeakKeyDictionary()
        self._other_pool: httpcore.AsyncConnectionPool | None = None  # trio and other non-asyncio loops
        self._open: set[object] = set()
        self._logged = 0.0
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"Upstream({self.url!r})"

    @property
    def in_flight(self) -> int:
        """Upstream responses open right now, in this process (0 when idle: nothing leaked)."""
        return len(self._open)

    # -- the apps ------------------------------------------------------------------
    def wsgi_app(self, fallback: WSGIApplication | None = None) -> WSGIApplication:
        """A WSGI app that proxies every request here; ``fallback`` serves when that is safe.

        The middleware calls this with its old app; call it yourself for a plain proxy.
        Needs no optional dependency: the WSGI proxy's client is canarymw's own.
        """
        return _WSGIProxy(self, fallback if self.fallback else None)

    def asgi_app(self, fallback: ASGIApp | None = None) -> ASGIApp:
        """An ASGI app that proxies every HTTP request here; ``fallback`` serves when that is safe.

        It answers lifespan events itself (closing its pool at shutdown) and never
        passes them to ``fallback``: the middleware runs the old app's lifespan.
        """
        _require_httpcore()
        import anyio  # noqa: F401  (a dependency of httpcore's async backend; fail here, not later)

        return _ASGIProxy(self, fallback if self.fallback else None)

    # -- pools ---------------------------------------------------------------------
    def _pool_options(self) -> dict[str, Any]:
        return {
            "ssl_context": self.ssl_context,
            "max_connections": self.max_connections,
            "max_keepalive_connections": self.max_connections,
            "keepalive_expiry": self.keepalive_expiry,
        }

    def _sync_pool(self) -> _h1.Pool:
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    ssl_context = self.ssl_context
                    if ssl_context is None and self._scheme == b"https":
                        import ssl

                        ssl_context = ssl.create_default_context()
                    pool = self._pool = _h1.Pool(
                        self._host.decode("ascii"),
                        self._port,
                        ssl_context=ssl_context,
                        max_connections=self.max_connections,
                        keepalive_expiry=self.keepalive_expiry,
                        connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout,
                        write_timeout=self.write_timeout,
                        pool_timeout=self.pool_timeout,
                        head_timeout=self.head_timeout,
                    )
        return pool

    def _async_pool(self) -> httpcore.AsyncConnectionPool:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        pool = self._other_pool if loop is None else self._async_pools.get(loop)
        if pool is None:
            import httpcore

            # An async pool's locks and sockets belong to the loop that made them.
            pool = httpcore.AsyncConnectionPool(**self._pool_options())
            if loop is None:
                self._other_pool = pool
            else:
                self._async_pools[loop] = pool
        return pool

    def _forget_pools(self) -> None:
        self._lock = threading.Lock()
        self._pool = None
        self._async_pools = weakref.WeakKeyDictionary()
        self._other_pool = None
        self._open = set()

    def close(self) -> None:
        """Close this process's WSGI connection pool (a new one is made on the next request)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """Close the ASGI connection pool of the running event loop (done at lifespan shutdown)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            pool, self._other_pool = self._other_pool, None
        else:
            pool = self._async_pools.pop(loop, None)
        if pool is not None:
            await pool.aclose()

    def _fail(self, cls: type[UpstreamError], exc: BaseException, fell_back: bool) -> str:
        """Log (rate-limited) and return the name recorded for the outcome."""
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            then = "served by the fallback" if fell_back else f"answered {cls.status}"
            log.warning("canarymw: upstream %s failed (%s, %r); %s", self.url, cls.__name__, exc, then)
        return cls.__name__


def _require_httpcore() -> None:
    try:
        import httpcore  # noqa: F401
    except ImportError:
        raise ImportError(
            "canarymw.Upstream needs httpx (and its httpcore); install the extra: "
            "pip install 'canarymw[upstream]'"
        ) from None


# -- WSGI ------------------------------------------------------------------------
class _Prefixed:
    """``wsgi.input`` for the fallback after we already read ``head`` from ``rest``."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            # PEP 3333 gives wsgi.input.read() a size argument: read the rest in pieces.
            rest = iter(lambda: bytes(self._rest.read(_CHUNK)), b"")
            return self._head.read() + b"".join(rest)
        data = self._head.read(size)
        if len(data) < size:
            data += bytes(self._rest.read(size - len(data)))
        return data

    def readline(self, size: int | None = -1) -> bytes:
        line = self._head.readline(-1 if size is None else size)
        if line.endswith(b"\n") or (size is not None and 0 <= size <= len(line)):
            return line
        more = size - len(line) if size is not None and size >= 0 else -1
        return line + bytes(self._rest.readline(more) if more >= 0 else self._rest.readline())

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _WSGIInput:
    """The request body streamed from ``wsgi.input`` (after ``head``, already read)."""

    started = False

    def __init__(self, stream: Any, head: bytes, remaining: int | None) -> None:
        self.stream = stream
        self.head = head
        self.remaining = remaining  # None: read to the end (the server terminates the input)

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        if self.head:
            yield self.head
        read = self.stream.read
        remaining = self.remaining
        while remaining is None or remaining > 0:
            chunk = read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                if remaining:
                    raise _IncompleteBody
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _read_up_to(stream: Any, limit: int) -> bytes:
    """Read until ``limit`` bytes or the end of ``stream``, whichever comes first."""
    parts = []
    got = 0
    while got < limit:
        chunk = stream.read(min(_CHUNK, limit - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class _WSGIBody:
    """The response iterable: yields upstream chunks as they arrive; close() closes the response."""

    __slots__ = ("open", "response")

    def __init__(self, response: _h1.Response, open_: set[object]) -> None:
        self.response: _h1.Response | None = response
        self.open = open_

    def __iter__(self) -> Iterator[bytes]:
        response = self.response
        if response is None:
            return
        try:
            for chunk in response:
                if chunk:
                    yield chunk
        except Exception as exc:
            if _classify(exc) is None:
                raise
            # Raising after the headers went out makes the server drop the connection,
            # so the client sees a broken response, never a short one that looks whole.
            raise UpstreamAborted(f"the upstream response broke off: {exc!r}") from exc

    def close(self) -> None:
        response = self.response
        if response is not None:
            self.response = None
            self.open.discard(response)
            response.close()


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


class _WSGIProxy(_Proxy):
    """``Upstream.wsgi_app()``: one instance per middleware variant."""

    def __init__(self, upstream: Upstream, fallback: WSGIApplication | None) -> None:
        super().__init__(upstream)
        self.fallback = fallback
        self._pool = upstream._sync_pool
        self._authority = upstream._authority
        self._names: dict[str, bytes | None] = {}
        """environ key -> lower-case header name to forward, or None (not a header, or one we handle)."""

    def __repr__(self) -> str:
        return f"<WSGI proxy to {self.upstream.url}>"

    def _learn_name(self, key: str) -> bytes | None:
        name: bytes | None = None
        if key.startswith("HTTP_"):
            text = key[5:].replace("_", "-").lower()
            # Servers may also put the body headers under HTTP_; the CGI names are authoritative.
            if text not in self._drop and not text.startswith("proxy-") and text != "content-type":
                name = text.encode("latin-1")
        elif key == "CONTENT_TYPE":
            name = b"content-type"
        if len(self._names) < _NAME_CACHE_MAX:
            self._names[key] = name
        return name

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        headers = self._headers(environ)
        target = _target(
            self._prefix,
            environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            "latin-1",
        )
        # The body: buffered (and replayable) up to the cap, else streamed.
        stream = environ.get("wsgi.input")
        length = environ.get("CONTENT_LENGTH")
        body: bytes | _WSGIInput = b""
        if length:
            try:
                size = int(length)
                if size < 0:
                    raise ValueError
            except ValueError:
                return _plain(start_response, "400 Bad Request", b"Invalid Content-Length.\n", method)
            if size <= self._cap:
                body = _read_up_to(stream, size)
                if len(body) < size:
                    return _plain(start_response, "400 Bad Request", b"Incomplete request body.\n", method)
            else:
                body = _WSGIInput(stream, b"", size)
            headers.append((b"content-length", str(size).encode("ascii")))
        elif (
            environ.get("wsgi.input_terminated")
            and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        ):
            # A chunked upload: the server decodes it and ends wsgi.input at its end.
            head = _read_up_to(stream, self._cap + 1)
            if len(head) <= self._cap:
                body = head
                headers.append((b"content-length", str(len(head)).encode("ascii")))
            else:
                body = _WSGIInput(stream, head, None)
                headers.append((b"transfer-encoding", b"chunked"))
        try:
            response = self._pool().request(method.encode("latin-1"), target, headers, body)
        except Exception as exc:
            if isinstance(exc, _IncompleteBody):
                return _plain(start_response, "400 Bad Request", b"Incomplete request body.\n", method)
            cls = _classify(exc)
            if cls is None:
                raise
            return self._failed(cls, exc, environ, start_response, method, body)
        headers_out = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in _response_headers(response.headers)
        ]
        whole = response.body
        if whole is not None:
            # The whole body came with the head and the connection is already back in
            # the pool: nothing is left to stream or to close.
            start_response(_status_line(response.status, response.reason), headers_out)
            return [whole] if whole and method != "HEAD" else []
        self.upstream._open.add(response)
        try:
            start_response(_status_line(response.status, response.reason), headers_out)
        except BaseException:
            self.upstream._open.discard(response)
            response.close()
            raise
        return _WSGIBody(response, self.upstream._open)

    def _headers(self, environ: WSGIEnvironment) -> list[tuple[bytes, bytes]]:
        names = self._names
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        for key, value in environ.items():
            name = names.get(key, b"")
            if name is None:
                continue
            if not name:
                name = self._learn_name(key)
                if name is None:
                    continue
            append((name, value.encode("latin-1")))
        connection = environ.get("HTTP_CONNECTION")
        if connection:
            named = _connection_tokens(connection)
            if named:
                out = [h for h in out if h[0] not in named]
        client_host = environ.get("HTTP_HOST")
        if not client_host:
            server, port = environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", "")
            default = "443" if environ.get("wsgi.url_scheme") == "https" else "80"
            client_host = server if not port or port == default else f"{server}:{port}"
        out.append((b"host", (client_host if self._preserve_host else self._authority).encode("latin-1")))
        remote = environ.get("REMOTE_ADDR")
        prior = environ.get("HTTP_X_FORWARDED_FOR")
        forwarded_for = (f"{prior}, {remote}" if prior else remote) if remote else prior
        if forwarded_for:
            out.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
        out.append((b"x-forwarded-proto", environ.get("wsgi.url_scheme", "http").encode("latin-1")))
        if client_host:
            out.append((b"x-forwarded-host", client_host.encode("latin-1")))
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        via = f"{protocol[5:] if protocol.startswith('HTTP/') else protocol} {_VIA}"
        prior_via = environ.get("HTTP_VIA")
        out.append((b"via", (f"{prior_via}, {via}" if prior_via else via).encode("latin-1")))
        return out

    def _failed(
        self,
        cls: type[UpstreamError],
        exc: Exception,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        method: str,
        body: bytes | _WSGIInput,
    ) -> Iterable[bytes]:
        fallback = self.fallback
        if fallback is not None:
            if isinstance(body, bytes):
                # Nothing sent, or sent but replayable: old gets the same body again.
                if issubclass(cls, UpstreamUnavailable) or (method in _IDEMPOTENT and len(body) <= self._cap):
                    environ.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                    environ["wsgi.input"] = io.BytesIO(body)
                    if body or environ.get("CONTENT_LENGTH"):
                        environ["CONTENT_LENGTH"] = str(len(body))
                    return fallback(environ, start_response)
            elif issubclass(cls, UpstreamUnavailable) and not body.started:
                environ.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                if body.head:
                    environ["wsgi.input"] = _Prefixed(body.head, body.stream)
                return fallback(environ, start_response)
        environ.setdefault("canarymw.error", self.upstream._fail(cls, exc, False))
        status = "504 Gateway Timeout" if cls.status == 504 else "502 Bad Gateway"
        return _plain(start_response, status, _error_body(cls), method)


def _plain(start_response: StartResponse, status: str, text: bytes, method: str) -> list[bytes]:
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(text)))]
    )
    return [] if method == "HEAD" else [text]


# -- ASGI ------------------------------------------------------------------------


class _AsyncInput:
    """The request body streamed from ``receive()`` after the ``head`` chunks already read."""

    started = False

    def __init__(self, head: list[bytes], receive: Receive) -> None:
        self.head = head
        self.receive = receive

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        for chunk in self.head:
            if chunk:
                yield chunk
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise _IncompleteBody
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def _replaying(chunks: list[bytes], more: bool, receive: Receive) -> Receive:
    """A receive() that first hands out ``chunks`` again, then continues with ``receive``."""
    pending = list(chunks) or [b""]

    async def replay() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or more}
        return await receive()

    return replay


class _Gone:
    """Set by the disconnect listener of a watched copy."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


async def _copy(response: httpcore.Response, remaining: int | None, send: Send, watch: _Gone | None) -> None:
    """Send the upstream body as it arrives; with a known length the last chunk ends the response.

    The stream is read to its end even after the last byte went out (or when no body is
    expected, as for HEAD): only a response read to its end leaves the connection
    reusable, and that costs no further network read.
    """
    finished = False
    async for chunk in response.aiter_stream():
        # Once the client left, the closed connection ends this loop with a read error;
        # until then chunks are read and dropped (leaving the loop early would strand
        # httpcore's async generators until garbage collection).
        if chunk and not finished and (watch is None or not watch.gone):
            if remaining is not None:
                remaining -= len(chunk)
                finished = remaining <= 0
            await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
    if not finished and (watch is None or not watch.gone):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # trio: long bodies are copied in the request's task, unwatched


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _copy_then_close(
    response: httpcore.Response, remaining: int | None, send: Send, watch: _Gone
) -> None:
    try:
        await _copy(response, remaining, send, watch)
    finally:
        await response.aclose()


_stopping: set[asyncio.Task[None]] = set()  # strong references to fire-and-forget closes


def _stop(relay: asyncio.Task[None], response: httpcore.Response, watch: _Gone) -> None:
    """End a copy task without cancelling it: close its connection so its read fails."""
    watch.gone = True
    relay.add_done_callback(_consume)
    network = response.extensions.get("network_stream")
    if network is not None and not relay.done():
        closing = relay.get_loop().create_task(network.aclose())
        _stopping.add(closing)
        closing.add_done_callback(_consume)


def _consume(task: asyncio.Task[None]) -> None:
    _stopping.discard(task)
    if not task.cancelled():
        task.exception()  # the copy of a client that left may fail; nobody is waiting for it


async def _copy_watching(
    loop: asyncio.AbstractEventLoop,
    response: httpcore.Response,
    remaining: int | None,
    receive: Receive,
    send: Send,
) -> None:
    """:func:`_copy` for long or endless bodies (event streams, downloads), watching the client.

    Servers before ASGI 2.4 drop send() after a disconnect instead of raising, so the
    request's task waits for ``http.disconnect`` while a task of our own copies the
    body and then closes the response. That task is never cancelled: a client that
    left, or a cancellation of the request's task, ends it by closing the upstream
    connection, so its read fails as any broken connection does and httpcore cleans
    up on its ordinary error path. (A cancellation landing inside httpcore's own
    cleanup, which anyio's shields cannot stop on asyncio, would leave the pooled
    connection marked busy for good.)
    """
    watch = _Gone()
    relay = loop.create_task(_copy_then_close(response, remaining, send, watch))
    listener = loop.create_task(_until_disconnect(receive))
    listener.add_done_callback(_consume)
    try:
        await asyncio.wait((relay, listener), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        listener.cancel()
        _stop(relay, response, watch)
        raise
    listener.cancel()
    if relay.done():
        relay.result()  # re-raises a failure of the copy
        return
    _stop(relay, response, watch)  # the client went away
    await asyncio.wait((relay,))


async def _aclose(response: httpcore.Response) -> None:
    """Close an upstream response even when the request's task is being cancelled.

    A native ``Task.cancel()`` (a server tearing a request down) is not stopped by an
    anyio shield: it would interrupt the close half-way and leave the pooled
    connection marked busy forever. On asyncio the close runs in a task of its own,
    which the cancellation of ours cannot reach.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import anyio

        with anyio.CancelScope(shield=True):
            await response.aclose()
        return
    await asyncio.shield(loop.create_task(response.aclose()))


class _ASGIProxy(_Proxy):
    """``Upstream.asgi_app()``: one instance per middleware variant."""

    def __init__(self, upstream: Upstream, fallback: ASGIApp | None) -> None:
        super().__init__(upstream)
        self.fallback = fallback
        self._authority = upstream._authority.encode("latin-1")
        # Request headers treated specially (rewritten or dropped), by lower-case name.
        self._special = {name.encode(): name for name in (*self._drop, "cookie")}
        self._head_timeout = upstream.head_timeout
        import anyio
        import httpcore

        self._Request = httpcore.Request
        self._URL = httpcore.URL
        self._CancelScope = anyio.CancelScope
        self._now = anyio.current_time

    def __repr__(self) -> str:
        return f"<ASGI proxy to {self.upstream.url}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.upstream.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            scope.setdefault("canarymw.error", "UpstreamWebSocketUnsupported")
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1011})
        else:
            raise RuntimeError(f"canarymw.Upstream cannot serve ASGI scope type {kind!r}.")

    def _headers(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """The headers to forward, and the client's Content-Length (None if it sent none)."""
        special = self._special
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        host = length = None
        # Repeated fields are collected and joined once: linear however many a client sends.
        cookies: list[bytes] = []
        forwarded: list[bytes] = []
        vias: list[bytes] = []
        connection: list[bytes] = []
        for name, value in scope.get("headers", ()):
            which = special.get(name)
            if which is None:
                if name[:6] != b"proxy-":
                    append((name, value))
            elif which == "host":
                host = value
            elif which == "cookie":
                cookies.append(value)
            elif which == "x-forwarded-for":
                forwarded.append(value)
            elif which == "via":
                vias.append(value)
            elif which == "connection":
                connection.append(value)
            elif which == "content-length":
                length = value
        if connection:
            named = _connection_tokens(b", ".join(connection).decode("latin-1"))
            if named:
                out = [h for h in out if h[0] not in named]
                if b"cookie" in named:
                    cookies = []
        if cookies:
            # See: RFC 9113 §8.2.3 (an HTTP/1.1 upstream wants one Cookie header)
            out.append((b"cookie", b"; ".join(cookies)))
        if host is None:
            server = scope.get("server")
            if server:
                server_host, port = server[0], server[1]
                default = 443 if scope.get("scheme") == "https" else 80
                text = server_host if port in (None, default) else f"{server_host}:{port}"
                host = str(text).encode("latin-1")
        out.append((b"host", host if self._preserve_host and host else self._authority))
        client = scope.get("client")
        if client:
            forwarded.append(str(client[0]).encode("latin-1"))
        if forwarded:
            out.append((b"x-forwarded-for", b", ".join(forwarded)))
        out.append((b"x-forwarded-proto", b"https" if scope.get("scheme") == "https" else b"http"))
        if host:
            out.append((b"x-forwarded-host", host))
        vias.append(f"{scope.get('http_version', '1.1')} {_VIA}".encode("latin-1"))
        out.append((b"via", b", ".join(vias)))
        return out, length

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        headers, length = self._headers(scope)
        target = _target(
            self._prefix,
            scope.get("path", "/"),
            scope.get("query_string", b"").decode("latin-1"),
            "utf-8",
        )
        # The body: read into memory up to the cap (replayable), else streamed.
        chunks: list[bytes] = []
        size = 0
        complete = False
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished its request
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                complete = True
                break
            if size > self._cap:
                break
        body: bytes | _AsyncInput
        if complete:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if body or length is not None:
                headers.append((b"content-length", str(len(body)).encode("ascii")))
        else:
            body = _AsyncInput(chunks, receive)
            if length is not None:
                headers.append((b"content-length", length))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        extensions = self._extensions
        head_timeout = self._head_timeout
        head: anyio.CancelScope | None = None  # cut at the head deadline
        if head_timeout is not None:
            # httpcore's read timeout is per read and it skips any number of 1xx answers:
            # a scope whose deadline starts once the request is out (a slow upload is the
            # client's doing) bounds the whole head. Cancelling an anyio scope is safe
            # here, unlike Task.cancel(): httpcore's cleanup shields hold against it.
            head = self._CancelScope()
            now = self._now

            async def trace(event: str, info: object) -> None:
                if event == "http11.receive_response_headers.started":
                    head.deadline = now() + head_timeout

            extensions = {**extensions, "trace": trace}
        request = self._Request(
            method,
            self._URL(scheme=self._scheme, host=self._host, port=self._port, target=target),
            headers=headers,
            content=body,
            extensions=extensions,
        )
        try:
            if head is None:
                response = await self.upstream._async_pool().handle_async_request(request)
            else:
                with head:
                    response = await self.upstream._async_pool().handle_async_request(request)
                if head.cancelled_caught:
                    raise _HeadTimedOut("the upstream did not send its response head within the head timeout")
        except Exception as exc:
            if isinstance(exc, _IncompleteBody):
                return  # the client went away while uploading; nobody is left to answer
            cls = _classify(exc)
            if cls is None:
                raise
            await self._failed(cls, exc, scope, receive, send, method, body)
            return
        await self._relay(response, method, receive, send)

    async def _relay(self, response: httpcore.Response, method: str, receive: Receive, send: Send) -> None:
        status = response.status
        headers: list[tuple[bytes, bytes]] = []
        remaining: int | None = None
        for name, value in _response_headers(response.headers):
            lower = name.lower()
            if lower == b"content-length":
                try:
                    remaining = int(value)
                except ValueError:
                    remaining = None
            headers.append((lower, value))
        if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            remaining = 0
        open_ = self.upstream._open
        open_.add(response)
        owned = False  # a copy task of our own closes the response
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            loop = _asyncio_loop() if remaining is None or remaining > _WATCH_ABOVE else None
            if loop is not None:
                owned = True
                await _copy_watching(loop, response, remaining, receive, send)
            else:
                await _copy(response, remaining, send, None)
        except Exception as exc:
            if _classify(exc) is None:
                raise
            # The start message is out: raising makes the server abort the connection,
            # so the client never takes a short body for a complete one.
            raise UpstreamAborted(f"the upstream response broke off: {exc!r}") from exc
        finally:
            open_.discard(response)
            if not owned:
                await _aclose(response)

    async def _failed(
        self,
        cls: type[UpstreamError],
        exc: Exception,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        body: bytes | _AsyncInput,
    ) -> None:
        fallback = self.fallback
        if fallback is not None:
            if isinstance(body, bytes):
                if issubclass(cls, UpstreamUnavailable) or (method in _IDEMPOTENT and len(body) <= self._cap):
                    scope.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                    await fallback(scope, _replaying([body], False, receive), send)
                    return
            elif issubclass(cls, UpstreamUnavailable) and not body.started:
                scope.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                await fallback(scope, _replaying(body.head, True, receive), send)
                return
        scope.setdefault("canarymw.error", self.upstream._fail(cls, exc, False))
        text = _error_body(cls)
        await send(
            {
                "type": "http.response.start",
                "status": cls.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(text)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else text})
