"""An ASGI upstream for real-server tests (uvicorn): the routes of ``upstream_wsgi`` plus events.

Extra routes:
    /sse?interval=     server-sent events, one every ``interval`` seconds, until the client goes
    /sse-open          how many /sse responses are running right now (0 once clients left)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs

_open_streams = 0

# Tests abort thousands of responses on purpose, and asyncio warns about every write to
# a socket that is gone. The test servers' stderr is a pipe read only when they stop:
# once full, the server would block on it.
logging.getLogger("asyncio").setLevel(logging.ERROR)


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _open_streams
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    text = [(b"content-type", b"text/plain")]
    if path == "/healthz":
        await _send(send, 200, b"ok", text)
    elif path == "/sse-open":
        await _send(send, 200, str(_open_streams).encode(), text)
    elif path == "/sse":
        interval = float(query.get("interval", "0.05"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")],
            }
        )
        _open_streams += 1
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            i = 0
            while not gone.is_set():
                await send(
                    {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
                )
                i += 1
                try:
                    await asyncio.wait_for(gone.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            _open_streams -= 1
            watcher.cancel()
    elif path == "/stream":
        n, delay = int(query.get("n", "5")), float(query.get("delay", "0"))
        await send({"type": "http.response.start", "status": 200, "headers": text})
        for i in range(n):
            if i and delay:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": f"chunk {i}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":
        await _send(
            send,
            200,
            b"x" * int(query.get("size", "100000")),
            [(b"content-type", b"application/octet-stream")],
        )
    elif path == "/cookies":
        cookies = [b"a=1; Path=/", b"b=2; Path=/; HttpOnly", b"c=3, with a comma; Path=/"]
        await _send(send, 200, b"cookies", [*text, *((b"set-cookie", c) for c in cookies)])
    elif path == "/login":
        user = query.get("user", "nobody").encode()
        await _send(send, 200, b"in", [*text, (b"set-cookie", b"session=" + user + b"; Path=/")])
    elif path == "/redirect":
        await _send(send, 302, b"", [*text, (b"location", b"/echo")])
    elif path == "/status":
        await _send(send, int(query.get("code", "200")), b"", text)
    else:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            headers[key] = (
                f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
            )
        data = {
            "server": "uvicorn",
            "method": scope["method"],
            "path": path,
            "raw": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        await _send(send, 200, json.dumps(data).encode(), [(b"content-type", b"application/json")])
