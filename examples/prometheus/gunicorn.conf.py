"""gunicorn settings for canarymw + Prometheus with several worker processes.

Each worker counts its own outcomes; prometheus_client's multiprocess mode keeps the
counts in files under PROMETHEUS_MULTIPROC_DIR so that a scrape served by any worker
sums them all. The directory must exist, be empty at start (stale files from a
previous run would be added in) and be set in the environment before gunicorn
starts, because prometheus_client reads it when first imported.

    export PROMETHEUS_MULTIPROC_DIR=/run/myapp/prometheus
    gunicorn -c examples/prometheus/gunicorn.conf.py examples.prometheus.app:app
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
loglevel = os.environ.get("LOGLEVEL", "warning")


def on_starting(server: Any) -> None:
    """Fail early without the directory, and clear what a previous run left."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        raise RuntimeError("set PROMETHEUS_MULTIPROC_DIR to an empty directory before starting gunicorn")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # only prometheus_client's files
        stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (queue depth, percent); its counters stay summed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
