"""What a process can report of its guarded rollouts (for metrics exporters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from ._analysis import Decision, Verdict

if TYPE_CHECKING:
    from .._rollout import Rollout

STAGES = ("ramping", "paused", "rolled-back", "done")
"""The stages of a guarded rollout (``RolloutState.stage``)."""
DECISIONS: tuple[str, ...] = get_args(Decision)
"""The decisions of a :class:`Verdict`."""


def reading(rollout: Rollout) -> tuple[str | None, Verdict | None]:
    """What this process knows of a guarded rollout: its stage, and its last verdict.

    The stage is the one of the last state this process applied from the store (every
    process following the store knows it; None before the guard started). The verdict
    is the last one of this process's controller while it holds the lease (only that
    process judges); None in every other process.
    """
    state = rollout._store_state
    controller = rollout.controller
    verdict = None
    if controller is not None and controller.token is not None:
        verdict = controller.last
    return (None if state is None else state.stage), verdict
