"""JSONLinesSink: whole lines only, rotation without loss, several processes on one file, read back."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from canarymw import MemorySink, Outcome
from canarymw.sinks import BackgroundSink
from canarymw.sinks.jsonl import (
    DEFAULT_FILENAME,
    LINE_LIMIT,
    JSONLinesSink,
    encode,
    main,
    read_outcomes,
    read_stats,
)


def outcome(variant: str = "new", status: int | None = 200, **kw: Any) -> Outcome:
    base: dict[str, Any] = {
        "rollout": "r",
        "variant": variant,
        "status": status,
        "duration": 0.0125,
        "error": None,
        "disconnected": False,
        "method": "GET",
        "route": "/items/<id>",
        "timestamp": 1717000000.25,
    }
    base.update(kw)
    return Outcome(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_json_object_per_line_that_reads_back_exactly(tmp_path: Path) -> None:
    sink = JSONLinesSink(tmp_path / "out.jsonl")
    written = [
        outcome(),
        outcome("old", None, error="KeyError", route=None),
        outcome("old", 499, disconnected=True, method="POST", route="/café"),
    ]
    for o in written:
        sink.record(o)
    sink.close()
    rows = lines(tmp_path / "out.jsonl")
    assert rows[0] == {**outcome()._asdict(), "pid": os.getpid()}
    assert list(read_outcomes(tmp_path / "out.jsonl", strict=True)) == written
    assert repr(sink) == f"JSONLinesSink({str(tmp_path / 'out.jsonl')!r})"


def test_websocket_close_code_reads_back(tmp_path: Path) -> None:
    written = [
        outcome("new", 101, method="WEBSOCKET", close_code=1000),
        outcome("old", 403, method="WEBSOCKET", close_code=1008, disconnected=True),
        outcome("new", 101, method="WEBSOCKET", close_code=None),
    ]
    sink = JSONLinesSink(tmp_path / "ws.jsonl")
    sink.record_many(written)
    sink.close()
    assert [r["close_code"] for r in lines(tmp_path / "ws.jsonl")] == [1000, 1008, None]
    assert list(read_outcomes(tmp_path / "ws.jsonl", strict=True)) == written


@pytest.mark.parametrize(
    "close_code",
    [
        pytest.param('"1000"', id="string"),
        pytest.param("true", id="boolean"),
        pytest.param("1.5", id="float"),
    ],
)
def test_a_close_code_that_is_not_an_integer_is_malformed(tmp_path: Path, close_code: str) -> None:
    good = encode(outcome(method="WEBSOCKET", close_code=1000), 1)
    path = tmp_path / "c.jsonl"
    path.write_bytes(good + good.replace(b'"close_code":1000', b'"close_code":' + close_code.encode()))
    with pytest.raises(ValueError, match=r"c\.jsonl:2.*close_code"):
        list(read_outcomes(path, strict=True))


def test_a_directory_gets_the_default_file_name(tmp_path: Path) -> None:
    sink = JSONLinesSink(tmp_path)
    sink.record(outcome())
    sink.close()
    assert (tmp_path / DEFAULT_FILENAME).exists()
    missing = tmp_path / "logs" / "canary"
    sink = JSONLinesSink(str(missing) + os.sep)
    sink.record(outcome())
    sink.close()
    assert (missing / DEFAULT_FILENAME).exists()


def test_close_then_record_reopens(tmp_path: Path) -> None:
    sink = JSONLinesSink(tmp_path / "x.jsonl")
    sink.record(outcome())
    sink.close()
    sink.close()
    sink.record(outcome())
    sink.close()
    assert len(lines(tmp_path / "x.jsonl")) == 2


def test_long_strings_are_shortened_below_the_atomic_write_size(tmp_path: Path) -> None:
    huge = outcome(route="/" + "é" * 5000, error="E" * 5000, rollout="r" * 300)
    line = encode(huge, 1)
    assert len(line) <= LINE_LIMIT
    obj = json.loads(line)
    assert obj["truncated"] is True
    assert obj["route"].startswith("/éé")
    assert obj["variant"] == "new"
    normal = encode(outcome(duration=float("nan")), 1)
    assert json.loads(normal)["duration"] == 0.0  # never invalid JSON
    assert "truncated" not in json.loads(normal)


def test_batches_are_written_as_whole_lines_in_small_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        assert data.endswith(b"\n")
        return real_write(fd, data)

    sink = JSONLinesSink(tmp_path / "b.jsonl")
    monkeypatch.setattr(os, "write", spy)
    sink.record_many([outcome(status=i) for i in range(500)])
    monkeypatch.undo()
    sink.close()
    assert len(sizes) > 1
    assert max(sizes) <= LINE_LIMIT
    assert [o.status for o in read_outcomes(tmp_path / "b.jsonl", strict=True)] == list(range(500))


def test_size_rotation_keeps_every_line_and_prunes_old_files(tmp_path: Path) -> None:
    keep_all = JSONLinesSink(tmp_path / "all" / "o.jsonl", max_bytes=2000, backup_count=None)
    for i in range(300):
        keep_all.record(outcome(status=i))
    keep_all.close()
    rotated = keep_all.rotated_files()
    assert len(rotated) >= 10
    assert all(p.stat().st_size < 2000 + LINE_LIMIT for p in rotated)
    assert [o.status for o in read_outcomes(tmp_path / "all", strict=True)] == list(range(300))

    pruned = JSONLinesSink(tmp_path / "few" / "o.jsonl", max_bytes=2000, backup_count=2)
    for i in range(300):
        pruned.record(outcome(status=i))
    pruned.close()
    assert len(pruned.rotated_files()) == 2
    statuses = [o.status for o in read_outcomes(tmp_path / "few", strict=True)]
    assert statuses == list(range(300 - len(statuses), 300))  # the newest survive, in order


def test_threads_share_one_file(tmp_path: Path) -> None:
    sink = JSONLinesSink(tmp_path / "t.jsonl", max_bytes=10_000, backup_count=None)

    def work(n: int) -> None:
        for i in range(500):
            sink.record(outcome(route=f"{n}-{i}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    routes = sorted(o.route or "" for o in read_outcomes(tmp_path, strict=True))
    assert routes == sorted(f"{n}-{i}" for n in range(4) for i in range(500))


def _writer(path: str, writer: int, count: int, batch: int) -> None:
    sink = JSONLinesSink(path, max_bytes=16_000, backup_count=None)
    if batch:
        for start in range(0, count, batch):
            sink.record_many(
                [outcome(route=f"{writer}-{i}") for i in range(start, min(start + batch, count))]
            )
    else:
        for i in range(count):
            sink.record(outcome(route=f"{writer}-{i}"))
    sink.close()


def test_processes_writing_the_same_file_lose_and_tear_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "o.jsonl"
    ctx = multiprocessing.get_context("spawn")
    count, writers = 1500, 4
    procs = [
        ctx.Process(target=_writer, args=(str(path), w, count, 50 if w % 2 else 0)) for w in range(writers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = sorted((tmp_path / "shared").iterdir())
    assert len(files) > 5  # rotated many times while all four were appending
    raw = b"".join(f.read_bytes() for f in files)
    assert raw.endswith(b"\n")
    got = [json.loads(line)["route"] for line in raw.splitlines()]  # every line parses: none torn
    assert sorted(got) == sorted(f"{w}-{i}" for w in range(writers) for i in range(count))
    assert len(set(got)) == len(got)  # none written twice
    assert sum(1 for _ in read_outcomes(path.parent, strict=True)) == count * writers


def test_forked_children_append_to_the_same_file(tmp_path: Path) -> None:
    # In a subprocess: forking the multi-threaded test runner itself is unsafe.
    script = textwrap.dedent(
        """
        import os, sys
        from canarymw import Outcome
        from canarymw.sinks.jsonl import JSONLinesSink

        def o(route):
            return Outcome("r", "new", 200, 0.01, None, False, "GET", route, 1.0)

        sink = JSONLinesSink(sys.argv[1])
        sink.record(o("parent"))
        pid = os.fork()
        if pid == 0:
            sink.record(o("child"))
            os._exit(0)
        os.waitpid(pid, 0)
        sink.record(o("parent again"))
        sink.close()
        print(pid)
        """
    )
    path = tmp_path / "f.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    rows = lines(path)
    assert [r["route"] for r in rows] == ["parent", "child", "parent again"]
    assert rows[1]["pid"] == int(result.stdout)


def test_reader_skips_malformed_lines_and_an_unfinished_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = encode(outcome(), 1)
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        good
        + b"not json\n"
        + b'{"rollout": "r"}\n'
        + b'["a list"]\n'
        + good
        + b'{"status": true}\n'
        + good[:20]
    )
    with caplog.at_level(logging.WARNING, logger="canarymw"):
        assert len(list(read_outcomes(path))) == 2
    assert "skipped 4 malformed lines" in caplog.text
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        list(read_outcomes(path, strict=True))


def test_read_stats_matches_memory_sink(tmp_path: Path) -> None:
    mem = MemorySink()
    sink = JSONLinesSink(tmp_path, max_bytes=5000, backup_count=None)
    batch = [
        outcome(
            "new" if i % 3 else "old",
            [200, 200, 404, 500, None][i % 5],
            duration=0.001 * (i % 97),
            error="Boom" if i % 41 == 0 else None,
            rollout="a" if i % 2 else "b",
            timestamp=1000.0 + i,
        )
        for i in range(1000)
    ]
    for o in batch:
        mem.record(o)
        sink.record(o)
    sink.close()
    assert read_stats(tmp_path) == mem.snapshot()
    assert read_stats(tmp_path, rollout="a") == mem.snapshot("a")
    later = MemorySink()
    for o in batch[500:]:
        later.record(o)
    assert read_stats(tmp_path, since=1500.0) == later.snapshot()


def test_read_stats_always_has_both_variants(tmp_path: Path) -> None:
    empty = MemorySink().snapshot()["new"]
    assert empty.requests == 0 and empty.latency_p50 is None
    sink = JSONLinesSink(tmp_path)
    for _ in range(5):
        sink.record(outcome("old"))
    sink.close()
    stats = read_stats(tmp_path)
    assert sorted(stats) == ["new", "old"]
    assert stats["old"].requests == 5 and stats["new"] == empty
    assert read_stats(tmp_path, since=2e9) == {"old": empty, "new": empty}
    assert read_stats(tmp_path, rollout="other") == {"old": empty, "new": empty}


def test_through_a_background_sink(tmp_path: Path) -> None:
    bg = BackgroundSink(JSONLinesSink(tmp_path))
    for i in range(1000):
        bg.record(outcome(status=i % 600))
    assert bg.close(timeout=10)
    assert bg.errors == 0
    assert sum(1 for _ in read_outcomes(tmp_path, strict=True)) == 1000


def test_command_line_summary(tmp_path: Path) -> None:
    sink = JSONLinesSink(tmp_path)
    for i in range(20):
        sink.record(outcome("new" if i % 2 else "old", 500 if i % 5 == 0 else 200))
    sink.close()
    out: list[str] = []
    assert main([str(tmp_path)], out=out.append) == 0
    table = out[0].splitlines()
    assert table[0].split()[:3] == ["variant", "requests", "errors"]
    assert table[1].split()[:3] == ["new", "10", "2"]
    assert table[2].split()[:3] == ["old", "10", "2"]
    out.clear()
    main([str(tmp_path), "no-such-rollout"], out=out.append)
    assert out == ["no outcomes"]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_bytes": -1}, id="negative size"),
        pytest.param({"max_bytes": 1.5}, id="fractional size"),
        pytest.param({"backup_count": -1}, id="negative backups"),
    ],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="JSONLinesSink"):
        JSONLinesSink(tmp_path, **kwargs)
