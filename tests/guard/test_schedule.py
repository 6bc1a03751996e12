"""The guard's schedule as a pure state machine: start, plan, operators' overrides,
the windows it judges, what it says it will do next, and its settings."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import pytest

from canarymw.guard import Analysis, Guard, Verdict, Window, outlook, plan, start
from canarymw.guard._schedule import BY, SETTLE, closed, percents_by_window
from canarymw.store import Change, RolloutState, operate

from ._sim import bucket, counts, window

T0 = 1_000_000.0
NAME = "checkout-v2"
GUARD = Guard(steps=(1, 5, 25, 50, 100), bake=600, min_requests=500, deadline=3600)
SHIP = Guard(steps=(1, 5, 25, 50, 100), bake=600, min_requests=500, deadline=3600, on_deadline="ship")

ANALYSIS = Analysis()
PASS = ANALYSIS.judge([window((1000, 10), (9000, 90), percent=10.0)])
ROLLBACK = ANALYSIS.judge([window((90, 7), (810, 3))])
PAUSE = ANALYSIS.judge([window((200, 0), (19800, 0), percent=10.0)])
WAIT = ANALYSIS.judge([window((0, 0), (1000, 5))])
SLOW = Analysis(latency_objective=0.25).judge(
    [
        Window(
            0.0,
            counts("old", 900, buckets={bucket(0.1): 890, bucket(0.4): 10}),
            counts("new", 100, buckets={bucket(0.1): 60, bucket(0.4): 40}),
        )
    ]
)


def test_the_verdicts_used_here() -> None:
    assert [v.decision for v in (PASS, ROLLBACK, PAUSE, WAIT, SLOW)] == [
        "pass",
        "rollback",
        "pause",
        "wait",
        "rollback",
    ]
    assert SLOW.latency is not None and SLOW.latency.harm


def fresh(**kw: Any) -> RolloutState:
    """A seeded, unguarded rollout."""
    base: dict[str, Any] = {
        "percent": 0.0,
        "version": 3,
        "updated_at": T0 - 100,
        "updated_by": "code",
        "code_percent": 0.0,
        "epoch": "e1",
    }
    base.update(kw)
    return RolloutState(**base)


def guarded(percent: float = 1.0, guard: Guard = GUARD, **kw: Any) -> RolloutState:
    """A rollout the guard started at T0, then moved to ``percent`` (still ramping)."""
    state, _ = start(guard, NAME, fresh(), T0)
    return replace(state, percent=percent, **kw)


def planned(
    state: RolloutState,
    verdict: Verdict | None,
    step_requests: int = 500,
    now: float = T0 + 600,
    guard: Guard = GUARD,
) -> tuple[RolloutState, Change]:
    made = plan(guard, NAME, state, verdict, step_requests, now)
    assert made is not None
    return made


# -- start ----------------------------------------------------------------------------


def test_start_puts_a_fresh_rollout_at_the_first_step() -> None:
    before = fresh()
    after, change = start(GUARD, NAME, before, T0)
    assert (after.percent, after.stage, after.paused, after.held) == (1.0, "ramping", False, False)
    assert (after.guard, after.guard_since, after.stage_since, after.verdict) == (
        GUARD.settings(),
        T0,
        T0,
        None,
    )
    assert (after.version, after.updated_at, after.updated_by) == (4, T0, BY)
    assert after.reason == "guarded ramp started at 1%"
    assert after.epoch == "e1" and after.code_percent == 0.0
    assert (change.rollout, change.version, change.at, change.by, change.action) == (NAME, 4, T0, BY, "guard")
    assert (change.percent_before, change.percent_after, change.reason) == (0.0, 1.0, after.reason)
    assert change.extra == {}


def test_start_keeps_a_percent_already_above_the_first_step() -> None:
    after, change = start(GUARD, NAME, fresh(percent=7.0), T0)
    assert (after.percent, after.stage, after.reason) == (7.0, "ramping", "guarded ramp started at 7%")
    assert change.percent_before == change.percent_after == 7.0


def test_start_at_100_is_done() -> None:
    after, _ = start(GUARD, NAME, fresh(percent=100.0), T0)
    assert (after.percent, after.stage, after.reason) == (100.0, "done", "guarded; already at 100%")


def test_start_of_a_paused_rollout_keeps_it_paused() -> None:
    after, change = start(GUARD, NAME, fresh(percent=10.0, paused=True, held=True), T0)
    assert (after.percent, after.stage, after.paused, after.held) == (10.0, "paused", True, True)
    assert after.reason == "guarded; paused by an operator" and change.action == "guard"
    assert after.guard == GUARD.settings() and after.guard_since == T0


def test_start_of_a_rolled_back_rollout_keeps_it_rolled_back() -> None:
    after, _ = start(GUARD, NAME, fresh(percent=0.0, held=True), T0)
    assert (after.percent, after.stage, after.paused, after.held) == (0.0, "rolled-back", False, True)
    assert after.reason == "guarded; rolled back by an operator"


def test_plan_starts_an_unguarded_rollout() -> None:
    # Whatever the verdict: the guard first takes the rollout over.
    assert plan(GUARD, NAME, fresh(), ROLLBACK, 0, T0) == start(GUARD, NAME, fresh(), T0)


def test_new_settings_only_update_the_settings() -> None:
    before = guarded(25.0, stage_since=T0 + 50, verdict="advance to 25%: ...")
    other = Guard(steps=(1, 5, 25, 50, 100), bake=300, min_requests=500, deadline=3600)
    after, change = planned(before, PASS, now=T0 + 900, guard=other)
    assert after.guard == other.settings() != before.guard
    assert (change.action, change.reason, change.by) == ("guard", "the guard's settings changed", BY)
    assert change.extra == {}
    # Only the settings (and the bookkeeping of any change) moved: the evidence and the
    # step keep counting from where they were.
    same = replace(after, guard=before.guard, version=before.version, updated_at=before.updated_at)
    assert replace(same, updated_by=before.updated_by, reason=before.reason) == before
    assert (after.version, after.updated_at) == (before.version + 1, T0 + 900)
    assert (after.guard_since, after.stage_since, after.stage, after.percent) == (
        T0,
        T0 + 50,
        "ramping",
        25.0,
    )
    # A guarded state under other settings, even paused or done, gets them the same way.
    for state in (guarded(paused=True, held=True, stage="paused"), guarded(100.0, stage="done")):
        moved, _ = planned(state, None, guard=other)
        assert moved.guard == other.settings() and moved.stage == state.stage


# -- advancing -------------------------------------------------------------------------


def test_advance_once_passed_baked_and_exposed() -> None:
    before = guarded(1.0)
    after, change = planned(before, PASS, step_requests=500, now=T0 + 600)
    assert (after.percent, after.stage, after.stage_since, after.held) == (5.0, "ramping", T0 + 600, False)
    assert after.guard_since == T0  # the evidence carries over steps
    assert after.verdict == after.reason == f"advance to 5%: {PASS.sentence}"
    assert (change.action, change.by, change.at, change.version) == (
        "advance",
        BY,
        T0 + 600,
        before.version + 1,
    )
    assert (change.percent_before, change.percent_after) == (1.0, 5.0)
    assert change.extra == {
        "decision": "pass",
        "errors_e_value": PASS.errors.e_value,
        "canary_requests": 1000,
        "baseline_requests": 9000,
    }


@pytest.mark.parametrize(
    ("verdict", "step_requests", "now"),
    [
        (WAIT, 500, T0 + 600),  # the analysis cannot decide yet
        (PASS, 500, T0 + 599.999),  # still baking
        (PASS, 499, T0 + 600),  # one canary request short
        (PASS, 0, T0 + 3599.999),  # long past the bake, but not exposed
        (None, 500, T0 + 600),  # not judged
    ],
)
def test_no_advance_while_a_condition_is_missing(
    verdict: Verdict | None, step_requests: int, now: float
) -> None:
    assert plan(GUARD, NAME, guarded(1.0), verdict, step_requests, now) is None


def test_bake_counts_from_the_step_not_from_the_guard() -> None:
    state = guarded(5.0, stage_since=T0 + 1000)
    assert plan(GUARD, NAME, state, PASS, 5000, T0 + 1599) is None
    assert planned(state, PASS, 5000, T0 + 1600)[0].percent == 25.0
    # Without a stage_since, the state's last change time stands in.
    legacy = replace(state, stage_since=None, updated_at=T0 + 2000)
    assert plan(GUARD, NAME, legacy, PASS, 5000, T0 + 2599) is None
    assert planned(legacy, PASS, 5000, T0 + 2600)[0].percent == 25.0


def test_every_step_in_turn_then_done() -> None:
    state = guarded(1.0)
    now = T0
    seen = []
    while state.stage == "ramping":
        now += 600
        state, change = planned(state, PASS, 500, now)
        seen.append((change.action, state.percent, state.stage))
    assert seen == [
        ("advance", 5.0, "ramping"),
        ("advance", 25.0, "ramping"),
        ("advance", 50.0, "ramping"),
        ("advance", 100.0, "done"),
    ]
    assert plan(GUARD, NAME, state, PASS, 10_000, now + 10_000) is None  # done: nothing more


def test_a_percent_between_steps_advances_to_the_next_one() -> None:
    assert planned(guarded(7.0), PASS)[0].percent == 25.0


def test_ramping_at_the_last_step_finishes_without_moving() -> None:
    after, change = planned(guarded(100.0), PASS)
    assert (after.percent, after.stage, change.action) == (100.0, "done", "advance")
    assert after.verdict == after.reason == PASS.sentence


def test_one_step_is_a_switch() -> None:
    switch = Guard(steps=(100,), bake=0, min_requests=0, deadline=60)
    state, _ = start(switch, NAME, fresh(), T0)
    assert (state.percent, state.stage) == (100.0, "done")


def test_plan_is_pure() -> None:
    state = guarded(5.0)
    assert plan(GUARD, NAME, state, PASS, 500, T0 + 600) == plan(GUARD, NAME, state, PASS, 500, T0 + 600)
    assert state == guarded(5.0)


# -- rolling back and pausing ------------------------------------------------------------


def test_harm_rolls_back_at_once() -> None:
    before = guarded(25.0, stage_since=T0 + 5)
    after, change = planned(before, ROLLBACK, step_requests=0, now=T0 + 10)  # no bake needed
    assert (after.percent, after.paused, after.held, after.stage) == (0.0, True, True, "rolled-back")
    assert (after.stage_since, after.guard_since) == (T0 + 10, T0)
    assert after.verdict == after.reason == ROLLBACK.sentence
    assert after.updated_by == BY and after.version == before.version + 1
    assert (change.action, change.by, change.reason) == ("auto-rollback", BY, ROLLBACK.sentence)
    assert (change.percent_before, change.percent_after, change.paused_before, change.paused_after) == (
        25.0,
        0.0,
        False,
        True,
    )
    assert change.extra == {
        "decision": "rollback",
        "errors_e_value": ROLLBACK.errors.e_value,
        "canary_requests": 90,
        "baseline_requests": 810,
    }
    json.loads(change.to_json())  # the audit entry is storable


def test_latency_harm_records_the_latency_evidence() -> None:
    _, change = planned(guarded(5.0), SLOW)
    assert change.action == "auto-rollback"
    assert SLOW.latency is not None
    assert change.extra["latency_e_value"] == SLOW.latency.e_value
    assert "requests over 258 ms" in change.reason


def test_a_split_mismatch_pauses() -> None:
    before = guarded(5.0, stage_since=T0 + 5)
    after, change = planned(before, PAUSE, now=T0 + 20)
    assert (after.percent, after.paused, after.held, after.stage) == (5.0, True, True, "paused")
    assert after.stage_since == T0 + 5  # kept
    assert after.verdict == after.reason == PAUSE.sentence
    assert (change.action, change.by, change.paused_after) == ("auto-pause", BY, True)
    assert change.extra["decision"] == "pause"


@pytest.mark.parametrize(
    "state",
    [
        guarded(5.0, paused=True, held=True),  # paused by an operator
        guarded(5.0, paused=True, held=True, stage="paused"),  # paused by the guard
        guarded(100.0, stage="done"),
        guarded(0.0, held=True, stage="rolled-back"),
        guarded(0.0, held=True, paused=True, stage="rolled-back"),
    ],
)
@pytest.mark.parametrize("verdict", [PASS, ROLLBACK, PAUSE, WAIT, None])
def test_paused_done_or_rolled_back_rollouts_are_left_alone(
    state: RolloutState, verdict: Verdict | None
) -> None:
    assert plan(GUARD, NAME, state, verdict, 10_000, T0 + 100_000) is None


# -- the deadline -----------------------------------------------------------------------


def test_hold_pauses_at_the_deadline_without_the_exposure() -> None:
    state = guarded(1.0)
    assert plan(GUARD, NAME, state, WAIT, 10, T0 + 3599.999) is None
    after, change = planned(state, WAIT, step_requests=10, now=T0 + 3600)
    assert (after.percent, after.paused, after.held, after.stage) == (1.0, True, True, "paused")
    assert (
        after.reason
        == after.verdict
        == (
            "paused: the step at 1% reached its deadline of 3600 s without the exposure to decide "
            f"(10 of 500 canary requests; {WAIT.sentence})"
        )
    )
    assert (change.action, change.by, change.extra["decision"]) == ("auto-pause", BY, "wait")


def test_hold_pauses_a_passing_canary_short_of_requests() -> None:
    after, change = planned(guarded(1.0), PASS, step_requests=499, now=T0 + 3600)
    assert change.action == "auto-pause" and "(499 of 500 canary requests; pass: " in after.reason


def test_a_ready_canary_advances_even_past_the_deadline() -> None:
    assert planned(guarded(1.0), PASS, step_requests=500, now=T0 + 7200)[1].action == "advance"


def test_ship_advances_a_passing_canary_at_the_deadline() -> None:
    state = guarded(50.0, guard=SHIP)
    assert plan(SHIP, NAME, state, PASS, 10, T0 + 3599.999) is None  # before: the usual rules
    after, change = planned(state, PASS, step_requests=10, now=T0 + 3600, guard=SHIP)
    assert (change.action, after.percent, after.stage) == ("advance", 100.0, "done")


@pytest.mark.parametrize("verdict", [WAIT, ANALYSIS.judge([window((49, 0), (1000, 10))])])
def test_ship_never_promotes_a_canary_that_cannot_be_judged(verdict: Verdict) -> None:
    # An idle canary (or one short of the analysis's minimum) is paused, not shipped.
    assert verdict.decision == "wait"
    after, change = planned(guarded(50.0, guard=SHIP), verdict, step_requests=0, now=T0 + 3600, guard=SHIP)
    assert (change.action, after.percent, after.stage, after.paused) == ("auto-pause", 50.0, "paused", True)


def test_harm_still_rolls_back_past_the_deadline() -> None:
    assert planned(guarded(5.0, guard=SHIP), ROLLBACK, 0, T0 + 10**6, guard=SHIP)[1].action == "auto-rollback"


# -- operators win -------------------------------------------------------------------------


def test_an_operator_pause_keeps_the_stage_and_idles_the_guard() -> None:
    before = guarded(5.0, stage_since=T0 + 50)
    after, change = operate(NAME, before, "pause", by="alice", reason="looking", now=T0 + 100)
    assert (after.stage, after.stage_since, after.guard_since) == ("ramping", T0 + 50, T0)
    assert (after.paused, after.held, after.percent) == (True, True, 5.0)
    assert change.action == "pause" and change.by == "alice"
    for verdict in (PASS, ROLLBACK, PAUSE):
        assert plan(GUARD, NAME, after, verdict, 10_000, T0 + 10_000) is None


def test_resuming_a_guard_paused_rollout_starts_the_step_again() -> None:
    paused, _ = planned(guarded(5.0, stage_since=T0 + 50), PAUSE, now=T0 + 100)
    after, _ = operate(NAME, paused, "resume", by="alice", now=T0 + 200)
    assert (after.stage, after.paused, after.held, after.percent) == ("ramping", False, False, 5.0)
    assert (after.stage_since, after.guard_since) == (T0 + 200, T0)  # a new bake; the evidence kept
    assert plan(GUARD, NAME, after, PASS, 500, T0 + 799) is None
    assert planned(after, PASS, 500, T0 + 800)[0].percent == 25.0


def test_resuming_an_operator_pause_keeps_the_step() -> None:
    paused, _ = operate(NAME, guarded(5.0, stage_since=T0 + 50), "pause", by="alice", now=T0 + 100)
    after, _ = operate(NAME, paused, "resume", by="alice", now=T0 + 200)
    assert (after.stage, after.paused, after.stage_since, after.guard_since) == (
        "ramping",
        False,
        T0 + 50,
        T0,
    )


def test_resuming_after_a_rollback_is_a_new_attempt() -> None:
    rolled, _ = planned(guarded(25.0), ROLLBACK, now=T0 + 100)
    after, _ = operate(NAME, rolled, "resume", by="alice", now=T0 + 500)
    assert (after.stage, after.paused, after.held) == ("ramping", False, False)
    assert (after.stage_since, after.guard_since) == (T0 + 500, T0 + 500)  # the old evidence is void
    # The same after an operator's rollback.
    manual, _ = operate(NAME, guarded(25.0), "rollback", by="alice", now=T0 + 100)
    again, _ = operate(NAME, manual, "resume", by="alice", now=T0 + 500)
    assert (again.stage, again.stage_since, again.guard_since) == ("ramping", T0 + 500, T0 + 500)


def test_resuming_after_a_rollback_starts_again_from_the_first_step() -> None:
    """ "resume starts a new attempt from the first step" (Guard's and outlook's words): at
    0% the canary would get no requests, the verdict would wait, and the guard would never
    move it (until the deadline paused it)."""
    rolled, _ = planned(guarded(25.0), ROLLBACK, now=T0 + 100)
    after, change = operate(NAME, rolled, "resume", by="alice", now=T0 + 500)
    assert after.percent == GUARD.steps[0] == 1.0
    assert (change.percent_before, change.percent_after) == (0.0, 1.0)
    assert plan(GUARD, NAME, after, WAIT, 0, T0 + 505) is None  # then the usual schedule
    assert planned(after, PASS, 500, T0 + 1100)[0].percent == 5.0


@pytest.mark.parametrize(
    ("percent", "stage"), [(25.0, "ramping"), (3.0, "ramping"), (0.0, "rolled-back"), (100.0, "done")]
)
def test_an_operator_set_moves_the_stage_with_the_percent(percent: float, stage: str) -> None:
    before = guarded(5.0, stage_since=T0 + 50)
    after, change = operate(NAME, before, "set", percent=percent, by="alice", now=T0 + 300)
    assert (after.percent, after.stage, after.stage_since, after.guard_since) == (
        percent,
        stage,
        T0 + 300,
        T0,
    )
    assert change.action == "set" and after.held is False


def test_an_operator_set_continues_the_ramp_from_there() -> None:
    after, _ = operate(NAME, guarded(5.0), "set", percent=25, by="alice", now=T0 + 300)
    assert plan(GUARD, NAME, after, PASS, 500, T0 + 899) is None  # a new bake from the set
    assert planned(after, PASS, 500, T0 + 900)[0].percent == 50.0


def test_an_operator_promote_is_done() -> None:
    after, _ = operate(NAME, guarded(5.0), "promote", by="alice", now=T0 + 300)
    assert (after.percent, after.stage, after.stage_since) == (100.0, "done", T0 + 300)
    assert plan(GUARD, NAME, after, ROLLBACK, 500, T0 + 10_000) is None


def test_an_operator_rollback_ends_the_attempt() -> None:
    after, _ = operate(NAME, guarded(25.0), "rollback", by="alice", now=T0 + 300)
    assert (after.percent, after.stage, after.held, after.paused) == (0.0, "rolled-back", True, False)
    assert plan(GUARD, NAME, after, PASS, 500, T0 + 10_000) is None


def test_operators_on_an_unguarded_rollout_leave_the_stage_alone() -> None:
    for action, kw in (
        ("set", {"percent": 50}),
        ("promote", {}),
        ("rollback", {}),
        ("pause", {}),
        ("resume", {}),
    ):
        after, _ = operate(NAME, fresh(percent=10.0), action, by="alice", now=T0, **kw)  # type: ignore[arg-type]
        assert (after.stage, after.stage_since, after.guard_since) == (None, None, None)


# -- the windows it judges ---------------------------------------------------------------


def entry(at: float, version: int, percent: float) -> Change:
    return Change(NAME, version, at, "alice", "set", "", None, percent, None, False)


HISTORY = [entry(0.0, 1, 0.0), entry(100.0, 2, 5.0), entry(245.0, 3, 25.0)]


def test_percents_by_window() -> None:
    starts = [float(s) for s in range(-10, 300, 10)]
    got = percents_by_window(HISTORY, starts)
    assert SETTLE == 2.0
    assert got == {
        # -10 and 0: before or at the first entry, nothing known / a change inside.
        **dict.fromkeys(range(10, 100, 10), 0.0),  # 90 ends exactly at the change: kept
        # 100: the change at its start; 110: at 100 <= 110 - 2: kept.
        **dict.fromkeys(range(110, 240, 10), 5.0),
        # 240: a change inside; 250: a change 5 s before, more than the settle time.
        **dict.fromkeys(range(250, 300, 10), 25.0),
    }
    assert all(isinstance(k, int) for k in got)


def test_a_change_within_the_settle_time_before_a_window_leaves_it_out() -> None:
    history = [entry(0.0, 1, 0.0), entry(108.5, 2, 5.0)]
    assert percents_by_window(history, [110.0]) == {}  # 1.5 s before: processes may lag
    assert percents_by_window(history, [110.5]) == {110: 5.0}  # exactly the settle time before
    assert percents_by_window(history, [110.0], settle=1.0) == {110: 5.0}


def test_percents_by_window_takes_the_audit_log_in_any_order() -> None:
    shuffled = HISTORY[:]
    random.Random(1).shuffle(shuffled)
    starts = [float(s) for s in range(0, 400, 10)]
    assert percents_by_window(shuffled, starts) == percents_by_window(HISTORY, starts)
    # Two changes at the same second: the later version is the one in force.
    same = [entry(0.0, 1, 0.0), entry(50.0, 3, 25.0), entry(50.0, 2, 5.0)]
    assert percents_by_window(same, [60.0]) == {60: 25.0}


def test_a_constant_percent_keeps_every_window() -> None:
    starts = [float(s) for s in range(10, 100_000, 10)]
    got = percents_by_window([entry(0.0, 1, 10.0)], starts)
    assert got == {int(s): 10.0 for s in starts}
    assert percents_by_window([], starts) == {}


def test_closed_windows_are_the_ones_every_process_has_added_to() -> None:
    ws = [window((1, 0), (1, 0), start=float(s)) for s in (0, 10, 20)]
    assert [w.start for w in closed(ws, 22.5)] == [0.0, 10.0]  # 10 + 10 + 2.5 <= 22.5
    assert [w.start for w in closed(ws, 22.4)] == [0.0]
    assert [w.start for w in closed(ws, 30.0, grace=0)] == [0.0, 10.0, 20.0]
    assert closed(ws, 0.0) == []


# -- what it will do next -------------------------------------------------------------------


def test_outlook_of_each_state() -> None:
    def say(state: RolloutState, verdict: Verdict | None = PASS, n: int = 500, now: float = T0 + 600) -> str:
        return outlook(GUARD, state, verdict, n, now)

    assert say(fresh()) == "not guarded yet: the guard starts when a process running it looks"
    assert say(guarded(5.0, paused=True, held=True)) == "nothing until an operator resumes (canarymw resume)"
    assert say(guarded(100.0, stage="done")) == "nothing: the ramp is done"
    assert say(guarded(0.0, stage="rolled-back", held=True)) == (
        "nothing: rolled back; canarymw resume starts a new attempt from the first step"
    )
    assert say(guarded(5.0), None) == "judge at its next look (every 5 s)"
    assert say(guarded(5.0), ROLLBACK) == "roll back to 0% and pause at its next look"
    assert say(guarded(5.0), PAUSE) == "pause at its next look (sample-ratio mismatch)"
    assert say(guarded(5.0)) == "advance to 25% at its next look"
    assert say(guarded(100.0)) == "finish at its next look"
    assert say(guarded(5.0), WAIT, 100, T0 + 300) == (
        "advance to 25% in 5 min (bake time), after 400 more canary requests, once the analysis can "
        "decide, unless harm is found; deadline in 55 min (hold)"
    )
    assert say(guarded(5.0), PASS, 500, T0 + 510) == (
        "advance to 25% in 90 s (bake time), unless harm is found; deadline in 51 min (hold)"
    )
    slow = Guard(bake=600, min_requests=500)  # the default day-long deadline
    state, _ = start(slow, NAME, fresh(), T0)
    assert outlook(slow, state, PASS, 1, T0 + 700) == (
        "advance to 5% after 499 more canary requests, unless harm is found; deadline in 23.8 h (hold)"
    )
    assert outlook(SHIP, guarded(5.0, guard=SHIP), WAIT, 0, T0 + 600).endswith("deadline in 50 min (ship)")


# -- the guard's settings -------------------------------------------------------------------


def sentence(kw: dict[str, Any], error: type[Exception]) -> str:
    """The message of the error ``Guard(**kw)`` raises: one sentence naming the argument."""
    with pytest.raises(error, match=r"^Guard got .*\.$") as info:
        Guard(**kw)
    return str(info.value)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"steps": (5, 1, 100)}, "increasing percents above 0 ending with 100"),
        ({"steps": (1, 1, 100)}, "increasing"),
        ({"steps": (1, 5, 50)}, "ending with 100"),
        ({"steps": (0, 50, 100)}, "above 0"),
        ({"steps": (50, 150)}, "steps=(50.0, 150.0)"),
        ({"steps": (-5, 100)}, "above 0"),
        ({"steps": (math.nan, 100)}, "steps=(nan, 100.0)"),
        ({"steps": ()}, "steps=()"),
        ({"steps": ("a", 100)}, "steps=('a', 100)"),
        ({"steps": None}, "steps=None"),
        ({"bake": -1}, "bake=-1; use a number of seconds of at least 0"),
        ({"bake": math.nan}, "bake=nan"),
        ({"bake": math.inf}, "bake=inf"),
        ({"bake": True}, "bake=True"),
        ({"deadline": -1}, "deadline=-1"),
        ({"deadline": math.nan}, "deadline=nan"),
        ({"interval": -1}, "interval=-1"),
        ({"interval": math.nan}, "interval=nan"),
        ({"interval": 0.01}, "interval=0.01; use at least 0.05 seconds"),
        ({"deadline": 600, "bake": 600}, "the deadline must come after the bake time"),
        ({"deadline": 60, "bake": 600}, "deadline=60 with bake=600"),
        ({"min_requests": -1}, "min_requests=-1"),
        ({"min_requests": 1.5}, "min_requests=1.5"),
        ({"min_requests": False}, "min_requests=False"),
        ({"lease": 5.0}, "lease=5.0; use more seconds than interval (5.0)"),
        ({"lease": 1, "interval": 2}, "lease=1"),
        ({"lease": math.nan}, "lease=nan"),
        ({"lease": True}, "lease=True"),
        ({"on_deadline": "ship-it"}, "on_deadline='ship-it'; use 'hold' or 'ship'"),
        ({"on_deadline": None}, "on_deadline=None"),
    ],
)
def test_invalid_guard_arguments_raise_a_value_error_sentence(kw: dict[str, Any], needle: str) -> None:
    assert needle in sentence(kw, ValueError)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"on_verdict": 3}, "on_verdict=3; pass a callable or None"),
        ({"analysis": {"alpha": 0.1}}, "analysis="),
    ],
)
def test_invalid_guard_objects_raise_a_type_error_sentence(kw: dict[str, Any], needle: str) -> None:
    assert needle in sentence(kw, TypeError)


def test_valid_guard_arguments() -> None:
    def hook(name: str, verdict: Verdict, change: Change | None) -> None:
        pass

    g = Guard(steps=[2, 100], bake=0, min_requests=0, deadline=0.5, interval=0.05, on_verdict=hook)
    assert (g.steps, g.bake, g.min_requests, g.deadline, g.interval) == ((2.0, 100.0), 0.0, 0, 0.5, 0.05)
    assert g.lease == pytest.approx(0.15)  # three intervals by default
    assert g.on_verdict is hook and isinstance(g.analysis, Analysis)
    assert (g.next_step(0), g.next_step(2), g.next_step(50), g.next_step(100)) == (2.0, 100.0, 100.0, None)
    assert repr(GUARD) == "Guard(steps=(1.0, 5.0, 25.0, 50.0, 100.0), bake=600, min_requests=500)"


CUSTOM = Guard(
    steps=(5, 20, 100),
    bake=30,
    min_requests=0,
    deadline=60.5,
    on_deadline="ship",
    interval=1,
    analysis=Analysis(
        alpha=0.01,
        min_requests=7,
        latency_objective=0.3,
        latency_weight=0.3,
        ratio_alpha=0.002,
        tail_ratio=1.5,
        harm_ratios=((1.2, 1), (3, 3)),
    ),
)


@pytest.mark.parametrize("guard", [Guard(), GUARD, SHIP, CUSTOM])
def test_settings_round_trip_through_json(guard: Guard) -> None:
    settings = guard.settings()
    loaded = json.loads(json.dumps(settings))
    assert loaded == settings
    again = Guard.from_settings(loaded)
    assert again.settings() == settings
    assert again.analysis.latency_objective == guard.analysis.latency_objective
    assert again.analysis.harm_ratios == guard.analysis.harm_ratios
    # So the controller of a rollout stored with these settings sees no change.
    state, _ = start(guard, NAME, fresh(), T0)
    stored = RolloutState.from_json(state.to_json())
    assert plan(again, NAME, stored, None, 0, T0 + 1) is None


def test_settings_hold_what_a_reader_needs() -> None:
    s = CUSTOM.settings()
    assert s == {
        "steps": [5.0, 20.0, 100.0],
        "bake": 30.0,
        "min_requests": 0,
        "deadline": 60.5,
        "on_deadline": "ship",
        "interval": 1.0,
        "alpha": 0.01,
        "decision_requests": 7,
        "latency_objective": CUSTOM.analysis.latency_objective,
        "latency_weight": 0.3,
        "ratio_alpha": 0.002,
        "tail_ratio": 1.5,
        "harm_ratios": [[1.2, 1.0], [3.0, 3.0]],  # as given: the proportions are what weighs
    }
    assert Guard.from_settings({}).settings() == Guard().settings()  # defaults for what is missing


def test_settings_round_trip_with_any_weights() -> None:
    guard = Guard(analysis=Analysis(harm_ratios=[(2, 0.1), (3, 0.2), (4, 0.3)]))
    settings = json.loads(json.dumps(guard.settings()))
    assert Guard.from_settings(settings).settings() == settings
