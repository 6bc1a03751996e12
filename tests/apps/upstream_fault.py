"""A misbehaving upstream on a raw socket (a thread), for the failure paths of canarymw.Upstream.

The last path segment picks the behaviour; every request head is kept in ``heads``:

    echo                    200, the raw request head (request line and headers) as the body
    three-cookies           200 with three Set-Cookie headers (one with a comma in its date)
    hop                     200 with hop-by-hop headers, and X-Secret named in Connection
    reset-mid-body          200 promising 1000 bytes, 100 sent, then a TCP reset
    headers-then-close      200 promising 50 bytes, then a clean close without them
    close-before-response   reads the request, closes without answering
    reset-before-response   reads the request, resets
    delay?s=                answers after ``s`` seconds (or when the server stops)
    te-and-cl?cl=           200, chunked "hello world" that also claims ``Content-Length: cl``
    gzip-chunked            200 with ``Transfer-Encoding: gzip, chunked`` and a gzipped body
    trickle?s=              a response head sent a header line every 50 ms, for ``s`` seconds
    interim?n=&s=           ``n`` 100 Continue answers ``s`` seconds apart, then 200 "ok"

:func:`blackhole` gives a loopback port whose accept queue is full, so a new
connection attempt hangs until the client's connect timeout.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import struct
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit


class FaultServer:
    """Serve one request per connection on 127.0.0.1 from a thread; use as a context manager."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.errors: list[BaseException] = []
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._acceptor = threading.Thread(target=self._accept, name="fault-upstream", daemon=True)

    def __enter__(self) -> FaultServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self.listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self.connections += 1
                self._open.add(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            head, body = _read_request(conn)
            if not head:
                return
            with self._lock:
                self.heads.append(head)
                self.bodies.append(body)
            target = head.split(b" ")[1].decode("latin-1")
            parts = urlsplit(target)
            name = parts.path.rstrip("/").rsplit("/", 1)[-1]
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            self._behave(conn, name, query, head)
        except OSError:
            pass  # the proxy went away first: that is what several tests do
        except Exception as exc:  # pragma: no cover - reported by the tests
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _behave(self, conn: socket.socket, name: str, query: dict[str, str], head: bytes) -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        if name == "three-cookies":
            conn.sendall(
                ok + b"Set-Cookie: a=1; Path=/\r\n"
                b"Set-Cookie: b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/\r\n"
                b"Set-Cookie: c=3; HttpOnly\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
        elif name == "hop":
            conn.sendall(
                ok + b"Connection: close, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nTrailer: X-T\r\nX-Kept: yes\r\n"
                b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: fault\r\nContent-Length: 2\r\n\r\nok"
            )
        elif name == "reset-mid-body":
            conn.sendall(ok + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
            # Let the head arrive first: data still unread when a reset lands is lost.
            self._stop.wait(0.05)
            _reset(conn)
        elif name == "headers-then-close":
            conn.sendall(ok + b"Content-Length: 50\r\n\r\n")
            conn.shutdown(socket.SHUT_WR)
        elif name == "close-before-response":
            conn.shutdown(socket.SHUT_RDWR)
        elif name == "reset-before-response":
            _reset(conn)
        elif name == "te-and-cl":
            # See: RFC 9112 §6.3: chunked wins; a proxy must not pass the length on.
            cl = query.get("cl", "2").encode()
            conn.sendall(
                ok + b"Content-Length: " + cl + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
            )
        elif name == "gzip-chunked":
            packed = gzip.compress(b"compressed body")
            conn.sendall(
                ok
                + b"Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
                + b"%x\r\n%b\r\n0\r\n\r\n" % (len(packed), packed)
            )
        elif name == "trickle":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for i in range(int(float(query.get("s", "5")) / 0.05)):
                if self._stop.wait(0.05):
                    return
                conn.sendall(b"X-Trickle-%d: %d\r\n" % (i, i))
            conn.sendall(b"Content-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
        elif name == "interim":
            for _ in range(int(query.get("n", "1"))):
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self._stop.wait(float(query.get("s", "0"))):
                    return
            conn.sendall(ok + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
        elif name == "delay":
            if not self._stop.wait(float(query.get("s", "5"))):
                conn.sendall(ok + b"Content-Length: 4\r\nConnection: close\r\n\r\nlate")
        else:
            conn.sendall(ok + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(head) + head)


def _reset(conn: socket.socket) -> None:
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"\r\ncontent-length:" in lower:
        length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return head, body


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An http:// URL on loopback where connecting hangs: the accept queue is full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
