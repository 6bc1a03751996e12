"""The rules of change, as pure functions: seeding, deploys, operators' actions."""

from __future__ import annotations

import pytest

from canarymw.store import RolloutState, UnknownRollout, on_start, operate


def state(**kw: object) -> RolloutState:
    base: dict[str, object] = {"percent": 10.0, "version": 3, "code_percent": 10.0}
    base.update(kw)
    return RolloutState(**base)  # type: ignore[arg-type]


def test_the_code_percent_seeds_an_empty_store() -> None:
    made = on_start("r", None, 10, now=5.0)
    assert made is not None
    seeded, change = made
    assert (seeded.percent, seeded.version, seeded.code_percent, seeded.updated_by) == (10, 1, 10, "code")
    assert (change.action, change.percent_before, change.percent_after, change.at) == ("seed", None, 10, 5.0)


def test_the_same_code_percent_changes_nothing() -> None:
    # The store is the truth: an operator's 40% survives a restart with 10% in code.
    assert on_start("r", state(percent=40.0, updated_by="alice"), 10) is None


def test_a_deploy_with_another_code_percent_applies_it() -> None:
    made = on_start("r", state(percent=40.0), 25, now=9.0)
    assert made is not None
    new, change = made
    assert (new.percent, new.code_percent, new.version, new.updated_by) == (25, 25, 4, "deploy")
    assert change.action == "deploy" and change.percent_before == 40 and "from 10 to 25" in change.reason


@pytest.mark.parametrize(
    ("held", "why"),
    [({"paused": True, "held": True}, "paused"), ({"percent": 0.0, "held": True}, "rolled back")],
)
def test_a_deploy_after_a_pause_or_rollback_is_only_noted(held: dict[str, object], why: str) -> None:
    before = state(**held)
    made = on_start("r", before, 25, now=9.0)
    assert made is not None
    new, change = made
    assert new.percent == before.percent and new.paused == before.paused  # the operator's state stays
    assert new.code_percent == 25 and new.version == 4  # seen: the next start is quiet
    assert change.action == "deploy-held" and why in change.reason
    assert on_start("r", new, 25) is None


def test_operator_actions() -> None:
    s = state(percent=10.0)
    after, change = operate("r", s, "set", percent=25, by="alice", reason="fine", now=7.0)
    assert (after.percent, after.version, after.updated_by, after.reason, after.updated_at) == (
        25,
        4,
        "alice",
        "fine",
        7.0,
    )
    assert (change.percent_before, change.percent_after, change.by) == (10, 25, "alice")
    assert operate("r", s, "promote", by="a")[0].percent == 100
    rolled = operate("r", s, "rollback", by="a")[0]
    assert rolled.percent == 0 and rolled.held and not rolled.paused
    paused = operate("r", s, "pause", by="a")[0]
    assert paused.paused and paused.held and paused.percent == 10
    resumed = operate("r", paused, "resume", by="a")[0]
    assert not resumed.paused and not resumed.held
    assert not operate("r", rolled, "set", percent=5, by="a")[0].held  # a new percent ends the hold
    assert operate("r", rolled, "set", percent=5, by="a")[0].code_percent == 10  # code's view is kept


@pytest.mark.parametrize(
    ("action", "kw", "error", "match"),
    [
        ("set", {}, ValueError, "set needs a percent"),
        ("set", {"percent": 101}, ValueError, "out of range"),
        ("set", {"percent": float("nan")}, ValueError, "not a number"),
        ("set", {"percent": True}, ValueError, "not a number"),
        ("explode", {}, ValueError, "unknown action"),
        ("pause", {"by": ""}, ValueError, "say who"),
    ],
)
def test_operator_mistakes_are_sentences(action: str, kw: dict[str, object], error: type, match: str) -> None:
    kw.setdefault("by", "ops")
    with pytest.raises(error, match=match):
        operate("r", state(), action, **kw)  # type: ignore[arg-type]


def test_an_unknown_rollout_is_named() -> None:
    with pytest.raises(UnknownRollout, match="no rollout 'nope'"):
        operate("nope", None, "pause", by="ops")


def test_states_and_changes_round_trip_through_json() -> None:
    s = state(paused=True, stage="25%", verdict="ok")
    assert RolloutState.from_json(s.to_json()) == s
    change = operate("r", s, "resume", by="ops", reason="all clear")[1]
    assert type(change).from_json(change.to_json()) == change
    newer = s.to_json()[:-1] + ',"field_from_the_future":1}'
    assert RolloutState.from_json(newer) == s  # a newer writer's fields are ignored


def test_a_lost_rollout_is_restored_one_version_up() -> None:
    from canarymw.store._model import restore

    known = state(percent=40.0, version=7, paused=True, updated_by="alice")
    back, change = restore("r", known, now=50.0)
    assert (back.percent, back.paused, back.version, back.updated_by) == (40.0, True, 8, "canarymw")
    assert (change.action, change.version, change.percent_before, change.at) == ("restore", 8, None, 50.0)
    assert "lost" in change.reason
