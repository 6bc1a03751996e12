"""Guarded rollouts: judge canary against baseline, ramp, promote and roll back by itself.

::

    from canarymw import Rollout
    from canarymw.guard import Analysis, Guard

    rollout = Rollout(
        "checkout-v2", percent=0, secret_key=KEY, store="redis://127.0.0.1:6379/0",
        guard=Guard(steps=(1, 5, 25, 50, 100), bake=600, min_requests=500,
                    analysis=Analysis(alpha=0.05, latency_objective=0.5)),
    )

:class:`Analysis` is sans-IO: fed per-window counts of both variants (:class:`Window`),
it returns a :class:`Verdict` (rollback, pause, pass or wait) with its numbers and one
sentence. The tests are anytime-valid: looking every second does not raise the chance
of a false rollback above ``alpha``. :class:`Guard` adds the schedule; :func:`plan` is
that schedule as a pure function; one process at a time (a lease in the store) runs it.
See docs/guard.md for the statistics, the schedule and the simulations behind them.
"""

from __future__ import annotations

from ._analysis import (
    HARM_RATIOS,
    Analysis,
    Decision,
    Evidence,
    RatioCheck,
    Test,
    Verdict,
    Window,
    windows_from_counts,
)
from ._controller import Assessment, assess
from ._readout import DECISIONS, STAGES
from ._schedule import Guard, outlook, plan, start

__all__ = [
    "DECISIONS",
    "HARM_RATIOS",
    "STAGES",
    "Analysis",
    "Assessment",
    "Decision",
    "Evidence",
    "Guard",
    "RatioCheck",
    "Test",
    "Verdict",
    "Window",
    "assess",
    "outlook",
    "plan",
    "start",
    "windows_from_counts",
]
