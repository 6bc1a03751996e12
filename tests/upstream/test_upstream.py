"""canarymw.Upstream against real upstreams on 127.0.0.1: gunicorn, uvicorn and a faulty raw socket.

Most tests run the middleware in-process (once per adapter, through the ``driver``
fixture) against upstream servers that the module starts; the last ones serve the
proxy itself with a real gunicorn and a real uvicorn.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.validate import validator

import httpx
import pytest

from canarymw import ASGICanaryMiddleware, Rollout, Upstream, WSGICanaryMiddleware
from canarymw.upstream import UpstreamAborted

from ..apps.upstream_fault import FaultServer, blackhole
from ..harness import RecordingSink, validate_asgi
from ..servers import free_port, serve

KEY = "upstream-secret-key-0123456789abcdef"


# -- upstream servers, started once for the module ------------------------------------
@pytest.fixture(scope="module")
def gunicorn_upstream() -> Iterator[str]:
    port = free_port()
    argv = ["gunicorn", "-k", "gthread", "--threads", "16", "-w", "1", "--keep-alive", "5"]
    argv += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", "tests.apps.upstream_wsgi:app"]
    with serve(argv, port, ready_path="/healthz") as base:
        yield base


@pytest.fixture(scope="module")
def uvicorn_upstream() -> Iterator[str]:
    port = free_port()
    argv = ["uvicorn", "tests.apps.upstream_asgi:app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning", "--no-access-log"]
    with serve(argv, port, ready_path="/healthz") as base:
        yield base


@pytest.fixture(params=["gunicorn", "uvicorn"])
def upstream_url(request: pytest.FixtureRequest) -> str:
    """Each real upstream in turn."""
    return str(request.getfixturevalue(f"{request.param}_upstream"))


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server
    assert not server.errors


# -- one driver per adapter: build the middleware, make a request in-process ---------------
@dataclass
class Result:
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    error: BaseException | None = None
    chunk_times: list[float] = field(default_factory=list)
    complete: bool = True
    """ASGI: the last message sent was a final body (``more_body`` false)."""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def json(self) -> Any:
        return json.loads(self.body)


class Driver:
    kind = ""

    def __init__(self) -> None:
        self.upstreams: list[Upstream] = []
        self.sink = RecordingSink()

    def upstream(self, url: str, **kw: Any) -> Upstream:
        up = Upstream(url, **kw)
        self.upstreams.append(up)
        return up

    def rollout(self, percent: float) -> Rollout:
        return Rollout("up", percent=percent, secret_key=KEY)

    @property
    def outcome(self) -> Any:
        assert len(self.sink.outcomes) == 1, self.sink.outcomes
        return self.sink.outcomes.pop()

    def close(self) -> None:
        for up in self.upstreams:
            up.close()


class WSGIDriver(Driver):
    kind = "wsgi"

    def old(self) -> Any:
        """The old variant: answers ``old <method> <body>`` (so replays can be checked)."""

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            stream = environ["wsgi.input"]
            if environ.get("CONTENT_LENGTH"):
                body = stream.read(int(environ["CONTENT_LENGTH"]))
            else:  # a chunked upload: the input ends where the body does
                body = b"".join(iter(lambda: stream.read(4096), b""))
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"old " + environ["REQUEST_METHOD"].encode() + b" " + body]

        return validator(app)

    def wrap(self, old: Any, new: Any, *, percent: float = 100) -> Any:
        return validator(WSGICanaryMiddleware(old, new=new, rollout=self.rollout(percent), sink=self.sink))

    def request(
        self,
        app: Any,
        method: str = "GET",
        path: str = "/echo",
        *,
        query: str = "",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        chunked: bool = False,
        max_chunks: int | None = None,
        client: str = "127.0.0.1",
    ) -> Result:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "front.example",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": client,
            "HTTP_HOST": "front.example",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if chunked:
            environ["wsgi.input_terminated"] = True
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        elif body or method in ("POST", "PUT"):
            environ["CONTENT_LENGTH"] = str(len(body))
        for name, value in headers:
            key = name.upper().replace("-", "_")
            environ[key if key == "CONTENT_TYPE" else f"HTTP_{key}"] = value
        started: list[Any] = []

        def start_response(status: str, hs: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started[:] = [status, hs]
            return lambda data: None

        result = app(environ, start_response)
        chunks: list[bytes] = []
        times: list[float] = []
        error: BaseException | None = None
        try:
            for chunk in result:
                chunks.append(chunk)
                times.append(time.monotonic())
                if max_chunks is not None and len(chunks) >= max_chunks:
                    break
        except Exception as exc:
            error = exc
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status = int(started[0][:3]) if started else None
        headers = list(started[1]) if started else []
        return Result(status, headers, b"".join(chunks), error, times, complete=error is None)


class ASGIDriver(Driver):
    kind = "asgi"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

    def old(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            text = b"old " + scope["method"].encode() + b" " + body
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": text})

        return validate_asgi(app)

    def wrap(self, old: Any, new: Any, *, percent: float = 100) -> Any:
        return validate_asgi(
            ASGICanaryMiddleware(old, new=new, rollout=self.rollout(percent), sink=self.sink)
        )

    def request(
        self,
        app: Any,
        method: str = "GET",
        path: str = "/echo",
        *,
        query: str = "",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        chunked: bool = False,
        max_chunks: int | None = None,
        client: str = "127.0.0.1",
        abort: str = "disconnect",
    ) -> Result:
        return self.loop.run_until_complete(
            self._request(app, method, path, query, headers, body, chunked, max_chunks, client, abort)
        )

    async def _request(
        self,
        app: Any,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        chunked: bool,
        max_chunks: int | None,
        client: str,
        abort: str,
    ) -> Result:
        raw = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]
        if not any(k == b"host" for k, _ in raw):
            raw.append((b"host", b"front.example"))
        if not chunked and (body or method in ("POST", "PUT")):
            raw.append((b"content-length", str(len(body)).encode()))
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)] if chunked else [body]
        incoming = [
            {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
            for i, p in enumerate(pieces or [b""])
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": raw,
            "client": (client, 50000),
            "server": ("front.example", 80),
        }
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []
        times: list[float] = []

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if gone.is_set():
                if abort == "oserror":
                    raise OSError("client disconnected")
                return  # like uvicorn: sends after a disconnect are dropped
            sent.append(message)
            if message["type"] == "http.response.body":
                times.append(time.monotonic())
                if not message.get("more_body") or (max_chunks is not None and len(times) >= max_chunks):
                    gone.set()

        error: BaseException | None = None
        task = asyncio.ensure_future(app(scope, receive, send))
        if abort == "cancel" and max_chunks is not None:
            while len(times) < max_chunks and not task.done():
                await asyncio.sleep(0.001)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            error = exc
        starts = [m for m in sent if m["type"] == "http.response.start"]
        status = starts[0]["status"] if starts else None
        hs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in starts[0]["headers"]] if starts else []
        chunks = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        complete = bool(sent) and sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
        return Result(status, hs, chunks, error, times, complete)

    def close(self) -> None:
        for up in self.upstreams:
            self.loop.run_until_complete(up.aclose())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture(params=["wsgi", "asgi"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """The adapter under test, in-process."""
    d: Driver = WSGIDriver() if request.param == "wsgi" else ASGIDriver()
    try:
        yield d
    finally:
        d.close()
        for up in d.upstreams:
            assert up.in_flight == 0, f"{up!r} leaked {up.in_flight} response(s)"


def proxy(driver: Driver, url: str, *, fallback: bool = True, **kw: Any) -> Any:
    """The middleware at 100%: every request goes to an upstream at ``url``."""
    return driver.wrap(driver.old(), driver.upstream(url, fallback=fallback, **kw))


# -- configuration ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "kw", "message"),
    [
        pytest.param("ftp://h/", {}, "http:// or https://", id="scheme"),
        pytest.param("http:///x", {}, "with a host", id="no host"),
        pytest.param("http://u:p@h/", {}, "credentials", id="credentials"),
        pytest.param("http://h/?a=1", {}, "query or fragment", id="query"),
        pytest.param("http://h:99999", {}, "not a valid URL", id="port"),
        pytest.param("http://h", {"connect_timeout": 0}, "connect_timeout=0", id="timeout zero"),
        pytest.param("http://h", {"pool_timeout": None}, "pool_timeout=None", id="pool timeout none"),
        pytest.param("http://h", {"read_timeout": "1"}, "read_timeout='1'", id="timeout str"),
        pytest.param("http://h", {"max_replay_body": -1}, "max_replay_body=-1", id="replay negative"),
        pytest.param("http://h", {"max_connections": 0}, "max_connections=0", id="connections zero"),
        pytest.param("http://h", {"fallback": "yes"}, "fallback='yes'", id="fallback str"),
        pytest.param("http://h", {"head_timeout": 0}, "head_timeout=0", id="head timeout zero"),
        pytest.param("http://h", {"head_timeout": "10"}, "head_timeout='10'", id="head timeout str"),
        pytest.param("http://h", {"trust_forwarded": 1}, "trust_forwarded=1", id="trust forwarded int"),
    ],
)
def test_invalid_configuration_fails_at_construction(url: str, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="Upstream") as info:
        Upstream(url, **kw)
    assert message in str(info.value) and str(info.value).endswith(".")


@pytest.mark.parametrize(
    ("kw", "head"),
    [
        pytest.param({}, 60.0, id="twice the read timeout"),
        pytest.param({"read_timeout": 5}, 10.0, id="follows the read timeout"),
        pytest.param({"read_timeout": None}, None, id="long polls keep no limit"),
        pytest.param({"head_timeout": 3}, 3.0, id="explicit"),
        pytest.param({"head_timeout": None}, None, id="none"),
    ],
)
def test_the_head_timeout_default(kw: dict[str, Any], head: float | None) -> None:
    assert Upstream("http://h", **kw).head_timeout == head


def test_importing_canarymw_imports_no_http_client() -> None:
    code = (
        "import sys, canarymw, canarymw.upstream, canarymw.wsgi, canarymw.asgi;"
        "u = canarymw.Upstream('http://127.0.0.1:1');"
        "print(','.join(m for m in ('httpx', 'httpcore', 'h11', 'anyio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def refused_url() -> str:
    """An address where nothing listens: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def request_lines(fault: FaultServer) -> list[str]:
    """The last request head the faulty upstream received, lower-cased, one line per item."""
    return fault.heads[-1].decode("latin-1").lower().split("\r\n")


