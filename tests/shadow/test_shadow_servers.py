"""Shadow traffic under real servers (gunicorn for WSGI, uvicorn for ASGI): a mismatching,
a slow and a failing shadow, and an Upstream as the shadow; the user's responses never
change, and a slow shadow leaves the primary's latency as it was (a generous bound here,
the honest measurement is bench/bench_shadow.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ..servers import free_port, gunicorn, serve

SERVERS = ["gunicorn", "uvicorn"]
pytestmark = pytest.mark.server


@contextlib.contextmanager
def server(kind: str, mode: str, url: str = "", app: str = "") -> Iterator[str]:
    """The primary of tests/apps/shadow_servers.py with shadow ``mode``, one worker."""
    port = free_port()
    env = {"CANARYMW_SHADOW_MODE": mode, "CANARYMW_SHADOW_URL": url}
    if kind == "gunicorn":
        argv = gunicorn(f"tests.apps.shadow_servers:{app or 'wsgi_app'}", port, workers=1)
    else:
        argv = ["uvicorn", f"tests.apps.shadow_servers:{app or 'asgi_app'}", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    with serve(argv, port, env=env, ready_path="/_shadow") as base:
        yield base


def report(client: httpx.Client, settled: bool = True) -> dict[str, Any]:
    """The server's shadow report, once nothing is queued or running (``settled``)."""
    deadline = time.monotonic() + 10
    while True:
        data: dict[str, Any] = client.get("/_shadow").json()["report"]
        if not settled or (data["queued"] == 0 and data["running"] == 0) or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def visit(client: httpx.Client, paths: list[str]) -> list[float]:
    """Each path once, in order; the user's answers are checked; the latencies returned."""
    took = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        took.append(time.perf_counter() - started)
        assert (response.status_code, response.text) == (200, f"page {path}")
    return took


@pytest.mark.parametrize("kind", SERVERS)
def test_a_mismatching_shadow_is_counted_and_sampled(kind: str) -> None:
    with server(kind, "mismatch") as base, httpx.Client(base_url=base, timeout=10) as client:
        for i in range(10):
            visit(client, [f"/even/{i}", f"/odd/{i}"])
            time.sleep(0.01)  # a pace the queue of 8 keeps up with
        data = report(client)
    counts = data["total"]["counts"]
    assert counts["match"] == 10 and counts["mismatch"] == 10, counts
    assert data["total"]["mismatch_rate"] == 0.5 and data["total"]["parts"]["body"] == 10
    [route] = data["routes"].values()
    assert len(route["samples"]) == 10
    assert all(
        s["request"].startswith("GET /odd/") and s["differences"] == ["body"] for s in route["samples"]
    )


@pytest.mark.parametrize("kind", SERVERS)
def test_a_failing_shadow_never_reaches_the_user(kind: str) -> None:
    with server(kind, "fail") as base, httpx.Client(base_url=base, timeout=10) as client:
        for i in range(20):
            visit(client, [f"/p/{i}"])
            time.sleep(0.005)
        data = report(client)
    counts = data["total"]["counts"]
    assert counts["error"] + counts["dropped"] == 20 and counts["error"] >= 10, counts
    assert {s["error"] for s in data["routes"]["-"]["samples"]} == {"RuntimeError"}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.mark.parametrize("kind", SERVERS)
def test_a_slow_shadow_times_out_and_leaves_the_primary_latency_alone(kind: str) -> None:
    rounds, per_round = 6, 50
    with (
        server(kind, "none") as plain_base,
        server(kind, "slow") as slow_base,
        httpx.Client(base_url=plain_base, timeout=10) as plain,
        httpx.Client(base_url=slow_base, timeout=10) as slow,
    ):
        visit(plain, ["/warm"] * 20)
        visit(slow, ["/warm"] * 20)
        without: list[float] = []
        with_slow: list[float] = []
        for r in range(rounds):  # interleaved, so both see the same machine
            without += visit(plain, [f"/p/{r}/{i}" for i in range(per_round)])
            with_slow += visit(slow, [f"/p/{r}/{i}" for i in range(per_round)])
        data = report(slow)
    counts = data["total"]["counts"]
    # Copies arrive far faster than a 0.2 s shadow answers: most are dropped, the rest time out.
    assert counts["timeout"] >= 4 and counts["dropped"] > counts["timeout"], counts
    assert counts["match"] == counts["mismatch"] == 0, counts
    assert p99(with_slow) <= 2 * p99(without) + 0.010, (p99(with_slow), p99(without))


@pytest.mark.parametrize("kind", SERVERS)
def test_an_upstream_shadow_gets_the_copies(kind: str) -> None:
    pytest.importorskip("httpcore")
    with (
        server("gunicorn", "none", app="green_wsgi") as green,
        server(kind, "upstream", url=green) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for i in range(5):
            visit(client, [f"/p/{i}"])
        data = report(client)
    counts = data["total"]["counts"]
    assert counts["match"] == 5, counts
