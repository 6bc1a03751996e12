"""A WSGI upstream for real-server tests (gunicorn): echoes requests, streams, sets cookies.

Routes (any method unless noted):
    /echo, anything else   JSON: method, path, raw target, query, headers, body length and sha256
    /stream?n=&delay=      n chunks "chunk i\\n", ``delay`` seconds apart (chunked, no length)
    /big?size=             ``size`` bytes with a Content-Length
    /cookies               three Set-Cookie headers
    /login?user=           Set-Cookie: session=<user>
    /redirect              302 to /echo
    /status?code=          an empty response with that status
    /healthz               ok
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs


def _json(start_response: Any, data: dict[str, Any], status: str = "200 OK") -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes] | list[bytes]:
    path = environ.get("PATH_INFO", "")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/stream":
        n, delay = int(query.get("n", "5")), float(query.get("delay", "0"))
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks() -> Iterator[bytes]:
            for i in range(n):
                if i and delay:
                    time.sleep(delay)
                yield f"chunk {i}\n".encode()

        return chunks()
    if path == "/big":
        size = int(query.get("size", "100000"))
        start_response(
            "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        )
        return [b"x" * size]
    if path == "/cookies":
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                ("Set-Cookie", "c=3, with a comma; Path=/"),
                ("Content-Length", "7"),
            ],
        )
        return [b"cookies"]
    if path == "/login":
        user = query.get("user", "nobody")
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Set-Cookie", f"session={user}; Path=/"),
                ("Content-Length", "2"),
            ],
        )
        return [b"in"]
    if path == "/redirect":
        start_response(
            "302 Found", [("Location", "/echo"), ("Content-Type", "text/plain"), ("Content-Length", "0")]
        )
        return []
    if path == "/status":
        code = int(query.get("code", "200"))
        start_response(f"{code} Whatever", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return []
    body = environ["wsgi.input"].read()
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    return _json(
        start_response,
        {
            "server": "gunicorn",
            "pid": os.getpid(),
            "method": environ["REQUEST_METHOD"],
            "path": path,
            "raw": environ.get("RAW_URI"),
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        },
    )
