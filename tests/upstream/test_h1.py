"""The WSGI proxy's HTTP/1.1 client against a scripted upstream on a raw socket."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from canarymw.upstream import _h1

Script = Callable[[socket.socket, int], None]
"""Serves one accepted connection; gets the connection's index."""


def make_pool(port: int, *, max_connections: int = 4, **kw: float) -> _h1.Pool:
    """A pool to 127.0.0.1:``port`` with short, test-sized limits unless told otherwise."""
    limits = {"keepalive_expiry": 5.0, "connect_timeout": 2.0, "read_timeout": 2.0, "write_timeout": 2.0}
    limits["pool_timeout"] = 2.0
    limits.update(kw)
    return _h1.Pool("127.0.0.1", port, ssl_context=None, max_connections=max_connections, **limits)


class Scripted:
    """A loopback server that runs ``script`` for every connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.connections = 0
        self.pools: list[_h1.Pool] = []
        self.closed = threading.Semaphore(0)  # released each time a connection is closed
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                self.script(conn, index)
            except OSError:
                pass
        self.closed.release()

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        self.requests.append(data)
        return data

    def pool(self, *, max_connections: int = 4, **kw: float) -> _h1.Pool:
        pool = make_pool(self.port, max_connections=max_connections, **kw)
        self.pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Scripted]]:
    servers: list[Scripted] = []

    def make(script: Script) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def get(pool: _h1.Pool, method: bytes = b"GET", body: bytes = b"") -> tuple[int, bytes, _h1.Response]:
    response = pool.request(method, b"/x", [(b"host", b"up")], body)
    data = b"".join(response)
    response.close()
    return response.status, data, response


def test_chunked_body_with_extensions_and_trailers_keeps_the_connection(
    serve: Callable[..., Scripted],
) -> None:
    def script(conn: socket.socket, index: int) -> None:
        while server.read_request(conn):
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n"
            )

    server = serve(script)
    pool = server.pool()
    assert get(pool)[:2] == (200, b"hello!")
    assert get(pool)[:2] == (200, b"hello!")
    assert server.connections == 1


def test_transfer_encoding_wins_over_content_length_and_closes(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head + b"2\r\nok\r\n0\r\n\r\n")

    server = serve(script)
    pool = server.pool()
    assert get(pool)[:2] == (200, b"ok")
    assert get(pool)[:2] == (200, b"ok")
    assert server.connections == 2  # never reused after a doubly framed answer


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 300 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=[
        "2-lengths",
        "negative",
        "space-in-name",
        "folding",
        "http2",
        "status",
        "101",
        "huge",
        "300",
        "gzip-chunked",
        "gzip",
        "chunked-twice",
        "two-te-fields",
        "17-interim",
    ],
)
def test_malformed_answers_are_protocol_errors(serve: Callable[..., Scripted], answer: bytes) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        conn.sendall(answer)

    server = serve(script)
    with pytest.raises(_h1.ProtocolFailed):
        get(server.pool())


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n", b"5\r\nhel"],
    ids=["size", "crlf", "short"],
)
def test_broken_chunked_bodies_fail_while_streaming(serve: Callable[..., Scripted], body: bytes) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    server = serve(script)
    pool = server.pool()
    response = pool.request(b"GET", b"/x", [(b"host", b"up")], b"")
    with pytest.raises(_h1.ProtocolFailed):
        b"".join(response)
    response.close()
    assert pool.connections == []


def test_interim_answers_are_skipped_and_head_has_no_body(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        while request := server.read_request(conn):
            conn.sendall(
                b"HTTP/1.1 100 Continue\r\n\r\n" * 15 + b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            )
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
            conn.sendall(head if request.startswith(b"HEAD") else head + b"hello")

    server = serve(script)
    pool = server.pool()
    assert get(pool, b"HEAD")[:2] == (200, b"")
    assert get(pool)[:2] == (200, b"hello")
    assert server.connections == 1


def test_an_http10_answer_is_read_to_the_close(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nall of it")

    server = serve(script)
    pool = server.pool()
    assert get(pool)[:2] == (200, b"all of it")
    assert pool.connections == []


def test_a_kept_connection_closed_by_the_server_is_not_reused(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # then closes: the pooled connection is dead before it is used again

    server = serve(script)
    pool = server.pool()
    assert get(pool)[:2] == (200, b"ok")
    assert server.closed.acquire(timeout=5)  # the server has closed the kept connection
    assert get(pool, b"POST", b"data")[:2] == (200, b"ok")
    assert server.connections == 2 and len(server.requests) == 2


@pytest.mark.parametrize("close", ["fin", "reset"])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_silent_close_is_retried_for_idempotent_requests_only(
    serve: Callable[..., Scripted], method: bytes, close: str
) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        if index == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            server.read_request(conn)  # took the second request, then closed without a byte
            if close == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry")

    server = serve(script)
    pool = server.pool()
    assert get(pool)[:2] == (200, b"ok")
    if method == b"GET":
        assert get(pool, method)[:2] == (200, b"retry")
        assert server.connections == 2
    else:
        with pytest.raises(_h1.ProtocolFailed):
            get(pool, method, b"order")
        assert server.connections == 1  # sent once, never twice


def test_read_timeout(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        threading.Event().wait(2)

    server = serve(script)
    with pytest.raises(_h1.TimedOut):
        get(server.pool(read_timeout=0.2))


@pytest.fixture(params=["kernel", "python"])
def timeouts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Timeouts as socket options (Linux) and as Python's own socket timeouts (elsewhere, TLS)."""
    if request.param == "python":
        monkeypatch.setattr(_h1, "_KERNEL_TIMEOUTS", False)
    elif not _h1._KERNEL_TIMEOUTS:  # pragma: no cover - not Linux
        pytest.skip("kernel timeouts are Linux only")
    return str(request.param)


