"""A small blocking HTTP/1.1 client with a keep-alive pool: the WSGI proxy's engine.

It does what a gateway needs and nothing else: one request per connection at a time,
bodies streamed both ways, framing by ``Content-Length``, chunked or connection close
(See: RFC 9112 §6.3), strict parsing with bounded heads, and failures sorted by whether
the request could have reached the server. Standard library only, and about a quarter
of the CPU per request of a general-purpose client: what a proxy on a busy worker spends.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import ssl

_MAX_HEAD: Final = 64 * 1024
_MAX_HEADERS: Final = 200
_MAX_CHUNK_LINE: Final = 4096
_MAX_INTERIM: Final = 16  # 1xx answers before the final one; more is a server stalling us
_READ: Final = 64 * 1024
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
"""Methods that may be sent again (See: RFC 9110 §9.2.2)."""
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_is_token = re.compile(_TCHAR + rb"+").fullmatch
# chunk-size [ chunk-ext ]: hex digits only (no sign, prefix, underscore or space, which
# int(x, 16) would take), at most 16 of them; extensions are checked for stray control
# bytes and ignored. See: RFC 9112 §7.1, §7.1.1.
_chunk_size = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?").fullmatch


class H1Error(Exception):
    """Base of this client's failures."""


class ConnectFailed(H1Error):
    """No connection: refused, unresolvable, unreachable, or the TLS handshake failed."""


class ConnectTimedOut(H1Error):
    """Connecting (or the TLS handshake) took longer than the connect timeout."""


class PoolTimedOut(H1Error):
    """Every connection stayed busy for the pool timeout."""


class TimedOut(H1Error):
    """A read or a write timed out after the request had (perhaps partly) gone out."""


