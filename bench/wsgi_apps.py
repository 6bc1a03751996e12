"""Apps served by ``bench_wsgi.py --gunicorn``: the same Flask hello, bare and wrapped."""

from __future__ import annotations

import os

from flask import Flask

from canarymw import MemorySink, Rollout, WSGICanaryMiddleware


def _hello(label: str) -> Flask:
    app = Flask(label)
    app.add_url_rule("/", "index", lambda: f"Hello, {label} World!")
    return app


_blue, _green = _hello("Blue"), _hello("Green")
bare = _blue.wsgi_app
wrapped = WSGICanaryMiddleware(
    _blue.wsgi_app,
    new=_green.wsgi_app,
    rollout=Rollout("hello-v2", percent=10, secret_key=os.environ.get("BENCH_KEY", "bench")),
    sink=MemorySink(),
)
