"""A canary whose outcomes Prometheus scrapes, summed over every gunicorn worker.

    export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)
    gunicorn -c examples/prometheus/gunicorn.conf.py examples.prometheus.app:app
    curl -s localhost:8000/ ; curl -s localhost:8000/metrics | grep canarymw_

``/metrics`` is excluded from the rollout: it is never routed, gets no cookie and is
not counted. Without PROMETHEUS_MULTIPROC_DIR (a single process, e.g. ``python -m
examples.prometheus.app``) the same code serves the process's own registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.sinks import BackgroundSink
from canarymw.sinks.prometheus import PrometheusSink

StartResponse = Callable[..., Any]

rollout = Rollout(
    "hello-v2",
    percent=float(os.environ.get("CANARY_PERCENT", "50")),
    secret_key=os.environ.get("CANARY_SECRET_KEY", "change-me-to-a-long-random-secret"),
    exclude=["/metrics"],
)


def metrics(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        # A fresh registry per scrape that reads every worker's files.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
    return [body]


def variant_app(name: str) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return metrics(environ, start_response)
        body = f"hello from {name}\n".encode()
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("X-Variant", name),
                ("X-Worker", str(os.getpid())),
            ],
        )
        return [body]

    return app


prom = PrometheusSink()
sink = BackgroundSink(prom)
app = WSGICanaryMiddleware(variant_app("old"), new=variant_app("new"), rollout=rollout, sink=sink)
prom.watch(app)  # health counters: cohort events, sink errors, drops, queue depth
# Queued outcomes are delivered when a worker exits (BackgroundSink's atexit hook).


if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    with make_server("127.0.0.1", 8000, app) as server:
        print("serving on http://127.0.0.1:8000 (metrics at /metrics)")
        server.serve_forever()
