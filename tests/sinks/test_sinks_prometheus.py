"""PrometheusSink: bounded labels, batch == one by one, health counters, gunicorn multiprocess sums."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from canarymw import MemorySink, Outcome, Rollout, WSGICanaryMiddleware  # noqa: E402
from canarymw.sinks import DEFAULT_BUCKETS, BackgroundSink, CallableSink  # noqa: E402
from canarymw.sinks.prometheus import PrometheusSink  # noqa: E402

from ..harness import WSGITransport, make_outcome  # noqa: E402
from ..servers import ROOT, free_port, serve  # noqa: E402

KEY = "test-secret-key-0123456789abcdef"


def outcome(variant: str = "new", status: int | None = 200, duration: float = 0.02, **kw: Any) -> Outcome:
    return make_outcome(variant, status, duration, **{"route": "/items/<id>", **kw})


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        v for (n, lab), v in samples(registry).items() if n == name and labels.items() <= dict(lab).items()
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_counts_and_histogram_by_rollout_variant_and_outcome(registry: CollectorRegistry) -> None:
    sink = PrometheusSink(registry=registry)
    sink.record(outcome("new", 200, 0.003))
    sink.record(outcome("new", 503, 0.2))
    sink.record(outcome("old", 200, 0.04, disconnected=True))
    sink.record(outcome("old", None, 1.5, error="KeyError"))
    got = samples(registry)
    assert value(registry, "canarymw_requests_total") == 4
    assert value(registry, "canarymw_requests_total", variant="new", outcome="2xx") == 1
    assert value(registry, "canarymw_requests_total", variant="new", outcome="5xx") == 1
    assert value(registry, "canarymw_requests_total", variant="old", outcome="disconnect") == 1
    assert value(registry, "canarymw_requests_total", variant="old", outcome="exception") == 1
    assert value(registry, "canarymw_request_duration_seconds_count") == 4
    assert value(registry, "canarymw_request_duration_seconds_sum") == pytest.approx(1.743)
    new_2xx = {"rollout": "r", "variant": "new", "outcome": "2xx"}
    assert value(registry, "canarymw_request_duration_seconds_bucket", le="0.0025", **new_2xx) == 0
    assert value(registry, "canarymw_request_duration_seconds_bucket", le="0.005", **new_2xx) == 1
    bounds = {dict(lab)["le"] for (n, lab) in got if n.endswith("_bucket")}
    assert bounds == {str(b) for b in DEFAULT_BUCKETS} | {"+Inf"}
    # Only bounded labels: never the route, the method, a user or a cookie.
    names = {k for (_, lab) in got for k, _ in lab}
    assert names <= {"rollout", "variant", "outcome", "le", "event", "stage"}


def test_record_many_equals_one_by_one() -> None:
    rng = random.Random(4)
    batch = [
        outcome(
            rng.choice(["old", "new"]),
            rng.choice([200, 200, 302, 404, 500, None]),
            rng.choice([0.0, 1e-6, 0.001, 0.0025, 0.01, 0.3, 7.0, 31.0, 1e9, -1.0, float("nan")]),
            error=rng.choice([None, None, None, "Boom"]),
            disconnected=rng.random() < 0.1,
            rollout=rng.choice(["a", "b"]),
        )
        for _ in range(3000)
    ]
    one, many, fallback = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    s1 = PrometheusSink(registry=one)
    for o in batch:
        s1.record(o)
    s2 = PrometheusSink(registry=many)
    for i in range(0, len(batch), 256):
        s2.record_many(batch[i : i + 256])
    s3 = PrometheusSink(registry=fallback)
    s3.record_many(batch[:1])
    for series in s3._series.values():
        series.raw = None  # as if prometheus_client's internals had changed
    s3.record_many(batch[1:])
    expected = samples(one)
    for got in (samples(many), samples(fallback)):
        assert got.keys() == expected.keys()
        for key, v in expected.items():
            assert got[key] == pytest.approx(v), key


def test_is_thread_safe(registry: CollectorRegistry) -> None:
    sink = PrometheusSink(registry=registry)

    def work() -> None:
        for i in range(2000):
            if i % 2:
                sink.record(outcome())
            else:
                sink.record_many([outcome()])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(registry, "canarymw_requests_total") == 8000
    assert value(registry, "canarymw_request_duration_seconds_count") == 8000


def test_configuration_errors(registry: CollectorRegistry) -> None:
    PrometheusSink(registry=registry)
    with pytest.raises(ValueError, match="one PrometheusSink per registry"):
        PrometheusSink(registry=registry)
    with pytest.raises(ValueError, match="increasing"):
        PrometheusSink(registry=CollectorRegistry(), buckets=[0.1, 0.05])
    with pytest.raises(ValueError, match="increasing"):
        PrometheusSink(registry=CollectorRegistry(), buckets=[])
    custom = CollectorRegistry()
    PrometheusSink(registry=custom, namespace="shop", buckets=[0.1, 1.0, float("inf")]).record(outcome())
    assert value(custom, "shop_requests_total") == 1
    assert value(custom, "shop_request_duration_seconds_bucket", le="1.0") == 1
    assert repr(PrometheusSink(registry=None)) == "PrometheusSink(namespace='canarymw')"


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_health_counters_of_watched_objects(registry: CollectorRegistry) -> None:
    rollout = Rollout("health", percent=50, secret_key=KEY)

    def broken(o: Outcome) -> None:
        raise RuntimeError("down")

    prom = PrometheusSink(registry=registry)
    gate, entered = threading.Event(), threading.Event()

    def block(o: Outcome) -> None:
        entered.set()
        gate.wait(10)

    blocked = CallableSink(block)
    bg = BackgroundSink(prom, CallableSink(broken), blocked, maxsize=3)
    request_side = CallableSink(broken)
    mw = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=[bg, MemorySink()])
    mw_direct = WSGICanaryMiddleware(_app, new=_app, rollout=rollout, sink=request_side)
    prom.watch(mw, mw_direct, rollout, bg)  # duplicates are counted once
    # Before traffic every (variant, outcome) of the rollout already exists at zero.
    assert value(registry, "canarymw_requests_total", rollout="health", outcome="5xx") == 0
    assert ("canarymw_requests_total", (("outcome", "5xx"), ("rollout", "health"), ("variant", "new"))) in (
        samples(registry)
    )
    try:
        bg.record(outcome(rollout="health"))
        assert entered.wait(5)  # the consumer now holds that outcome, stuck in `blocked`
        with httpx.Client(transport=WSGITransport(mw), base_url="http://t") as client:
            client.get("/", headers={"Cookie": "canarymw=forged.value"})
            client.cookies.clear()
            for _ in range(9):
                client.get("/")
                client.cookies.clear()
        with httpx.Client(transport=WSGITransport(mw_direct), base_url="http://t") as client:
            client.get("/")
        prom.flush()
        events = {"rollout": "health"}
        assert value(registry, "canarymw_rollout_events_total", event="cookie_rejected", **events) == 1
        assert value(registry, "canarymw_rollout_events_total", event="assigned", **events) == 11
        assert value(registry, "canarymw_rollout_percent", rollout="health") == 50
        assert value(registry, "canarymw_sink_errors_total", stage="request") == 1  # mw_direct's sink raised
        # Of the 10 routed outcomes 3 wait in the queue and 7 were dropped.
        assert value(registry, "canarymw_outcomes_dropped_total") == bg.dropped == 7
        assert value(registry, "canarymw_queue_depth") == bg.depth == 3
        rollout.percent = 75
        prom.flush()
        assert value(registry, "canarymw_rollout_percent", rollout="health") == 75
    finally:
        gate.set()
        assert bg.flush(timeout=5)
    # The consumer calls flush() once the queue is drained: health follows by itself.
    assert value(registry, "canarymw_queue_depth") == 0
    assert value(registry, "canarymw_sink_errors_total", stage="background") == bg.errors == 4
    assert value(registry, "canarymw_requests_total", rollout="health") == 4
    bg.close()
    with pytest.raises(TypeError, match="cannot watch"):
        prom.watch("rollout name")


def test_counter_sync_survives_a_source_restarting_from_zero(registry: CollectorRegistry) -> None:
    rollout = Rollout("fork", percent=5, secret_key=KEY)
    prom = PrometheusSink(registry=registry, watch=[rollout], health_interval=0)
    rollout.counters["assigned"] = 10
    prom.record(outcome(rollout="fork"))  # record() syncs when health_interval has passed
    assert value(registry, "canarymw_rollout_events_total", event="assigned") == 10
    rollout.counters["assigned"] = 3  # e.g. a fresh child process: counts again from zero
    prom.flush()
    assert value(registry, "canarymw_rollout_events_total", event="assigned") == 13


# -- a real gunicorn with 2 workers, scraped over loopback --------------------------------
@pytest.fixture
def gunicorn_prometheus(tmp_path: Path) -> Iterator[str]:
    pytest.importorskip("gunicorn")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    (multiproc / "gauge_livesum_999999.db").write_bytes(b"")  # stale file: on_starting clears it
    port = free_port()
    argv = [
        "gunicorn",
        "-c",
        str(ROOT / "examples" / "prometheus" / "gunicorn.conf.py"),
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        "2",
        "examples.prometheus.app:app",
    ]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "CANARY_PERCENT": "50", "LOGLEVEL": "warning"}
    with serve(argv, port, env=env, ready_path="/metrics") as base:
        yield base


def _scrape(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "set-cookie" not in response.headers  # excluded: never routed, no cohort cookie
    by_variant: Counter[str] = Counter()
    hist_count = 0.0
    assigned = dropped = depth = 0.0
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name == "canarymw_requests_total":
                by_variant[s.labels["variant"]] += int(s.value)
            elif s.name == "canarymw_request_duration_seconds_count":
                hist_count += s.value
            elif s.name == "canarymw_rollout_events_total" and s.labels["event"] == "assigned":
                assigned += s.value
            elif s.name == "canarymw_outcomes_dropped_total":
                dropped += s.value
            elif s.name == "canarymw_queue_depth":
                depth += s.value
    return {
        "variants": by_variant,
        "count": hist_count,
        "assigned": assigned,
        "dropped": dropped,
        "depth": depth,
    }


@pytest.mark.server
def test_gunicorn_multiprocess_scrape_sums_every_worker(gunicorn_prometheus: str) -> None:
    n = 240
    pool_of_clients: queue.Queue[httpx.Client] = queue.Queue()
    for _ in range(8):
        pool_of_clients.put(httpx.Client(base_url=gunicorn_prometheus, timeout=10))

    def hit(_: int) -> tuple[str, str]:
        client = pool_of_clients.get()
        try:
            client.cookies.clear()  # every request is a new visitor
            response = client.get("/")
        finally:
            pool_of_clients.put(client)
        assert response.status_code == 200
        return response.headers["x-variant"], response.headers["x-worker"]

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(hit, range(n)))
    finally:
        while not pool_of_clients.empty():
            pool_of_clients.get().close()
    seen = Counter(variant for variant, _ in results)
    assert len({pid for _, pid in results}) == 2, "both workers should have served traffic"
    assert set(seen) == {"old", "new"}

    with httpx.Client(base_url=gunicorn_prometheus, timeout=10) as client:
        deadline = time.monotonic() + 15
        while True:
            got = _scrape(client)
            if sum(got["variants"].values()) >= n and got["assigned"] >= n and got["depth"] == 0:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        time.sleep(0.3)  # nothing else may trickle in: the scrapes themselves are never counted
        got = _scrape(client)
    assert got["variants"] == seen
    assert got["count"] == n
    assert got["assigned"] == n
    assert got["dropped"] == 0
