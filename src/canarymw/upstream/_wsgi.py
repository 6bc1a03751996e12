"""The WSGI proxy: ``Upstream.wsgi_app()``, on canarymw's own HTTP/1.1 client."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _h1
from ._errors import UpstreamAborted, UpstreamError, _IncompleteBody
from ._forward import (
    _CHUNK,
    _NAME_CACHE_MAX,
    _classify,
    _connection_tokens,
    _error_body,
    _forwarding,
    _may_fall_back,
    _Proxy,
    _response_headers,
    _status_line,
    _target,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._config import Upstream


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


class _WSGIProxy(_Proxy):
    """``Upstream.wsgi_app()``: one instance per middleware variant."""

    def __init__(self, upstream: Upstream, fallback: WSGIApplication | None) -> None:
        super().__init__(upstream)
        self.fallback = fallback
        self._pool = upstream._sync_pool
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
        https = environ.get("wsgi.url_scheme") == "https"
        host = environ.get("HTTP_HOST")
        if not host:
            server, port = environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", "")
            host = server if not port or port == ("443" if https else "80") else f"{server}:{port}"
        remote = environ.get("REMOTE_ADDR")
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        out += _forwarding(
            self,
            host.encode("latin-1") or None,
            _latin1_list(environ.get("HTTP_X_FORWARDED_FOR")),
            remote.encode("latin-1") if remote else None,
            https,
            protocol[5:] if protocol.startswith("HTTP/") else protocol,
            _latin1_list(environ.get("HTTP_VIA")),
        )
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
            replay = body if isinstance(body, bytes) else None
            if _may_fall_back(cls, method, replay, not isinstance(body, bytes) and body.started, self._cap):
                environ.setdefault("canarymw.error", self.upstream._fail(cls, exc, True))
                if isinstance(body, bytes):  # old gets the same body again
                    environ["wsgi.input"] = io.BytesIO(body)
                    if body or environ.get("CONTENT_LENGTH"):
                        environ["CONTENT_LENGTH"] = str(len(body))
                elif body.head:
                    environ["wsgi.input"] = _Prefixed(body.head, body.stream)
                return fallback(environ, start_response)
        environ.setdefault("canarymw.error", self.upstream._fail(cls, exc, False))
        status = "504 Gateway Timeout" if cls.status == 504 else "502 Bad Gateway"
        return _plain(start_response, status, _error_body(cls), method)


def _latin1_list(value: str | None) -> list[bytes]:
    return [value.encode("latin-1")] if value else []


def _plain(start_response: StartResponse, status: str, text: bytes, method: str) -> list[bytes]:
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(text)))]
    )
    return [] if method == "HEAD" else [text]