@pytest.mark.parametrize(
    ("pieces", "end"),
    [
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n"] + [b"X-%d: y\r\n" % i for i in range(60)],
            b"Content-Length: 2\r\n\r\nok",
            id="trickled head",
        ),
        pytest.param(
            [b"HTTP/1.1 100 Continue\r\n\r\n"] * 15,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            id="slow interim answers",
        ),
    ],
)
def test_the_head_timeout_bounds_all_reads_of_the_head(
    serve: Callable[..., Scripted], timeouts: str, pieces: list[bytes], end: bytes
) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        for piece in pieces:  # each read comes well within the read timeout
            conn.sendall(piece)
            threading.Event().wait(0.05)
        conn.sendall(end)

    server = serve(script)
    started = time.monotonic()
    with pytest.raises(_h1.TimedOut):
        get(server.pool(read_timeout=1.0, head_timeout=0.3))
    assert time.monotonic() - started < 0.6


def test_a_read_timeout_longer_than_the_time_left_is_cut_to_it(
    serve: Callable[..., Scripted], timeouts: str
) -> None:
    def script(conn: socket.socket, index: int) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        threading.Event().wait(2)

    server = serve(script)
    started = time.monotonic()
    with pytest.raises(_h1.TimedOut):
        get(server.pool(read_timeout=5.0, head_timeout=0.3))
    assert time.monotonic() - started < 1.0


def test_the_body_gets_the_whole_read_timeout_after_a_slow_head(
    serve: Callable[..., Scripted], timeouts: str
) -> None:
    def script(conn: socket.socket, index: int) -> None:
        while server.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            threading.Event().wait(0.4)
            conn.sendall(b"X-A: 1\r\n")
            threading.Event().wait(0.05)  # the head's last read waited with about 0.15 s left
            conn.sendall(b"Content-Length: 2\r\n\r\n")
            threading.Event().wait(0.35)  # longer than that, shorter than the read timeout
            conn.sendall(b"ok")

    server = serve(script)
    pool = server.pool(read_timeout=0.6, head_timeout=0.55)
    assert get(pool)[:2] == (200, b"ok")
    assert get(pool)[:2] == (200, b"ok")  # and so does the next request on the connection
    assert server.connections == 1


def test_fields_that_would_smuggle_a_request_are_refused_before_connecting(
    serve: Callable[..., Scripted],
) -> None:
    server = serve(lambda conn, index: None)
    pool = server.pool()
    for headers, method in (
        ([(b"x", b"a\r\nGET /admin HTTP/1.1")], b"GET"),
        ([(b"x", b"a\nb")], b"GET"),
        ([(b"x", b"a\x00")], b"GET"),
        ([(b"host", b"up")], b"GET /y"),
    ):
        with pytest.raises(_h1.ProtocolFailed):
            pool.request(method, b"/x", headers, b"")
    assert server.connections == 0


def test_connect_errors_and_pool_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = make_pool(port, max_connections=1, pool_timeout=0.1)
    with pytest.raises(_h1.ConnectFailed):
        get(pool)
    with pytest.raises(_h1.ConnectFailed):  # the failed attempt gave its slot back
        get(pool)


def test_the_pool_waits_for_a_slot_then_times_out(serve: Callable[..., Scripted]) -> None:
    more = threading.Event()

    def script(conn: socket.socket, index: int) -> None:
        while server.read_request(conn):
            # A streamed answer: the connection stays busy until its last chunk is read.
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
            more.wait(5)
            conn.sendall(b"0\r\n\r\n")

    server = serve(script)
    pool = server.pool(max_connections=1, pool_timeout=0.2)
    held = pool.request(b"GET", b"/x", [(b"host", b"up")], b"")
    with pytest.raises(_h1.PoolTimedOut):
        get(pool)
    threading.Timer(0.05, held.close).start()
    pool.pool_timeout = 2.0
    more.set()
    assert get(pool)[:2] == (200, b"ok")  # woken when the held one came back
    assert server.connections == 2  # the held one was closed unread, never reused


