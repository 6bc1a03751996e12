"""``canarymw demo --guard``: the guard ramps a healthy green to 100% and rolls a failing one
back by itself, across two real workers that share the state (SQLite or Redis)."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from typing import Any

import pytest

from canarymw._demo import run as demo_run
from canarymw._demo.flags import add_guard_flags, guard_options
from canarymw._demo.guarded import analyse_guarded, render_guarded
from canarymw._demo.load import Hit, UserRun
from canarymw._demo.run import DemoOptions, run_demo
from canarymw._demo.settings import ROLLOUT_NAME, DemoSettings, GuardPlan
from canarymw.cli import build_parser, main
from canarymw.store import Change, RolloutState

from .test_demo import REDIS_URL, redis_prefix  # noqa: F401 (a fixture: the Redis test prefix)

KEY = "demo-guard-test-key-0123456789abcdef"
TIMELINE = re.compile(
    r"^\s+\+(?P<at>\d+\.\d) s\s+(?P<action>[a-z-]+)\s+(?P<before>-|[\d.]+%) -> (?P<after>[\d.]+%)\s+"
    r"by (?P<by>\S+)",
    re.MULTILINE,
)


def demo(**fields: Any) -> tuple[int, str, str]:
    """Run ``canarymw demo --guard`` with these options; exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = run_demo(DemoOptions(guard=True, **fields), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def timeline(out: str) -> list[tuple[str, str, str, str]]:
    """(action, before, after, by) of each timeline line of the report."""
    return [(m["action"], m["before"], m["after"], m["by"]) for m in TIMELINE.finditer(out)]


def line(out: str, label: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(f"{label} "))


def assert_followed(data: dict[str, Any]) -> None:
    """Both workers answered, users crossed them, and every response agreed with the hash."""
    assert data["ok"], [c for c in data["checks"] if not c["ok"]]
    assert data["transport_errors"] == data["unrouted"] == 0
    assert len(data["pids"]) == 2 and data["several_workers"] > 0
    assert data["hash_agrees"] == data["responses"] == data["variants"]["all"]["requests"]
    assert data["tail"] > 0 and data["tail_stamped"] == data["tail"]
    for step in data["timeline"]:
        if step["by"] == "canarymw-guard":  # every worker took every change of the guard, promptly
            assert sorted(int(p) for p in step["workers"]) == data["pids"]
            assert all(0 <= d < 3000 for d in step["workers"].values())


# -- through real servers ---------------------------------------------------------------


@pytest.mark.server
def test_guard_ramps_a_healthy_green_to_100_through_the_embedded_store() -> None:
    code, out, err = demo(seed=1)
    assert code == 0, out + err
    assert timeline(out) == [
        ("seed", "-", "0%", "code"),
        ("guard", "0%", "10%", "canarymw-guard"),
        ("advance", "10%", "25%", "canarymw-guard"),
        ("advance", "25%", "50%", "canarymw-guard"),
        ("advance", "50%", "100%", "canarymw-guard"),
    ]
    assert line(out, "stage").split()[1:4] == ["done:", "green", "at"]
    assert line(out, "verdict").startswith("verdict        advance to 100%: pass: canary 0 errors /")
    assert "guard          ok    the guard ramped green to 100% in 3 steps at +" in out
    for check in ("completed", "routed", "followed", "sticky", "hash"):
        assert line(out, check).split()[1] == "ok"
    assert out.rstrip().splitlines()[-1].startswith("PASSED in ")
    assert "SQLiteStore(" in out and "(temporary, removed after the run)" in out
    # Each step of the guard was told on stderr as it happened.
    assert re.search(r"\+\d+\.\d s advance 50% -> 100% by canarymw-guard: advance to 100%: pass", err)
    path = re.search(r"SQLiteStore\('([^']+)'", out)
    assert path is not None and not os.path.exists(os.path.dirname(path.group(1)))


@pytest.mark.server
def test_guard_rolls_a_failing_green_back_through_the_embedded_store() -> None:
    code, out, err = demo(seed=2, error_rate=0.05)
    assert code == 0, out + err
    assert timeline(out) == [
        ("seed", "-", "0%", "code"),
        ("guard", "0%", "10%", "canarymw-guard"),
        ("auto-rollback", "10%", "0%", "canarymw-guard"),
    ]
    verdict = line(out, "verdict").removeprefix("verdict").strip()
    assert re.fullmatch(
        r"rollback: canary \d+ errors / [\d,]+ requests vs baseline 0 / [\d,]+ at [\d.]+% of traffic; "
        r"harm is certain at alpha 0.05 \(e-value [^)]+\)",
        verdict,
    )
    rollback = next(x for x in out.splitlines() if "auto-rollback" in x)
    assert rollback.endswith(verdict)  # the audit entry's reason is the verdict's sentence
    assert line(out, "stage").startswith("stage          rolled-back: green at 0%, paused")
    assert "the guard rolled green back to 0% by itself at +" in line(out, "guard")
    # After the rollback reached both workers, every request went to blue.
    assert re.search(
        r"(\d+)/\1 responses after every worker took the last one carried its version and 0%", out
    )
    assert "PASSED" in out
    assert f"auto-rollback 10% -> 0% by canarymw-guard: {verdict}" in err


@pytest.fixture
def redis_url(redis_prefix: str) -> str:  # noqa: F811
    return f"{REDIS_URL}?prefix={redis_prefix}"


def _read_back(url: str, name: str) -> tuple[RolloutState, list[Change]]:
    from canarymw.store import open_store

    store = open_store(url)
    try:
        return store.read([name])[name], store.history(name)
    finally:
        store.close()


@pytest.mark.server
def test_guard_ramps_a_healthy_green_through_redis(redis_url: str) -> None:
    # From 25%: steps 25, 50, 100, two advances (the shorter ramp keeps the test quicker).
    code, out, err = demo(seed=3, percent=25, store=redis_url, json=True)
    data = json.loads(out)
    assert code == 0, err
    assert data["config"]["steps"] == [25, 50, 100]
    assert data["config"]["store"].startswith("RedisStore(")
    assert (data["stage"], data["percent"], data["paused"], data["timed_out"]) == ("done", 100, False, False)
    assert_followed(data)
    name = data["config"]["rollout"]
    assert re.fullmatch(rf"{ROLLOUT_NAME}-[0-9a-f]{{8}}", name)  # a store of the user's: a name of its own
    state, history = _read_back(redis_url, name)
    assert (state.stage, state.percent, state.verdict) == ("done", 100, data["verdict"])
    assert [(c.action, c.percent_before, c.percent_after, c.by) for c in history] == [
        ("seed", None, 0, "code"),
        ("guard", 0, 25, "canarymw-guard"),
        ("advance", 25, 50, "canarymw-guard"),
        ("advance", 50, 100, "canarymw-guard"),
    ]
    assert [s["action"] for s in data["timeline"]] == [c.action for c in history]
    assert data["variants"]["new"]["errors"] == 0


@pytest.mark.server
def test_guard_rolls_a_failing_green_back_through_redis(redis_url: str) -> None:
    code, out, err = demo(seed=4, error_rate=0.05, store=redis_url, json=True)
    data = json.loads(out)
    assert code == 0, err
    assert (data["stage"], data["percent"], data["paused"]) == ("rolled-back", 0, True)
    assert data["verdict"].startswith("rollback: canary ")
    assert_followed(data)
    state, history = _read_back(redis_url, data["config"]["rollout"])
    assert (state.stage, state.percent, state.paused) == ("rolled-back", 0, True)
    assert [c.action for c in history] == ["seed", "guard", "auto-rollback"]
    assert history[-1].reason == state.verdict == data["verdict"]
    assert history[-1].extra["decision"] == "rollback" and history[-1].extra["canary_requests"] >= 50
    assert data["variants"]["new"]["errors"] > 0 and data["variants"]["old"]["errors"] == 0


# -- flags and set-up errors (no server) ---------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"ramp_to": 50.0}, "--ramp-to cannot be combined with --guard: with --guard the", id="ramp"
        ),
        pytest.param({"ramp": False}, "--no-ramp cannot be combined with --guard:", id="no ramp"),
        pytest.param({"percent": 0.0}, "--percent 0 cannot start a guarded ramp:", id="percent 0"),
    ],
)
def test_flags_that_make_no_sense_with_the_guard_are_usage_errors(
    fields: dict[str, Any], message: str
) -> None:
    code, out, err = demo(**fields)
    assert code == demo_run.EXIT_USAGE == 2
    assert out == ""
    assert message in err and err.rstrip().endswith(".")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canarymw demo")
    add_guard_flags(parser)
    return parser


