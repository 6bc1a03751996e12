"""The operator page and its JSON API: see and steer every rollout of a store from a browser.

::

    from canarymw.admin import Admin, BasicAuth, BearerAuth

    admin = Admin(
        "redis://127.0.0.1:6379/0",
        auth=[BearerAuth({TOKEN: ("deploy-bot", "operate")}),
              BasicAuth({"alice": (ALICE_PASSWORD, "operate"), "bob": (BOB_PASSWORD, "read")})],
        secret_key=ADMIN_SECRET,
    )

    # Flask (or any WSGI app): everything under /canary goes to the admin
    app.wsgi_app = admin.mount_wsgi(app.wsgi_app, "/canary")
    # Starlette / FastAPI
    routes.append(Mount("/canary", app=admin.asgi))
    # standalone: canarymw serve-admin --store URL

The page lists the rollouts; each rollout's page shows its percent, stage, verdict and
sentence, per-variant numbers, time-series charts (server-rendered SVG, no script, no
CDN), the blended success estimate and the audit log, with buttons to set the percent,
promote, roll back, pause, resume and reset. Each change is a POST carrying a CSRF token and
the state version it was made against: a stale page gets 409, never a silent
overwrite, and the audit log records the operator's name. The JSON API
(``/api/...``, described by ``/api/openapi.json``) does the same, with the same checks.
Nothing is served until authentication is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..store._model import Store
from ._auth import BasicAuth, BearerAuth, CallableAuth, Principal, Request, Role
from ._core import MAX_BODY, Core, Response, reason

__all__ = ["Admin", "BasicAuth", "BearerAuth", "CallableAuth", "Principal", "Request", "Role"]

Auth = BearerAuth | BasicAuth | CallableAuth


class Admin:
    """The admin app for the rollouts of one store.

    Args:
        store: A :class:`~canarymw.store.Store` or its URL.
        auth: Who may look and act: a :class:`BearerAuth`, :class:`BasicAuth`,
            :class:`CallableAuth` (your app's login), or a list of them (the first
            that recognises a request wins). Required: the admin is off until it is
            configured.
        secret_key: Signs the pages' CSRF tokens; at least 32 characters, the same in
            every process serving the admin (a token made by one worker is checked
            by another).
        window: Seconds of outcome counters the pages and the API summarise.
    """

    def __init__(
        self,
        store: Store | str,
        *,
        auth: Auth | Sequence[Auth] | Callable[[Request], Principal | None] | None = None,
        secret_key: str | bytes,
        window: float = 300.0,
    ) -> None:
        from ..store import Store as StoreProtocol
        from ..store import open_store

        if isinstance(store, str):
            store = open_store(store)
        if not isinstance(store, StoreProtocol):
            raise TypeError(f"Admin got store={store!r}; pass a store (SQLiteStore, RedisStore) or its URL.")
        if auth is None:
            raise ValueError(
                "Admin needs auth: BearerAuth, BasicAuth or CallableAuth (or a list of them); "
                "the operator page is off until it is configured."
            )
        auths: list[Any] = list(auth) if isinstance(auth, list | tuple) else [auth]
        if not auths:
            raise ValueError(
                "Admin got an empty auth list; give at least one of BearerAuth, BasicAuth, CallableAuth."
            )
        for i, a in enumerate(auths):
            if not isinstance(a, BearerAuth | BasicAuth | CallableAuth):
                if not callable(a):
                    raise TypeError(f"Admin got auth {a!r}; pass BearerAuth, BasicAuth or CallableAuth.")
                auths[i] = CallableAuth(a)
        key = secret_key.encode() if isinstance(secret_key, str) else secret_key
        if not isinstance(key, bytes) or len(key) < 32:
            raise ValueError("Admin needs a secret_key of at least 32 characters, the same in every process.")
        if isinstance(window, bool) or not isinstance(window, int | float) or not 10 <= window <= 86400:
            raise ValueError(f"Admin got window={window!r}; use a number of seconds from 10 to 86400.")
        self.store: Store = store
        self.auth: tuple[Any, ...] = tuple(auths)
        self.window = float(window)
        self._secret = hashlib.sha256(b"canarymw admin csrf\x00" + key).digest()
        self._assessors: dict[str, Any] = {}
        self._core = Core(self)

        # A plain function, not a bound method: servers that tell ASGI 3 from ASGI 2 by
        # inspecting the app (uvicorn) take a bound method for ASGI 2.
        async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
            await self._asgi(scope, receive, send)

        self.asgi = asgi
        """The admin as an ASGI 3 app (``Mount("/canary", app=admin.asgi)``; ``root_path``
        is its root)."""

    def __repr__(self) -> str:
        return f"Admin({self.store!r})"

    def openapi(self, root: str = "") -> dict[str, Any]:
        """The OpenAPI 3.1 document of the JSON API (what ``/api/openapi.json`` serves) for
        the admin mounted at ``root`` (``"/canary"``)."""
        from ._openapi import document

        return document(root.rstrip("/"))

    def handle(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        native: Any = None,
        root: str = "",
    ) -> Response:
        """Answer one request (sans-IO): ``path`` inside the admin, ``root`` where it is mounted."""
        lowered = {k.lower(): v for k, v in headers}
        return self._core.handle(method.upper(), path, query, lowered, body, native, root.rstrip("/"))

    # -- WSGI ------------------------------------------------------------------------
    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The admin as a WSGI app (mount it where you like; ``SCRIPT_NAME`` is its root)."""
        headers = [(k[5:].replace("_", "-"), v) for k, v in environ.items() if k.startswith("HTTP_")]
        if environ.get("CONTENT_TYPE"):
            headers.append(("content-type", environ["CONTENT_TYPE"]))
        body, too_big = _read_wsgi_body(environ)
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        response = self._core.handle(
            method,
            _latin1_to_text(environ.get("PATH_INFO", "")),
            environ.get("QUERY_STRING", ""),
            {k.lower(): v for k, v in headers},
            body,
            environ,
            _latin1_to_text(environ.get("SCRIPT_NAME", "")).rstrip("/"),
            too_big=too_big,
        )
        start_response(f"{response.status} {reason(response.status)}", _with_length(response))
        return [b"" if method == "HEAD" else response.body]

    def mount_wsgi(self, app: Callable[..., Any], prefix: str) -> Callable[..., Any]:
        """``app`` with the admin answering everything under ``prefix`` (``"/canary"``)."""
        prefix = "/" + prefix.strip("/")
        admin = self.wsgi

        def mounted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == prefix or path.startswith(prefix + "/"):
                environ = {**environ, "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + prefix}
                environ["PATH_INFO"] = path[len(prefix) :] or "/"
                return admin(environ, start_response)
            return app(environ, start_response)  # type: ignore[no-any-return]

        return mounted

    # -- ASGI ------------------------------------------------------------------------
    async def _asgi(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body = b""
        too_big = _declared_length(headers.get("content-length")) > MAX_BODY
        while not too_big:  # a body declared too large is never read
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                too_big = True
                body = b""
                break
            if not message.get("more_body"):
                break
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        if root and path.startswith(root):  # Starlette's Mount keeps the full path in "path"
            path = path[len(root) :] or "/"
        method = str(scope.get("method", "GET")).upper()
        # The store's calls block: off the event loop.
        response = await asyncio.to_thread(
            self._core.handle,
            method,
            path,
            scope.get("query_string", b"").decode("latin-1"),
            headers,
            body,
            scope,
            root.rstrip("/"),
            too_big=too_big,
        )
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in _with_length(response)
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else response.body})


def _with_length(response: Response) -> list[tuple[str, str]]:
    return (
        [*response.headers, ("Content-Length", str(len(response.body)))]
        if not any(k.lower() == "content-length" for k, _ in response.headers)
        else list(response.headers)
    )


def _declared_length(text: str | None) -> int:
    # Content-Length as the client declared it; none (or nonsense the server let through): 0.
    text = (text or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


def _read_wsgi_body(environ: dict[str, Any]) -> tuple[bytes, bool]:
    """The body (at most :data:`MAX_BODY` bytes) and whether it was larger."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b"", False
    declared = environ.get("CONTENT_LENGTH")
    if declared in (None, "") and environ.get("wsgi.input_terminated"):
        # Chunked (no length): the server ends the stream; read one byte past the limit.
        body = stream.read(MAX_BODY + 1)
        return (b"", True) if len(body) > MAX_BODY else (body, False)
    length = _declared_length(declared)
    if length > MAX_BODY:
        return b"", True
    return (stream.read(length) if length > 0 else b""), False


def _latin1_to_text(value: str) -> str:
    # PEP 3333: the path arrives as latin-1 decoded bytes; the URL's bytes were UTF-8.
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
