"""A Flask app with one split route, for a real-server test of canarymw.flask."""

from __future__ import annotations

import os

from flask import Flask, jsonify

from canarymw import MemorySink
from canarymw.flask import Canary, current_variant

app = Flask(__name__)
app.config.update(
    CANARYMW_NAME="split-v2",
    CANARYMW_PERCENT=40,
    CANARYMW_SECRET_KEY="test-secret-key-0123456789abcdef",
    CANARYMW_EXCLUDE=["/stats"],
)
sink = MemorySink()
canary = Canary(app, sink=sink)


def greet_v2(name: str) -> str:
    return f"v2 {name} {current_variant()} {os.getpid()}"


@app.route("/greet/<name>")
@canary.split(new=greet_v2)
def greet(name: str) -> str:
    return f"v1 {name} {current_variant()} {os.getpid()}"


@app.route("/about")
def about() -> str:
    return f"about {os.getpid()}"


@app.route("/stats")
def stats() -> object:
    return jsonify({v: s.requests for v, s in sink.snapshot().items()} | {"pid": os.getpid()})