def test_guard_flags_parse() -> None:
    assert guard_options(_parser().parse_args([])) == {"guard": False, "guard_timeout": 240.0}
    assert guard_options(_parser().parse_args(["--guard", "--guard-timeout", "90"])) == {
        "guard": True,
        "guard_timeout": 90.0,
    }


@pytest.mark.parametrize("value", ["0", "nan", "soon", "4000"])
def test_bad_guard_timeout_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--guard", "--guard-timeout", value])
    assert info.value.code == 2
    assert f"--guard-timeout must be a number from 1 to 3600, not {value}" in capsys.readouterr().err


def test_the_cli_passes_the_guard_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        build_parser().parse_args(["demo", "--guard", "--guard-timeout", "30"])
    except SystemExit:
        pytest.skip("canarymw.cli does not add the demo's guard flags yet (canarymw._demo.flags)")
    seen: list[DemoOptions] = []

    def fake(options: DemoOptions, **kwargs: Any) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(demo_run, "run_demo", fake)
    assert main(["demo", "--guard", "--guard-timeout", "30", "--error-rate", "0.05"]) == 0
    assert (seen[0].guard, seen[0].guard_timeout, seen[0].error_rate) == (True, 30.0, 0.05)


# -- the guard's settings and the report (no server) ----------------------------------------