def summary(driver: Driver) -> list[tuple[str, int | None, str | None]]:
    out = [(o.variant, o.status, o.error) for o in driver.sink.outcomes]
    driver.sink.outcomes.clear()
    return out


# -- methods and bodies, both adapters, both real upstreams ----------------------------
@pytest.mark.server
def test_get_head_and_post_reach_the_upstream(driver: Driver, upstream_url: str) -> None:
    app = proxy(driver, upstream_url)
    got = driver.request(app, "GET", "/echo", query="a=1&b=%20x")
    assert got.status == 200, got.body
    echo = got.json()
    assert (echo["method"], echo["path"], echo["query"], echo["length"]) == ("GET", "/echo", "a=1&b=%20x", 0)
    head = driver.request(app, "HEAD", "/echo")
    assert head.status == 200 and head.body == b"" and head.header("content-length")
    body = bytes(range(256)) * 40  # 10 KiB, every byte value
    post = driver.request(app, "POST", "/echo", body=body, headers=[("Content-Type", "application/x-thing")])
    echo = post.json()
    assert (echo["method"], echo["length"], echo["sha256"]) == (
        "POST",
        len(body),
        hashlib.sha256(body).hexdigest(),
    )
    assert echo["headers"]["content-type"] == "application/x-thing"
    assert echo["headers"]["content-length"] == str(len(body))
    assert [(o.variant, o.status, o.error, o.disconnected) for o in driver.sink.outcomes] == [
        ("new", 200, None, False)
    ] * 3


