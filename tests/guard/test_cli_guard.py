"""``canarymw status``/``watch``/``history`` of guarded rollouts: stage, verdict, evidence,
controller, blended intervals and outlook, in text and JSON, on SQLite and in memory.

States are written as a process would (``on_start``, then the guard's ``start`` and
``plan``, or an operator's ``operate``), with their audit entries; counters go in closed
windows well before the command runs, so the live verdict is the one :func:`assess`
gives on the same store.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from canarymw import cli
from canarymw.guard import Analysis, Guard, assess, outlook, plan, start
from canarymw.store import Counts, RolloutState, Store, on_start, operate
from canarymw.store._model import _change
from canarymw.store._stats import blended_interval, summarize

from ..store.cli_where import Where, where_for

NAME = "checkout"
GUARD = Guard(
    steps=(5, 25, 100), bake=600, min_requests=100, deadline=3600, analysis=Analysis(min_requests=50)
)
HOLDER = "web-1:4242:abc123"


@pytest.fixture(params=["sqlite", "memory"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Where]:
    with where_for(request.param, tmp_path, monkeypatch) as where:
        yield where


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def state(store: Store, name: str = NAME) -> RolloutState:
    return store.read([name])[name]


def write(store: Store, made: tuple[RolloutState, Any]) -> RolloutState:
    before = made[0].version - 1
    store.write(made[1].rollout, before, *made)
    return made[0]


def guarded(store: Store, started: float, guard: Guard = GUARD) -> RolloutState:
    """A rollout seeded at 0% long ago, put under ``guard`` at ``started`` (ramping at 5%)."""
    seeded = on_start(NAME, None, 0, now=started - 2000)
    assert seeded is not None
    write(store, seeded)
    return write(store, start(guard, NAME, seeded[0], started))


def traffic(store: Store, since: float, until: float, old: tuple[int, int], new: tuple[int, int]) -> int:
    """(requests, errors) per variant in every window from ``since`` to ``until``; returns
    the canary's requests."""
    first = (int(since) // 10 + 1) * 10
    counts = []
    for w in range(first, int(until) // 10 * 10, 10):
        counts.append(Counts(NAME, "old", w, requests=old[0], errors=old[1], latency_sum=0.01 * old[0]))
        counts.append(Counts(NAME, "new", w, requests=new[0], errors=new[1], latency_sum=0.01 * new[0]))
    store.add_counts(counts)
    return sum(c.requests for c in counts if c.variant == "new")


def block(out: str, name: str = NAME) -> dict[str, str]:
    """The guard's lines of a rollout's status: label -> text (a continued label adds lines)."""
    part = out[out.index(f"{name}: the last") :].split("\n\n")[0]
    lines = part.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  guard "))
    width = len(lines[at]) - len(lines[at][2:].split("  ", 1)[1].lstrip()) - 2
    got: dict[str, str] = {}
    label = ""
    for line in lines[at:]:
        head, text = line[2:width].strip(), line[width:].strip()
        label = head or label
        got[label] = f"{got[label]}\n{text}" if label in got else text
    return got


def window_numbers(store: Store, window: float = 300) -> tuple[Any, Any]:
    variants = summarize(store.read_counts([NAME], since=time.time() - window), [NAME])[NAME]
    return variants["old"], variants["new"]


def pct(rate: float) -> str:
    return f"{rate * 100:.2f}%"


# -- ramping: the live verdict ------------------------------------------------------------


def test_a_ramping_rollout_shows_the_live_verdict_and_what_comes_next(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    guarded(where.store, now - 1000)
    traffic(where.store, now - 900, now - 20, old=(95, 0), new=(5, 0))  # 5%, as configured
    expected = assess(where.store, NAME, state(where.store), GUARD, now)
    assert expected.verdict.decision == "pass"

    code, out, err = run(capsys, "status", "--store", where.url)
    assert code == 0 and err == ""
    header = out.splitlines()[0].split()
    assert header == ["rollout", "percent", "paused", "stage", "version", "age", "by", "reason"]
    assert out.splitlines()[1].split()[:5] == [NAME, "5%", "no", "ramping", "2"]
    g = block(out)
    assert g["guard"] == "stage ramping; this step began 16 min ago; steps 5% -> 25% -> 100%"
    assert g["verdict"] == expected.verdict.sentence
    assert g["verdict"].startswith("pass: canary 0 errors / ")
    assert g["evidence"] == (
        f"errors e-value 1 (harm at 20); {expected.step_requests:,} canary requests at this step"
    )
    assert g["controller"] == "none: no process holds the lease; the guard acts only while one does"
    old, new = window_numbers(where.store)
    lines = g["blended 95%"].splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "at 5% (now)",
        "at 25% (next step)",
        "at 100% (all on new)",
    ]
    for line, percent in zip(lines, (5, 25, 100), strict=True):
        low, estimate, high = blended_interval(old, new, percent) or (0, 0, 0)
        assert line.endswith(f": {pct(estimate)} ({pct(low)} to {pct(high)})")
    assert g["next"] == "advance to 25% at its next look"
    assert "note" not in g and "last action" not in g


def test_harm_shows_as_a_rollback_to_come(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    guarded(where.store, now - 1000)
    traffic(where.store, now - 900, now - 20, old=(95, 1), new=(5, 3))
    code, out, _ = run(capsys, "status", NAME, "--store", where.url)
    assert code == 0
    g = block(out)
    assert g["verdict"].startswith("rollback: canary ") and "harm is certain at alpha 0.05" in g["verdict"]
    e = float(re.search(r"errors e-value ([0-9.e+,]+)", g["evidence"]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert e >= 20
    assert g["next"] == "roll back to 0% and pause at its next look"


def test_too_little_exposure_waits_and_says_for_what(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    guarded(where.store, now - 300)  # 5 min into a bake time of 10
    canary = traffic(where.store, now - 280, now - 20, old=(38, 0), new=(2, 0))
    assert 50 <= canary < 100  # enough to decide, not enough to advance
    code, out, _ = run(capsys, "status", "--json", "--store", where.url)
    assert code == 0
    g = json.loads(out)["rollouts"][NAME]["guard"]
    assert g["live"] is True and g["decision"] == "pass" and g["step_requests"] == canary
    assert re.fullmatch(
        rf"advance to 25% in [45] min \(bake time\), after {100 - canary} more canary requests, "
        r"unless harm is found; deadline in 5\d min \(hold\)",
        g["outlook"],
    ), g["outlook"]

    # Stricter settings (the guard's "settings changed" action): not enough to decide yet.
    stricter = Guard(**{**_kw(), "analysis": Analysis(min_requests=500)})
    write(where.store, start(stricter, NAME, state(where.store), time.time()))
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    g = json.loads(out)["rollouts"][NAME]["guard"]
    assert g["decision"] == "wait" and g["sentence"].startswith(
        f"wait: the canary has had {canary} of the 500"
    )
    assert re.fullmatch(
        rf"advance to 25% in [45] min \(bake time\), after {100 - canary} more canary requests, once the "
        r"analysis can decide, unless harm is found; deadline in 5\d min \(hold\)",
        g["outlook"],
    ), g["outlook"]


def test_a_note_of_the_verdict_is_shown(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    guarded(where.store, now - 1000)
    first = (int(now - 900) // 10 + 1) * 10
    slow, fast = {300: 5}, {176: 95}
    where.store.add_counts(
        [
            Counts(NAME, variant, w, requests=n, latency_sum=0.01 * n, buckets=buckets)
            for w in range(first, int(now - 20) // 10 * 10, 10)
            for variant, n, buckets in (("old", 95, fast), ("new", 5, slow))
        ]
    )
    _, out, _ = run(capsys, "status", "--store", where.url)
    g = block(out)
    assert g["note"].startswith("the canary's p95 is ") and "x the baseline's" in g["note"]


# -- stages where the guard judges nothing --------------------------------------------------


def test_a_rollout_paused_by_the_guard_shows_the_last_action(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    g = Guard(steps=(5, 25, 100), bake=600, min_requests=100, deadline=900)
    ramping = guarded(where.store, now - 1000, g)
    verdict = assess(where.store, NAME, ramping, g, now).verdict  # no traffic: wait
    made = plan(g, NAME, ramping, verdict, 0, now)  # past the deadline: hold
    assert made is not None and made[1].action == "auto-pause"
    paused = write(where.store, made)
    code, out, _ = run(capsys, "status", "--store", where.url)
    assert code == 0
    assert out.splitlines()[1].split()[:4] == [NAME, "5%", "yes", "paused"]
    got = block(out)
    assert got["guard"] == "stage paused; this step began 16 min ago; steps 5% -> 25% -> 100%"
    assert got["last action"] == f"{paused.verdict} (not judged now: stage paused)"
    assert paused.verdict is not None and paused.verdict.startswith(
        "paused: the step at 5% reached its deadline"
    )
    assert got["next"] == "nothing until an operator resumes (canarymw resume)"
    assert "verdict" not in got and "evidence" not in got

    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    j = json.loads(out)["rollouts"][NAME]["guard"]
    assert (j["stage"], j["live"], j["decision"], j["sentence"]) == ("paused", False, None, paused.verdict)
    assert j["e_values"] is None and j["step_requests"] is None


def test_a_rolled_back_rollout_and_its_history(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    ramping = guarded(where.store, now - 1000)
    traffic(where.store, now - 900, now - 20, old=(95, 1), new=(5, 3))
    verdict = assess(where.store, NAME, ramping, GUARD, now).verdict
    made = plan(GUARD, NAME, ramping, verdict, 500, now)
    assert made is not None and made[1].action == "auto-rollback"
    write(where.store, made)
    _, out, _ = run(capsys, "status", "--store", where.url)
    assert out.splitlines()[1].split()[:4] == [NAME, "0%", "yes", "rolled-back"]
    got = block(out)
    assert got["last action"] == f"{verdict.sentence} (not judged now: stage rolled-back)"
    assert got["next"] == "nothing until an operator resumes (canarymw resume)"
    assert got["blended 95%"].splitlines()[0].startswith("at 0% (now): ")
    assert got["blended 95%"].splitlines()[1].startswith("at 5% (next step): ")

    # The guard's actions are in the audit log like any other, by canarymw-guard.
    code, out, _ = run(capsys, "history", NAME, "--store", where.url)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[2:4] for r in rows] == [
        ["seed", "code"],
        ["guard", "canarymw-guard"],
        ["auto-rollback", "canarymw-guard"],
    ]
    assert rows[1][4:7] == ["0%", "->", "5%"] and "guarded ramp started at 5%" in out
    assert rows[2][4:9] == ["5%", "->", "0%", "no", "->"] and rows[2][9] == "yes"
    assert out.splitlines()[3].endswith(verdict.sentence)
    _, out, _ = run(capsys, "history", NAME, "--json", "--store", where.url)
    last = json.loads(out)["history"][-1]
    assert last["action"] == "auto-rollback" and last["by"] == "canarymw-guard"
    assert last["extra"]["decision"] == "rollback" and last["extra"]["errors_e_value"] >= 20


def test_a_promoted_rollout_is_done(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    ramping = guarded(where.store, now - 1000)
    write(where.store, operate(NAME, ramping, "promote", by="alice", reason="looks good", now=now - 60))
    traffic(where.store, now - 50, now - 20, old=(0, 0), new=(100, 1))
    _, out, _ = run(capsys, "status", "--store", where.url)
    got = block(out)
    assert got["guard"] == "stage done; this step began 60 s ago; steps 5% -> 25% -> 100%"
    assert got["last action"] == "- (not judged now: stage done)"
    assert got["next"] == "nothing: the ramp is done"
    old, new = window_numbers(where.store)
    low, estimate, high = blended_interval(old, new, 100) or (0, 0, 0)
    assert got["blended 95%"] == f"at 100% (now): {pct(estimate)} ({pct(low)} to {pct(high)})"  # one line

    write(where.store, operate(NAME, state(where.store), "pause", by="bob", now=now))
    got = block(run(capsys, "status", "--store", where.url)[1])
    assert got["guard"].startswith("stage done, paused by an operator; this step began ")


def test_an_operator_pause_of_a_ramp_stops_the_live_verdict(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    ramping = guarded(where.store, now - 1000)
    traffic(where.store, now - 900, now - 20, old=(95, 0), new=(5, 0))
    write(where.store, operate(NAME, ramping, "pause", by="bob", reason="incident", now=now))
    got = block(run(capsys, "status", "--store", where.url)[1])
    assert got["guard"].startswith("stage ramping, paused by an operator; this step began 16 min ago")
    assert got["last action"] == "- (not judged now: paused by an operator)"
    assert got["next"] == "nothing until an operator resumes (canarymw resume)"


# -- the controller ----------------------------------------------------------------------


def test_the_controller_holding_the_lease_is_shown(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    guarded(where.store, time.time() - 1000)
    token = where.store.lease(NAME, HOLDER, 30)
    assert token is not None
    got = block(run(capsys, "status", "--store", where.url)[1])
    assert re.fullmatch(
        rf"{re.escape(HOLDER)} \(lease token {token}, expires in (29(\.\d)?|30) s\)", got["controller"]
    ), got["controller"]
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    c = json.loads(out)["rollouts"][NAME]["guard"]["controller"]
    assert c["holder"] == HOLDER and c["token"] == token and 25 < c["expires_in"] <= 30
    where.store.release(NAME, HOLDER)
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    assert json.loads(out)["rollouts"][NAME]["guard"]["controller"] is None


# -- unguarded rollouts, JSON, watch -------------------------------------------------------


def test_unguarded_rollouts_look_as_before(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seeded = on_start("search", None, 50)
    assert seeded is not None
    write(where.store, seeded)
    _, alone, _ = run(capsys, "status", "--store", where.url)
    assert alone.splitlines()[0].split() == ["rollout", "percent", "paused", "version", "age", "by", "reason"]
    assert "guard" not in alone and "stage" not in alone
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    assert json.loads(out)["rollouts"]["search"]["guard"] is None

    guarded(where.store, time.time() - 1000)
    _, both, _ = run(capsys, "status", "--store", where.url)
    rows = {line.split()[0]: line.split() for line in both.splitlines()[1:3]}
    assert rows["search"][3] == "-" and rows[NAME][3] == "ramping"
    search = both[both.index("search: the last") :]
    # The unguarded rollout's block is the same as when it was alone in the store.
    assert search == alone[alone.index("search: the last") :]


def test_status_json_has_a_guard_object(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    ramping = guarded(
        where.store, now - 1000, Guard(**{**_kw(), "analysis": Analysis(latency_objective=0.5)})
    )
    traffic(where.store, now - 900, now - 20, old=(95, 0), new=(5, 0))
    where.store.lease(NAME, HOLDER, 30)
    code, out, _ = run(capsys, "status", NAME, "--json", "--store", where.url)
    assert code == 0
    g = json.loads(out)["rollouts"][NAME]["guard"]
    assert set(g) == {
        "stage",
        "stage_since",
        "guard_since",
        "steps",
        "live",
        "decision",
        "sentence",
        "notes",
        "e_values",
        "harm_at",
        "step_requests",
        "controller",
        "blended",
        "outlook",
        "error",
    }
    guard = Guard.from_settings(ramping.guard or {})
    expected = assess(where.store, NAME, ramping, guard, now)
    assert g["stage"] == "ramping" and g["steps"] == [5, 25, 100] and g["live"] is True
    assert g["stage_since"] == g["guard_since"] == pytest.approx(now - 1000)
    assert g["decision"] == "pass" and g["sentence"] == expected.verdict.sentence and g["notes"] == []
    assert g["e_values"] == {"errors": 1.0, "latency": 1.0}
    assert g["harm_at"] == {"errors": pytest.approx(40), "latency": pytest.approx(40)}  # alpha split in two
    assert g["step_requests"] == expected.step_requests
    assert g["controller"]["holder"] == HOLDER
    old, new = window_numbers(where.store)
    assert g["blended"]["confidence"] == 0.95
    for key, percent in (("now", 5), ("next", 25), ("full", 100)):
        low, estimate, high = blended_interval(old, new, percent) or (0, 0, 0)
        assert g["blended"][key] == {
            "percent": percent,
            "low": pytest.approx(low),
            "estimate": pytest.approx(estimate),
            "high": pytest.approx(high),
        }
    assert g["outlook"] == outlook(guard, ramping, expected.verdict, expected.step_requests, now)


def _kw() -> dict[str, Any]:
    return {"steps": (5, 25, 100), "bake": 600, "min_requests": 100, "deadline": 3600}


def test_a_variant_without_requests_has_no_interval(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    guarded(where.store, time.time() - 1000)
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    g = json.loads(out)["rollouts"][NAME]["guard"]
    assert g["blended"]["now"] == {"percent": 5, "low": None, "estimate": None, "high": None}
    assert g["decision"] == "wait" and g["sentence"].startswith("wait: no traffic yet")
    got = block(run(capsys, "status", "--store", where.url)[1])
    assert got["blended 95%"].splitlines()[0] == (
        "at 5% (now): - (a variant with weight had no requests in the window)"
    )


def test_unreadable_guard_settings_do_not_break_status(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    ramping = guarded(where.store, now - 1000)
    odd = replace(ramping, version=ramping.version + 1, updated_at=now, guard={"steps": [50, 10]})
    write(where.store, (odd, _change(NAME, ramping, odd, "guard", "canarymw-guard", "from a newer version")))
    code, out, err = run(capsys, "status", "--store", where.url)
    assert code == 0 and err == ""
    got = block(out)
    assert got["error"].startswith("the guard's settings cannot be read: Guard got steps=")
    assert got["guard"] == "stage ramping; this step began 16 min ago"
    _, out, _ = run(capsys, "status", "--json", "--store", where.url)
    g = json.loads(out)["rollouts"][NAME]["guard"]
    assert g["stage"] == "ramping" and g["outlook"] is None and g["error"].startswith("the guard's settings")


def test_watch_shows_the_guard_and_judges_incrementally(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import canarymw.guard._controller as controller

    now = time.time()
    guarded(where.store, now - 1000)
    traffic(where.store, now - 900, now - 20, old=(95, 0), new=(5, 0))
    made: list[object] = []

    class Counting(controller.Assessor):
        def __init__(self, guard: Guard) -> None:
            made.append(guard)
            super().__init__(guard)

    monkeypatch.setattr(controller, "Assessor", Counting)
    code, out, err = run(capsys, "watch", "--count", "3", "--interval", "0.1", "--store", where.url)
    assert code == 0 and err == ""
    assert out.count("  verdict ") == 3 and out.count("advance to 25% at its next look") == 3
    assert len(made) == 1  # one judgement kept across refreshes
    _, status, _ = run(capsys, "status", "--store", where.url)
    assert block(status)["verdict"] in out


def test_infinite_evidence_is_valid_json() -> None:
    from canarymw.store._report import _finite

    assert _finite(math.inf) == 1.7976931348623157e308 and _finite(3.0) == 3.0
    json.loads(json.dumps({"e": _finite(math.inf)}, allow_nan=False))
