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

from ._config import Upstream
from ._errors import (
    UpstreamAborted,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

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

Upstream.__module__ = "canarymw"  # public as canarymw.Upstream
for _name in __all__:
    if _name != "Upstream":
        globals()[_name].__module__ = __name__