@pytest.mark.server
@pytest.mark.parametrize("size", [10, 200_000], ids=["buffered", "streamed"])
def test_chunked_upload_without_content_length(driver: Driver, upstream_url: str, size: int) -> None:
    app = proxy(driver, upstream_url)
    body = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    echo = driver.request(app, "POST", "/echo", body=body, chunked=True).json()
    assert (echo["length"], echo["sha256"]) == (size, hashlib.sha256(body).hexdigest())
    if size <= 64 * 1024:  # read whole, then sent with its length (so it could be replayed)
        assert echo["headers"]["content-length"] == str(size)
    else:  # streamed as it comes, chunked again
        assert echo["headers"]["transfer-encoding"] == "chunked"


@pytest.mark.server
def test_a_large_body_is_streamed_with_its_length(driver: Driver, upstream_url: str) -> None:
    app = proxy(driver, upstream_url, max_replay_body=1024)
    body = bytes(range(256)) * 1200  # 300 KiB
    echo = driver.request(app, "PUT", "/echo", body=body).json()
    assert (echo["length"], echo["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    big = driver.request(app, "GET", "/big", query="size=300000")
    assert len(big.body) == 300_000 and big.header("content-length") == ["300000"]


@pytest.mark.server
def test_the_response_is_streamed_as_the_upstream_produces_it(driver: Driver, upstream_url: str) -> None:
    app = proxy(driver, upstream_url)
    started = time.monotonic()
    got = driver.request(app, "GET", "/stream", query="n=4&delay=0.15")
    assert got.body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    first, last = got.chunk_times[0] - started, got.chunk_times[-1] - started
    assert first < 0.3 and last >= 0.45, (first, last)


@pytest.mark.server
def test_redirects_are_passed_to_the_client(driver: Driver, upstream_url: str) -> None:
    got = driver.request(proxy(driver, upstream_url), "GET", "/redirect")
    assert got.status == 302 and got.header("location") == ["/echo"]
    status = driver.request(proxy(driver, upstream_url), "GET", "/status", query="code=503")
    assert status.status == 503
    assert summary(driver)[-1] == ("new", 503, None)  # passed through, counted by its status


@pytest.mark.server
def test_set_cookies_stay_separate_and_never_reach_another_user(driver: Driver, upstream_url: str) -> None:
    app = proxy(driver, upstream_url)
    theirs = [c for c in driver.request(app, "GET", "/cookies").header("set-cookie") if "canarymw=" not in c]
    assert theirs == ["a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3, with a comma; Path=/"]
    alice = driver.request(app, "GET", "/login", query="user=alice")
    assert "session=alice; Path=/" in alice.header("set-cookie")
    bob = driver.request(app, "GET", "/echo")  # another user, right after, same pooled connection
    assert "cookie" not in bob.json()["headers"]
    assert not any("alice" in c for c in bob.header("set-cookie"))
    carol = driver.request(app, "GET", "/echo", headers=[("Cookie", "session=carol")])
    assert carol.json()["headers"]["cookie"] == "session=carol"


def test_three_set_cookies_from_a_raw_upstream(driver: Driver, fault: FaultServer) -> None:
    got = driver.request(proxy(driver, fault.url), "GET", "/three-cookies")
    assert [c for c in got.header("set-cookie") if "canarymw=" not in c] == [
        "a=1; Path=/",
        "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/",
        "c=3; HttpOnly",
    ]


# -- headers ---------------------------------------------------------------------
def test_request_headers_hop_by_hop_and_forwarding(driver: Driver, fault: FaultServer) -> None:
    sent = [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "s"),
        ("Keep-Alive", "300"),
        ("Proxy-Authorization", "Basic Zm9v"),
        ("Proxy-Whatever", "1"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Trailer", "X-T"),
        ("Expect", "100-continue"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Via", "1.0 edge"),
        ("X-Kept", "yes"),
    ]
    driver.request(proxy(driver, fault.url), "GET", "/echo", headers=sent, client="10.1.2.3")
    lines = request_lines(fault)
    names = [line.split(":")[0] for line in lines[1:] if line]
    assert lines[0] == "get /echo http/1.1"
    hop = {"connection", "x-secret", "keep-alive", "proxy-authorization", "proxy-whatever", "te", "upgrade"}
    assert hop.isdisjoint(names) and "trailer" not in names and "expect" not in names
    assert "x-kept: yes" in lines
    assert f"host: 127.0.0.1:{fault.port}" in lines
    assert "x-forwarded-for: 6.6.6.6, 10.1.2.3" in lines
    assert "x-forwarded-proto: http" in lines
    assert "x-forwarded-host: front.example" in lines
    assert "via: 1.0 edge, 1.1 canarymw" in lines
    for once in ("host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"):
        assert names.count(once) == 1, once


def test_response_hop_by_hop_headers_are_stripped(driver: Driver, fault: FaultServer) -> None:
    got = driver.request(proxy(driver, fault.url), "GET", "/hop")
    names = {k.lower() for k, _ in got.headers}
    assert {"connection", "x-secret", "keep-alive", "proxy-authenticate", "upgrade", "trailer"}.isdisjoint(
        names
    )
    assert {"date", "server"}.isdisjoint(names)  # the front server sends its own
    assert got.header("x-kept") == ["yes"] and got.body == b"ok"


def test_preserve_host_sends_the_client_host_to_the_configured_address(
    driver: Driver, fault: FaultServer
) -> None:
    app = proxy(driver, fault.url, preserve_host=True)
    driver.request(app, "GET", "/echo", headers=[("Host", "evil.example:8080")])
    lines = request_lines(fault)  # it reached the configured upstream regardless
    assert "host: evil.example:8080" in lines and "x-forwarded-host: evil.example:8080" in lines


_CLIENT_FORWARDING = [
    ("Forwarded", "for=10.0.0.1;proto=https;host=admin.example"),
    ("X-Real-IP", "10.0.0.1"),
]


def test_the_clients_forwarded_and_x_real_ip_never_reach_the_upstream(
    driver: Driver, fault: FaultServer
) -> None:
    driver.request(proxy(driver, fault.url), "GET", "/echo", headers=_CLIENT_FORWARDING, client="10.1.2.3")
    names = [line.split(":")[0] for line in request_lines(fault)[1:] if line]
    assert "forwarded" not in names and "x-real-ip" not in names
    assert "x-forwarded-for: 10.1.2.3" in request_lines(fault)  # the one forwarding rule still holds


def test_trust_forwarded_passes_them_on_unchanged(driver: Driver, fault: FaultServer) -> None:
    app = proxy(driver, fault.url, trust_forwarded=True)
    driver.request(app, "GET", "/echo", headers=_CLIENT_FORWARDING, client="10.1.2.3")
    lines = request_lines(fault)
    assert "forwarded: for=10.0.0.1;proto=https;host=admin.example" in lines
    assert "x-real-ip: 10.0.0.1" in lines
    assert "x-forwarded-for: 10.1.2.3" in lines and "x-forwarded-proto: http" in lines


@pytest.mark.parametrize("cl", ["2", "1000"], ids=["shorter", "longer"])
def test_a_chunked_response_loses_the_content_length_it_also_claimed(
    driver: Driver, fault: FaultServer, cl: str
) -> None:
    got = driver.request(proxy(driver, fault.url), "GET", "/te-and-cl", query=f"cl={cl}")
    assert (got.status, got.body, got.error, got.complete) == (200, b"hello world", None, True)
    assert got.header("content-length") == [] and got.header("transfer-encoding") == []
    assert summary(driver) == [("new", 200, None)]


def test_a_transfer_coding_other_than_chunked_is_a_protocol_error(driver: Driver, fault: FaultServer) -> None:
    # gzip, chunked: passing the gzip bytes on as the body, with nothing to say so, is wrong.
    assert driver.request(proxy(driver, fault.url), "GET", "/gzip-chunked").body == b"old GET "
    got = driver.request(proxy(driver, fault.url, fallback=False), "GET", "/gzip-chunked")
    assert got.status == 502 and got.body.startswith(b"Bad Gateway")
    assert summary(driver) == [("new", 200, "UpstreamProtocolError"), ("new", 502, "UpstreamProtocolError")]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        pytest.param("/trickle", "s=5", id="a head trickled a line at a time"),
        pytest.param("/interim", "n=100&s=0.05", id="100 Continue again and again"),
    ],
)
def test_the_head_timeout_bounds_the_whole_response_head(
    driver: Driver, fault: FaultServer, path: str, query: str
) -> None:
    # Every read comes well within read_timeout; only the head deadline can end this.
    app = proxy(driver, fault.url, read_timeout=2, head_timeout=0.4)
    started = time.monotonic()
    assert driver.request(app, "GET", path, query=query).body == b"old GET "
    got = driver.request(app, "POST", path, query=query, body=b"order")
    assert time.monotonic() - started < 2.5
    assert got.status == 504 and got.body.startswith(b"Gateway Timeout")
    assert summary(driver) == [("new", 200, "UpstreamTimeout"), ("new", 504, "UpstreamTimeout")]
    assert driver.request(app, "GET", "/echo").status == 200  # the pool is still usable
    assert all(c.is_idle() or c.is_closed() for c in _pool_connections(driver.upstreams[-1]))


def test_a_head_within_the_head_timeout_is_not_cut(driver: Driver, fault: FaultServer) -> None:
    app = proxy(driver, fault.url, read_timeout=2, head_timeout=1.5)
    got = driver.request(app, "GET", "/trickle", query="s=0.3")
    assert (got.status, got.body) == (200, b"late") and got.header("x-trickle-0") == ["0"]
    got = driver.request(app, "GET", "/interim", query="n=3&s=0.05")
    assert (got.status, got.body) == (200, b"ok")


@pytest.mark.parametrize(
    ("path", "query", "target"),
    [
        pytest.param("/a b/ü", "", "/prefix/a%20b/%C3%BC", id="re-encoded"),
        pytest.param(
            "/x/../../etc/passwd", "", "/prefix/etc/passwd", id="dot segments stay below the prefix"
        ),
        pytest.param("//evil.example/x", "", "/prefix//evil.example/x", id="authority-like path"),
        pytest.param("/100%", "", "/prefix/100%25", id="percent sign"),
        pytest.param("/q", "a=1&b=%41#frag x", "/prefix/q?a=1&b=%41%23frag%20x", id="query"),
    ],
)
def test_the_target_is_configuration_plus_the_re_encoded_path(
    driver: Driver, fault: FaultServer, path: str, query: str, target: str
) -> None:
    app = proxy(driver, fault.url + "/prefix/")
    # WSGI carries the path as bytes in a latin-1 str; ASGI as decoded text.
    raw = path.encode("utf-8").decode("latin-1") if driver.kind == "wsgi" else path
    driver.request(app, "GET", raw, query=query, headers=[("Host", "evil.example")])
    assert request_lines(fault)[0] == f"get {target.lower()} http/1.1"


# -- failures ----------------------------------------------------------------------
def test_a_refused_connection_falls_back_to_old_for_any_method(driver: Driver) -> None:
    app = proxy(driver, refused_url())
    assert driver.request(app, "POST", "/form", body=b"x=1").body == b"old POST x=1"
    outcome = driver.outcome
    assert (outcome.variant, outcome.status, outcome.error, outcome.ok) == (
        "new",
        200,
        "UpstreamConnectError",
        False,
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_refused_streamed_upload_reaches_old_whole(driver: Driver, chunked: bool) -> None:
    app = proxy(driver, refused_url(), max_replay_body=100)
    body = bytes(range(256)) * 20
    assert driver.request(app, "POST", "/doc", body=body, chunked=chunked).body == b"old POST " + body
    assert summary(driver) == [("new", 200, "UpstreamConnectError")]


def test_without_fallback_a_refused_connection_is_a_502(driver: Driver) -> None:
    got = driver.request(proxy(driver, refused_url(), fallback=False), "GET", "/x")
    assert got.status == 502 and got.body.startswith(b"Bad Gateway")
    assert got.header("content-type") == ["text/plain; charset=utf-8"]
    assert summary(driver) == [("new", 502, "UpstreamConnectError")]


def test_a_connect_timeout_falls_back_or_is_a_504(driver: Driver) -> None:
    with blackhole() as url:
        assert driver.request(proxy(driver, url, connect_timeout=0.2), "DELETE", "/x").body == b"old DELETE "
        got = driver.request(proxy(driver, url, connect_timeout=0.2, fallback=False), "GET", "/x")
    assert got.status == 504 and got.body.startswith(b"Gateway Timeout")
    assert summary(driver) == [("new", 200, "UpstreamConnectTimeout"), ("new", 504, "UpstreamConnectTimeout")]


def test_a_timeout_after_sending_replays_only_idempotent_buffered_requests(
    driver: Driver, fault: FaultServer
) -> None:
    app = proxy(driver, fault.url, read_timeout=0.3)
    assert driver.request(app, "GET", "/delay", query="s=5").body == b"old GET "
    assert driver.request(app, "PUT", "/delay", query="s=5", body=b"doc").body == b"old PUT doc"
    got = driver.request(app, "POST", "/delay", query="s=5", body=b"order")
    assert got.status == 504 and got.body.startswith(b"Gateway Timeout")
    assert summary(driver) == [
        ("new", 200, "UpstreamTimeout"),
        ("new", 200, "UpstreamTimeout"),
        ("new", 504, "UpstreamTimeout"),
    ]


@pytest.mark.parametrize("how", ["close-before-response", "reset-before-response"])
def test_a_connection_lost_after_sending(driver: Driver, fault: FaultServer, how: str) -> None:
    app = proxy(driver, fault.url, max_replay_body=10)
    assert driver.request(app, "GET", f"/{how}").body == b"old GET "
    assert driver.request(app, "POST", f"/{how}", body=b"x").status == 502  # not idempotent
    assert driver.request(app, "PUT", f"/{how}", body=b"z" * 100).status == 502  # too big to replay
    assert summary(driver) == [
        ("new", 200, "UpstreamProtocolError"),
        ("new", 502, "UpstreamProtocolError"),
        ("new", 502, "UpstreamProtocolError"),
    ]


@pytest.mark.parametrize("how", ["reset-mid-body", "headers-then-close"])
def test_a_response_that_breaks_off_aborts_the_client_connection(
    driver: Driver, fault: FaultServer, how: str
) -> None:
    got = driver.request(proxy(driver, fault.url), "GET", f"/{how}")
    assert got.status == 200  # the head had gone out ...
    assert isinstance(got.error, UpstreamAborted)  # ... so the server must drop the connection
    assert len(got.body) < 1000
    assert not got.complete  # ASGI: never a final more_body=False
    assert summary(driver) == [("new", 200, "UpstreamAborted")]


def test_an_old_upstream_that_fails_counts_against_old(driver: Driver, uvicorn_upstream: str) -> None:
    app = driver.wrap(driver.upstream(refused_url()), driver.upstream(uvicorn_upstream), percent=0)
    got = driver.request(app, "GET", "/echo")
    assert got.status == 502
    assert summary(driver) == [("old", 502, "UpstreamConnectError")]


@pytest.mark.server
def test_a_new_upstream_falls_back_to_an_old_upstream(driver: Driver, uvicorn_upstream: str) -> None:
    app = driver.wrap(driver.upstream(uvicorn_upstream), driver.upstream(refused_url()), percent=100)
    got = driver.request(app, "POST", "/echo", body=b"abc")
    assert got.json()["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert summary(driver) == [("new", 200, "UpstreamConnectError")]


@pytest.mark.server
def test_a_pool_timeout_is_a_failure_not_a_hang(uvicorn_upstream: str) -> None:
    driver = WSGIDriver()
    try:
        up = driver.upstream(uvicorn_upstream, max_connections=1, pool_timeout=0.2, fallback=False)
        app = up.wsgi_app()
        holder = app({**_plain_environ("/stream"), "QUERY_STRING": "n=3"}, lambda s, h, e=None: None)
        try:
            got = driver.request(app, "GET", "/echo")
        finally:
            holder.close()  # type: ignore[attr-defined]
        assert got.status == 504
        assert driver.request(app, "GET", "/echo").status == 200  # the connection came back
    finally:
        driver.close()


def _plain_environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "front.example",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
    }


# -- the pool after many aborted requests ------------------------------------------------
def _pool_connections(up: Upstream) -> list[Any]:
    pools = [up._pool] if up._pool is not None else []
    pools += list(up._async_pools.values())
    return [c for pool in pools for c in pool.connections]  # type: ignore[union-attr]


@pytest.mark.server
def test_a_thousand_aborted_requests_leave_the_pool_usable(driver: Driver, uvicorn_upstream: str) -> None:
    up = driver.upstream(uvicorn_upstream, max_connections=4, pool_timeout=2)
    app = driver.wrap(driver.old(), up)
    modes = ["disconnect", "oserror", "cancel"]
    seen_whole: list[bool] = []
    for i in range(1000):
        path, query = ("/stream", "n=20") if i % 2 else ("/big", "size=200000")
        extra = {"abort": modes[i % 3]} if driver.kind == "asgi" else {}
        got = driver.request(app, "GET", path, query=query, max_chunks=1, **extra)
        assert got.status == 200 and got.body
        assert up.in_flight == 0
        seen_whole.append(got.complete)
    connections = _pool_connections(up)
    assert len(connections) <= 4 and all(c.is_idle() or c.is_closed() for c in connections)
    assert driver.request(app, "GET", "/echo").json()["method"] == "GET"
    outcomes = driver.sink.outcomes
    assert len(outcomes) == 1001 and all(o.variant == "new" and o.error is None for o in outcomes)
    exact = 0
    for i, (outcome, whole) in enumerate(zip(outcomes, seen_whole, strict=False)):
        if driver.kind == "wsgi":
            # The server stopped iterating after one chunk: never a finished response.
            assert outcome.disconnected, i
        elif modes[i % 3] == "oserror":
            # The next send failed: recorded exactly when the client missed the end.
            assert outcome.disconnected is not whole, i
            exact += not whole
        else:
            # Sends after the client left are dropped, as uvicorn drops them, so the proxy
            # learns of it only if its watcher or the cancellation lands before the last
            # byte went out (a race); it never records a disconnect that did not happen.
            assert not (whole and outcome.disconnected), i
    assert driver.kind == "wsgi" or exact >= 100  # the exact branch ran (long bodies always break off)


# -- ASGI specifics: lifespan and websockets -------------------------------------------------
@pytest.mark.server
def test_asgi_lifespan_closes_the_pool_of_its_loop(uvicorn_upstream: str) -> None:
    from ..harness import ASGIKit, TestClient

    up = Upstream(uvicorn_upstream)
    old = ASGIKit().echo("old")  # speaks lifespan, like any real app
    app = ASGICanaryMiddleware(old, new=up, rollout=Rollout("up", percent=100, secret_key=KEY))
    with TestClient(app) as client:
        assert client.get("/echo").json()["method"] == "GET"
        assert len(up._async_pools) == 1
    assert len(up._async_pools) == 0 and up.in_flight == 0


@pytest.mark.parametrize("fallback", [True, False])
def test_asgi_websockets_go_to_the_fallback_or_are_refused(fallback: bool) -> None:
    from ..harness import FakeServer, http_scope, run

    async def old(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    sink = RecordingSink()
    up = Upstream(refused_url(), fallback=fallback)
    mw = ASGICanaryMiddleware(old, new=up, rollout=Rollout("up", percent=100, secret_key=KEY), sink=sink)
    server = FakeServer([{"type": "websocket.connect"}], kind="websocket")
    scope = http_scope("/ws", type="websocket", scheme="ws")
    run(mw(scope, server.receive, server.send))
    [outcome] = sink.outcomes
    assert outcome.error == "UpstreamWebSocketUnsupported"
    if fallback:
        assert server.types == ["websocket.accept", "websocket.close"] and outcome.status == 101
    else:
        assert server.types == ["websocket.close"] and outcome.status == 403


# -- the proxy itself under real servers ---------------------------------------------------
@pytest.fixture(scope="module")
def module_fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture(scope="module", params=["gunicorn", "uvicorn"])
def served_proxy(
    request: pytest.FixtureRequest, uvicorn_upstream: str, module_fault: FaultServer
) -> Iterator[str]:
    """The proxy app under a real gunicorn (WSGI) or uvicorn (ASGI), to the uvicorn upstream."""
    port = free_port()
    env = {"CANARYMW_TEST_UPSTREAM": uvicorn_upstream, "CANARYMW_TEST_FAULT": module_fault.url}
    if request.param == "gunicorn":
        argv = ["gunicorn", "-w", "1", "-k", "gthread", "--threads", "8", "-b", f"127.0.0.1:{port}"]
        argv += ["--log-level", "critical", "tests.apps.upstream_proxy:wsgi_app"]
    else:
        argv = ["uvicorn", "--factory", "tests.apps.upstream_proxy:asgi_app", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--log-level", "critical", "--no-access-log"]
    with serve(argv, port, env=env, ready_path="/_outcomes") as base:
        yield base


def _outcomes(base: str) -> list[dict[str, Any]]:
    return list(httpx.get(base + "/_outcomes", timeout=5).json())


@pytest.mark.server
def test_served_proxy_forwards_methods_bodies_and_streams(served_proxy: str) -> None:
    with httpx.Client(base_url=served_proxy, timeout=10) as client:
        echo = client.get("/echo", params={"q": "1"}).json()
        assert (echo["server"], echo["path"], echo["query"]) == ("uvicorn", "/echo", "q=1")
        assert echo["headers"]["x-forwarded-for"] == "127.0.0.1" and echo["headers"]["via"] == "1.1 canarymw"
        body = bytes(range(256)) * 400
        posted = client.post("/echo", content=iter([body[:50_000], body[50_000:]])).json()  # chunked upload
        assert (posted["length"], posted["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        assert client.head("/echo").status_code == 200
        started = time.monotonic()
        with client.stream("GET", "/stream", params={"n": "3", "delay": "0.3"}) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            waited = time.monotonic() - started
            rest = b"".join(chunks)
        assert first.startswith(b"chunk 0") and waited < 0.5 and (first + rest).endswith(b"chunk 2\n")


@pytest.mark.server
def test_served_proxy_keeps_concurrent_requests_apart(served_proxy: str) -> None:
    # 16 clients at once through pooled upstream connections: every answer must be the
    # one to its own request (a pool that mixed them up would leak one user's data).
    wrong: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=served_proxy, timeout=20) as c:
            for j in range(25):
                body = f"client {i} request {j}|".encode() * (1 + (i * 7 + j) % 300)
                got = c.post("/echo", content=body, headers={"x-client": f"{i}-{j}"}).json()
                if (
                    got["sha256"] != hashlib.sha256(body).hexdigest()
                    or got["headers"]["x-client"] != f"{i}-{j}"
                ):
                    wrong.append(f"{i}-{j}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.mark.server
def test_served_proxy_ignores_absolute_form_targets_and_host(served_proxy: str) -> None:
    port = int(served_proxy.rsplit(":", 1)[1])
    request = (
        b"GET http://evil.example:1/echo?x=1 HTTP/1.1\r\nHost: evil.example:1\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    echo = json.loads(body)
    assert (echo["server"], echo["path"], echo["raw"]) == ("uvicorn", "/echo", "/echo")


@pytest.mark.server
def test_served_proxy_aborts_the_client_connection_when_the_upstream_breaks_off(served_proxy: str) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(served_proxy + "/fault/reset-mid-body", timeout=10)
    deadline = time.monotonic() + 5
    while not any(o["error"] == "UpstreamAborted" for o in _outcomes(served_proxy)):
        assert time.monotonic() < deadline, _outcomes(served_proxy)
        time.sleep(0.05)


@pytest.mark.server
def test_served_proxy_closes_the_upstream_event_stream_when_the_client_leaves(
    served_proxy: str, uvicorn_upstream: str
) -> None:
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", served_proxy + "/sse", params={"interval": "0.05"}) as response:
            assert response.headers["content-type"] == "text/event-stream"
            events = []
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                if len(events) == 3:
                    break
        deadline = time.monotonic() + 5
        while client.get(uvicorn_upstream + "/sse-open").text != "0":
            assert time.monotonic() < deadline, "the upstream event stream was never closed"
            time.sleep(0.05)
    assert events == ["data: 0", "data: 1", "data: 2"]


def _one_connection(base: str, targets: Sequence[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """GET each target in turn on one kept-alive client connection, read by h11 (a strict client)."""
    import h11

    port = int(base.rsplit(":", 1)[1])
    answers: list[tuple[int, dict[str, str], bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        client = h11.Connection(h11.CLIENT)
        for i, target in enumerate(targets):
            headers = [("Host", "front.example")]
            if i == len(targets) - 1:
                headers.append(("Connection", "close"))
            data = client.send(h11.Request(method="GET", target=target, headers=headers))
            sock.sendall(data + (client.send(h11.EndOfMessage()) or b""))
            status, fields, body = 0, {}, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    fields = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"response {i} ({target}) ended with {event!r}")
            answers.append((status, fields, body))
            if i < len(targets) - 1:
                client.start_next_cycle()
    return answers


@pytest.mark.server
def test_served_proxy_keeps_a_kept_alive_connection_in_step_when_the_upstream_sends_te_and_cl(
    served_proxy: str,
) -> None:
    # A Content-Length passed on next to chunked framing makes gunicorn cut the body to
    # it (or the client wait for bytes that belong to the next response), and makes
    # uvicorn tear the connection down. Each answer must be its own, whole.
    answers = _one_connection(
        served_proxy, ["/fault/te-and-cl?cl=2", "/fault/te-and-cl?cl=1000", "/fault/gzip-chunked", "/echo"]
    )
    assert [(status, body) for status, _, body in answers[:2]] == [(200, b"hello world")] * 2
    assert all("content-length" not in fields for _, fields, _ in answers[:2])
    assert answers[2][0] == 502 and answers[2][2].startswith(b"Bad Gateway")
    assert answers[3][0] == 200 and json.loads(answers[3][2])["path"] == "/echo"


@pytest.mark.server
def test_the_wsgi_proxy_needs_no_optional_client(
    uvicorn_upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "httpcore", None)  # `import httpcore` now fails
    monkeypatch.setitem(sys.modules, "httpx", None)
    driver = WSGIDriver()
    try:
        app = driver.wrap(driver.old(), driver.upstream(uvicorn_upstream))
        got = driver.request(app, "POST", "/echo", body=b"payload")
        assert got.status == 200 and got.json()["sha256"] == hashlib.sha256(b"payload").hexdigest()
        broken = driver.wrap(driver.old(), driver.upstream(refused_url()))
        assert driver.request(broken, "GET", "/x").body == b"old GET "
        assert [o.error for o in driver.sink.outcomes] == [None, "UpstreamConnectError"]
    finally:
        driver.close()


# -- https upstreams ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    """A uvicorn upstream serving https with a certificate from a throwaway CA."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    key, chain = folder / "key.pem", folder / "cert.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    port = free_port()
    argv = ["uvicorn", "tests.apps.upstream_asgi:app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning", "--no-access-log"]
    argv += ["--ssl-keyfile", str(key), "--ssl-certfile", str(chain)]
    with serve(argv, port, ready_path="/healthz", tls=True) as base:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        yield base, context


@pytest.mark.server
def test_an_https_upstream_is_verified_pooled_and_streamed(
    driver: Driver, tls_upstream: tuple[str, ssl.SSLContext]
) -> None:
    base, context = tls_upstream
    up = driver.upstream(base, ssl_context=context)
    app = driver.wrap(driver.old(), up)
    for _ in range(3):
        got = driver.request(app, "POST", "/echo", body=b"secret")
        assert got.json()["sha256"] == hashlib.sha256(b"secret").hexdigest()
    started = time.monotonic()
    streamed = driver.request(app, "GET", "/stream", query="n=3&delay=0.2")
    assert streamed.body == b"chunk 0\nchunk 1\nchunk 2\n"
    first, last = streamed.chunk_times[0] - started, streamed.chunk_times[-1] - started
    assert first < 0.3 and last >= 0.35, (first, last)  # chunks arrive as they are made
    # A read timeout mid-body over TLS aborts the client connection.
    slow = driver.wrap(driver.old(), driver.upstream(base, ssl_context=context, read_timeout=0.3))
    broken = driver.request(slow, "GET", "/stream", query="n=2&delay=1")
    assert broken.body == b"chunk 0\n" and isinstance(broken.error, UpstreamAborted)
    assert len(_pool_connections(up)) == 1  # one TLS handshake, then reuse
    # An upstream whose certificate does not verify is never talked to: old serves.
    untrusted = driver.wrap(driver.old(), driver.upstream(base))
    assert driver.request(untrusted, "GET", "/echo").body == b"old GET "
    assert summary(driver)[-1] == ("new", 200, "UpstreamConnectError")