def test_a_body_that_came_with_the_head_frees_the_connection_at_once(serve: Callable[..., Scripted]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        while server.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    server = serve(script)
    pool = server.pool(max_connections=1, pool_timeout=0.2)
    first = pool.request(b"GET", b"/x", [(b"host", b"up")], b"")
    threading.Event().wait(0.05)
    second = pool.request(b"GET", b"/x", [(b"host", b"up")], b"")  # no wait for the first
    assert [first.body, second.body] == [b"hello", b"hello"]
    assert b"".join(first) == b"hello" and server.connections == 1


# -- chunk sizes: the strict grammar, never int()'s ---------------------------------------------
# chunk-size = 1*HEXDIG (16 at most here), then chunk extensions, which are ignored but may
# hold no control byte other than HTAB. See: RFC 9112 §7.1, §7.1.1.
_STRICT_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]{1,16}(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?")


def _stream_chunked(line: bytes, data: bytes) -> tuple[list[bytes], BaseException | None]:
    """The body chunks a chunked response yields for one chunk-size line, and its error if any."""
    ours, theirs = socket.socketpair()
    chunks: list[bytes] = []
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + line + b"\r\n" + data)
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(1.0)
        pool = make_pool(9, max_connections=1)
        pool._active = 1  # the slot this exchange holds, as _take() would have taken it
        conn = _h1.Connection(ours, kernel=False)
        try:
            status, reason, headers, http10 = _h1._parse_head(conn.read_head())
            for chunk in _h1.Response(pool, conn, status, reason, headers, False, http10):
                chunks.append(chunk)
        except _h1.H1Error as exc:
            return chunks, exc
        finally:
            pool.close()
    return chunks, None


@pytest.mark.parametrize(
    "line",
    [b"+5", b"-1", b"0x5", b"0X5", b"0_5", b" 5", b"5 ", b"\t5", b"5\x00", b"", b";x", b"1" * 17, b"5;\nx"],
    ids=["plus", "minus", "0x", "0X", "underscore", "space-before", "space-after", "tab", "nul", "empty",
         "ext-only", "17-digits", "lf-in-ext"],
)  # fmt: skip
def test_chunk_sizes_that_int_would_take_are_refused_before_any_body(line: bytes) -> None:
    chunks, error = _stream_chunked(line, b"hello\r\n0\r\n\r\n")
    assert isinstance(error, _h1.ProtocolFailed) and chunks == []


@pytest.mark.parametrize("line", [b"5", b"05", b"0000000000000005", b"5;a=1", b'5 ;a="x y"', b"5\t;a"])
def test_strict_chunk_sizes_and_extensions_are_read(line: bytes) -> None:
    assert _stream_chunked(line, b"hello\r\n0\r\n\r\n") == ([b"hello"], None)


_LINE_PIECES = [b"0", b"5", b"a", b"F", b"ffffffff", b"+", b"-", b"x", b"X", b"_", b" ", b"\t", b";"]
_LINE_PIECES += [b"ext=1", b'"q;"', b"\x00", b"\r", b"\n", b"\x0b", b"\x7f", b"\xff", b"\xd9\xa5"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(_LINE_PIECES), max_size=12).map(b"".join), st.binary(max_size=30)))
def test_any_chunk_size_line_is_strict_or_refused_without_streaming(line: bytes) -> None:
    assume(b"\r\n" not in line)  # a line ends at its first CRLF
    size = 20
    chunks, error = _stream_chunked(line, b"x" * size + b"\r\n0\r\n\r\n")
    strict = _STRICT_CHUNK_LINE.fullmatch(line)
    if strict is None:
        assert isinstance(error, _h1.ProtocolFailed), (line, error)
        assert chunks == [], (line, chunks)  # never a framing byte as body
        return
    declared = int(line.split(b";")[0], 16)
    if declared == size:
        assert (b"".join(chunks), error) == (b"x" * size, None)
    elif declared == 0:
        assert chunks == []  # a last-chunk: what follows is trailers, then nothing
    else:  # the wrong length: the body breaks off, but only with the client's own error
        assert isinstance(error, _h1.H1Error), (line, error)


# -- hostile bytes: only this client's own errors, never a crash ----------------------------
_CHUNK_PIECES = [b"5\r\nhello\r\n", b"0\r\n\r\n", b"ffffffffff\r\n", b"\r\n", b"3;x=y\r\nabc\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_response_head_parses_or_is_a_protocol_error(raw: bytes) -> None:
    try:
        status, _, headers, _ = _h1._parse_head(b"HTTP/1.1 200 OK\r\n" + raw)
    except _h1.ProtocolFailed:
        return
    assert status == 200
    for name, value in headers:
        assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name), name
        assert not re.search(rb"[\r\n\x00]", value) and value == value.strip(b" \t"), value


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"Transfer-Encoding: chunked", b"Content-Length: 10", b"Connection: close"]),
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(_CHUNK_PIECES),
        ),
        max_size=6,
    ),
)
def test_any_body_streams_or_fails_with_a_client_error(framing: bytes, parts: list[bytes]) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + b"".join(parts))
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(1.0)
        pool = make_pool(9, max_connections=1)
        conn = _h1.Connection(ours, kernel=False)
        pool._active = 1  # the slot this exchange holds, as _take() would have taken it
        try:
            status, reason, headers, http10 = _h1._parse_head(conn.read_head())
            response = _h1.Response(pool, conn, status, reason, headers, False, http10)
            body = b"".join(response)
        except _h1.H1Error:
            return
        finally:
            pool.close()
        assert isinstance(body, bytes)
