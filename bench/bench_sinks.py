"""What outcome sinks cost: on the request path (enqueue only) and in the background consumer.

    python bench/bench_sinks.py            # about 20 s
    python bench/bench_sinks.py --quick    # fewer rounds, for a smoke run

Request path: nanoseconds per ``record()`` as the middleware calls it, median over
rounds. "enqueue only" is ``BackgroundSink.record`` while its consumer is parked (so
the figure is the append alone, whatever the wrapped sink); "with consumer" is the
wall time per outcome while the consumer drains into the sink at the same time on
the same GIL, i.e. the total CPU an outcome costs the process. "direct" is the sink's
own ``record()`` called on the request path without the wrapper.

Consumer: outcomes per second the background thread delivers, timed from the release
of a pre-filled queue to the end of ``flush()``; PrometheusSink both in single-process
and in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, as under gunicorn).

Needs the prometheus and otel extras (``pip install -e '.[prometheus,otel]'``);
sinks whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from canarymw import MemorySink, Outcome
from canarymw.sinks import BackgroundSink
from canarymw.sinks.jsonl import JSONLinesSink

OUTCOMES = [
    Outcome("checkout-v2", "new" if i % 3 else "old", (200, 200, 200, 404, 500)[i % 5], 0.0005 * (i % 200),
            None, False, "GET", "/cart/<id>", 1.7e9 + i)
    for i in range(1024)
]  # fmt: skip


class Null:
    def record(self, outcome: Outcome) -> None:
        pass


class Gate:
    """Parks the consumer until released, so the queue can be filled undisturbed."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = True

    def record(self, outcome: Outcome) -> None:
        if self.armed:
            self.entered.set()
            self.release.wait()
            self.armed = False


def per_record_ns(record: Callable[[Outcome], None], n: int) -> float:
    outs = OUTCOMES
    mask = len(outs) - 1
    t0 = time.perf_counter_ns()
    for i in range(n):
        record(outs[i & mask])
    return (time.perf_counter_ns() - t0) / n


def enqueue_only(sink: Any, n: int, rounds: int) -> float:
    results = []
    for _ in range(rounds):
        gate = Gate()
        bg = BackgroundSink(gate, sink, maxsize=n + 10)
        bg.record(OUTCOMES[0])
        gate.entered.wait()
        results.append(per_record_ns(bg.record, n))
        gate.release.set()
        bg.close(timeout=60)
    return statistics.median(results)


def with_consumer(sink: Any, n: int, rounds: int) -> float:
    results = []
    for _ in range(rounds):
        bg = BackgroundSink(sink, maxsize=n + 10)
        t0 = time.perf_counter_ns()
        for i in range(n):
            bg.record(OUTCOMES[i & 1023])
        bg.flush(timeout=120)
        results.append((time.perf_counter_ns() - t0) / n)
        bg.close()
    return statistics.median(results)


def dropping(n: int, rounds: int) -> float:
    results = []
    for _ in range(rounds):
        gate = Gate()
        bg = BackgroundSink(gate, maxsize=1, log_interval=3600)
        bg.record(OUTCOMES[0])
        gate.entered.wait()
        bg.record(OUTCOMES[0])
        results.append(per_record_ns(bg.record, n))
        gate.release.set()
        bg.close()
    return statistics.median(results)


def consumer_rate(sink: Any, n: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        gate = Gate()
        bg = BackgroundSink(gate, sink, maxsize=n + 10)
        bg.record(OUTCOMES[0])
        gate.entered.wait()
        for i in range(n):
            bg.record(OUTCOMES[i & 1023])
        t0 = time.perf_counter()
        gate.release.set()
        bg.flush(timeout=300)
        rates.append(n / (time.perf_counter() - t0))
        bg.close()
    return statistics.median(rates)


def prometheus_figures(n: int, rounds: int) -> dict[str, float]:
    """Run in a child process: the multiprocess switch is read when prometheus_client is imported."""
    from prometheus_client import CollectorRegistry

    from canarymw.sinks.prometheus import PrometheusSink

    sink = PrometheusSink(registry=CollectorRegistry())
    direct = statistics.median(per_record_ns(sink.record, n // 4) for _ in range(rounds))
    return {
        "direct_ns": direct,
        "with_consumer_ns": with_consumer(sink, n, rounds),
        "consumer_per_s": consumer_rate(sink, n, rounds),
    }


def run_prometheus(mode: str, n: int, rounds: int) -> dict[str, float] | None:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = tmp
        proc = subprocess.run(
            [sys.executable, __file__, "--prometheus-child", str(n), str(rounds)],
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        print(f"  prometheus ({mode}) skipped: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    figures: dict[str, float] = json.loads(proc.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--prometheus-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prometheus_child:
        print(json.dumps(prometheus_figures(*args.prometheus_child)))
        return
    n, rounds = (50_000, 3) if args.quick else (200_000, 5)
    logging.getLogger("canarymw").setLevel(logging.ERROR)  # the drop rounds warn by design
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {n} outcomes per round, median of {rounds}"
    )

    def row(label: str, value: float, unit: str = "ns") -> None:
        print(f"  {label:<50} {value:>10,.0f} {unit}")

    print("\nrequest path, per outcome")
    row(
        "MemorySink.record (no wrapper)",
        statistics.median(per_record_ns(MemorySink().record, n) for _ in range(rounds)),
    )
    row("BackgroundSink.record, enqueue only", enqueue_only(Null(), n, rounds))
    row("BackgroundSink.record, queue full (drop)", dropping(n, rounds))
    row("BackgroundSink(no-op sink), with consumer", with_consumer(Null(), n, rounds))
    row("BackgroundSink(MemorySink), with consumer", with_consumer(MemorySink(), n, rounds))
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = JSONLinesSink(tmp, max_bytes=0)
        row("JSONLinesSink.record (direct: one write() each)", per_record_ns(jsonl.record, n // 10))
        row("BackgroundSink(JSONLinesSink), with consumer", with_consumer(jsonl, n, rounds))
        jsonl_rate = consumer_rate(jsonl, n, rounds)
        jsonl.close()
    otel_rate = None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from canarymw.sinks.otel import OpenTelemetrySink
    except ImportError:
        print("  OpenTelemetrySink skipped: install the otel extra and opentelemetry-sdk")
    else:
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        otel = OpenTelemetrySink(meter_provider=provider)
        row("OpenTelemetrySink.record (direct)", per_record_ns(otel.record, n // 10))
        row("BackgroundSink(OpenTelemetrySink), with consumer", with_consumer(otel, n // 4, rounds))
        otel_rate = consumer_rate(otel, n // 4, rounds)
        provider.shutdown()
    prom = {mode: run_prometheus(mode, n, rounds) for mode in ("single-process", "multiprocess")}
    for mode, figures in prom.items():
        if figures:
            row(f"PrometheusSink.record (direct, {mode})", figures["direct_ns"])
            row(f"BackgroundSink(PrometheusSink), {mode}", figures["with_consumer_ns"])

    print("\nbackground consumer throughput")
    for mode, figures in prom.items():
        if figures:
            row(f"PrometheusSink, {mode}", figures["consumer_per_s"], "outcomes/s")
    row("JSONLinesSink", jsonl_rate, "outcomes/s")
    if otel_rate is not None:
        row("OpenTelemetrySink (SDK with an in-memory reader)", otel_rate, "outcomes/s")


if __name__ == "__main__":
    main()