def test_guard_plan_steps_start_at_the_percent_and_travel_through_the_environment() -> None:
    assert GuardPlan.for_demo(10).steps == (10, 25, 50, 100)
    assert GuardPlan.for_demo(30).steps == (30, 50, 100)
    assert GuardPlan.for_demo(100).steps == (100,)
    with pytest.raises(ValueError, match="above 0"):
        GuardPlan.for_demo(0)
    # The library's sample-ratio check learns the spread of clustered requests: the demo
    # keeps its default level however many requests its users make.
    assert {GuardPlan.for_demo(10, n).ratio_alpha for n in (1, 5, 1000)} == {0.001}
    settings = DemoSettings(KEY, percent=0, store="sqlite:////tmp/x.db", guard=GuardPlan.for_demo(25, 5))
    assert DemoSettings.from_env(settings.to_env()) == settings
    guard = settings.guard.build() if settings.guard else None
    assert guard is not None and guard.steps == (25, 50, 100) and guard.interval == 1
    assert guard.analysis.ratio_alpha == 0.001 and guard.analysis.min_requests == 50
    with pytest.raises(ValueError, match="needs a store"):
        DemoSettings(KEY, guard=GuardPlan())
    with pytest.raises(RuntimeError, match="CANARYMW_DEMO_GUARD"):
        DemoSettings.from_env({**settings.to_env(), "CANARYMW_DEMO_GUARD": "{}"})


def _cookie(settings: DemoSettings) -> tuple[str, str]:
    decision = settings.local_rollout(50).decide(None)
    assert decision.set_cookie is not None
    return decision.set_cookie.split(";", 1)[0].split("=", 1)[1], decision.cohort


