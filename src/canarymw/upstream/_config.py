"""``Upstream``: the configuration object, its connection pools and its failure log."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from .._runtime import RateLimit, reset_after_fork
from .._types import ASGIApp

if TYPE_CHECKING:
    import ssl

    import httpcore
    from _typeshed.wsgi import WSGIApplication

    from . import _h1
    from ._errors import UpstreamError

log = logging.getLogger("canarymw")
_LOG_EVERY = 10.0  # seconds between two warnings about the same upstream


def _check_seconds(name: str, value: object, also: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Upstream got {name}={value!r}; use a number of seconds above 0{also}.")
    return float(value)


def _check_timeout(name: str, value: object) -> float | None:
    return None if value is None else _check_seconds(name, value, " or None (no limit)")


# -- the public configuration object ---------------------------------------------------
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
        self._log_due = RateLimit(_LOG_EVERY)
        # A pool made before a fork belongs to the parent: its sockets and locks are
        # shared state. The child forgets it (no I/O, no locking) and makes its own.
        reset_after_fork(self, Upstream._forget_pools)

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
        from ._wsgi import _WSGIProxy

        return _WSGIProxy(self, fallback if self.fallback else None)

    def asgi_app(self, fallback: ASGIApp | None = None) -> ASGIApp:
        """An ASGI app that proxies every HTTP request here; ``fallback`` serves when that is safe.

        It answers lifespan events itself (closing its pool at shutdown) and never
        passes them to ``fallback``: the middleware runs the old app's lifespan.
        """
        _require_httpcore()
        import anyio  # noqa: F401  (a dependency of httpcore's async backend; fail here, not later)

        from ._asgi import _ASGIProxy

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
        from . import _h1

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
        if self._log_due.due():
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
