"""``canarymw demo``: flags, the report's arithmetic and checks, and whole runs through real servers."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from canarymw import Rollout
from canarymw._demo import run as demo_run
from canarymw._demo.load import CookieJar, Hit, UserRun
from canarymw._demo.progress import Progress
from canarymw._demo.ramp import RampRecord, WorkerSwitch
from canarymw._demo.report import analyse, blend, quantile, render, split_check
from canarymw._demo.server import DemoServer, ServerError
from canarymw._demo.settings import ROLLOUT_NAME, DemoSettings
from canarymw.cli import main

KEY = "demo-test-key-0123456789abcdef"
REDIS_URL = os.environ.get("CANARYMW_TEST_REDIS", "redis://127.0.0.1:6379/0")


def run_json(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, dict[str, Any]]:
    code = main(["demo", "--json", *flags])
    out = capsys.readouterr().out
    return code, json.loads(out)


def assert_split(split: dict[str, Any], percent: float) -> None:
    users, p = split["users"], percent / 100
    assert users > 0
    sd = math.sqrt(users * p * (1 - p))
    assert abs(split["users_new"] - users * p) <= 4 * sd
    assert split["ok"]


def assert_sound(
    data: dict[str, Any], users: int, requests: int, percent: float, ramp_to: float | None
) -> None:
    """What every completed run must show, whatever the server and the store."""
    assert data["ok"], data["checks"]
    assert data["variants"]["all"]["requests"] == users * requests
    assert data["transport_errors"] == 0
    sticky = data["stickiness"]
    assert sticky["users"] == sticky["one_variant"] + sticky["moved"] == sticky["hash_agrees"] == users
    assert sticky["moved_back"] == sticky["mixed_in_phase"] == 0
    assert sticky["several_cohorts"] == sticky["no_cookie"] == 0
    assert len(sticky["pids"]) == 2  # both workers answered ...
    assert sticky["several_workers"] > 0  # ... and users crossed workers, keeping their variant
    assert data["config"]["ramp_to"] == ramp_to
    phases = {p["name"]: p for p in data["phases"]}
    for phase in phases.values():
        assert phase["stamped"] == phase["requests"]  # every response showed the phase's percent
    if ramp_to is None:
        assert data["ramp"] is None and list(phases) == ["run"]
        assert_split(phases["run"]["split"], percent)
        if percent < 100:
            assert sticky["moved"] == 0
        return
    assert list(phases) == ["before", "after"]
    assert_split(phases["before"]["split"], percent)
    assert_split(phases["after"]["split"], ramp_to)
    assert phases["before"]["percent"] == percent and phases["after"]["percent"] == ramp_to
    assert sum(p["requests"] for p in phases.values()) + data["between"] == users * requests
    ramp = data["ramp"]
    assert ramp["error"] is None and ramp["all_switched"]
    assert (ramp["from_percent"], ramp["to_percent"]) == (percent, ramp_to)
    assert ramp["version"] == ramp["version_before"] + 1 == phases["after"]["version"]
    assert ramp["by"] == "canarymw demo" and ramp["at_s"] > 0
    assert sorted(w["pid"] for w in ramp["workers"]) == sticky["pids"]
    for worker in ramp["workers"]:  # every worker reported its switch, within 2 s of the change
        assert worker["version"] == ramp["version"] and worker["percent"] == ramp_to
        assert 0 <= worker["delay_ms"] < 2000
    assert ramp["max_delay_ms"] == max(w["delay_ms"] for w in ramp["workers"])
    assert ramp["switched_at"] >= ramp["at"]
    assert {c["name"] for c in data["checks"]} >= {"switch", "split-before", "split-after"}


# -- through real servers ---------------------------------------------------------


@pytest.mark.server
def test_demo_under_gunicorn_ramps_through_the_embedded_store(capsys: pytest.CaptureFixture[str]) -> None:
    users, requests = 150, 3
    code, data = run_json(
        capsys,
        "--users", str(users),
        "--requests-per-user", str(requests),
        "--percent", "30",
        "--error-rate", "0.5",
        "--seed", "7",
        "--concurrency", "6",
    )  # fmt: skip
    assert code == 0
    assert data["server"]["kind"] == "gunicorn"
    assert data["config"]["seed"] == 7
    assert data["config"]["store"].startswith("SQLiteStore(") and "temporary" in data["config"]["store"]
    assert data["config"]["rollout"] == ROLLOUT_NAME  # a fresh file: the fixed name is safe
    assert_sound(data, users, requests, 30, 75)  # the default ramp: 2.5 x 30
    old, new = data["variants"]["old"], data["variants"]["new"]
    assert old["errors"] == 0 and old["success_rate"] == 1.0  # injected into green only
    assert 0.2 < new["errors"] / new["requests"] < 0.8
    for phase in data["phases"]:  # the blend of each phase uses that phase's weight and requests
        success, w = phase["success"], phase["percent"] / 100
        assert success["weight"] == w
        assert success["blended"] == pytest.approx(success["s_new"] * w + success["s_old"] * (1 - w))
        assert abs(success["blended"] - success["measured"]) < 0.2
    before, after = (p["success"]["measured"] for p in data["phases"])
    assert after < before  # more users on the failing green after the ramp


@pytest.mark.server
def test_demo_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--users", "60", "--requests-per-user", "3", "--percent", "50", "--ramp-to", "60"])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    out = captured.out
    for expected in (
        "old (blue)",
        "new (green)",
        "p95 ms",
        "s = s_new * w + s_old * (1 - w)",
        "50% -> 60% at ",
        "store version 1 -> 2",
        "slowest",
        "success-before",
        "success-after",
        "split-before",
        "split-after",
        "PASSED",
    ):
        assert expected in out
    switched = next(line for line in out.splitlines() if line.startswith("switched"))
    assert len(re.findall(r"pid \d+ \+[\d.]+ ms", switched)) == 2  # one delay per worker
    assert "MemorySink numbers are per worker process" in out
    assert "starting Flask blue/green under gunicorn" in captured.err
    assert "\r" not in captured.err  # no progress bar when stderr is not a terminal


@pytest.mark.server
def test_demo_without_a_ramp(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "--users", "60", "--requests-per-user", "2", "--percent", "40", "--no-ramp")
    assert code == 0
    assert_sound(data, 60, 2, 40, None)
    assert [c["name"] for c in data["checks"]] == ["completed", "routed", "sticky", "hash", "split"]


@pytest.mark.server
def test_demo_asgi_under_uvicorn(capsys: pytest.CaptureFixture[str]) -> None:
    if demo_run.missing_requirements(asgi=True) is not None:
        pytest.skip("canarymw.asgi, starlette or uvicorn is not available")
    code, data = run_json(
        capsys,
        "--asgi",
        "--users",
        "100",
        "--requests-per-user",
        "3",
        "--percent",
        "20",
        "--error-rate",
        "0.5",
    )
    assert code == 0
    assert data["server"]["kind"] == "uvicorn"
    assert_sound(data, 100, 3, 20, 50)
    assert data["variants"]["old"]["errors"] == 0
    assert data["variants"]["new"]["errors"] > 0


@pytest.fixture
def redis_prefix() -> Any:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"canarymw-demo-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.server
@pytest.mark.parametrize("asgi", [False, True], ids=["gunicorn", "uvicorn"])
def test_demo_against_redis(capsys: pytest.CaptureFixture[str], redis_prefix: str, asgi: bool) -> None:
    if asgi and demo_run.missing_requirements(asgi=True) is not None:
        pytest.skip("canarymw.asgi, starlette or uvicorn is not available")
    url = f"{REDIS_URL}?prefix={redis_prefix}"
    flags = ["--users", "100", "--requests-per-user", "3", "--store", url] + (["--asgi"] if asgi else [])
    code, data = run_json(capsys, *flags)
    assert code == 0, [check for check in data["checks"] if not check["ok"]]
    assert data["config"]["store"].startswith("RedisStore(") and redis_prefix in data["config"]["store"]
    # A store that outlives the run: a rollout name of its own, so no rerun inherits its state.
    name = data["config"]["rollout"]
    assert re.fullmatch(rf"{ROLLOUT_NAME}-[0-9a-f]{{8}}", name)
    assert_sound(data, 100, 3, 10, 25)

    from canarymw.store import open_store

    store = open_store(url)
    try:
        state = store.read([name])[name]
        assert (state.percent, state.version) == (25, data["ramp"]["version"])
        assert [c.action for c in store.history(name)] == ["seed", "set"]
    finally:
        store.close()


@pytest.mark.parametrize("url", ["memory://", "MEMORY://demo"])
def test_memory_store_is_refused(capsys: pytest.CaptureFixture[str], url: str) -> None:
    assert main(["demo", "--store", url]) == demo_run.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "every worker is a separate process with its own memory" in err


def test_bad_store_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--store", "postgres://db/x"]) == 2
    assert "unknown scheme" in capsys.readouterr().err


def test_unreachable_store_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("redis")
    # Nothing listens on port 1: the demo stops before starting any server.
    assert main(["demo", "--store", "redis://127.0.0.1:1/0"]) == demo_run.EXIT_SETUP
    assert "cannot use the store" in capsys.readouterr().err


@pytest.mark.server
def test_readme_command_needs_no_options_and_leaves_nothing_behind() -> None:
    # The README's command through the installed console script, with the embedded store
    # (only smaller, to stay quick).
    script = Path(sys.executable).with_name("canarymw")
    done = subprocess.run(
        [str(script), "demo", "--users", "80", "--requests-per-user", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED" in done.stdout and "switched" in done.stdout
    store_line = next(line for line in done.stdout.splitlines() if line.startswith("store: "))
    path = re.search(r"SQLiteStore\('([^']+)'", store_line)
    assert path is not None
    assert not Path(path.group(1)).parent.exists()  # the temporary directory is gone


@pytest.mark.server
def test_server_that_cannot_load_the_app_is_reported_and_stopped() -> None:
    server = DemoServer("gunicorn", workers=1, env={"CANARYMW_DEMO_KEY": ""}, startup_timeout=20)
    with pytest.raises(ServerError) as info:
        server.__enter__()
    assert "CANARYMW_DEMO_KEY" in str(info.value)  # the log tail explains why
    assert server.proc is None


@pytest.mark.server
def test_server_stops_on_exit_even_after_an_error() -> None:
    procs: list[subprocess.Popen[bytes] | None] = []

    def crash() -> None:
        with DemoServer("gunicorn", workers=2, env=DemoSettings(KEY).to_env()) as server:
            procs.append(server.proc)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        crash()
    (proc,) = procs
    assert proc is not None and proc.returncode is not None  # reaped
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # and no worker of its process group is left behind


# -- flags and set-up errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--percent", "150"], "--percent must be a number from 0 to 100", id="percent too big"),
        pytest.param(["--percent", "nan"], "--percent must be a number from 0 to 100", id="percent nan"),
        pytest.param(["--percent", "ten"], "--percent must be a number", id="percent not a number"),
        pytest.param(["--users", "0"], "--users must be from 1", id="no users"),
        pytest.param(["--users", "1.5"], "--users must be a whole number", id="fractional users"),
        pytest.param(["--requests-per-user", "-1"], "--requests-per-user must be from 1", id="negative"),
        pytest.param(["--error-rate", "2"], "--error-rate must be a number from 0 to 1", id="rate above 1"),
        pytest.param(["--workers", "0"], "--workers must be from 1", id="no workers"),
        pytest.param(["--concurrency", "1000"], "--concurrency must be from 1 to 256", id="too concurrent"),
        pytest.param(["--colour", "green"], "unrecognized arguments: --colour", id="unknown flag"),
        pytest.param(["--ramp-to", "101"], "--ramp-to must be a number from 0 to 100", id="ramp too far"),
        pytest.param(["--ramp-to", "50", "--no-ramp"], "not allowed with argument", id="ramp and no ramp"),
    ],
)
def test_bad_flags_are_a_clear_usage_error(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("canarymw ")


def test_missing_server_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gunicorn" else real(name, *a)
    )
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["demo"]) == demo_run.EXIT_SETUP
    err = capsys.readouterr().err
    assert "needs gunicorn, which is not installed" in err
    assert "pip install 'canarymw[demo]'" in err


def test_asgi_without_the_asgi_adapter_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "canarymw.asgi", None)  # makes the import fail
    if demo_run.missing_requirements(asgi=True) is None:
        pytest.fail("a missing canarymw.asgi went unnoticed")
    assert main(["demo", "--asgi"]) == demo_run.EXIT_SETUP
    assert "needs canarymw.asgi.ASGICanaryMiddleware" in capsys.readouterr().err


# -- the report ----------------------------------------------------------------------


def test_split_check_accepts_four_sigma_and_rejects_beyond() -> None:
    ok = split_check(100, 1000, 0.10)
    assert ok.ok and ok.z == 0.0 and ok.observed == 0.10
    sd = math.sqrt(1000 * 0.1 * 0.9)
    assert split_check(int(100 + 3.9 * sd), 1000, 0.10).ok
    outside = split_check(int(100 + 4.1 * sd) + 1, 1000, 0.10)
    assert not outside.ok and outside.z is not None and outside.z > 4
    assert outside.low < 0.10 < outside.high


@pytest.mark.parametrize(
    ("new", "users", "share", "ok"),
    [
        pytest.param(0, 50, 0.0, True, id="0% exact"),
        pytest.param(1, 50, 0.0, False, id="0% with one new user"),
        pytest.param(50, 50, 1.0, True, id="100% exact"),
        pytest.param(0, 0, 0.5, False, id="no users"),
    ],
)
def test_split_check_edges(new: int, users: int, share: float, ok: bool) -> None:
    assert split_check(new, users, share).ok is ok


def test_blend_is_the_weighted_success_rate() -> None:
    b = blend(0.8, 1.0, 0.1, 0.99)
    assert b.blended == pytest.approx(0.98)
    assert blend(None, 0.97, 0.0, 0.97).blended == pytest.approx(0.97)  # nobody on new at 0%
    assert blend(None, 0.97, 0.5, 0.97).blended is None


def test_quantile_nearest_rank() -> None:
    assert quantile([], 0.5) is None
    values = [float(i) for i in range(1, 101)]
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.95) == 95.0
    assert quantile([3.0], 0.95) == 3.0


def _cookie(rollout: Rollout) -> str:
    set_cookie = rollout.decide(None).set_cookie
    assert set_cookie is not None
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


def _user(index: int, cookie: str, variants: list[str], pids: list[int], status: int = 200) -> UserRun:
    return UserRun(
        index,
        [
            Hit(status, v, p, 0.001, cookie, i == 0)
            for i, (v, p) in enumerate(zip(variants, pids, strict=True))
        ],
    )


def _analyse(runs: list[UserRun], settings: DemoSettings, ramp: RampRecord | None = None) -> Any:
    config = {
        "rollout": ROLLOUT_NAME,
        "percent": settings.percent,
        "ramp_to": None if ramp is None else ramp.to_percent,
        "store": "MemoryStore()",
        "users": len(runs),
        "requests_per_user": 2,
        "error_rate": 0.0,
        "concurrency": 1,
        "seed": 0,
    }
    server = {"kind": "gunicorn", "app": "Flask", "workers": 2, "url": "http://127.0.0.1:1"}
    return analyse(runs, settings, config=config, server=server, elapsed=1.0, ramp=ramp)


def test_analyse_flags_a_user_who_saw_both_variants() -> None:
    settings = DemoSettings(KEY, percent=50)
    rollout = settings.rollout()
    good = _cookie(rollout)
    right = rollout.variant_for(rollout.decide(f"canarymw={good}").cohort)
    runs = [
        _user(0, good, [right, right], [11, 12]),
        _user(1, _cookie(rollout), ["old", "new"], [11, 11]),
    ]
    result = _analyse(runs, settings)
    assert not result.ok
    st = result.stickiness
    assert (st.one_variant, st.moved_back, st.several_workers, st.hash_agrees) == (1, 1, 1, 1)
    assert [c.name for c in result.checks if not c.ok] == ["sticky", "hash"]
    assert "FAILED" in render(result)


def _ramp(to: float, *, change_at: float, switched_at: float) -> RampRecord:
    workers = [WorkerSwitch(11, 2, to, switched_at, 30.0), WorkerSwitch(12, 2, to, switched_at - 0.01, 20.0)]
    return RampRecord(
        store="MemoryStore()",
        from_percent=0,
        to_percent=to,
        version_before=1,
        version=2,
        at=change_at,
        at_s=1.0,
        requested_at=change_at,
        workers=workers,
        max_delay_ms=30.0,
        all_switched=True,
        switched_at=switched_at,
    )


def _timed(index: int, cookie: str, hits: list[tuple[str, float, int, float]]) -> UserRun:
    """A user whose hits are (variant, start time, store version, percent)."""
    return UserRun(
        index,
        [
            Hit(200, v, 11 + i % 2, 0.001, cookie, i == 0, at=at, version=version, percent=pct)
            for i, (v, at, version, pct) in enumerate(hits)
        ],
    )


def test_analyse_with_a_ramp_allows_one_move_in_its_direction_only() -> None:
    # From 0% to 100%: everyone is old before and new after, so a user who crosses the
    # ramp must move old -> new, and anything else is a failure.
    settings = DemoSettings(KEY, percent=0)
    ramp = _ramp(100, change_at=100.0, switched_at=100.5)
    before, after = (100.0 - 1, 1, 0.0), (101.0, 2, 100.0)
    cookies = [_cookie(settings.rollout()) for _ in range(3)]
    moving = _timed(0, cookies[0], [("old", *before), ("new", *after)])
    spreading = _timed(1, cookies[1], [("old", *before), ("new", 100.2, 2, 100.0)])  # between: excluded
    result = _analyse([moving, spreading], settings, ramp)
    assert result.ok, result.checks
    st = result.stickiness
    assert (st.one_variant, st.moved, st.moved_back, st.hash_agrees) == (0, 2, 0, 2)
    assert result.between == 1
    assert [(p.name, p.requests, p.users, p.stamped) for p in result.phases] == [
        ("before", 2, 2, 2),
        ("after", 1, 1, 1),
    ]
    assert "pid 11 +30.0 ms, pid 12 +20.0 ms; slowest 30.0 ms" in render(result)

    back = _timed(2, cookies[2], [("new", *before), ("old", *after)])
    result = _analyse([moving, back], settings, ramp)
    assert result.stickiness.moved_back == 1
    assert {c.name for c in result.checks if not c.ok} == {"sticky", "hash", "split-before", "split-after"}


def test_analyse_with_a_ramp_flags_a_stale_worker() -> None:
    settings = DemoSettings(KEY, percent=0)
    ramp = _ramp(100, change_at=100.0, switched_at=100.5)
    cookie = _cookie(settings.rollout())
    # Served after every worker reported the switch, yet stamped with the old version.
    stale = _timed(0, cookie, [("old", 99.0, 1, 0.0), ("new", 101.0, 1, 100.0)])
    result = _analyse([stale], settings, ramp)
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert list(failed) == ["switch"]
    assert "0/1 responses after every worker switched carried version 2" in failed["switch"]

    ramp.workers[1] = WorkerSwitch(12, 1, 0.0)  # a worker that never reported the new version
    ramp.all_switched = False
    result = _analyse([_timed(0, cookie, [("old", 99.0, 1, 0.0)])], settings, ramp)
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert "worker(s) 12 did not report version 2" in failed["switch"]


def test_analyse_flags_a_foreign_cookie_and_a_wrong_variant() -> None:
    settings = DemoSettings(KEY, percent=50)
    foreign = _cookie(Rollout(ROLLOUT_NAME, percent=50, secret_key="another-key-0123456789abcdef"))
    rollout = settings.rollout()
    cookie = _cookie(rollout)
    wrong = "old" if rollout.variant_for(rollout.decide(f"canarymw={cookie}").cohort) == "new" else "new"
    result = _analyse(
        [_user(0, foreign, ["old", "old"], [1, 1]), _user(1, cookie, [wrong, wrong], [1, 1])], settings
    )
    failed = {c.name for c in result.checks if not c.ok}
    assert {"sticky", "hash"} <= failed
    assert result.stickiness.no_cookie == 1
    assert result.to_json()["ok"] is False


def test_analyse_counts_transport_errors_as_failures() -> None:
    settings = DemoSettings(KEY, percent=0)
    cookie = _cookie(settings.rollout())
    run = UserRun(
        0,
        [Hit(200, "old", 1, 0.001, cookie, True), Hit(None, None, None, 10.0, cookie, False, "TimeoutError")],
    )
    result = _analyse([run], settings)
    assert result.transport_errors == 1
    assert result.variants["all"].errors == 1
    assert result.phases[0].success.measured == 0.5
    assert [c.name for c in result.checks if not c.ok] == ["completed"]


# -- small parts -------------------------------------------------------------------------


def test_cookie_jar_keeps_and_expires_cookies() -> None:
    jar = CookieJar()
    assert jar.header() is None
    assert jar.store("canarymw=abc; Max-Age=2592000; Path=/; HttpOnly; SameSite=Lax") == "canarymw"
    assert jar.store("other=1") == "other"
    assert jar.header() == "canarymw=abc; other=1"
    jar.store("other=; Max-Age=0")
    assert jar.get("other") is None and jar.get("canarymw") == "abc"
    assert jar.store("no-equals-sign") is None
    assert jar.store("canarymw=def; Max-Age=oops") == "canarymw"
    assert jar.get("canarymw") == "def"


def test_progress_bar_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    bar = Progress(100, quiet)
    bar.update(50, force=True)
    bar.close(100)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    bar = Progress(100, loud, enabled=True)
    bar.update(50, force=True)
    bar.close(100)
    text = loud.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert " 50%" in text and "100/100 requests" in text
    assert Progress(10, loud).line(5, 1.0).startswith(" 50% [")


def test_injected_failures_are_reproducible_and_near_the_rate() -> None:
    settings = DemoSettings(KEY, error_rate=0.2, seed=3)
    draws = [settings.should_fail(f"cohort-{i}", "0") for i in range(5000)]
    assert draws == [settings.should_fail(f"cohort-{i}", "0") for i in range(5000)]
    assert 0.17 < sum(draws) / len(draws) < 0.23
    other_seed = DemoSettings(KEY, error_rate=0.2, seed=4)
    assert draws != [other_seed.should_fail(f"cohort-{i}", "0") for i in range(5000)]
    assert not DemoSettings(KEY).should_fail("x", "0")


def test_settings_travel_through_the_environment() -> None:
    settings = DemoSettings(KEY, percent=12.5, error_rate=0.25, seed=9)
    assert DemoSettings.from_env(settings.to_env()) == settings
    shared = DemoSettings(KEY, store="sqlite:////tmp/x.db", name="hello-v2-abc")
    assert DemoSettings.from_env(shared.to_env()) == shared
    assert shared.local_rollout(30).store is None and shared.local_rollout(30).percent == 30
    with pytest.raises(RuntimeError, match="CANARYMW_DEMO_KEY"):
        DemoSettings.from_env({})
    with pytest.raises(ValueError, match="percent"):
        DemoSettings(KEY, percent=101)


def test_flask_demo_app_in_process() -> None:
    from canarymw._demo.flask_app import create_app

    client = create_app(DemoSettings(KEY, percent=100, error_rate=1.0)).test_client()
    with client.get("/?n=0") as failed:
        assert failed.status_code == 500 and failed.headers["X-Canary-Variant"] == "new"
    # The outcome is recorded when the response is closed, as a server would close it.
    with client.get("/healthz") as health:
        assert health.status_code == 200 and "Set-Cookie" not in health.headers  # excluded
    with client.get("/_canarymw/stats") as stats:
        assert stats.json is not None
        assert {k: stats.json[k] for k in ("pid", "requests", "errors", "switches")} == {
            "pid": os.getpid(),
            "requests": {"new": 1, "old": 0},
            "errors": {"new": 1, "old": 0},
            "switches": [],  # no store: nothing to follow
        }
        assert stats.json["store"]["version"] is None and stats.json["store"]["percent"] == 100


def test_demo_app_follows_a_store_and_notes_when(tmp_path: Path) -> None:
    from canarymw._demo.flask_app import create_app
    from canarymw.store import change, open_store

    url = f"sqlite:///{tmp_path}/state.db"
    client = create_app(DemoSettings(KEY, percent=0, store=url)).test_client()
    with client.get("/?n=0") as first:
        assert first.headers["X-Canary-Store-Version"] == "1" and first.headers["X-Canary-Percent"] == "0"
    store = open_store(url)
    try:
        state = change(store, ROLLOUT_NAME, "set", percent=100, by="test")
    finally:
        store.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with client.get("/?n=1") as response:
            if response.headers["X-Canary-Store-Version"] == "2":
                break
        time.sleep(0.02)
    assert response.headers["X-Canary-Variant"] == "new" and response.headers["X-Canary-Percent"] == "100"
    with client.get("/_canarymw/stats") as stats:
        assert stats.json is not None
        switches = stats.json["switches"]
    assert [(s["version"], s["percent"]) for s in switches] == [(1, 0), (2, 100)]
    assert 0 <= switches[1]["at"] - state.updated_at < 2


def test_starlette_demo_app_in_process() -> None:
    if demo_run.missing_requirements(asgi=True) is not None:
        pytest.skip("canarymw.asgi or starlette is not available")
    from starlette.testclient import TestClient

    from canarymw._demo.starlette_app import create_app

    with TestClient(create_app(DemoSettings(KEY, percent=0))) as client:
        hello = client.get("/?n=0")
        assert hello.text == "Hello, Blue World!\n" and hello.headers["x-canary-variant"] == "old"
        assert "canarymw=" in hello.headers["set-cookie"]
        assert client.get("/").headers.get("set-cookie") is None  # the cookie came back: no new one
        assert client.get("/_canarymw/stats").json()["requests"] == {"new": 0, "old": 2}