def _guarded(
    runs: list[UserRun], switches: dict[int, list[Any]], *, stage: str = "done", error_rate: float = 0.0
) -> Any:
    settings = DemoSettings(KEY, percent=0, store="sqlite:////tmp/x.db", guard=GuardPlan())
    history = [
        Change(ROLLOUT_NAME, 1, 100.0, "code", "seed", "seeded", None, 0, None, False),
        Change(ROLLOUT_NAME, 2, 101.0, "canarymw-guard", "guard", "started", 0, 10, False, False),
        Change(
            ROLLOUT_NAME,
            3,
            110.0,
            "canarymw-guard",
            "advance",
            "advance to 100%: pass",
            10,
            100,
            False,
            False,
        ),
    ]
    state = RolloutState(percent=100, version=3, stage=stage, verdict="advance to 100%: pass")
    config = {
        "rollout": ROLLOUT_NAME,
        "steps": [10, 100],
        "bake": 12,
        "min_requests": 100,
        "interval": 1,
        "ratio_alpha": 0.001,
        "guard_timeout": 240,
        "store": "SQLiteStore()",
        "requests_per_user": 2,
        "error_rate": error_rate,
        "concurrency": 1,
        "seed": 0,
    }
    server = {"kind": "gunicorn", "app": "Flask", "workers": 2, "url": "http://127.0.0.1:1"}
    return analyse_guarded(
        runs,
        settings,
        config=config,
        server=server,
        elapsed=1.0,
        origin=99.0,
        history=history,
        state=state,
        switches=switches,
        timed_out=False,
    )


def test_a_response_decided_just_before_the_switch_is_accepted_and_a_wrong_one_is_not() -> None:
    settings = DemoSettings(KEY, percent=0)
    rollout = settings.local_rollout(10)
    # A user on old at 10% and on new at 100%: a response stamped 100% that says old was
    # decided at 10%, which is fine only if the request started before the worker switched.
    cookie = ""
    while not cookie:
        value, cohort = _cookie(settings)
        cookie = value if rollout.variant_for(cohort) == "old" else ""
    logs = {
        11: [{"version": 2, "percent": 10, "at": 101.0}, {"version": 3, "percent": 100, "at": 110.05}],
        12: [{"version": 2, "percent": 10, "at": 101.0}, {"version": 3, "percent": 100, "at": 110.01}],
    }

    def hit(at: float, variant: str, pid: int, version: int, percent: float) -> Hit:
        return Hit(200, variant, pid, 0.001, cookie, False, at=at, version=version, percent=percent)

    early = UserRun(
        0, [hit(105.0, "old", 11, 2, 10), hit(110.03, "old", 11, 3, 100), hit(111.0, "new", 12, 3, 100)]
    )
    result = _guarded([early], logs)
    assert result.ok, result.checks
    assert (result.responses, result.hash_agrees, result.in_flight, result.tail, result.tail_stamped) == (
        3,
        3,
        1,
        1,
        1,
    )
    assert result.moved == {"old->new": 1, "new->old": 0}
    text = render_guarded(result)
    assert "workers +50, +10 ms" in text and "1 decided just before the worker took a new percent" in text

    late = UserRun(0, [hit(110.2, "old", 11, 3, 100)])  # after the switch: old at 100% is wrong
    failed = {c.name for c in _guarded([late], logs).checks if not c.ok}
    assert failed == {"hash"}


def test_guard_outcomes_that_fail_the_demo() -> None:
    settings = DemoSettings(KEY, percent=0)
    cookie, _ = _cookie(settings)
    runs = [UserRun(0, [Hit(200, "new", 11, 0.001, cookie, True, at=112.0, version=3, percent=100)])]
    logs = {
        11: [{"version": 3, "percent": 100, "at": 110.0}],
        12: [{"version": 3, "percent": 100, "at": 110.0}],
    }
    assert _guarded(runs, logs).ok
    paused = {c.name: c.detail for c in _guarded(runs, logs, stage="paused").checks if not c.ok}
    assert list(paused) == ["guard"] and paused["guard"].startswith("the guard paused the rollout")
    stuck = {c.name for c in _guarded(runs, {11: logs[11]}).checks if not c.ok}
    assert "followed" in stuck  # a worker never seen on the guard's changes