class ProtocolFailed(H1Error):
    """After sending: the connection broke, or the answer was not valid HTTP/1.1."""


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: safe to retry once."""


_POLL: Final = hasattr(select, "poll")


# On Linux a plain socket stays blocking and the kernel enforces the timeouts
# (SO_RCVTIMEO/SO_SNDTIMEO): Python's own timeouts add a poll() before every recv and
# send and an ioctl() per change, which is most of the system time of a short exchange.
_KERNEL_TIMEOUTS: Final = sys.platform.startswith("linux")


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return struct.pack("ll", 0, 0)  # 0: no limit
    micros = max(1, round(seconds * 1e6))
    return struct.pack("ll", micros // 1_000_000, micros % 1_000_000)


class Connection:
    """One socket and its read buffer."""

    __slots__ = (
        "_buf",
        "_closed",
        "_poller",
        "expires",
        "in_use",
        "kernel",
        "rcvtimeo",
        "reused",
        "sock",
        "timeout",
    )

    def __init__(self, sock: socket.socket, kernel: bool) -> None:
        self.sock = sock
        self.kernel = kernel  # timeouts are socket options; the socket is blocking
        self.timeout: float | None = sock.gettimeout()
        self.rcvtimeo: float | None = None  # kernel: the SO_RCVTIMEO in force
        self._buf = b""
        self._closed = False
        self._poller: select.poll | None = None
        self.in_use = False
        self.reused = False
        self.expires = 0.0

    def set_timeout(self, seconds: float | None) -> None:
        if not self.kernel and seconds != self.timeout:
            self.sock.settimeout(seconds)
            self.timeout = seconds

    def set_read_timeout(self, seconds: float | None) -> None:
        if not self.kernel:
            self.set_timeout(seconds)
        elif seconds != self.rcvtimeo:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
            self.rcvtimeo = seconds

    def is_idle(self) -> bool:
        return not self.in_use and not self._closed

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def dead(self) -> bool:
        # An idle connection with something to read was closed by the server (or sent
        # bytes nobody asked for): either way it must not carry a request.
        if self._buf:
            return True
        pending = getattr(self.sock, "pending", None)  # a TLS socket may hold decrypted bytes
        if pending is not None and pending():
            return True
        if not _POLL:  # pragma: no cover - platforms without poll()
            return bool(select.select([self.sock], [], [], 0)[0])
        poller = self._poller
        if poller is None:
            # One poll object per connection: a check is then one system call and,
            # unlike a non-blocking peek, raises nothing when all is well.
            poller = self._poller = select.poll()
            poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    # -- reading -----------------------------------------------------------------
    def _fill(self) -> bytes:
        try:
            data = self.sock.recv(_READ)
        except (TimeoutError, BlockingIOError):
            raise TimedOut("the upstream did not answer within the read or head timeout") from None
        except OSError as exc:
            raise ProtocolFailed(f"the connection to the upstream broke: {exc!r}") from None
        return data

    def read_head(
        self, limit: int = _MAX_HEAD, deadline: float | None = None, read_timeout: float | None = None
    ) -> bytes:
        """One head; with a ``deadline`` (monotonic), no read waits past it."""
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", max(0, start - 3))
            if end != -1:
                if end > limit:
                    raise ProtocolFailed("the upstream's response head is too large")
                self._buf = buf[end + 4 :]
                return buf[:end]
            if len(buf) > limit:
                raise ProtocolFailed("the upstream's response head is too large")
            start = len(buf)
            if deadline is not None:
                # read_timeout bounds each read, so a head sent a byte at a time would
                # otherwise hold the request for as long as the upstream likes.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimedOut("the upstream did not send its response head within the head timeout")
                if read_timeout is None or left < read_timeout:
                    self.set_read_timeout(left)
            try:
                data = self._fill()
            except ProtocolFailed:
                if buf:
                    raise
                raise _Stale() from None  # reset before a byte of the answer: same as a close
            if not data:
                self._buf = buf
                raise _Stale() if not buf else ProtocolFailed("the upstream closed the connection mid-head")
            buf += data

    def read_some(self, most: int) -> bytes:
        """Up to ``most`` bytes (at least one), or b"" at the end of the stream."""
        buf = self._buf
        if buf:
            if len(buf) <= most:
                self._buf = b""
                return buf
            self._buf = buf[most:]
            return buf[:most]
        data = self._fill()
        if len(data) > most:
            self._buf = data[most:]
            return data[:most]
        return data

    def read_line(self) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n")
            if end != -1:
                self._buf = buf[end + 2 :]
                return buf[:end]
            if len(buf) > _MAX_CHUNK_LINE:
                raise ProtocolFailed("the upstream sent an overlong chunk line")
            data = self._fill()
            if not data:
                raise ProtocolFailed("the upstream closed the connection mid-body")
            buf += data


# Field lines after the status line: a token, a colon, a value without CR, LF or NUL.
# No whitespace before the colon and no obsolete line folding (RFC 9112 §5.1, §5.2).
_VALID_FIELDS = re.compile(rb"(?:\r\n" + _TCHAR + rb"+:[^\r\n\x00]*)*")


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """Status, reason, headers and HTTP/1.0-ness of one response head."""
    end = head.find(b"\r\n")
    if end == -1:
        end = len(head)
    status_line = head[:end]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolFailed(f"the upstream sent an invalid status line {status_line[:100]!r}")
    if not _VALID_FIELDS.fullmatch(head, end):
        raise ProtocolFailed("the upstream sent an invalid header field line")
    headers = []
    if end < len(head):
        lines = head[end + 2 :].split(b"\r\n")
        if len(lines) > _MAX_HEADERS:
            raise ProtocolFailed("the upstream sent too many header fields")
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
    return int(code), reason, headers, version == b"HTTP/1.0"


class Response:
    """One upstream response; iterate for the body (streamed), then close()."""

    __slots__ = ("_chunked", "_conn", "_keep", "_pool", "_remaining", "body", "headers", "reason", "status")

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        head_only: bool,
        http10: bool,
    ) -> None:
        self._pool: Pool | None = pool
        self._conn: Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        keep = not http10
        length: bytes | None = None
        encoding: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length is not None and value != length:
                    raise ProtocolFailed("the upstream sent conflicting Content-Length values")
                length = value
            elif lower == b"transfer-encoding":
                encoding = value if encoding is None else encoding + b"," + value
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    keep = False
                elif b"keep-alive" in tokens:
                    keep = True
        self._chunked = False
        self._remaining: int | None = 0
        if head_only or status in (204, 304):
            pass
        elif encoding is not None:
            # See: RFC 9112 §6.3: Transfer-Encoding wins over Content-Length. Only chunked
            # alone: a proxy cannot undo gzip or any other coding (its bytes would pass as
            # the body with nothing to say so), and a repeated chunked is malformed.
            if encoding.lower() != b"chunked":
                raise ProtocolFailed(
                    f"the upstream used a transfer coding other than chunked: {encoding[:40]!r}"
                )
            self._chunked = True
            self._remaining = None
            if length is not None:
                keep = False
        elif length is not None:
            if not length.isdigit() or len(length) > 18:
                raise ProtocolFailed(f"the upstream sent an invalid Content-Length {length[:40]!r}")
            self._remaining = int(length)
        else:
            self._remaining = None
            keep = False
        self._keep = keep
        self.body: bytes | None = None
        """The whole body when it had already arrived with the head (the connection is
        then back in the pool); None when it is to be streamed by iterating."""
        remaining = self._remaining
        if remaining is not None and not self._chunked:
            buf = conn._buf
            if len(buf) >= remaining:
                self.body, conn._buf = buf[:remaining], buf[remaining:]
                self._remaining = 0
                self._release(True)

    def __iter__(self) -> Iterator[bytes]:
        if self.body is not None:
            if self.body:
                yield self.body
            return
        conn = self._conn
        if conn is None:
            return
        if self._chunked:
            yield from self._chunks(conn)
        elif self._remaining is None:
            while True:
                data = conn.read_some(_READ)
                if not data:
                    break
                yield data
        else:
            remaining = self._remaining
            while remaining:
                data = conn.read_some(min(remaining, _READ))
                if not data:
                    raise ProtocolFailed("the upstream closed the connection mid-body")
                remaining -= len(data)
                self._remaining = remaining
                yield data
        self._release(True)

    def _chunks(self, conn: Connection) -> Iterator[bytes]:
        while True:
            line = conn.read_line()
            match = _chunk_size(line)
            if match is None:
                raise ProtocolFailed(f"the upstream sent an invalid chunk size line {line[:40]!r}")
            size = int(match[1], 16)
            if size == 0:
                for _ in range(_MAX_HEADERS):  # trailers are dropped: they are hop-by-hop for us
                    if not conn.read_line():
                        return
                raise ProtocolFailed("the upstream sent too many trailer fields")
            while size:
                data = conn.read_some(min(size, _READ))
                if not data:
                    raise ProtocolFailed("the upstream closed the connection mid-body")
                size -= len(data)
                yield data
            if conn.read_line():
                raise ProtocolFailed("the upstream sent a chunk without its CRLF")

    def _release(self, complete: bool) -> None:
        conn, pool = self._conn, self._pool
        self._conn = self._pool = None
        if conn is not None and pool is not None:
            pool._give_back(conn, complete and self._keep)

    def close(self) -> None:
        """Give the connection back (kept alive only if the body was read to its end)."""
        self._release(False)


class Pool:
    """Keep-alive connections to one ``host:port``, thread-safe, fork-unaware (callers forget it)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry: float,
        connect_timeout: float,
        read_timeout: float | None,
        write_timeout: float | None,
        pool_timeout: float,
        head_timeout: float | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.keepalive_expiry = keepalive_expiry
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.pool_timeout = pool_timeout
        self.head_timeout = head_timeout
        """Seconds for the whole response head, interim answers included, once the request is sent."""
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._active = 0  # exchanges holding a slot (a connection, new or reused)
        self._waiting = 0
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closed = False

    @property
    def connections(self) -> list[Connection]:
        """Open connections, idle and busy (for tests and diagnostics)."""
        with self._lock:
            return [*self._idle, *self._busy]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
        for conn in idle:
            conn.close()

    # -- connections ---------------------------------------------------------------
    def _connect(self) -> Connection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise ConnectTimedOut(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        kernel = _KERNEL_TIMEOUTS and self.ssl_context is None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            if kernel:
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.read_timeout))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.write_timeout))
        except TimeoutError:
            sock.close()
            raise ConnectTimedOut(f"the TLS handshake with {self.host}:{self.port} timed out") from None
        except OSError as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise ConnectFailed(f"the TLS handshake with {self.host}:{self.port} failed: {exc}") from None
        conn = Connection(sock, kernel)
        conn.rcvtimeo = self.read_timeout
        return conn

    def _take(self, fresh: bool = False) -> Connection:
        """A slot and a connection for it: a live idle one (unless ``fresh``), else a new one."""
        conn: Connection | None = None
        with self._lock:
            if self._active >= self.max_connections:
                self._wait_for_slot()
            self._active += 1
            if self._idle and not fresh:
                conn = self._idle.pop()
        try:
            now = time.monotonic()
            while conn is not None:
                if conn.expires > now and not conn.dead():
                    conn.reused = True
                    break
                conn.close()
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
        except BaseException:
            self._give_back(None)
            raise
        conn.in_use = True
        with self._lock:
            self._busy.add(conn)
        return conn

    def _wait_for_slot(self) -> None:
        # Called with the lock held; Condition.wait releases it while waiting.
        deadline = time.monotonic() + self.pool_timeout
        self._waiting += 1
        try:
            while self._active >= self.max_connections:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolTimedOut(f"no connection to {self.host}:{self.port} became free in time")
                self._freed.wait(left)
        finally:
            self._waiting -= 1

    def _give_back(self, conn: Connection | None, keep: bool = False) -> None:
        """End an exchange: keep its connection for reuse or close it, and free the slot."""
        with self._lock:
            self._active -= 1
            if conn is not None:
                self._busy.discard(conn)
                conn.in_use = False
                if keep and not self._closed and not conn.is_closed():
                    conn.expires = time.monotonic() + self.keepalive_expiry
                    self._idle.append(conn)
                    conn = None
            if self._waiting:
                self._freed.notify()
        if conn is not None:
            conn.close()

    # -- one exchange ------------------------------------------------------------------
    def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | Iterable[bytes],
    ) -> Response:
        """Send one request and read the response head; the body streams from the result.

        Raises the errors above; ``_IncompleteBody`` (or anything else) from a streamed
        ``body`` passes through after the connection was discarded.
        """
        chunked = False
        lines = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
            if name == b"transfer-encoding" and value == b"chunked":
                chunked = True
        lines.append(b"\r\n")
        head = b"".join(lines)
        breaks = len(headers) + 2
        # A CR, LF or NUL inside a field would let one request smuggle another.
        if (
            head.count(b"\n") != breaks
            or head.count(b"\r") != breaks
            or b"\0" in head
            or not _is_token(method)
            or b" " in target
        ):
            raise ProtocolFailed("the request has an invalid method, target or header field")
        for attempt in (0, 1):
            conn = self._take(fresh=bool(attempt))
            try:
                return self._exchange(conn, method, head, body, chunked)
            except _Stale:
                self._give_back(conn)
                # The server closed a kept-alive connection as we reused it and sent no
                # byte back. Once more on a new connection, when the request can be sent
                # again and may be (RFC 9112 §9.3.1: idempotent methods only).
                if attempt or not isinstance(body, bytes) or method not in IDEMPOTENT:
                    raise ProtocolFailed("the upstream closed the connection without answering") from None
            except BaseException:
                self._give_back(conn)
                raise
        raise AssertionError  # pragma: no cover

    def _exchange(
        self, conn: Connection, method: bytes, head: bytes, body: bytes | Iterable[bytes], chunked: bool
    ) -> Response:
        sock = conn.sock
        reused = conn.reused
        try:
            conn.set_timeout(self.write_timeout)
            if isinstance(body, bytes):
                if len(body) < 16384:
                    sock.sendall(head + body)  # one segment for the common small request
                else:
                    sock.sendall(head)
                    sock.sendall(body)
            else:
                sock.sendall(head)
                for chunk in body:
                    if not chunk:
                        continue
                    sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (TimeoutError, BlockingIOError):
            raise TimedOut("writing the request to the upstream timed out") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            if reused and isinstance(body, bytes):
                raise _Stale() from exc
            raise ProtocolFailed(f"the connection to the upstream broke: {exc!r}") from None
        except OSError as exc:
            raise ProtocolFailed(f"the connection to the upstream broke: {exc!r}") from None
        read_timeout = self.read_timeout
        conn.set_read_timeout(read_timeout)
        head_timeout = self.head_timeout
        deadline = None if head_timeout is None else time.monotonic() + head_timeout
        for _ in range(_MAX_INTERIM + 1):
            try:
                raw = conn.read_head(_MAX_HEAD, deadline, read_timeout)
            except _Stale:
                if reused:
                    raise
                raise ProtocolFailed("the upstream closed the connection without answering") from None
            reused = False  # bytes arrived: never retry from here on
            status, reason, headers, http10 = _parse_head(raw)
            if 100 <= status < 200:
                if status == 101:
                    raise ProtocolFailed("the upstream switched protocols, which a proxied request cannot")
                continue  # interim answers (100 Continue, 103 Early Hints) are not forwarded
            conn.set_read_timeout(read_timeout)  # the head may have shortened it; the body gets it whole
            return Response(self, conn, status, reason, headers, method == b"HEAD", http10)
        raise ProtocolFailed(f"the upstream sent more than {_MAX_INTERIM} interim (1xx) responses")
