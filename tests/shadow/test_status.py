"""Shadow comparisons in the store's counters: ``canarymw status`` shows the mismatch rate,
and no success rate, blended estimate or guard ever counts them as requests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from canarymw import Rollout, Shadow, WSGICanaryMiddleware, cli
from canarymw.guard._analysis import windows_from_counts
from canarymw.shadow import Comparison, Result
from canarymw.sinks.store import StoreSink
from canarymw.store import MemoryStore, SQLiteStore
from canarymw.store._stats import SHADOW

from ..conftest import KEY
from ..harness import WSGITransport

NAME = "search-v2"


def app(label: bytes) -> Any:
    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        # Half the pages differ: /same/... answers alike, anything else names its app.
        body = b"same" if environ["PATH_INFO"].startswith("/same") else label
        start_response(
            "500 X" if environ["PATH_INFO"] == "/fail" else "200 OK", [("Content-Type", "text/plain")]
        )
        return [body]

    return wsgi


def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    raise RuntimeError("the shadow broke")


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in (cli.STORE_ENV, cli.BY_ENV, cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_status_shows_the_shadow_mismatch_rate_apart_from_the_variants(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SQLiteStore(store_url.removeprefix("sqlite:///"))
    sink = StoreSink(store, interval=60)
    rollout = Rollout(NAME, percent=0, secret_key=KEY, store=store_url)
    shadow = Shadow(app(b"green"))
    mw = WSGICanaryMiddleware(app(b"blue"), new=app(b"green"), rollout=rollout, sink=sink, shadow=shadow)
    with httpx.Client(transport=WSGITransport(mw), base_url="http://t") as client:
        for path in ("/same/1", "/same/2", "/same/3", "/other/1"):
            assert client.get(path).status_code == 200
        assert client.post("/other/2").status_code == 200  # not copied
        assert shadow.drain(10)
    # A failing shadow of the same rollout: counted as a failure, not as a mismatch.
    failing = Shadow(broken)
    other = WSGICanaryMiddleware(app(b"blue"), new=None, rollout=rollout, sink=sink, shadow=failing)
    with httpx.Client(transport=WSGITransport(other), base_url="http://t") as client:
        assert client.get("/same/4").text == "same"
        assert failing.drain(10)
    assert sink.flush()

    assert cli.main(["status", "--store", store_url]) == 0
    out = capsys.readouterr().out
    block = out[out.index(f"{NAME}: the last 300 s") :]
    rows = {line.split()[0]: line.split() for line in block.splitlines()[1:6]}
    assert rows["old"][:3] == ["old", "6", "0"]
    assert rows["all"][:2] == ["all", "6"]  # the copies are not requests
    assert "shadow" not in rows and "measured 100.00%" in block
    [line] = [x for x in block.splitlines() if x.strip().startswith("shadow")]
    assert "mismatch rate 25.00% (1 of 4 compared copies differ); 1 failed or timed out, 0 dropped" in line

    assert cli.main(["status", "--store", store_url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["rollouts"][NAME]
    assert list(data["variants"]) == ["old", "new"]
    assert data["success"]["measured"] == 1.0
    sh = data["shadow"]
    assert (sh["copies"], sh["compared"], sh["mismatches"], sh["failures"], sh["dropped"]) == (5, 4, 1, 1, 0)
    assert sh["mismatch_rate"] == 0.25 and sh["p50"] is not None
    sink.close()
    store.close()


def test_status_without_shadow_traffic_has_no_shadow_line(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SQLiteStore(store_url.removeprefix("sqlite:///"))
    Rollout(NAME, percent=0, secret_key=KEY, store=store)
    assert cli.main(["status", "--store", store_url]) == 0
    assert "shadow" not in capsys.readouterr().out
    assert cli.main(["status", "--store", store_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rollouts"][NAME]["shadow"] is None
    store.close()


def test_the_store_sink_counts_comparisons_as_the_shadow_variant() -> None:
    store = MemoryStore()
    sink = StoreSink(store, interval=60)
    now = time.time()
    results: list[tuple[Result, float | None]] = [
        ("match", 0.01), ("mismatch", 0.02), ("error", 0.03),
        ("timeout", 0.5), ("dropped", None), ("not-compared", None),
    ]  # fmt: skip
    for result, duration in results:
        sink.record_comparison(
            Comparison(NAME, "old", None, "GET", "/", result, duration=duration, timestamp=now)
        )
    assert sink.flush()
    [counts] = store.read_counts([NAME], since=0)
    assert (counts.rollout, counts.variant) == (NAME, SHADOW)
    # not-compared copies are left out: every copy counted was sent (or dropped) and judged.
    assert (counts.requests, counts.errors, counts.exceptions, counts.disconnects) == (5, 1, 2, 1)
    assert sum(counts.buckets.values()) == 4 and abs(counts.latency_sum - 0.56) < 1e-9
    # The guard judges old and new only: a window with nothing but comparisons is no window.
    assert windows_from_counts([counts]) == []
    sink.close()
